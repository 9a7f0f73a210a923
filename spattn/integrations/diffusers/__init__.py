"""spattn for diffusers pipelines: the parallel transformer (``parallelize``), and beside it the
parts of the pipeline around attention (CFG parallel, the patch-parallel VAE) as they land.

    handle = parallelize(pipe.transformer, mesh)   # see .transformer for the full story
"""
from .transformer import PLANS, ModelPlan, SPHandle, Split, _Processor, _State, parallelize, supported_models

__all__ = ["parallelize", "SPHandle", "ModelPlan", "Split", "PLANS", "supported_models"]
