"""spattn for diffusers pipelines: the parallel transformer (``parallelize``), and beside it the
parts of the pipeline around attention (CFG parallel, the patch-parallel VAE) as they land.

    handle = parallelize(pipe.transformer, mesh)   # see .transformer for the full story
    handle = parallelize_pipeline(pipe, mesh)      # every transformer of a pipeline, CFG parallel included (.cfg)
"""
from .transformer import PLANS, ModelPlan, SPHandle, Split, _Processor, _State, parallelize, supported_models
from .cfg import CFG_RULES, PipelineHandle, RunInfo, parallelize_pipeline

__all__ = ["parallelize", "SPHandle", "ModelPlan", "Split", "PLANS", "supported_models",
           "parallelize_pipeline", "PipelineHandle", "RunInfo", "CFG_RULES"]
