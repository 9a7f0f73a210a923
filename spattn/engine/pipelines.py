"""Which diffusers pipeline a model name means, what its ``__call__`` takes, and loading it on a device.

Shared by ``spattn.Engine`` and ``spattn generate`` (the CLI imports this, never the reverse). A model
is a built-in tiny pipeline name, a local ``save_pretrained`` directory or a cached hub id (nothing is
downloaded). Errors are ``ValueError`` naming the fix.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import FrozenSet, Optional

IMAGE_PIPELINES = ("QwenImagePipeline", "FluxPipeline")
VIDEO_PIPELINES = ("WanPipeline",)
SUPPORTED_PIPELINES = IMAGE_PIPELINES + VIDEO_PIPELINES


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the engine needs to know about a model before loading it (picklable)."""

    path: str                      # a tiny name or a pipeline directory
    label: str                     # what the user passed
    pipeline_class: str
    spatial_multiple: int          # width and height must be multiples of this
    frame_multiple: Optional[int]  # video: num_frames = k * frame_multiple + 1; None for images
    call_params: FrozenSet[str]    # the pipeline's __call__ parameters

    @property
    def is_video(self) -> bool:
        return self.frame_multiple is not None


def _tiny():
    # Imported lazily: the tiny pipelines import torch (and diffusers when built).
    from spattn.integrations.diffusers import tiny

    return tiny


def _call_params(cls_name: str) -> FrozenSet[str]:
    import diffusers

    return frozenset(inspect.signature(getattr(diffusers, cls_name).__call__).parameters) - {"self"}


def cached_hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of ``repo_id`` in the Hugging Face cache; nothing is downloaded."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), bad id, or no huggingface_hub
        raise ValueError(f"--model {repo_id}: not in the local Hugging Face cache (spattn downloads nothing); "
                         f"run `huggingface-cli download {repo_id}` first or pass a local directory") from None


def resolve_model(model: str) -> ModelInfo:
    """The ``ModelInfo`` of ``model``; ``ValueError`` naming the fix when it is not a supported pipeline."""
    tiny = _tiny()
    names = ", ".join(tiny.TINY_MODELS)
    if model in tiny.TINY_MODELS:
        cls = tiny.TINY_PIPELINE_CLASS[model]
        frames = 4 if cls in VIDEO_PIPELINES else None
        return ModelInfo(model, model, cls, tiny.TINY_SPATIAL_MULTIPLE, frames, _call_params(cls))
    path = Path(model).expanduser()
    if not path.exists():
        if model.count("/") == 1 and not model.startswith((".", "/", "~")):
            path = cached_hub_snapshot(model)
        else:
            raise ValueError(f"--model {model}: no such directory; pass a diffusers pipeline directory, a "
                             f"cached hub id, or {' / '.join(tiny.TINY_MODELS)}")
    index = path / "model_index.json"
    if not index.is_file():
        raise ValueError(f"--model {model}: {path} has no model_index.json; pass the directory that "
                         f"save_pretrained wrote (or one of {names})")
    try:
        cls = json.loads(index.read_text())["_class_name"]
        vae_cfg = json.loads((path / "vae" / "config.json").read_text())
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--model {model}: unreadable pipeline files ({e}); re-save it with save_pretrained") from None
    if cls not in SUPPORTED_PIPELINES:
        raise ValueError(f"--model {model}: {cls} is not supported; use a {' or '.join(SUPPORTED_PIPELINES)} "
                         f"directory (or one of {names})")
    # The pipelines' own rule: latents are packed in 2x2 patches, so sizes are multiples of 2 x VAE factor.
    frames = None
    if cls in ("QwenImagePipeline", "WanPipeline"):
        downsample = vae_cfg.get("temperal_downsample", [False, True, True])
        factor = 2 ** len(downsample)
        if cls == "WanPipeline":
            frames = 2 ** sum(bool(d) for d in downsample)
    else:
        factor = 2 ** (len(vae_cfg.get("block_out_channels", [0, 0, 0, 0])) - 1)
    return ModelInfo(str(path), model, cls, 2 * factor, frames, _call_params(cls))


def load_pipeline(model: str, dtype: str, device):
    """The pipeline ``model`` (a tiny name or a resolved directory) in ``dtype`` ("float32", ...) on ``device``."""
    import torch

    tiny = _tiny()
    torch_dtype = getattr(torch, dtype)
    if model in tiny.TINY_MODELS:
        pipe = tiny.build_tiny_pipeline(model, dtype=torch_dtype)
    else:
        import diffusers
        from diffusers import DiffusionPipeline

        # diffusers 0.42 renamed torch_dtype to dtype (the old name warns).
        new = tuple(int(x) for x in diffusers.__version__.split(".")[:2]) >= (0, 42)
        pipe = DiffusionPipeline.from_pretrained(model, local_files_only=True,
                                                 **{"dtype" if new else "torch_dtype": torch_dtype})
    return pipe.to(device)


def quiet_libraries() -> None:
    """Library warnings about casting and optional extras would bury tables and server logs."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
