"""The public sequence-parallel attention: Ulysses (all-to-all over heads) around Ring (P2P over the
sequence). Every mode is this one composition: Ulysses-only is a ring of one, Ring-only skips the
all-to-all, a mesh of one is plain attention.

    seq-sharded q/k/v (B, s, H, D) --all-to-all--> head-sharded (B, U*s, h, D)
        --ring over the ring group--> (B, U*s, h, D) --all-to-all back--> (B, s, H, D)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import check
from .backends import get_backend
from .comm import A2ASpec, count_bytes, default_ring_engine, start_head_to_seq, start_seq_to_head
from .layout import LAYOUTS, Geometry
from .mesh import SPMesh
from .ops import check_qkv
from .ring import RingSetup, choose_ring_impl, ring_backward, ring_forward
from .ulysses import HeadMapBackend, head_plan, pipeline_plans

Tensor = torch.Tensor
JOINT_STRATEGIES = ("front", "rear")


def _validate(q, k, v, mesh, causal, seq_len, layout, joint, joint_strategy) -> Geometry:
    """Every check that can fail is local and runs before the first collective."""
    check_qkv(q, k, v, "attention")
    if not isinstance(mesh, SPMesh):
        raise TypeError(f"spattn.attention: mesh must be an SPMesh (from spattn.init_mesh), got {type(mesh).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"spattn.attention: layout must be one of {LAYOUTS}, got {layout!r}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"spattn.attention: local q has {q.shape[1]} positions but k has {k.shape[1]}; "
                         f"q, k and v must be shards of the same sequence")
    backend = mesh.comm_backend
    if backend == "nccl" and q.device.type != "cuda":
        raise ValueError(f"spattn.attention: the mesh communicates over NCCL but q is on {q.device}; "
                         f"move q, k, v to the GPU (q.cuda()) or build the mesh from gloo groups")
    if backend == "gloo" and q.device.type != "cpu":
        raise ValueError(f"spattn.attention: the mesh communicates over gloo but q is on {q.device}; "
                         f"use CPU tensors or an NCCL process group")
    n, w = q.shape[1], mesh.world_size
    if seq_len is None:
        seq_len = n * w
    elif not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"spattn.attention: seq_len must be a positive int, got {seq_len!r}")
    geo = Geometry(seq_len, w, layout)
    if geo.local_len != n:
        raise ValueError(f"spattn.attention: local length {n} does not fit seq_len={seq_len} on {w} ranks with "
                         f"layout {layout!r}: each shard must have {geo.local_len} positions "
                         f"(use spattn.shard(x, mesh, seq_len=..., layout=...) to make them)")
    if joint is not None:
        jq, jk, jv = joint
        if any(t is None for t in joint):
            raise ValueError("spattn.attention: pass all of joint_q, joint_k, joint_v, or none of them")
        if joint_strategy not in JOINT_STRATEGIES:
            raise ValueError(f"spattn.attention: joint_strategy must be one of {JOINT_STRATEGIES}, got {joint_strategy!r}")
        if causal:
            raise ValueError("spattn.attention: joint (text) tokens are for bidirectional MMDiT attention; "
                             "causal=True with joint tensors is not supported")
        check_qkv(jq, jk, jv, "attention(joint)")
        if jq.dtype != q.dtype or jq.device != q.device:
            raise ValueError(f"spattn.attention: joint tensors ({jq.dtype}, {jq.device}) must match q "
                             f"({q.dtype}, {q.device})")
        if jq.shape[1] != jk.shape[1]:
            raise ValueError("spattn.attention: joint_q and joint_k must have the same text length")
        if (jq.shape[0], jq.shape[2], jq.shape[3]) != (q.shape[0], q.shape[2], q.shape[3]) or \
                jk.shape[2:] != k.shape[2:] or jk.shape[0] != k.shape[0]:
            raise ValueError(f"spattn.attention: joint_q {tuple(jq.shape)} / joint_k {tuple(jk.shape)} must match "
                             f"q {tuple(q.shape)} / k {tuple(k.shape)} in batch, heads and head_dim "
                             f"(they are (batch, text_len, heads, head_dim), full on every rank)")
    return geo


def _check_joint_mask(joint_mask, joint, q: Tensor) -> None:
    """joint_mask must be bool (batch, text_len) on q's device, and only comes with joint tensors."""
    if joint_mask is None:
        return
    if joint is None:
        raise ValueError("spattn.attention: joint_mask masks joint (text) keys; pass joint_q, joint_k and "
                         "joint_v with it, or drop joint_mask")
    if not isinstance(joint_mask, torch.Tensor):
        raise TypeError(f"spattn.attention: joint_mask must be a bool torch.Tensor (batch, text_len), "
                        f"got {type(joint_mask).__name__}")
    if joint_mask.dtype != torch.bool:
        raise ValueError(f"spattn.attention: joint_mask must be bool (True = real token), got {joint_mask.dtype}; "
                         f"convert it with joint_mask.bool() (or mask > 0)")
    want = (q.shape[0], joint[0].shape[1])
    if tuple(joint_mask.shape) != want:
        raise ValueError(f"spattn.attention: joint_mask has shape {tuple(joint_mask.shape)} but must be "
                         f"(batch, text_len) = {want}, one row per batch element of joint_q")
    if joint_mask.device != q.device:
        raise ValueError(f"spattn.attention: joint_mask is on {joint_mask.device} but q is on {q.device}; "
                         f"move it with joint_mask.to(q.device)")


RING_IMPLS = ("auto", "p2p", "allgather")


def _check_varlen(cu_seqlens, ring_impl, joint, q: Tensor, geo: Geometry) -> Optional[Tuple[int, ...]]:
    """Validate cu_seqlens (and ring_impl) locally; return the document boundaries as a tuple of
    ints (read once on the host: the plan is built from them), or None."""
    if ring_impl not in RING_IMPLS:
        raise ValueError(f"spattn.attention: ring_impl must be one of {RING_IMPLS}, got {ring_impl!r}")
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"spattn.attention: cu_seqlens must be an int32/int64 torch.Tensor of document "
                        f"boundaries, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"spattn.attention: cu_seqlens must be a 1-D int32/int64 tensor [0, b_1, ..., seq_len] "
                         f"with at least 2 entries, got dtype {cu_seqlens.dtype}, shape {tuple(cu_seqlens.shape)}")
    if joint is not None:
        raise ValueError("spattn.attention: cu_seqlens (packed documents) cannot be combined with joint "
                         "(text) tensors; pass one or the other")
    if q.shape[0] != 1:
        raise ValueError(f"spattn.attention: cu_seqlens needs packed batch 1 (all documents in one sequence), "
                         f"got batch {q.shape[0]}; concatenate the batch along the sequence instead")
    b = tuple(int(x) for x in cu_seqlens.tolist())
    if b[0] != 0 or b[-1] != geo.seq_len:
        raise ValueError(f"spattn.attention: cu_seqlens must start at 0 and end at the global (unpadded) "
                         f"sequence length {geo.seq_len}, got {b[0]} ... {b[-1]}")
    if any(x >= y for x, y in zip(b, b[1:])):
        raise ValueError("spattn.attention: cu_seqlens must be strictly increasing (no empty documents); "
                         "drop repeated boundaries, e.g. with torch.unique_consecutive(cu_seqlens)")
    return b


def _mask_summary(mask: Tensor) -> Tuple[bool, int, int]:
    """(right-padded?, longest, shortest) of a bool (B, T) text mask, read on the host. Cached on the
    mask tensor, keyed by its version counter (an in-place change recomputes): a model hands the same
    mask to every layer, so a GPU stream waits for this read once per forward, not once per layer."""
    try:
        version = mask._version
    except RuntimeError:  # inference-mode tensors have no version counter: read it every call
        version = None
    cached = getattr(mask, "_spattn_summary", None)
    if cached is not None and version is not None and cached[0] == version:
        return cached[1]
    lens = mask.sum(1)
    prefix = torch.arange(mask.shape[1], device=mask.device)[None, :] < lens[:, None]
    is_prefix, longest, shortest = torch.stack([(mask == prefix).all().long(), lens.max(), lens.min()]).tolist()
    summary = (bool(is_prefix), longest, shortest)
    if version is not None:
        try:
            mask._spattn_summary = (version, summary)
        except (AttributeError, RuntimeError):  # a tensor type without Python attributes: just no cache
            pass
    return summary


def _compact_joint(mask: Optional[Tensor], jk: Tensor, jv: Tensor):
    """Joint K/V and per-batch key lengths for a text mask (batch, T): returns (jk, jv, k_lens) with
    each batch element's real keys first, so every backend only needs lengths (int32 (B,), or None
    when every batch element keeps all of the returned keys).

    Right-padded masks (what pipelines pass) already are a prefix: no copy, no mask, and the keys past
    the longest prompt are sliced off (a batch of one padded prompt then runs unmasked on fewer keys).
    Any other mask (holes) is compacted: the real keys are gathered to the front, order kept. That is
    exact without any bias, reuses the same length path in every backend (the Triton kernels skip the
    masked tiles), and costs one gather of the text K/V (B*T*Hkv*D, small beside the attention); the
    gather's backward scatters gradients home, so masked keys get exactly 0.

    While dynamo traces, the result keeps the full text length (lengths always returned): see
    ``spattn.compile``, which hands the compacted K/V and the lengths to its custom op.
    """
    if mask is None:
        return jk, jv, None
    if torch.compiler.is_compiling():
        # Traced (spattn.compile): no host read, no data-dependent shape. Always gather (the identity
        # order for a right-padded mask) and keep all T keys; the lengths mask the rest, exactly.
        order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices
        idx = order[:, :, None, None].expand(-1, -1, *jk.shape[2:])
        return jk.gather(1, idx), jv.gather(1, idx), mask.sum(1, dtype=torch.int32)
    is_prefix, longest, shortest = _mask_summary(mask)
    n = max(1, longest)  # keep one (masked) key when no text token is real: no empty blocks downstream
    if not is_prefix:
        order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices  # (B, T): real keys first
        idx = order[:, :, None, None].expand(-1, -1, *jk.shape[2:])
        jk, jv = jk.gather(1, idx), jv.gather(1, idx)
    if shortest == n:  # every batch element keeps its first n keys: nothing left to mask
        return jk[:, :n], jv[:, :n], None
    return jk[:, :n], jv[:, :n], mask.sum(1, dtype=torch.int32)


def _validate_call(q, k, v, mesh, softmax_scale, backend, joint) -> Tuple[object, float]:
    """Checks that need the resolved backend and scale (local; before any collective)."""
    be = get_backend(backend, q.device)
    if q.shape[0] == 0:
        raise ValueError("spattn.attention: empty batch (q.shape[0] == 0); skip the call on every rank instead")
    if softmax_scale is not None:
        try:
            scale = float(softmax_scale)
        except (TypeError, ValueError):
            raise TypeError(f"spattn.attention: softmax_scale must be a number, got {softmax_scale!r}") from None
        if not math.isfinite(scale):
            raise ValueError(f"spattn.attention: softmax_scale must be finite, got {softmax_scale!r}")
    else:
        scale = q.shape[-1] ** -0.5
    limit = _BACKEND_LIMITS.get(getattr(be, "name", ""))
    if limit is not None:
        max_d, dtypes = limit
        if q.shape[-1] > max_d or q.dtype not in dtypes:
            raise ValueError(f"spattn.attention: backend {be.name!r} takes head_dim <= {max_d} and dtypes "
                             f"{[str(d) for d in dtypes]}, got head_dim {q.shape[-1]} and {q.dtype}; use "
                             f"backend='torch' (any head_dim, any float dtype)")
    if joint is not None and joint[0].shape[1] == 0:
        raise ValueError("spattn.attention: joint tensors have text_len 0; pass joint_q=joint_k=joint_v=None "
                         "for no text tokens")
    return be, scale


# Backends with kernel limits (head_dim, dtypes): said before any collective, with the way out.
_BACKEND_LIMITS = {"triton": (256, (torch.float16, torch.bfloat16, torch.float32))}


def _check_across_ranks(mesh: SPMesh, q, k, v, *, causal, geo, scale, return_lse, backend, engine,
                        joint, joint_strategy, joint_mask=None, docs=None, ring_impl="auto") -> None:
    """The per-call cross-rank signature check (spattn.check), on by default; SPATTN_CHECK=0 skips it."""
    mode = check.check_mode()
    if not mode or mesh.world_size == 1 or torch.compiler.is_compiling():
        return
    sig = check.signature(q, k, v, mesh=mesh, causal=causal, seq_len=geo.seq_len, layout=geo.layout,
                          scale=scale, return_lse=return_lse, backend=backend, ring_engine=engine,
                          ulysses_chunks=ulysses_chunks(), joint=joint, joint_strategy=joint_strategy,
                          joint_mask=joint_mask, docs=docs, ring_impl=ring_impl, mode=mode)
    check.check_signature(mesh, sig)


def _guarded(what: str):
    """A peer dying or timing out inside the collectives of ``what`` becomes a RankFailure that
    names the dead rank(s) where the host can tell."""
    def deco(fn):
        def run(ctx, *args):
            chunks = ctx.chunks if hasattr(ctx, "chunks") else args[0]
            groups = [g for ch in chunks for g in (ch.setup.group, ch.spec.group if ch.spec else None)]
            with check.guard_collectives(groups, what):
                return fn(ctx, *args)
        run.__name__, run.__doc__ = fn.__name__, fn.__doc__
        return run
    return deco


class _Replicated(torch.autograd.Function):
    """Identity on a tensor replicated on every rank of the mesh; backward sums every rank's
    gradient contribution, so each rank returns the full gradient."""

    @staticmethod
    def forward(ctx, mesh, *xs):
        ctx.mesh = mesh
        return xs

    @staticmethod
    def backward(ctx, *gs):
        flat = torch.cat([g.reshape(-1) for g in gs])  # one all-reduce per group, not one per tensor
        for grp in ctx.mesh.groups():
            n = dist.get_world_size(grp)
            count_bytes("all_reduce", 2 * (n - 1) * flat.numel() * flat.element_size() // n)
            dist.all_reduce(flat, group=grp)
        return (None, *(f.view_as(g) for f, g in zip(flat.split([g.numel() for g in gs]), gs)))


class _GatherHeads(torch.autograd.Function):
    """(B, T, h_rank, D) per rank -> (B, T, H, D) on every rank (uneven head counts allowed).
    Replicated output: the gradient is the same on every rank and counts once."""

    @staticmethod
    def forward(ctx, x, group, ranges):
        ctx.rank_range = ranges[dist.get_rank(group)]
        width = max(hi - lo for lo, hi in ranges)
        b, t, h, d = x.shape
        padded = x.new_zeros((b, t, width, d))
        padded[:, :, :h] = x
        parts = [torch.empty_like(padded) for _ in ranges]
        dist.all_gather(parts, padded, group=group)
        count_bytes("all_gather", (len(ranges) - 1) * padded.numel() * padded.element_size())
        return torch.cat([p[:, :, :hi - lo] for p, (lo, hi) in zip(parts, ranges)], dim=2)

    @staticmethod
    def backward(ctx, g):
        lo, hi = ctx.rank_range
        return g[:, :, lo:hi], None, None


@dataclass(frozen=True)
class _Chunk:
    """One pipeline stage: a slice of every rank's heads, its all-to-all specs and ring setup."""

    setup: RingSetup
    spec: Optional[A2ASpec]      # q, k, v exchange (None without Ulysses)
    out_spec: Optional[A2ASpec]  # q-shaped exchange: out forward, dout backward
    q_heads: Tuple[int, int]     # this rank's query heads in this chunk (global head indices)
    kv_heads: Tuple[int, int]


_SAVED_PER_CHUNK = 10  # q, k, v, out, lse, jq, jk, jv, t_out, t_lse


class _SPAttention(torch.autograd.Function):
    """Ulysses around Ring, forward and backward, pipelined over head chunks: the all-to-all of
    chunk c+1 and the return of chunk c run while chunk c+1 / c computes.

    Returns out (B, s, Hq, D); lse (B, h_local, U*s) in head-sharded order; t_out (B, T, h_local, D)
    and t_lse (None without joint tokens).
    """

    @staticmethod
    @_guarded("forward")
    def forward(ctx, chunks: List[_Chunk], q, k, v, jq, jk, jv):
        joint = jq is not None
        ctx.chunks, ctx.shapes, ctx.joint = chunks, (q.shape, k.shape), joint
        if chunks[0].spec is None:  # no Ulysses: one ring
            res = ring_forward(chunks[0].setup, q, k, v, jq, jk, jv)
            saved = [(q, k, v, *res[:2], jq, jk, jv, *res[2:])]
            out, lse, t_out, t_lse = res
        else:
            out = torch.empty_like(q)  # every head is written exactly once, by one chunk of one rank
            saved, pending, parts = [], [], []
            work = start_seq_to_head([q, k, v], chunks[0].spec)
            for c, ch in enumerate(chunks):
                qc, kc, vc = work.wait()
                if c + 1 < len(chunks):
                    work = start_seq_to_head([q, k, v], chunks[c + 1].spec)
                js = _joint_slices(ch, jq, jk, jv)
                res = ring_forward(ch.setup, qc, kc, vc, *js)
                pending.append(start_head_to_seq([res[0]], ch.out_spec, [out], add=[False]))
                saved.append((qc, kc, vc, *res[:2], *js, *res[2:]))
                parts.append(res[1:])
            for w in pending:
                w.wait()
            lse = torch.cat([p[0] for p in parts], dim=1)
            t_out = torch.cat([p[1] for p in parts], dim=2) if joint else None
            t_lse = torch.cat([p[2] for p in parts], dim=1) if joint else None
        ctx.save_for_backward(*[t for tup in saved for t in tup])
        ctx.mark_non_differentiable(lse)
        if joint:
            ctx.mark_non_differentiable(t_lse)
        return out, lse, t_out, t_lse

    @staticmethod
    @_guarded("backward")
    def backward(ctx, dout, _dlse, dt_out, _dt_lse):
        chunks, flat = ctx.chunks, ctx.saved_tensors
        saved = [flat[i:i + _SAVED_PER_CHUNK] for i in range(0, len(flat), _SAVED_PER_CHUNK)]
        if chunks[0].spec is None:
            return (None, *ring_backward(chunks[0].setup, saved[0], dout, dt_out))
        (qs, ks), joint = ctx.shapes, ctx.joint
        dq = dout.new_empty(qs)  # query heads are disjoint: copied; KV heads may be shared: summed
        dk, dv = dout.new_zeros(ks), dout.new_zeros(ks)
        if joint:
            jq, jk = saved[0][5], saved[0][6]
            djq = jq.new_zeros(jq.shape[:2] + (qs[2], jq.shape[3]))
            djk, djv = (jk.new_zeros(jk.shape[:2] + (ks[2], jk.shape[3])) for _ in range(2))
        base = chunks[0].q_heads[0]
        pending = []
        work = start_seq_to_head([dout], chunks[0].out_spec)
        for c, ch in enumerate(chunks):
            (doc,) = work.wait()
            if c + 1 < len(chunks):
                work = start_seq_to_head([dout], chunks[c + 1].out_spec)
            dtc = None
            if joint and dt_out is not None:
                dtc = dt_out[:, :, ch.q_heads[0] - base:ch.q_heads[1] - base]
            g = ring_backward(ch.setup, saved[c], doc, dtc)
            pending.append(start_head_to_seq(list(g[:3]), ch.spec, [dq, dk, dv], add=[False, True, True]))
            if joint:
                djq[:, :, ch.q_heads[0]:ch.q_heads[1]] += g[3]
                djk[:, :, ch.kv_heads[0]:ch.kv_heads[1]] += g[4]
                djv[:, :, ch.kv_heads[0]:ch.kv_heads[1]] += g[5]
        for w in pending:
            w.wait()
        return (None, dq, dk, dv) + ((djq, djk, djv) if joint else (None,) * 3)


def _joint_slices(ch: _Chunk, jq, jk, jv):
    if jq is None:
        return None, None, None
    (qlo, qhi), (klo, khi) = ch.q_heads, ch.kv_heads
    return jq[:, :, qlo:qhi], jk[:, :, klo:khi], jv[:, :, klo:khi]


def ulysses_chunks() -> int:
    """Head chunks the Ulysses pipeline aims for (``SPATTN_ULYSSES_CHUNKS``, default 4)."""
    return max(1, int(os.environ.get("SPATTN_ULYSSES_CHUNKS", "4")))


def attention(q: Tensor, k: Tensor, v: Tensor, mesh: SPMesh, *, causal: bool = False,
              softmax_scale: Optional[float] = None, return_lse: bool = False, backend: str = "auto",
              seq_len: Optional[int] = None, layout: str = "contiguous",
              joint_q: Optional[Tensor] = None, joint_k: Optional[Tensor] = None,
              joint_v: Optional[Tensor] = None, joint_strategy: str = "front",
              ring_engine: Optional[str] = None,
              joint_mask: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
              ring_impl: str = "auto") -> Union[Tensor, Tuple[Tensor, ...]]:
    """Sequence-parallel attention on this rank's shards; equals attention over the full sequence.

    Args:
        q: (batch, seq_local, heads_q, head_dim), this rank's shard (see ``spattn.shard``).
        k, v: (batch, seq_local, heads_kv, head_dim); ``heads_q % heads_kv == 0`` (GQA/MQA).
        mesh: the ``SPMesh`` (Ulysses x Ring groups).
        causal: causal mask over the *global* sequence order.
        softmax_scale: default ``head_dim ** -0.5``.
        return_lse: also return the LSE of the local queries.
        backend: single-device kernel: "auto", "torch", "reference" or "triton".
        seq_len: global length when it is not ``seq_local * world_size`` (shards are padded; padded
            keys get exactly zero weight, padded output rows are 0 and get no gradient).
        layout: "contiguous", "zigzag" (load-balanced causal) or "balanced" (load-balanced packed
            documents: chunks dealt by their causal work under ``cu_seqlens``); must match how q/k/v
            were sharded (``spattn.shard(..., layout=..., cu_seqlens=...)``).
        joint_q, joint_k, joint_v: text tokens (batch, text_len, heads, head_dim), identical on every
            rank, attending jointly with the image tokens (non-causal only).
        joint_strategy: "front" ([text, image]) or "rear" ([image, text]); for bidirectional attention
            both orders give the same numbers, the flag records the model's convention.
        ring_engine: P2P ring transport: "auto" (C++ engine when built), "python" or "cpp"; default
            ``$SPATTN_RING_ENGINE``.
        joint_mask: bool (batch, text_len), True = real text token, identical on every rank (e.g.
            Qwen-Image's ``encoder_hidden_states_mask``); needs joint_q/k/v. Masked text *keys* get
            exactly zero weight for every query and zero gradient; a masked text *row* still gets a
            finite output (it attends to the unmasked keys), exactly as SDPA over the joint sequence
            with ``attn_mask`` (batch, 1, 1, text_len + seq_len). Right-padded masks take a fast path
            (per-batch key lengths); any other pattern is exact too.
        cu_seqlens: packed documents, int32/int64 (n_docs + 1,) boundaries ``0 = b_0 < ... < b_n =
            seq_len`` over the global unpadded sequence, identical on every rank, batch 1. Token i
            attends to token j only within its own document (and j <= i if causal), exactly as SDPA
            with the block-diagonal document mask; (query, key) blocks with no visible pair are skipped.
        ring_impl: "p2p" (K/V blocks travel the ring, overlapped with compute), "allgather" (the ring
            group's K/V gathered in head chunks, one pass; dK/dV reduce-scattered) or "auto" (the
            measured rule in ``spattn.ring.choose_ring_impl``; an explicit ``ring_engine`` means "p2p").

    Returns:
        ``out`` (batch, seq_local, heads_q, head_dim), then ``joint_out`` (batch, text_len, heads_q,
        head_dim, full on every rank) if joint tensors are given, then ``lse`` (batch, heads_q,
        seq_local; fp32, natural log, -inf on padded rows) and ``joint_lse`` (batch, heads_q,
        text_len) if ``return_lse``. LSEs carry no gradient.
    """
    if torch.compiler.is_compiling():  # dynamo: the same eager code, behind opaque custom ops
        from .compile import traced_attention
        return traced_attention(q, k, v, mesh, causal=causal, softmax_scale=softmax_scale, return_lse=return_lse,
                                backend=backend, seq_len=seq_len, layout=layout, joint_q=joint_q, joint_k=joint_k,
                                joint_v=joint_v, joint_strategy=joint_strategy, ring_engine=ring_engine,
                                joint_mask=joint_mask, cu_seqlens=cu_seqlens, ring_impl=ring_impl)
    return _attention(q, k, v, mesh, causal=causal, softmax_scale=softmax_scale, return_lse=return_lse,
                      backend=backend, seq_len=seq_len, layout=layout, joint_q=joint_q, joint_k=joint_k,
                      joint_v=joint_v, joint_strategy=joint_strategy, ring_engine=ring_engine,
                      joint_mask=joint_mask, cu_seqlens=cu_seqlens, ring_impl=ring_impl)


def _attention(q: Tensor, k: Tensor, v: Tensor, mesh: SPMesh, *, causal: bool, softmax_scale: Optional[float],
               return_lse: bool, backend: str, seq_len: Optional[int], layout: str, joint_q: Optional[Tensor],
               joint_k: Optional[Tensor], joint_v: Optional[Tensor], joint_strategy: str,
               ring_engine: Optional[str], joint_mask: Optional[Tensor] = None,
               cu_seqlens: Optional[Tensor] = None, ring_impl: str = "auto",
               joint_lens: Optional[Tensor] = None) -> Union[Tensor, Tuple[Tensor, ...]]:
    """``attention`` in eager mode. ``joint_lens`` (int32 (batch,), instead of ``joint_mask``): the
    joint K/V are already compacted (real keys first, as ``_compact_joint`` returns them under
    tracing) and batch element b keeps its first ``joint_lens[b]`` keys; spattn.compile's op uses it."""
    joint = (joint_q, joint_k, joint_v) if any(t is not None for t in (joint_q, joint_k, joint_v)) else None
    geo = _validate(q, k, v, mesh, causal, seq_len, layout, joint, joint_strategy)
    _check_joint_mask(joint_mask, joint, q)
    if joint_lens is not None and (joint is None or joint_mask is not None):
        raise ValueError("spattn.attention: joint_lens needs joint tensors and no joint_mask")
    docs = _check_varlen(cu_seqlens, ring_impl, joint, q, geo)
    be, scale = _validate_call(q, k, v, mesh, softmax_scale, backend, joint)
    engine = ring_engine or default_ring_engine()
    _check_across_ranks(mesh, q, k, v, causal=causal, geo=geo, scale=scale, return_lse=return_lse,
                        backend=backend, engine=engine, joint=joint, joint_strategy=joint_strategy,
                        joint_mask=joint_mask, docs=docs, ring_impl=ring_impl)
    U, R = mesh.ulysses_degree, mesh.ring_degree
    hq, hkv = q.shape[2], k.shape[2]
    jq = jk = jv = None
    if joint is not None:
        jq, jk, jv = _Replicated.apply(mesh, *joint) if mesh.world_size > 1 else joint
    jk, jv, jlens = _compact_joint(joint_mask, jk, jv) if joint is not None else (jk, jv, None)
    if joint_lens is not None:
        jlens = joint_lens

    if layout == "balanced":  # the chunk assignment depends on the documents and the mesh shape
        geo = Geometry(geo.seq_len, geo.world_size, layout, U, docs)
    pieces, L, i = geo.pieces_per_rank, U * geo.chunk, mesh.ring_rank
    starts = tuple(tuple(s * L for s in geo.ring_segments(r, R)) for r in range(R))

    impl = choose_ring_impl(R, U * q.shape[1], q.device, ring_engine) if ring_impl == "auto" else ring_impl

    def setup(backend_) -> RingSetup:
        return RingSetup(mesh.ring_group, R, i, L, starts, geo.seq_len, bool(causal), scale, backend_,
                         engine, jlens, docs, impl, mesh.comm_cache)

    if U == 1:
        chunks = [_Chunk(setup(be), None, None, (0, hq), (0, hkv))]
    else:
        plan, u = head_plan(hq, hkv, U), mesh.ulysses_rank
        # Head-sharded sequence in global order: piece 0 of every rank, then (zigzag) piece 1 reversed.
        if layout == "zigzag":
            order = [(r, 0) for r in range(U)] + [(r, 1) for r in reversed(range(U))]
        else:  # contiguous / balanced: every local piece j is super-chunk j's U-th part u
            order = [(r, j) for j in range(pieces) for r in range(U)]
        chunks = []
        for p in pipeline_plans(plan, ulysses_chunks()):
            index = p.local_kv_index(u)
            chunks.append(_Chunk(
                setup(be if index is None else HeadMapBackend(be, index)),
                A2ASpec(mesh.ulysses_group, [p.q_ranges, p.kv_ranges, p.kv_ranges], pieces, order),
                A2ASpec(mesh.ulysses_group, [p.q_ranges], pieces, order), p.q_ranges[u], p.kv_ranges[u]))
    out, lse, t_out, t_lse = _SPAttention.apply(chunks, q, k, v, jq, jk, jv)

    if U > 1:
        if return_lse:  # (B, h, U*s) head-sharded -> (B, s, h, 1) for the all-to-all -> (B, H, s)
            (lse,) = start_head_to_seq([lse.transpose(1, 2).unsqueeze(-1).contiguous()],
                                       A2ASpec(mesh.ulysses_group, [plan.q_ranges], pieces, order),
                                       [lse.new_empty(q.shape[:3] + (1,))], add=[False]).wait()
            lse = lse.squeeze(-1).transpose(1, 2).contiguous()
        if joint is not None:
            t_out = _GatherHeads.apply(t_out, mesh.ulysses_group, plan.q_ranges)
            if return_lse:
                t_lse = _GatherHeads.apply(t_lse.transpose(1, 2).unsqueeze(-1).contiguous(),
                                           mesh.ulysses_group, plan.q_ranges).squeeze(-1).transpose(1, 2)
    if return_lse:
        lse = _mask_lse(lse, geo, mesh, layout)
    res = (out,) + ((t_out,) if joint is not None else ())
    if return_lse:
        res += (lse,) + ((t_lse,) if joint is not None else ())
    return res[0] if len(res) == 1 else res


def _mask_lse(lse: Tensor, geo: Geometry, mesh: SPMesh, layout: str) -> Tensor:
    """-inf on this rank's padded rows (B, H, s)."""
    c = geo.chunk
    rows = [(j * c + geo.valid(cid * c, c), (j + 1) * c) for j, cid in enumerate(geo.chunk_ids(mesh.sp_rank))]
    rows = [r for r in rows if r[0] < r[1]]
    if not rows:
        return lse
    lse = lse.clone()
    for r0, r1 in rows:
        lse[:, :, r0:r1] = float("-inf")
    return lse
