"""One attention call, validated once: ``Options`` (what the caller chose) -> ``AttnCall`` (frozen, checked).

``spattn.attention`` packs its keyword options into ``Options`` (hashable, tensors excluded) and the
op turns options + tensors into an ``AttnCall`` with ``build_call``: every local check, in one
function, before any collective. Every layer below (the cross-rank check, the plan cache, the
strategies) takes the ``AttnCall``; nothing re-reads the environment or the arguments.

Adding an option touches three places: (1) ``attention``'s signature and its ``Options(...)``
line, (2) a field of ``Options`` (+ its check in ``build_call``, + a field of ``AttnCall`` when it
is resolved there), (3) the code that uses it. ``check.signature`` reads ``AttnCall`` fields by
name, so an option that must agree across ranks adds one entry there too (``check.FIELDS``).
``window_size`` is the example: ``Options.window_size`` (as given), ``_check_window`` (checked and
normalized into ``AttnCall.window``), the plan (``parallel.blocks.BlockPlan.window``) and one field of
the cross-rank check.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Tuple

import torch

from . import config
from .backends import get_backend
from .layout import LAYOUTS, Geometry
from .mesh import SPMesh
from .ops import check_qkv

Tensor = torch.Tensor
Shape = Tuple[int, ...]

JOINT_STRATEGIES = ("front", "rear")
RING_IMPLS = ("auto", "p2p", "allgather")
# Backends with kernel limits (head_dim, dtypes): said before any collective, with the way out.
BACKEND_LIMITS = {"triton": (256, (torch.float16, torch.bfloat16, torch.float32))}

__all__ = ["Options", "AttnCall", "Inputs", "build_call", "JOINT_STRATEGIES", "RING_IMPLS"]


@dataclass(frozen=True)
class Options:
    """The keyword options of ``spattn.attention`` as given (None: the environment's default)."""

    causal: bool = False
    softmax_scale: Optional[float] = None
    return_lse: bool = False
    backend: str = "auto"
    seq_len: Optional[int] = None
    layout: str = "contiguous"
    joint_strategy: str = "front"
    ring_engine: Optional[str] = None
    ring_impl: str = "auto"
    ulysses_chunks: Optional[int] = None
    allgather_bytes: Optional[int] = None
    check: Optional[int] = None
    window_size: Tuple[int, int] = (-1, -1)  # sliding window (left, right), -1 = unbounded


class Inputs(NamedTuple):
    """The tensors of one call, as the op receives them (joint K/V already compacted by a mask)."""

    q: Tensor
    k: Tensor
    v: Tensor
    jq: Optional[Tensor] = None
    jk: Optional[Tensor] = None
    jv: Optional[Tensor] = None
    jlens: Optional[Tensor] = None       # int32 (batch,): real joint keys per batch element
    cu_seqlens: Optional[Tensor] = None  # packed documents' boundaries

    @property
    def joint(self) -> bool:
        return self.jq is not None


@dataclass(frozen=True)
class AttnCall:
    """Everything a layer below needs to know about one call, checked. Equal calls share a plan."""

    opts: Options
    q_shape: Shape
    k_shape: Shape
    v_shape: Shape
    dtype: torch.dtype
    device: torch.device
    geo: Geometry                       # global length, layout (balanced: its chunk assignment)
    scale: float
    ring_engine: str                    # resolved: "auto", "python" or "cpp"
    ulysses_chunks: int
    allgather_bytes: int
    check: int                          # 0 off, 1 signature, 2 + joint contents
    requires_grad: int                  # bit mask q, k, v, jq, jk, jv | grad mode << 6 (backward collectives)
    joint_q_shape: Optional[Shape] = None
    joint_kv_shape: Optional[Shape] = None  # after compaction by the mask
    joint_masked: bool = False          # per-batch joint key lengths (jlens) apply
    docs: Optional[Tuple[int, ...]] = None
    window: Tuple[int, int] = (-1, -1)  # normalized window_size ((-1, -1): none; causal: right = -1)
    mesh: SPMesh = field(default=None, compare=False, repr=False)   # the plan cache lives on it
    kernel: object = field(default=None, compare=False, repr=False)  # the resolved backend

    @property
    def joint(self) -> bool:
        return self.joint_q_shape is not None

    @property
    def seq_len(self) -> int:
        return self.geo.seq_len

    @property
    def layout(self) -> str:
        return self.geo.layout

    def plan_key(self) -> "AttnCall":
        """The key of this call's plan: the call itself (hashable; the few fields a plan ignores, like
        return_lse, only make a second entry, which costs less per call than building a narrower key)."""
        return self


def _err(msg: str) -> ValueError:
    return ValueError(f"spattn.attention: {msg}")


def _check_mesh_and_layout(x: Inputs, mesh, o: Options) -> Geometry:
    q, k = x.q, x.k
    if not isinstance(mesh, SPMesh):
        raise TypeError(f"spattn.attention: mesh must be an SPMesh (from spattn.init_mesh), got {type(mesh).__name__}")
    if o.layout not in LAYOUTS:
        raise _err(f"layout must be one of {LAYOUTS}, got {o.layout!r}")
    if q.shape[1] != k.shape[1]:
        raise _err(f"local q has {q.shape[1]} positions but k has {k.shape[1]}; "
                   f"q, k and v must be shards of the same sequence")
    backend = mesh.comm_backend
    if backend == "nccl" and q.device.type != "cuda":
        raise _err(f"the mesh communicates over NCCL but q is on {q.device}; "
                   f"move q, k, v to the GPU (q.cuda()) or build the mesh from gloo groups")
    if backend == "gloo" and q.device.type != "cpu":
        raise _err(f"the mesh communicates over gloo but q is on {q.device}; use CPU tensors or an NCCL process group")
    n, w = q.shape[1], mesh.world_size
    seq_len = o.seq_len
    if seq_len is None:
        seq_len = n * w
    elif not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise _err(f"seq_len must be a positive int, got {seq_len!r}")
    geo = Geometry(seq_len, w, o.layout)
    if geo.local_len != n:
        raise _err(f"local length {n} does not fit seq_len={seq_len} on {w} ranks with "
                   f"layout {o.layout!r}: each shard must have {geo.local_len} positions "
                   f"(use spattn.shard(x, mesh, seq_len=..., layout=...) to make them)")
    return geo


def check_joint(x: Inputs, o: Options) -> None:
    """Joint (text) tensors: all three or none, bidirectional only, shaped like q/k but for length."""
    js = (x.jq, x.jk, x.jv)
    if all(t is None for t in js):
        return
    if any(t is None for t in js):
        raise _err("pass all of joint_q, joint_k, joint_v, or none of them")
    if o.joint_strategy not in JOINT_STRATEGIES:
        raise _err(f"joint_strategy must be one of {JOINT_STRATEGIES}, got {o.joint_strategy!r}")
    if o.causal:
        raise _err("joint (text) tokens are for bidirectional MMDiT attention; causal=True with joint tensors "
                   "is not supported")
    q, k = x.q, x.k
    jq, jk, jv = js
    check_qkv(jq, jk, jv, "attention(joint)")
    if jq.dtype != q.dtype or jq.device != q.device:
        raise _err(f"joint tensors ({jq.dtype}, {jq.device}) must match q ({q.dtype}, {q.device})")
    # (joint_q vs joint_k text length is checked by attention() before a mask compacts the keys)
    if (jq.shape[0], jq.shape[2], jq.shape[3]) != (q.shape[0], q.shape[2], q.shape[3]) or \
            jk.shape[2:] != k.shape[2:] or jk.shape[0] != k.shape[0]:
        raise _err(f"joint_q {tuple(jq.shape)} / joint_k {tuple(jk.shape)} must match "
                   f"q {tuple(q.shape)} / k {tuple(k.shape)} in batch, heads and head_dim "
                   f"(they are (batch, text_len, heads, head_dim), full on every rank)")


def check_joint_mask(joint_mask, joint: bool, q: Tensor, text_len: int) -> None:
    """joint_mask must be bool (batch, text_len) on q's device, and only comes with joint tensors."""
    if joint_mask is None:
        return
    if not joint:
        raise _err("joint_mask masks joint (text) keys; pass joint_q, joint_k and joint_v with it, or drop joint_mask")
    if not isinstance(joint_mask, torch.Tensor):
        raise TypeError(f"spattn.attention: joint_mask must be a bool torch.Tensor (batch, text_len), "
                        f"got {type(joint_mask).__name__}")
    if joint_mask.dtype != torch.bool:
        raise _err(f"joint_mask must be bool (True = real token), got {joint_mask.dtype}; "
                   f"convert it with joint_mask.bool() (or mask > 0)")
    want = (q.shape[0], text_len)
    if tuple(joint_mask.shape) != want:
        raise _err(f"joint_mask has shape {tuple(joint_mask.shape)} but must be "
                   f"(batch, text_len) = {want}, one row per batch element of joint_q")
    if joint_mask.device != q.device:
        raise _err(f"joint_mask is on {joint_mask.device} but q is on {q.device}; move it with joint_mask.to(q.device)")


def _check_varlen(x: Inputs, o: Options, geo: Geometry) -> Optional[Tuple[int, ...]]:
    """Validate cu_seqlens (and ring_impl) locally; return the document boundaries as a tuple of
    ints (read once on the host: the plan is built from them), or None."""
    if o.ring_impl not in RING_IMPLS:
        raise _err(f"ring_impl must be one of {RING_IMPLS}, got {o.ring_impl!r}")
    cu = x.cu_seqlens
    if cu is None:
        return None
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"spattn.attention: cu_seqlens must be an int32/int64 torch.Tensor of document "
                        f"boundaries, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1 or cu.numel() < 2:
        raise _err(f"cu_seqlens must be a 1-D int32/int64 tensor [0, b_1, ..., seq_len] "
                   f"with at least 2 entries, got dtype {cu.dtype}, shape {tuple(cu.shape)}")
    if x.joint:
        raise _err("cu_seqlens (packed documents) cannot be combined with joint (text) tensors; pass one or the other")
    if x.q.shape[0] != 1:
        raise _err(f"cu_seqlens needs packed batch 1 (all documents in one sequence), "
                   f"got batch {x.q.shape[0]}; concatenate the batch along the sequence instead")
    b = tuple(int(v) for v in cu.tolist())
    if b[0] != 0 or b[-1] != geo.seq_len:
        raise _err(f"cu_seqlens must start at 0 and end at the global (unpadded) "
                   f"sequence length {geo.seq_len}, got {b[0]} ... {b[-1]}")
    if any(u >= w for u, w in zip(b, b[1:])):
        raise _err("cu_seqlens must be strictly increasing (no empty documents); "
                   "drop repeated boundaries, e.g. with torch.unique_consecutive(cu_seqlens)")
    return b


def _check_scale_and_backend(x: Inputs, o: Options):
    """Checks that need the resolved backend and scale (local; before any collective)."""
    q = x.q
    be = get_backend(o.backend, q.device)
    if q.shape[0] == 0:
        raise _err("empty batch (q.shape[0] == 0); skip the call on every rank instead")
    if o.softmax_scale is not None:
        try:
            scale = float(o.softmax_scale)
        except (TypeError, ValueError):
            raise TypeError(f"spattn.attention: softmax_scale must be a number, got {o.softmax_scale!r}") from None
        if not math.isfinite(scale):
            raise _err(f"softmax_scale must be finite, got {o.softmax_scale!r}")
    else:
        scale = q.shape[-1] ** -0.5
    limit = BACKEND_LIMITS.get(getattr(be, "name", ""))
    if limit is not None:
        max_d, dtypes = limit
        if q.shape[-1] > max_d or q.dtype not in dtypes:
            raise _err(f"backend {be.name!r} takes head_dim <= {max_d} and dtypes "
                       f"{[str(d) for d in dtypes]}, got head_dim {q.shape[-1]} and {q.dtype}; use "
                       f"backend='torch' (any head_dim, any float dtype)")
    if x.joint and x.jq.shape[1] == 0:
        raise _err("joint tensors have text_len 0; pass joint_q=joint_k=joint_v=None for no text tokens")
    return be, scale


def _check_window(o: Options, be) -> Tuple[int, int]:
    """window_size checked and normalized: (-1, -1) when it restricts nothing; under causal the right
    side restricts nothing either (keys after the query are masked anyway), so it becomes -1."""
    w = o.window_size
    if not (isinstance(w, tuple) and len(w) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in w)
            and min(w) >= -1):
        raise _err(f"window_size must be a pair of ints (left, right), each >= 0 or -1 for unbounded "
                   f"(flash-attn's convention: key j is seen by query i iff -right <= i - j <= left), got {w!r}")
    if o.causal:
        w = (w[0], -1)
    if w == (-1, -1):
        return w
    if not getattr(be, "supports_window", False):
        raise _err(f"backend {getattr(be, 'name', be)!r} takes no sliding window; use backend='torch', 'triton' or "
                   f"'reference' with window_size")
    return w


def _resolved_knobs(o: Options, mesh: SPMesh) -> Tuple[int, int, int]:
    """(ulysses_chunks, allgather_bytes, check): the argument, else the mesh's, else the environment's."""
    env = config.settings()
    chunks = env.ulysses_chunks if o.ulysses_chunks is None else \
        config.positive_int_of(o.ulysses_chunks, "attention(ulysses_chunks=...)")
    budget = env.allgather_bytes if o.allgather_bytes is None else \
        config.positive_int_of(o.allgather_bytes, "attention(allgather_bytes=...)")
    if o.check is not None:
        mode = config.check_mode_of(o.check, "attention(check=...)")
    else:
        mode = mesh.check_mode
    return chunks, budget, mode


def grad_bits(x: Inputs) -> int:
    """requires_grad of q, k, v, jq, jk, jv as bits 0-5, grad mode as bit 6 (what backward will exchange)."""
    grad = torch.is_grad_enabled()
    ts = (x.q, x.k, x.v, x.jq, x.jk, x.jv)
    return sum(1 << i for i, t in enumerate(ts) if t is not None and t.requires_grad and grad) | (int(grad) << 6)


def build_call(x: Inputs, mesh: SPMesh, o: Options, grad_mask: Optional[int] = None) -> AttnCall:
    """Every local check of one call, in the order a user meets them, then the frozen ``AttnCall``.
    Runs before any collective, so a bad call raises a clear error on its own rank instead of hanging.
    ``grad_mask``: the caller's requires_grad bits (q, k, v, jq, jk, jv | grad mode << 6) when ``x``
    was detached on the way in (the op runs below autograd); default: read from ``x``."""
    check_qkv(x.q, x.k, x.v, "attention")
    geo = _check_mesh_and_layout(x, mesh, o)
    check_joint(x, o)
    if x.jlens is not None and (not x.joint or x.jlens.dtype != torch.int32 or tuple(x.jlens.shape) != (x.q.shape[0],)):
        raise _err("joint key lengths must be int32 (batch,) and come with joint tensors")
    docs = _check_varlen(x, o, geo)
    be, scale = _check_scale_and_backend(x, o)
    window = _check_window(o, be)
    chunks, budget, mode = _resolved_knobs(o, mesh)
    engine = o.ring_engine or config.settings().ring_engine
    if o.layout == "balanced":  # the chunk assignment depends on the documents and the mesh shape
        geo = Geometry(geo.seq_len, geo.world_size, o.layout, mesh.ulysses_degree, docs)
    rg = grad_bits(x) if grad_mask is None else grad_mask
    return AttnCall(
        opts=o, q_shape=tuple(x.q.shape), k_shape=tuple(x.k.shape), v_shape=tuple(x.v.shape), dtype=x.q.dtype,
        device=x.q.device, geo=geo, scale=scale, ring_engine=engine, ulysses_chunks=chunks,
        allgather_bytes=budget, check=mode, requires_grad=rg,
        joint_q_shape=tuple(x.jq.shape) if x.joint else None, joint_kv_shape=tuple(x.jk.shape) if x.joint else None,
        joint_masked=x.jlens is not None, docs=docs, window=window, mesh=mesh, kernel=be)
