"""The public sequence-parallel attention: Ulysses (all-to-all over heads) around Ring (P2P over the
sequence). Every mode is this one composition: Ulysses-only is a ring of one, Ring-only skips the
all-to-all, a mesh of one is plain attention.

    seq-sharded q/k/v (B, s, H, D) --all-to-all--> head-sharded (B, U*s, h, D)
        --ring over the ring group--> (B, U*s, h, D) --all-to-all back--> (B, s, H, D)
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist

from .backends import get_backend
from .comm import A2ASpec, HeadToSeq, SeqToHead, default_ring_engine, head_to_seq
from .layout import LAYOUTS, Geometry
from .mesh import SPMesh
from .ops import check_qkv
from .ring import RingAttention, RingSetup
from .ulysses import HeadMapBackend, head_plan

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


class _Replicated(torch.autograd.Function):
    """Identity on a tensor replicated on every rank of the mesh; backward sums every rank's
    gradient contribution, so each rank returns the full gradient."""

    @staticmethod
    def forward(ctx, mesh, *xs):
        ctx.mesh = mesh
        return xs

    @staticmethod
    def backward(ctx, *gs):
        gs = [g.contiguous() for g in gs]
        for g in gs:
            for grp in ctx.mesh.groups():
                dist.all_reduce(g, group=grp)
        return (None, *gs)


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
        return torch.cat([p[:, :, :hi - lo] for p, (lo, hi) in zip(parts, ranges)], dim=2)

    @staticmethod
    def backward(ctx, g):
        lo, hi = ctx.rank_range
        return g[:, :, lo:hi], None, None


def attention(q: Tensor, k: Tensor, v: Tensor, mesh: SPMesh, *, causal: bool = False,
              softmax_scale: Optional[float] = None, return_lse: bool = False, backend: str = "auto",
              seq_len: Optional[int] = None, layout: str = "contiguous",
              joint_q: Optional[Tensor] = None, joint_k: Optional[Tensor] = None,
              joint_v: Optional[Tensor] = None, joint_strategy: str = "front",
              ring_engine: Optional[str] = None) -> Union[Tensor, Tuple[Tensor, ...]]:
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
        layout: "contiguous" or "zigzag" (load-balanced causal); must match how q/k/v were sharded.
        joint_q, joint_k, joint_v: text tokens (batch, text_len, heads, head_dim), identical on every
            rank, attending jointly with the image tokens (non-causal only).
        joint_strategy: "front" ([text, image]) or "rear" ([image, text]); for bidirectional attention
            both orders give the same numbers, the flag records the model's convention.
        ring_engine: "auto" (C++ engine when built), "python" or "cpp"; default ``$SPATTN_RING_ENGINE``.

    Returns:
        ``out`` (batch, seq_local, heads_q, head_dim), then ``joint_out`` (batch, text_len, heads_q,
        head_dim, full on every rank) if joint tensors are given, then ``lse`` (batch, heads_q,
        seq_local; fp32, natural log, -inf on padded rows) and ``joint_lse`` (batch, heads_q,
        text_len) if ``return_lse``. LSEs carry no gradient.
    """
    joint = (joint_q, joint_k, joint_v) if any(t is not None for t in (joint_q, joint_k, joint_v)) else None
    geo = _validate(q, k, v, mesh, causal, seq_len, layout, joint, joint_strategy)
    be = get_backend(backend, q.device)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    U, R = mesh.ulysses_degree, mesh.ring_degree
    hq, hkv = q.shape[2], k.shape[2]
    jq = jk = jv = None
    if joint is not None:
        jq, jk, jv = _Replicated.apply(mesh, *joint) if mesh.world_size > 1 else joint

    pieces = geo.pieces_per_rank
    if U > 1:
        plan = head_plan(hq, hkv, U)
        u = mesh.ulysses_rank
        # Head-sharded sequence in global order: piece 0 of every rank, then (zigzag) piece 1 reversed.
        order = [(r, 0) for r in range(U)] + ([(r, 1) for r in reversed(range(U))] if pieces == 2 else [])
        spec = A2ASpec(mesh.ulysses_group, [plan.q_ranges, plan.kv_ranges, plan.kv_ranges], pieces, order)
        out_spec = A2ASpec(mesh.ulysses_group, [plan.q_ranges], pieces, order)
        q, k, v = SeqToHead.apply(spec, q, k, v)
        (qlo, qhi), (klo, khi) = plan.q_ranges[u], plan.kv_ranges[u]
        if joint is not None:
            jq, jk, jv = jq[:, :, qlo:qhi], jk[:, :, klo:khi], jv[:, :, klo:khi]
        index = plan.local_kv_index(u)
        if index is not None:
            be = HeadMapBackend(be, index)

    L = U * geo.chunk
    i = mesh.ring_rank
    starts = tuple((r * L,) if pieces == 1 else (r * L, (2 * R - 1 - r) * L) for r in range(R))
    setup = RingSetup(mesh.ring_group, R, i, L, starts, geo.seq_len, bool(causal), scale, be,
                      ring_engine or default_ring_engine())
    out, lse, t_out, t_lse = RingAttention.apply(setup, q, k, v, jq, jk, jv)
    if return_lse:
        lse = _mask_lse(lse, setup)

    if U > 1:
        (out,) = HeadToSeq.apply(out_spec, [hq], out)
        if return_lse:  # (B, h, S) -> (B, S, h, 1) for the all-to-all, and back
            (lse,) = head_to_seq([lse.transpose(1, 2).unsqueeze(-1).contiguous()], out_spec, [hq])
            lse = lse.squeeze(-1).transpose(1, 2).contiguous()
        if joint is not None:
            t_out = _GatherHeads.apply(t_out, mesh.ulysses_group, plan.q_ranges)
            if return_lse:
                t_lse = _GatherHeads.apply(t_lse.transpose(1, 2).unsqueeze(-1).contiguous(),
                                           mesh.ulysses_group, plan.q_ranges).squeeze(-1).transpose(1, 2)
    res = (out,) + ((t_out,) if joint is not None else ())
    if return_lse:
        res += (lse,) + ((t_lse,) if joint is not None else ())
    return res[0] if len(res) == 1 else res


def _mask_lse(lse: Tensor, setup: RingSetup) -> Tensor:
    rows = setup.pad_rows()
    if not rows:
        return lse
    lse = lse.clone()
    for r0, r1 in rows:
        lse[:, :, r0:r1] = float("-inf")
    return lse
