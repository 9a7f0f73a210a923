"""The all-gather K/V ring: one all-gather of the ring group's K/V (per head chunk) instead of R-1 P2P
steps, every visible block computed from it with the same block plan; backward reduce-scatters dK/dV.
Also the measured rule that chooses between it and the P2P ring (``choose_ring_impl``)."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .. import config
from ..comm.collectives import all_gather, reduce_scatter, wait_work
from .heads import HeadMapBackend, balanced_ranges
from .blocks import RingRun, Saved, blocks_backward, blocks_forward, call_kw_for, joint_backward, running

Tensor = torch.Tensor


def choose_ring_impl(degree: int, local_len: int, device: torch.device, ring_engine: Optional[str] = None) -> str:
    """The ring implementation ``ring_impl="auto"`` picks for a ring of ``degree`` ranks whose
    post-Ulysses local sequence is ``local_len`` positions. ``$SPATTN_RING_IMPL`` ("p2p" or
    "allgather") overrides the rule; an explicit ``ring_engine`` (an option of the P2P ring) picks "p2p".

    Rule: "allgather" on CPU when the gathered sequence ``degree * local_len`` is at most 512
    positions, else "p2p"; on GPUs always "p2p" (its transfers overlap compute; not measured here).
    Evidence (bench/bench_varlen.py time --worlds 2,4 --seqs 256,1024,4096 --heads 4 --reps 5
    --packing one-doc; gloo CPU, 2 cores shared, load average ~19, so +-30% noise; causal zigzag,
    fp32, head_dim 64; median ms p2p / allgather, fwd and fwd+bwd):
        R=2, S=256:  fwd 16.3 / 7.5    fwd+bwd  42.1 / 21.5   allgather wins (fewer, larger messages)
        R=4, S=256:  fwd  9.4 / 5.9    fwd+bwd  30.4 / 35.1   fwd wins, bwd a wash
        R=2, S=1024: fwd 32.4 / 32.2   fwd+bwd 124.3 / 128.3  tie
        R=4, S=1024: fwd 14.7 / 20.3   fwd+bwd  55.5 / 74.4   p2p wins
        R=4, S=4096: fwd 195 / 198     fwd+bwd  626 / 672     p2p (and R x less K/V memory)
    Above a few hundred positions the compute hides the ring's per-step cost, and the P2P ring
    keeps K/V memory at 2 blocks instead of R, so it stays the default.
    """
    forced = config.settings().ring_impl
    if forced is not None:
        return forced
    if ring_engine is not None:
        return "p2p"
    if degree > 1 and device.type == "cpu" and degree * local_len <= 512:
        return "allgather"
    return "p2p"


def allgather_head_chunks(st: RingRun, q: Tensor, k: Tensor) -> List[Tuple[Tuple[int, int], Tuple[int, int]]]:
    """(query head range, kv head range) per chunk. The gathered K/V of one chunk is
    R * 2 * B * Sl * hc * D elements; chunks keep it under ``RingRun.allgather_bytes`` (``attention(allgather_bytes=)``,
    ``$SPATTN_ALLGATHER_BYTES``, default 256 MiB; two chunks are alive at once, the next one arriving while this one computes). A
    backend with a non-uniform head map (``HeadMapBackend``) takes all heads in one chunk."""
    hq, hkv = q.shape[2], k.shape[2]
    budget = st.allgather_bytes
    need = st.blocks.size * 2 * k.numel() * k.element_size()
    n = min(hkv, max(1, -(-need // max(budget, 1))))
    if n == 1 or isinstance(st.backend, HeadMapBackend):
        return [((0, hq), (0, hkv))]
    g = hq // hkv
    return [((lo * g, hi * g), (lo, hi)) for lo, hi in balanced_ranges(hkv, n)]


def _start_gather(st: RingRun, k: Tensor, v: Tensor, kh: Tuple[int, int]):
    kv = torch.stack([k[:, :, kh[0]:kh[1]], v[:, :, kh[0]:kh[1]]])  # K and V in one message
    return all_gather(kv, st.group, async_op=True)


def allgather_forward(st: RingRun, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """out (B, Sl, Hq, D) fp32, lse (B, Hq, Sl) of the local queries against every ring rank's K/V."""
    chunks = allgather_head_chunks(st, q, k)
    bp = st.blocks
    plans, kw = [bp.calls(src) for src in range(bp.size)], call_kw_for(bp, q.device)
    order = [(bp.rank - j) % bp.size for j in range(bp.size)]  # the P2P ring's merge order
    res = None if len(chunks) == 1 else running(q, q.shape[2])
    work = _start_gather(st, k, v, chunks[0][1])
    for c, ((q0, q1), kh) in enumerate(chunks):
        w, parts = work
        wait_work(w)
        if c + 1 < len(chunks):
            work = _start_gather(st, k, v, chunks[c + 1][1])
        qc, acc = q[:, :, q0:q1], [None, None]
        for src in order:
            blocks_forward(st.backend, qc, parts[src], plans[src], st.scale, acc, kw(src))
        if acc[0] is None:
            acc = list(running(qc, q1 - q0))
        if res is None:
            return acc[0], acc[1]
        res[0][:, :, q0:q1] = acc[0]
        res[1][:, q0:q1] = acc[1]
    return res


def allgather_backward(st: RingRun, saved: Saved, dout: Tensor, dt_out: Optional[Tensor]):
    q, k, v, out, lse, jq, jk, jv, t_out, t_lse = saved
    chunks = allgather_head_chunks(st, q, k)
    bp = st.blocks
    plans, kw = [bp.calls(src) for src in range(bp.size)], call_kw_for(bp, q.device)
    dq = torch.zeros_like(q, dtype=torch.float32)
    dkv = k.new_zeros((2,) + k.shape, dtype=torch.float32)  # this rank's own (dk, dv)
    pending = []
    work = _start_gather(st, k, v, chunks[0][1])
    for c, ((q0, q1), (h0, h1)) in enumerate(chunks):
        w, parts = work
        wait_work(w)
        if c + 1 < len(chunks):
            work = _start_gather(st, k, v, chunks[c + 1][1])
        grads = [parts[0].new_zeros(parts[0].shape, dtype=torch.float32) for _ in range(bp.size)]
        qs = slice(q0, q1)
        for src in range(bp.size):
            if plans[src]:
                blocks_backward(st, (dout[:, :, qs], q[:, :, qs], out[:, :, qs], lse[:, qs]), parts[src],
                                plans[src], (dq[:, :, qs], grads[src]), kw(src))
        w, mine = reduce_scatter(grads, st.group, async_op=True)
        pending.append((w, mine, (h0, h1)))
    for w, mine, (h0, h1) in pending:
        wait_work(w)
        dkv[:, :, :, h0:h1] += mine
    joint = jq is not None
    if joint:
        djq, djk, djv = (torch.zeros_like(t, dtype=torch.float32) for t in (jq, jk, jv))
        dt_out = torch.zeros_like(t_out) if dt_out is None else dt_out.contiguous()
        joint_backward(st, saved, dout, dt_out, dq, (djq, djk, djv), dkv)
    grads = (dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype))
    return grads + ((djq.to(jq.dtype), djk.to(jk.dtype), djv.to(jv.dtype)) if joint else (None,) * 3)
