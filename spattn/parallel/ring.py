"""Ring attention: K/V blocks travel around the ring group, partial results merge online by LSE.

Forward, per step: start sending the current K/V block on, compute attention of the local queries
with it, fold the result in with ``ops.merge_``, wait. Backward recomputes each block from the saved
final (out, lse); dq accumulates locally and each block's (dk, dv) travel the ring with it, arriving
back at the owner after the last step. Nothing of size seqlen x seqlen is ever stored.

Causal masking, padding and packed documents are handled by the per-step block plan (``blocks``).
With ``RingRun.impl == "allgather"`` the K/V exchange is the all-gather ring's (``ring_allgather``).

Joint (text) tokens, replicated on every rank and already head-sliced: image queries see the joint
K/V once (one local block, not a ring step), text queries see each rank's own image block plus, on ring rank
0 only, the joint K/V; their partials are all-gathered over the ring and merged, so text work is done
once across the ring. A text padding mask reaches this layer as per-batch key lengths
(``RingRun.joint_lens``, keys compacted to a prefix by attention()) and applies to the two joint K/V
blocks only; image K/V are never masked by it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..comm.collectives import all_gather
from ..comm.ring_comm import make_ring_comm
from ..ops import block_backward, block_forward, merge_
from .blocks import (RingRun, Saved, blocks_backward, blocks_forward, call_kw, call_kw_for, joint_backward,
                     joint_calls, running)
from .ring_allgather import allgather_backward, allgather_forward

Tensor = torch.Tensor


def ring_forward(st: RingRun, q: Tensor, k: Tensor, v: Tensor, jq: Optional[Tensor] = None,
                 jk: Optional[Tensor] = None, jv: Optional[Tensor] = None):
    """Ring attention forward over ``st.group``.

    q: (B, Sl, Hq, D) local queries; k, v: (B, Sl, Hkv, D); jq/jk/jv: (B, T, H*, D) or None.
    Returns out (q's dtype, padded rows 0), lse (the real fp32 LSE, padded rows included),
    t_out, t_lse (None without joint tokens).
    """
    be, bp = st.backend, st.blocks
    i = bp.rank
    # A rank left without heads (fewer heads than Ulysses ranks) has nothing to compute, and
    # neither has the rest of its ring (same heads): no compute, no ring.
    R = bp.size if q.shape[2] else 0
    if st.impl == "allgather" and R > 1:
        out, lse = allgather_forward(st, q, k, v)
    else:
        kv = torch.stack([k, v]) if R > 1 else (k, v)  # K and V travel as one message
        comm = make_ring_comm(st.group, kv, st.engine, st.comm_cache, "kv") if R > 1 else None
        cur, acc, kw = kv, [None, None], call_kw_for(bp, q.device)
        for j in range(R):
            if j + 1 < R:
                comm.start(cur)
            blocks_forward(be, q, cur, bp.calls((i - j) % R), st.scale, acc, kw((i - j) % R))
            if j + 1 < R:
                cur = comm.wait()
        out, lse = acc if acc[0] is not None else running(q, q.shape[2])
    t_out = t_lse = None
    if jq is not None:
        t_out, t_lse = running(jq, jq.shape[2])
        if R:
            blocks = [("image", q, (jk, jv), (out, lse), st.joint_lens), ("text", jq, (k, v), (t_out, t_lse), None)]
            if i == 0:
                blocks.append(("text_joint", jq, (jk, jv), (t_out, t_lse), st.joint_lens))
            for kind, rows, kv, (o, l), lens in blocks:
                n_keys = bp.kv_valid(i) if kind == "text" else kv[0].shape[1]
                for (q0, q1, k0, k1, _), kw in joint_calls(bp, kind, rows.shape[1], n_keys):
                    merge_(o[:, q0:q1], l[:, :, q0:q1], *block_forward(be, rows[:, q0:q1], kv[0][:, k0:k1],
                                                                       kv[1][:, k0:k1], False, st.scale, lens, **kw))
            if R > 1:
                t_out, t_lse = _allgather_merge(t_out, t_lse, st.group, R)
        t_out = t_out.to(q.dtype)
    out = out.to(q.dtype)
    for r0, r1 in bp.pad_rows():
        out[:, r0:r1] = 0
    return out, lse, t_out, t_lse


def ring_backward(st: RingRun, saved: Saved, dout: Tensor, dt_out: Optional[Tensor] = None):
    """Gradients of ``ring_forward``. saved = (q, k, v, out, lse, jq, jk, jv, t_out, t_lse) as the
    forward took and returned them. Returns (dq, dk, dv, djq, djk, djv); the joint ones are this
    rank's contributions (None without joint tokens)."""
    q, k, v, out, lse, jq, jk, jv, t_out, t_lse = saved
    be, bp = st.backend, st.blocks
    i = bp.rank
    joint = jq is not None
    if q.shape[2] == 0:
        return tuple(torch.zeros_like(t) if t is not None else None for t in (q, k, v, jq, jk, jv))
    R = bp.size
    pad = bp.pad_rows()
    if pad:  # padded rows are outputs of nothing: their gradient must not flow anywhere
        dout = dout.clone()
        for r0, r1 in pad:
            dout[:, r0:r1] = 0
    dout = dout.contiguous()
    if st.impl == "allgather" and R > 1:
        return allgather_backward(st, saved, dout, dt_out)
    calls, kw = bp.calls(i), call_kw_for(bp, q.device)
    sl = q.shape[1]
    if R == 1 and not joint and len(calls) == 1 and calls[0][:4] == (0, sl, 0, sl):
        # One block covering everything (Ulysses, or a mesh of one): no accumulators needed.
        return block_backward(be, (dout, q, out, lse), (k, v), calls[0][4], st.scale,
                              **call_kw(kw(i), 0, sl, 0, sl)) + (None,) * 3
    dq = torch.zeros_like(q, dtype=torch.float32)
    kv = torch.stack([k, v]) if R > 1 else (k, v)
    # Block (dk, dv) accumulate in fp32: scratch[0] for step 0 (it is sent away), scratch[1] after.
    scratch = [k.new_zeros((2,) + k.shape, dtype=torch.float32) for _ in range(min(R, 2))]
    kv_comm = make_ring_comm(st.group, kv, st.engine, st.comm_cache, "kv") if R > 1 else None
    dkv_comm = make_ring_comm(st.group, scratch[0], st.engine, st.comm_cache, "dkv") if R > 1 else None
    if joint:
        djq, djk, djv = (torch.zeros_like(t, dtype=torch.float32) for t in (jq, jk, jv))
        dt_out = torch.zeros_like(t_out) if dt_out is None else dt_out.contiguous()
    cur, send = kv, None
    for j in range(R):
        if j + 1 < R:
            kv_comm.start(cur)
        acc = scratch[min(j, 1)]
        if j > 1:
            acc.zero_()
        blocks_backward(st, (dout, q, out, lse), cur, bp.calls((i - j) % R), (dq, acc), kw((i - j) % R))
        if joint and j == 0:
            joint_backward(st, saved, dout, dt_out, dq, (djq, djk, djv), acc)
        if j == 0:
            send = acc
        else:
            send = dkv_comm.wait()  # partial (dk, dv) of this block from the ranks before us
            send.add_(acc)
        if R > 1:
            dkv_comm.start(send)
        if j + 1 < R:
            cur = kv_comm.wait()
    dkv = dkv_comm.wait() if R > 1 else send  # our own block's gradient, home after a full lap
    # dkv may be a cached ring buffer that the next call overwrites: the gradients handed out are copies.
    copy = R > 1 and st.comm_cache is not None
    grads = (dq.to(q.dtype), dkv[0].to(k.dtype, copy=copy), dkv[1].to(v.dtype, copy=copy))
    return grads + ((djq.to(jq.dtype), djk.to(jk.dtype), djv.to(jv.dtype)) if joint else (None,) * 3)


def _allgather_merge(out: Tensor, lse: Tensor, group, size: int) -> Tuple[Tensor, Tensor]:
    """Merge every ring rank's partial (out, lse) in ring order: identical result on every rank."""
    outs, lses = all_gather(out, group), all_gather(lse, group)
    res_out, res_lse = outs[0], lses[0]
    for o, l in zip(outs[1:], lses[1:]):
        merge_(res_out, res_lse, o, l)
    return res_out, res_lse
