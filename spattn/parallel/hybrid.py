"""The hybrid strategy: Ulysses (all-to-all over heads) around a ring, pipelined over head chunks.

Every mode is this one composition: Ulysses-only is a ring of one, Ring-only skips the all-to-all, a
mesh of one is plain attention.

    seq-sharded q/k/v (B, s, H, D) --all-to-all--> head-sharded (B, U*s, h, D)
        --ring over the ring group--> (B, U*s, h, D) --all-to-all back--> (B, s, H, D)

Plain functions, no autograd: ``forward`` returns the results and the tensors ``backward`` needs
(``saved_slots`` says which are op inputs, op results or new); the custom op in ``op.py`` is the only
autograd wrapper, for eager and torch.compile alike. The all-to-all of chunk c+1 and the return of
chunk c run while chunk c+1 / c computes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

import torch

from ..call import AttnCall, Inputs
from ..comm.all_to_all import A2ASpec, start_head_to_seq, start_seq_to_head
from ..comm.collectives import all_gather, all_reduce_over
from ..layout import ulysses_order
from .blocks import BlockPlan, RingRun
from .heads import HeadMapBackend, HeadPlan, head_plan, pipeline_plans
from .ring import ring_backward, ring_forward
from .ring_allgather import choose_ring_impl

Tensor = torch.Tensor
SAVED_PER_CHUNK = 10  # q, k, v, out, lse, jq, jk, jv, t_out, t_lse (head-sharded, one chunk)


@dataclass(frozen=True)
class Chunk:
    """One pipeline stage: a slice of every rank's heads, its all-to-all specs and ring call."""

    ring: RingRun
    spec: Optional[A2ASpec]      # q, k, v exchange (None without Ulysses)
    out_spec: Optional[A2ASpec]  # q-shaped exchange: out forward, dout backward
    q_heads: Tuple[int, int]     # this rank's query heads in this chunk (global head indices)
    kv_heads: Tuple[int, int]


@dataclass(frozen=True)
class Plan:
    """Everything static about one call on this rank: its chunks and the LSE's exchange."""

    chunks: Tuple[Chunk, ...]
    heads: Optional[HeadPlan]        # the whole head plan (None without Ulysses)
    lse_spec: Optional[A2ASpec]      # (B, s, h, 1)-shaped LSE exchange back to sequence sharding

    def with_lens(self, jlens: Optional[Tensor]) -> "Plan":
        """This plan with the call's joint key lengths (a per-call tensor, never cached)."""
        if jlens is None:
            return self
        return replace(self, chunks=tuple(replace(c, ring=replace(c.ring, joint_lens=jlens)) for c in self.chunks))


def build_plan(call: AttnCall) -> Plan:
    """The plan of ``call`` on this rank (pure function of the call; the mesh caches it)."""
    mesh, geo = call.mesh, call.geo
    U, R = mesh.ulysses_degree, mesh.ring_degree
    hq, hkv = call.q_shape[2], call.k_shape[2]
    starts = geo.ring_starts(R, U)
    impl = call.opts.ring_impl
    if impl == "auto":
        impl = choose_ring_impl(R, U * call.q_shape[1], call.device, call.opts.ring_engine)

    # Joint order for a window's positions: [text, image] (front) or [image, text] (rear).
    text = call.joint_q_shape[1] if call.joint else 0
    front = call.opts.joint_strategy == "front"
    image_pos, text_pos = (text, 0) if front else (0, geo.seq_len)

    def ring(backend) -> RingRun:
        blocks = BlockPlan(R, mesh.ring_rank, U * geo.chunk, starts, geo.seq_len, bool(call.opts.causal), call.docs,
                           call.docs is not None and bool(getattr(backend, "supports_docs", False)), call.window,
                           image_pos, text_pos)
        return RingRun(blocks, mesh.ring_group, backend, call.scale, call.ring_engine, None, impl, mesh.comm_cache,
                       call.allgather_bytes)

    if U == 1:
        ch = Chunk(ring(call.kernel), None, None, (0, hq), (0, hkv))
        return Plan((ch,), None, None)
    plan, u, pieces = head_plan(hq, hkv, U), mesh.ulysses_rank, geo.pieces_per_rank
    order = ulysses_order(geo, U)
    chunks = []
    for p in pipeline_plans(plan, call.ulysses_chunks):
        index = p.local_kv_index(u)
        chunks.append(Chunk(
            ring(call.kernel if index is None else HeadMapBackend(call.kernel, index)),
            A2ASpec(mesh.ulysses_group, [p.q_ranges, p.kv_ranges, p.kv_ranges], pieces, order),
            A2ASpec(mesh.ulysses_group, [p.q_ranges], pieces, order), p.q_ranges[u], p.kv_ranges[u]))
    lse_spec = A2ASpec(mesh.ulysses_group, [plan.q_ranges], pieces, order)
    return Plan(tuple(chunks), plan, lse_spec)


# ----------------------------------------------------------------------------------------------
# What forward keeps for backward: per chunk SAVED_PER_CHUNK tensors, each an op input ("q", "jq"...),
# a slice of one by the chunk's heads ("jq/h"...), an op result ("out", "jout"), new, or nothing.
# ----------------------------------------------------------------------------------------------
def saved_slots(call: AttnCall, n_chunks: int) -> List[Optional[str]]:
    """Where each saved tensor comes from. Ulysses saves head-sharded copies (new) and head slices of
    the joint inputs; a ring of one saves its inputs and results."""
    joint = call.joint
    if call.mesh.ulysses_degree == 1:
        return ["q", "k", "v", "out", "new"] + (["jq", "jk", "jv", "jout", "new"] if joint else [None] * 5)
    return (["new"] * 5 + (["jq/h", "jk/h", "jv/h", "new", "new"] if joint else [None] * 5)) * n_chunks


def new_saved_meta(call: AttnCall) -> List[Tuple[Tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every "new" saved tensor, in order: what the op's fake returns."""
    b, s, hq, d = call.q_shape
    hkv, U = call.k_shape[2], call.mesh.ulysses_degree
    t = call.joint_q_shape[1] if call.joint else 0
    f32 = torch.float32
    if U == 1:
        return [((b, hq, s), f32)] + ([((b, hq, t), f32)] if call.joint else [])
    u, T, meta = call.mesh.ulysses_rank, U * s, []
    for p in pipeline_plans(head_plan(hq, hkv, U), call.ulysses_chunks):
        nq = p.q_ranges[u][1] - p.q_ranges[u][0]
        nkv = p.kv_ranges[u][1] - p.kv_ranges[u][0]
        meta += [((b, T, nq, d), call.dtype), ((b, T, nkv, d), call.dtype), ((b, T, nkv, d), call.dtype),
                 ((b, T, nq, d), call.dtype), ((b, nq, T), f32)]
        if call.joint:
            meta += [((b, t, nq, d), call.dtype), ((b, nq, t), f32)]
    return meta


def _joint_slices(ch: Chunk, jq, jk, jv):
    if jq is None:
        return None, None, None
    (qlo, qhi), (klo, khi) = ch.q_heads, ch.kv_heads
    return jq[:, :, qlo:qhi], jk[:, :, klo:khi], jv[:, :, klo:khi]


def _pipeline_forward(plan: Plan, x: Inputs):
    """out (B, s, Hq, D); lse (B, h_local, U*s) head-sharded; t_out (B, T, h_local, D), t_lse; saved."""
    q, k, v, jq, jk, jv = x[:6]
    chunks = plan.chunks
    if chunks[0].spec is None:  # no Ulysses: one ring
        res = ring_forward(chunks[0].ring, q, k, v, jq, jk, jv)
        return res, [q, k, v, *res[:2], jq, jk, jv, *res[2:]]
    out = torch.empty_like(q)  # every head is written exactly once, by one chunk of one rank
    saved, pending, parts = [], [], []
    work = start_seq_to_head([q, k, v], chunks[0].spec)
    for c, ch in enumerate(chunks):
        qc, kc, vc = work.wait()
        if c + 1 < len(chunks):
            work = start_seq_to_head([q, k, v], chunks[c + 1].spec)
        js = _joint_slices(ch, jq, jk, jv)
        res = ring_forward(ch.ring, qc, kc, vc, *js)
        pending.append(start_head_to_seq([res[0]], ch.out_spec, [out], add=[False]))
        saved += [qc, kc, vc, *res[:2], *js, *res[2:]]
        parts.append(res[1:])
    for w in pending:
        w.wait()
    lse = torch.cat([p[0] for p in parts], dim=1)
    joint = jq is not None
    t_out = torch.cat([p[1] for p in parts], dim=2) if joint else None
    t_lse = torch.cat([p[2] for p in parts], dim=1) if joint else None
    return (out, lse, t_out, t_lse), saved


def _gather_heads(x: Tensor, group, ranges: Sequence[Tuple[int, int]]) -> Tensor:
    """(B, T, h_rank, D) per rank -> (B, T, H, D) on every rank (uneven head counts allowed)."""
    width = max(hi - lo for lo, hi in ranges)
    b, t, h, d = x.shape
    padded = x.new_zeros((b, t, width, d))
    padded[:, :, :h] = x
    parts = all_gather(padded, group)
    return torch.cat([p[:, :, :hi - lo] for p, (lo, hi) in zip(parts, ranges)], dim=2)


def _mask_lse(lse: Tensor, call: AttnCall) -> Tensor:
    """-inf on this rank's padded rows (B, H, s)."""
    rows = call.geo.padded_rows(call.mesh.sp_rank)
    if not rows:
        return lse
    lse = lse.clone()
    for r0, r1 in rows:
        lse[:, :, r0:r1] = float("-inf")
    return lse


def forward(plan: Plan, call: AttnCall, x: Inputs) -> Tuple[List[Tensor], List[Optional[Tensor]]]:
    """Results [out, (joint_out), (lse, (joint_lse))] and the saved tensors (``saved_slots`` order)."""
    (out, lse, t_out, t_lse), saved = _pipeline_forward(plan, x)
    mesh, ret_lse = call.mesh, call.opts.return_lse
    if mesh.ulysses_degree > 1:
        ranges = plan.heads.q_ranges
        if ret_lse:  # (B, h, U*s) head-sharded -> (B, s, h, 1) for the all-to-all -> (B, H, s)
            (lse_s,) = start_head_to_seq([lse.transpose(1, 2).unsqueeze(-1).contiguous()], plan.lse_spec,
                                         [lse.new_empty(call.q_shape[:3] + (1,))], add=[False]).wait()
            lse = lse_s.squeeze(-1).transpose(1, 2).contiguous()
        if call.joint:
            t_out = _gather_heads(t_out, mesh.ulysses_group, ranges)
            if ret_lse:
                t_lse = _gather_heads(t_lse.transpose(1, 2).unsqueeze(-1).contiguous(), mesh.ulysses_group,
                                      ranges).squeeze(-1).transpose(1, 2)
    res = [out] + ([t_out] if call.joint else [])
    if ret_lse:
        res += [_mask_lse(lse, call)] + ([t_lse] if call.joint else [])
    return res, saved


def backward(plan: Plan, call: AttnCall, saved: Sequence[Optional[Tensor]], dout: Tensor,
             dt_out: Optional[Tensor]) -> List[Tensor]:
    """[dq, dk, dv, (djq, djk, djv)] from the saved tensors: nothing recomputed, nothing re-exchanged
    but the gradients. ``dt_out``: gradient of the (replicated, all heads) joint output, or None."""
    chunks, joint = plan.chunks, call.joint
    if joint and dt_out is not None and call.mesh.ulysses_degree > 1:
        dt_out = dt_out[:, :, chunks[0].q_heads[0]:chunks[-1].q_heads[1]]  # joint_out gathered this rank's heads
    grads = list(_pipeline_backward(plan, call, saved, dout, dt_out))
    if not joint:
        return grads[:3]
    dj = grads[3:]
    if call.mesh.world_size > 1:  # joint tensors are replicated: every rank's share, summed
        flat = all_reduce_over(torch.cat([g.reshape(-1) for g in dj]), call.mesh.groups())
        dj = [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in dj]), dj)]
    return grads[:3] + dj


def _pipeline_backward(plan: Plan, call: AttnCall, flat: Sequence[Optional[Tensor]], dout: Tensor,
                       dt_out: Optional[Tensor]):
    chunks = plan.chunks
    saved = [tuple(flat[i:i + SAVED_PER_CHUNK]) for i in range(0, len(flat), SAVED_PER_CHUNK)]
    if chunks[0].spec is None:
        return ring_backward(chunks[0].ring, saved[0], dout, dt_out)
    qs, ks, joint = call.q_shape, call.k_shape, call.joint
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
        g = ring_backward(ch.ring, saved[c], doc, dtc)
        pending.append(start_head_to_seq(list(g[:3]), ch.spec, [dq, dk, dv], add=[False, True, True]))
        if joint:
            djq[:, :, ch.q_heads[0]:ch.q_heads[1]] += g[3]
            djk[:, :, ch.kv_heads[0]:ch.kv_heads[1]] += g[4]
            djv[:, :, ch.kv_heads[0]:ch.kv_heads[1]] += g[5]
    for w in pending:
        w.wait()
    return (dq, dk, dv) + ((djq, djk, djv) if joint else (None,) * 3)
