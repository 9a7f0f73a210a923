"""Ring attention: K/V blocks travel around the ring group, partial results merge online by LSE.

Forward, per step: start sending the current K/V block on, compute attention of the local queries
with it, fold the result in with ``ops.merge_``, wait. Backward recomputes each block from the saved
final (out, lse); dq accumulates locally and each block's (dk, dv) travel the ring with it, arriving
back at the owner after the last step. Nothing of size seqlen x seqlen is ever stored.

Causal masking and padding are handled by a per-step *plan*: each rank's post-Ulysses sequence is a
list of segments of length L at known global starts (1 segment contiguous, 2 zigzag), so a (query,
key) segment pair is either fully visible, the causal diagonal, or masked; the plan turns that into
as few backend calls as possible and skips masked work entirely.

Joint (text) tokens, replicated on every rank and already head-sliced: image queries see the joint
K/V once (one local block, not a ring step), text queries see each rank's own image block plus, on ring rank
0 only, the joint K/V; their partials are all-gathered over the ring and merged, so text work is done
once across the ring. A text padding mask reaches this layer as per-batch key lengths
(``RingSetup.joint_lens``, keys compacted to a prefix by attention()) and applies to the two joint K/V
blocks only; image K/V are never masked by it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .comm import count_bytes, make_ring_comm
from .ops import block_forward, merge_

Tensor = torch.Tensor
Call = Tuple[int, int, int, int, bool]  # q_lo, q_hi, k_lo, k_hi, causal (local sequence indices)


@dataclass(frozen=True)
class RingSetup:
    """Static description of one ring attention call on this rank."""

    group: Optional[dist.ProcessGroup]
    size: int                 # ring degree R
    rank: int                 # this rank's index in the ring
    seg_len: int              # L: length of one segment
    starts: Tuple[Tuple[int, ...], ...]  # per ring rank: global start of each of its segments
    seq_len: int              # global number of real positions (>= that is padding)
    causal: bool
    scale: float
    backend: object
    engine: str = "auto"
    joint_lens: Optional[Tensor] = None  # int32 (B,): valid joint keys per batch element (None: all)

    def valid(self, start: int) -> int:
        return max(0, min(self.seg_len, self.seq_len - start))

    def kv_valid(self, r: int) -> int:
        """Real keys of rank r's block: padding is a global suffix, so they are a prefix."""
        return sum(self.valid(s) for s in self.starts[r])

    def pad_rows(self) -> List[Tuple[int, int]]:
        """Local row ranges of this rank that are padding."""
        L = self.seg_len
        rows = [(a * L + self.valid(s), (a + 1) * L) for a, s in enumerate(self.starts[self.rank])]
        return [r for r in rows if r[0] < r[1]]

    def plan(self, src: int) -> List[Call]:
        """Backend calls for the local queries against ring rank ``src``'s key block."""
        L, qs, ks = self.seg_len, self.starts[self.rank], self.starts[src]

        def vis(a: int, b: int) -> str:
            if self.valid(qs[a]) == 0 or self.valid(ks[b]) == 0:
                return ""
            if not self.causal or ks[b] < qs[a]:
                return "full"
            return "diag" if ks[b] == qs[a] else ""

        grid = [[vis(a, b) for b in range(len(ks))] for a in range(len(qs))]
        rows = [a for a in range(len(qs)) if any(grid[a])]
        cols = [b for b in range(len(ks)) if any(grid[a][b] for a in range(len(qs)))]
        if not rows:
            return []
        contiguous = rows == list(range(rows[0], rows[-1] + 1)) and cols == list(range(cols[0], cols[-1] + 1))
        q_lo, q_hi = rows[0] * L, (rows[-1] + 1) * L
        if contiguous and all(grid[a][b] == "full" for a in rows for b in cols):
            # Trimming the keys to the real ones is what keeps padding out of non-causal attention.
            return [(q_lo, q_hi, cols[0] * L, cols[-1] * L + self.valid(ks[cols[-1]]), False)]
        if contiguous and rows == cols and all(qs[a] == ks[a] for a in rows):
            # Same segments on both sides, in increasing global order: one top-left causal call.
            # (Causal queries never see padded keys, so no trimming is needed.)
            return [(q_lo, q_hi, q_lo, q_hi, True)]
        calls = []
        for a in rows:
            for b in range(len(ks)):
                if grid[a][b] == "full":
                    calls.append((a * L, (a + 1) * L, b * L, b * L + self.valid(ks[b]), False))
                elif grid[a][b] == "diag":
                    calls.append((a * L, (a + 1) * L, b * L, (b + 1) * L, True))
        return calls


def _blocks_forward(be, q: Tensor, kv, calls: Sequence[Call], scale: float, acc: List) -> None:
    """Fold the calls' results into the running ``acc = [out, lse]``. While nothing is folded in
    (``acc == [None, None]``) a block covering every row becomes the accumulator itself: no zero
    fill, no copy, no merge."""
    for q0, q1, k0, k1, causal in calls:
        o, l = block_forward(be, q[:, q0:q1], kv[0][:, k0:k1], kv[1][:, k0:k1], causal, scale)
        if acc[0] is None:
            if q0 == 0 and q1 == q.shape[1]:
                acc[:] = [o.float().contiguous(), l.contiguous()]
                continue
            acc[:] = _running(q, q.shape[2])
        merge_(acc[0][:, q0:q1], acc[1][:, :, q0:q1], o, l)


def _blocks_backward(be, dout, q, kv, out, lse, calls, scale, dq, dkv) -> None:
    for q0, q1, k0, k1, causal in calls:
        be.backward(dout[:, q0:q1], q[:, q0:q1], kv[0][:, k0:k1], kv[1][:, k0:k1], out[:, q0:q1],
                    lse[:, :, q0:q1], causal, scale, dq=dq[:, q0:q1], dk=dkv[0][:, k0:k1], dv=dkv[1][:, k0:k1])


def _running(q: Tensor, heads: int) -> Tuple[Tensor, Tensor]:
    """Empty running result: out 0 (fp32), lse -inf."""
    b, s = q.shape[:2]
    return (q.new_zeros((b, s, heads, q.shape[3]), dtype=torch.float32),
            torch.full((b, heads, s), float("-inf"), dtype=torch.float32, device=q.device))


Saved = Tuple[Optional[Tensor], ...]


def ring_forward(st: RingSetup, q: Tensor, k: Tensor, v: Tensor, jq: Optional[Tensor] = None,
                 jk: Optional[Tensor] = None, jv: Optional[Tensor] = None):
    """Ring attention forward over ``st.group``.

    q: (B, Sl, Hq, D) local queries; k, v: (B, Sl, Hkv, D); jq/jk/jv: (B, T, H*, D) or None.
    Returns out (q's dtype, padded rows 0), lse (the real fp32 LSE, padded rows included),
    t_out, t_lse (None without joint tokens).
    """
    be, i = st.backend, st.rank
    # A rank left without heads (fewer heads than Ulysses ranks) has nothing to compute, and
    # neither has the rest of its ring (same heads): no compute, no ring.
    R = st.size if q.shape[2] else 0
    kv = torch.stack([k, v]) if R > 1 else (k, v)  # K and V travel as one message
    comm = make_ring_comm(st.group, kv, st.engine) if R > 1 else None
    cur, acc = kv, [None, None]
    for j in range(R):
        if j + 1 < R:
            comm.start(cur)
        _blocks_forward(be, q, cur, st.plan((i - j) % R), st.scale, acc)
        if j + 1 < R:
            cur = comm.wait()
    out, lse = acc if acc[0] is not None else _running(q, q.shape[2])
    t_out = t_lse = None
    if jq is not None:
        t_out, t_lse = _running(jq, jq.shape[2])
        if R:
            merge_(out, lse, *block_forward(be, q, jk, jv, False, st.scale, st.joint_lens))
            n = st.kv_valid(i)
            if n:
                merge_(t_out, t_lse, *block_forward(be, jq, k[:, :n], v[:, :n], False, st.scale))
            if i == 0:
                merge_(t_out, t_lse, *block_forward(be, jq, jk, jv, False, st.scale, st.joint_lens))
            if R > 1:
                t_out, t_lse = _allgather_merge(t_out, t_lse, st.group, R)
        t_out = t_out.to(q.dtype)
    out = out.to(q.dtype)
    for r0, r1 in st.pad_rows():
        out[:, r0:r1] = 0
    return out, lse, t_out, t_lse


def ring_backward(st: RingSetup, saved: Saved, dout: Tensor, dt_out: Optional[Tensor] = None):
    """Gradients of ``ring_forward``. saved = (q, k, v, out, lse, jq, jk, jv, t_out, t_lse) as the
    forward took and returned them. Returns (dq, dk, dv, djq, djk, djv); the joint ones are this
    rank's contributions (None without joint tokens)."""
    q, k, v, out, lse, jq, jk, jv, t_out, t_lse = saved
    be, i = st.backend, st.rank
    joint = jq is not None
    if q.shape[2] == 0:
        return tuple(torch.zeros_like(t) if t is not None else None for t in (q, k, v, jq, jk, jv))
    R = st.size
    pad = st.pad_rows()
    if pad:  # padded rows are outputs of nothing: their gradient must not flow anywhere
        dout = dout.clone()
        for r0, r1 in pad:
            dout[:, r0:r1] = 0
    dout = dout.contiguous()
    calls = st.plan(i)
    sl = q.shape[1]
    if R == 1 and not joint and len(calls) == 1 and calls[0][:4] == (0, sl, 0, sl):
        # One block covering everything (Ulysses, or a mesh of one): no accumulators needed.
        return be.backward(dout, q, k, v, out, lse, calls[0][4], st.scale) + (None,) * 3
    dq = torch.zeros_like(q, dtype=torch.float32)
    kv = torch.stack([k, v]) if R > 1 else (k, v)
    # Block (dk, dv) accumulate in fp32: scratch[0] for step 0 (it is sent away), scratch[1] after.
    scratch = [k.new_zeros((2,) + k.shape, dtype=torch.float32) for _ in range(min(R, 2))]
    kv_comm = make_ring_comm(st.group, kv, st.engine) if R > 1 else None
    dkv_comm = make_ring_comm(st.group, scratch[0], st.engine) if R > 1 else None
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
        _blocks_backward(be, dout, q, cur, out, lse, st.plan((i - j) % R), st.scale, dq, acc)
        if joint and j == 0:
            jkw = {} if st.joint_lens is None else {"k_lens": st.joint_lens}
            be.backward(dout, q, jk, jv, out, lse, False, st.scale, dq=dq, dk=djk, dv=djv, **jkw)
            n = st.kv_valid(i)
            if n:
                be.backward(dt_out, jq, k[:, :n], v[:, :n], t_out, t_lse, False, st.scale,
                            dq=djq, dk=acc[0][:, :n], dv=acc[1][:, :n])
            if i == 0:
                be.backward(dt_out, jq, jk, jv, t_out, t_lse, False, st.scale, dq=djq, dk=djk, dv=djv, **jkw)
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
    grads = (dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype))
    return grads + ((djq.to(jq.dtype), djk.to(jk.dtype), djv.to(jv.dtype)) if joint else (None,) * 3)


def _allgather_merge(out: Tensor, lse: Tensor, group, size: int) -> Tuple[Tensor, Tensor]:
    """Merge every ring rank's partial (out, lse) in ring order: identical result on every rank."""
    outs = [torch.empty_like(out) for _ in range(size)]
    lses = [torch.empty_like(lse) for _ in range(size)]
    dist.all_gather(outs, out.contiguous(), group=group)
    dist.all_gather(lses, lse.contiguous(), group=group)
    count_bytes("all_gather", (size - 1) * (out.numel() * out.element_size() + lse.numel() * lse.element_size()))
    res_out, res_lse = outs[0], lses[0]
    for o, l in zip(outs[1:], lses[1:]):
        merge_(res_out, res_lse, o, l)
    return res_out, res_lse
