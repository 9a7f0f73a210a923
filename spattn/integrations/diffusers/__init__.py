"""spattn for diffusers pipelines: the parallel transformer (``parallelize``), and beside it the
parts of the pipeline around attention (CFG parallel, the patch-parallel VAE) as they land.

    handle = parallelize(pipe.transformer, mesh)   # see .transformer for the full story
"""
from .transformer import PLANS, ModelPlan, SPHandle, Split, _Processor, _State, parallelize, supported_models

__all__ = ["parallelize", "SPHandle", "ModelPlan", "Split", "PLANS", "supported_models"]

# CFG parallel (issue 18): handle = parallelize_pipeline(pipe, mesh) parallelizes every transformer of a
# pipeline and, on a cfg_degree=2 mesh, runs the two guidance branches at once; see .cfg
from .cfg import CFG_RULES, PipelineHandle, RunInfo, parallelize_pipeline  # noqa: E402

__all__ += ["parallelize_pipeline", "PipelineHandle", "RunInfo", "CFG_RULES"]
# The patch-parallel VAE decode (issue 18): vae_handle = parallelize_vae(pipe.vae, mesh); see .vae
from .vae import VAE_PLANS, ConvInputMeter, VAEHandle, VAEPlan, parallelize_vae, vae_supported  # noqa: E402

__all__ += ["parallelize_vae", "VAEHandle", "VAEPlan", "VAE_PLANS", "vae_supported", "ConvInputMeter"]
