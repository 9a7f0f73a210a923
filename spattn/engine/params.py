"""The engine's request and result types, and the checks that turn a bad request into a ``ValueError``
naming the field before any rank sees it."""
from __future__ import annotations

import dataclasses
import secrets
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .pipelines import ModelInfo

MAX_IMAGES_PER_PROMPT = 10
MAX_SEED = 2 ** 63 - 1


class EngineDeadError(RuntimeError):
    """A rank died (or the engine was closed): this and every later request fails; ``rank`` names it."""

    def __init__(self, message: str, rank: Optional[int] = None):
        super().__init__(message)
        self.rank = rank


class EngineBusyError(RuntimeError):
    """The queue is full (``max_queue``); retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestCancelled(RuntimeError):
    """The request was cancelled (``Request.cancel()``) before it finished."""


class RequestFailed(RuntimeError):
    """The request raised on a rank; the message is the rank's. The engine serves later requests."""


@dataclasses.dataclass
class SamplingParams:
    """How to sample one prompt. ``None`` means the model's default (or, for ``seed``, a random seed,
    reported in ``GenerationOutput.seed``). Fields a model does not take (``true_cfg_scale`` on Wan,
    ``num_frames``/``fps`` on an image model) are an error naming the field."""

    width: int = 512
    height: int = 512
    num_inference_steps: int = 20
    seed: Optional[int] = None
    negative_prompt: Optional[str] = None
    guidance_scale: Optional[float] = None
    true_cfg_scale: Optional[float] = None
    num_images_per_prompt: int = 1
    num_frames: Optional[int] = None    # video models: 4k+1 frames (Wan; default 81)
    fps: Optional[int] = None           # video models: frames per second of the MP4 (default 16)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "SamplingParams":
        """``SamplingParams(**fields)``, but an unknown field is a ``ValueError`` naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown sampling field; known fields: {', '.join(sorted(known))}")
        return cls(**dict(fields))


@dataclasses.dataclass
class GenerationOutput:
    """One request's result (from rank 0).

    ``images``: PIL images (``num_images_per_prompt`` of them) for image models, else empty.
    ``video``: the frames (PIL) for video models, else None; ``fps`` its frame rate.
    ``array``: the pipeline's float output in [0, 1]: ``(n, H, W, 3)`` images or ``(F, H, W, 3)`` frames.
    ``metrics``: ``queue_s`` (submitted -> started), ``exec_s`` (the pipeline call, batch included),
    ``steps``, ``peak_memory_bytes`` (rank 0: CUDA peak allocated this request; on CPU the process peak
    RSS), ``batch_size`` (requests run together), ``cfg_degree`` (the engine's), ``cfg_parallel`` (the
    two guidance branches ran at once), ``idle_fraction`` (share of the ranks that did no useful work:
    0.5 for a request without guidance on a ``cfg_degree=2`` engine), ``vae_parallel`` (every rank decoded).
    """

    request_id: str
    prompt: str
    seed: int
    images: List[Any]
    video: Optional[List[Any]]
    array: Any
    fps: Optional[int]
    metrics: Dict[str, float]


def _int(name: str, value: Any, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}: {value} is out of range; use a value {bound}")
    return value


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        raise ValueError(f"{name}: expected a non-negative number, got {value!r}")
    return float(value)


def resolve_params(params: SamplingParams, info: ModelInfo) -> Dict[str, Any]:
    """Check ``params`` against the model; returns the resolved fields (the seed drawn if None).
    Raises ``ValueError`` naming the field and the fix."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling_params: expected SamplingParams or a dict, got {type(params).__name__}")
    cls, m = info.pipeline_class, info.spatial_multiple
    out = dataclasses.asdict(params)
    for name in ("width", "height"):
        v = _int(name, out[name], 1)
        if v % m:
            lo, hi = v // m * m, (v // m + 1) * m
            raise ValueError(f"{name}: {v} is not a multiple of {m} ({cls}: VAE factor x 2x2 patches); "
                             f"use {f'{lo} or {hi}' if lo else hi}")
    _int("num_inference_steps", out["num_inference_steps"], 1, 10_000)
    _int("num_images_per_prompt", out["num_images_per_prompt"], 1, MAX_IMAGES_PER_PROMPT)
    if out["seed"] is None:
        out["seed"] = secrets.randbelow(2 ** 31)
    _int("seed", out["seed"], 0, MAX_SEED - MAX_IMAGES_PER_PROMPT)
    if out["negative_prompt"] is not None and not isinstance(out["negative_prompt"], str):
        raise ValueError(f"negative_prompt: expected a string, got {type(out['negative_prompt']).__name__}")
    for name in ("guidance_scale", "true_cfg_scale"):
        if out[name] is not None:
            if name not in info.call_params:
                raise ValueError(f"{name}: {cls} does not take it; drop the field")
            out[name] = _float(name, out[name])
    if info.is_video:
        if out["num_images_per_prompt"] != 1:
            raise ValueError(f"num_images_per_prompt: {cls} makes one video per request; send one request per video")
        frames = 81 if out["num_frames"] is None else _int("num_frames", out["num_frames"], 1, 1025)
        k = info.frame_multiple
        if (frames - 1) % k:
            lo = (frames - 1) // k * k + 1
            raise ValueError(f"num_frames: {frames} is not {k}k+1 ({cls}'s VAE compresses time by {k}); "
                             f"use {lo} or {lo + k}")
        out["num_frames"] = frames
        out["fps"] = 16 if out["fps"] is None else _int("fps", out["fps"], 1, 240)
    else:
        for name in ("num_frames", "fps"):
            if out[name] is not None:
                raise ValueError(f"{name}: {cls} makes images, not video; drop the field (or use a video model)")
    return out


def batch_key(resolved: Mapping[str, Any]) -> Tuple:
    """Requests with equal keys can share one pipeline call (prompts and seeds may differ)."""
    return (resolved["width"], resolved["height"], resolved["num_inference_steps"], resolved["guidance_scale"],
            resolved["true_cfg_scale"], resolved["num_images_per_prompt"], resolved["num_frames"],
            resolved["negative_prompt"] is None)
