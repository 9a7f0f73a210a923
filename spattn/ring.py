"""Ring attention: K/V blocks travel around the ring group, partial results merge online by LSE.

Forward, per step: start sending the current K/V block on, compute attention of the local queries
with it, fold the result in with ``ops.merge_``, wait. Backward recomputes each block from the saved
final (out, lse); dq accumulates locally and each block's (dk, dv) travel the ring with it, arriving
back at the owner after the last step. Nothing of size seqlen x seqlen is ever stored.

Causal masking and padding are handled by a per-step *plan*: each rank's post-Ulysses sequence is a
list of segments of length L at known global starts (1 segment contiguous, 2 zigzag), so a (query,
key) segment pair is either fully visible, the causal diagonal, or masked; the plan turns that into
as few backend calls as possible and skips masked work entirely.

Packed documents (``RingSetup.docs``): a backend that masks documents itself (``supports_docs``, the
Triton kernels) gets one call per visible (query segment, key segment) pair with the pair's per-token
document ids; any other backend gets one call per visible document sub-block (``_plan_docs``).

Joint (text) tokens, replicated on every rank and already head-sliced: image queries see the joint
K/V once (one local block, not a ring step), text queries see each rank's own image block plus, on ring rank
0 only, the joint K/V; their partials are all-gathered over the ring and merged, so text work is done
once across the ring. A text padding mask reaches this layer as per-batch key lengths
(``RingSetup.joint_lens``, keys compacted to a prefix by attention()) and applies to the two joint K/V
blocks only; image K/V are never masked by it.
"""
from __future__ import annotations

import os
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .comm import RingCommCache, count_bytes, make_ring_comm
from .ops import block_forward, merge_
from .ulysses import HeadMapBackend, balanced_ranges

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
    docs: Optional[Tuple[int, ...]] = None  # packed documents: global boundaries 0 = b_0 < ... < b_n
    impl: str = "p2p"         # "p2p" (K/V blocks travel the ring) or "allgather" (gather, one pass)
    comm_cache: Optional[RingCommCache] = None  # the mesh's: ring buffers reused across calls

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

    @property
    def kernel_docs(self) -> bool:
        """Packed documents masked inside the backend (it takes ``q_doc`` / ``k_doc``)."""
        return self.docs is not None and bool(getattr(self.backend, "supports_docs", False))

    def doc_ids(self, r: int, device: torch.device) -> Tensor:
        """int32 (n_segments * L,): document of each local position of ring rank r (padding: the last
        document; no call reaches it). Non-decreasing within a segment, which is all one call spans."""
        pos = torch.tensor(self.starts[r], dtype=torch.int64)[:, None] + torch.arange(self.seg_len)
        bounds = torch.tensor(self.docs[1:-1], dtype=torch.int64)
        return torch.bucketize(pos.reshape(-1), bounds, right=True).to(device=device, dtype=torch.int32)

    def plan(self, src: int) -> List[Call]:
        """Backend calls for the local queries against ring rank ``src``'s key block."""
        if self.docs is not None:
            return self._plan_doc_pairs(src) if self.kernel_docs else self._plan_docs(src)
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

    def _plan_doc_pairs(self, src: int) -> List[Call]:
        """Packed documents masked by the backend: one call per (query segment, key segment) pair that
        shares a document and is causally visible (keys of an earlier segment: full; the same segment:
        top-left causal); the kernel masks and skips inside it by the document ids."""
        L, qs, ks, docs = self.seg_len, self.starts[self.rank], self.starts[src], self.docs

        def doc(p: int) -> int:
            return bisect_right(docs, p) - 1

        calls: List[Call] = []
        for a, qa in enumerate(qs):
            nq = self.valid(qa)
            for b, ka in enumerate(ks):
                nk = self.valid(ka)
                if not nq or not nk or (self.causal and ka > qa):
                    continue
                if doc(ka) > doc(qa + nq - 1) or doc(ka + nk - 1) < doc(qa):
                    continue  # no document in common
                calls.append((a * L, a * L + nq, b * L, b * L + nk, self.causal and ka == qa))
        return calls

    def _plan_docs(self, src: int) -> List[Call]:
        """Packed documents: for every (query segment, key segment) pair, one call per visible
        (document piece x document piece) sub-block, nothing for invisible ones. A causal
        sub-block is cut into keys before the first query (full), a square aligned diagonal
        (top-left causal) and, when the keys end before the queries do, the rows below it (full)."""
        L, qs, ks, docs = self.seg_len, self.starts[self.rank], self.starts[src], self.docs
        calls: List[Call] = []
        for a, qa in enumerate(qs):
            qb = qa + self.valid(qa)
            for b, ka in enumerate(ks):
                kb = ka + self.valid(ka)
                if qa >= qb or ka >= kb or (self.causal and ka >= qb):
                    continue
                # Only documents overlapping both segments can hold a visible pair.
                first = max(bisect_right(docs, qa), bisect_right(docs, ka)) - 1
                for d in range(first, min(bisect_left(docs, qb), bisect_left(docs, kb))):
                    d0, d1 = docs[d], docs[d + 1]
                    x0, x1, y0, y1 = max(qa, d0), min(qb, d1), max(ka, d0), min(kb, d1)
                    if x0 >= x1 or y0 >= y1:
                        continue
                    qo, ko = a * L - qa, b * L - ka  # global position -> local index
                    if not self.causal:
                        calls.append((x0 + qo, x1 + qo, y0 + ko, y1 + ko, False))
                        continue
                    if y0 >= x1:
                        continue
                    if y0 < x0:
                        calls.append((x0 + qo, x1 + qo, y0 + ko, min(y1, x0) + ko, False))
                    s0, s1 = max(x0, y0), min(y1, x1)
                    if s0 < s1:
                        calls.append((s0 + qo, s1 + qo, s0 + ko, s1 + ko, True))
                        if s1 < x1:
                            calls.append((s1 + qo, x1 + qo, s0 + ko, s1 + ko, False))
        return calls


def visible_pairs(calls: Sequence[Call]) -> int:
    """(query, key) pairs a list of calls computes: q*k for a full call, k*(k+1)/2 + (q-k)*k for a
    top-left causal one (the work measure of bench_varlen's balance figures)."""
    n = 0
    for q0, q1, k0, k1, causal in calls:
        sq, sk = q1 - q0, k1 - k0
        n += (min(sq, sk) * (min(sq, sk) + 1) // 2 + max(0, sq - sk) * sk) if causal else sq * sk
    return n


def _doc_kw(docs: Optional[Tuple[Tensor, Tensor]], q0: int, q1: int, k0: int, k1: int) -> dict:
    """The call's document ids (``docs``: local query ids, the key block's ids), {} without them."""
    return {} if docs is None else {"q_doc": docs[0][q0:q1], "k_doc": docs[1][k0:k1]}


def _blocks_forward(be, q: Tensor, kv, calls: Sequence[Call], scale: float, acc: List,
                    docs: Optional[Tuple[Tensor, Tensor]] = None) -> None:
    """Fold the calls' results into the running ``acc = [out, lse]``. While nothing is folded in
    (``acc == [None, None]``) a block covering every row becomes the accumulator itself: no zero
    fill, no copy, no merge. ``docs``: (query, key) document ids for a backend that masks them."""
    for q0, q1, k0, k1, causal in calls:
        o, l = block_forward(be, q[:, q0:q1], kv[0][:, k0:k1], kv[1][:, k0:k1], causal, scale,
                             **_doc_kw(docs, q0, q1, k0, k1))
        if acc[0] is None:
            if q0 == 0 and q1 == q.shape[1]:
                acc[:] = [o.float().contiguous(), l.contiguous()]
                continue
            acc[:] = _running(q, q.shape[2])
        merge_(acc[0][:, q0:q1], acc[1][:, :, q0:q1], o, l)


def _blocks_backward(be, dout, q, kv, out, lse, calls, scale, dq, dkv, docs=None) -> None:
    for q0, q1, k0, k1, causal in calls:
        be.backward(dout[:, q0:q1], q[:, q0:q1], kv[0][:, k0:k1], kv[1][:, k0:k1], out[:, q0:q1],
                    lse[:, :, q0:q1], causal, scale, dq=dq[:, q0:q1], dk=dkv[0][:, k0:k1], dv=dkv[1][:, k0:k1],
                    **_doc_kw(docs, q0, q1, k0, k1))


def _docs_for(st: RingSetup, device: torch.device):
    """src -> (local query ids, src's key ids), or src -> None when the backend does not mask documents."""
    if not st.kernel_docs:
        return lambda src: None
    ids = [st.doc_ids(r, device) for r in range(st.size)]
    return lambda src: (ids[st.rank], ids[src])


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
    if st.impl == "allgather" and R > 1:
        out, lse = _allgather_forward(st, q, k, v)
    else:
        kv = torch.stack([k, v]) if R > 1 else (k, v)  # K and V travel as one message
        comm = make_ring_comm(st.group, kv, st.engine, st.comm_cache, "kv") if R > 1 else None
        cur, acc, docs = kv, [None, None], _docs_for(st, q.device)
        for j in range(R):
            if j + 1 < R:
                comm.start(cur)
            _blocks_forward(be, q, cur, st.plan((i - j) % R), st.scale, acc, docs((i - j) % R))
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
    if st.impl == "allgather" and R > 1:
        return _allgather_backward(st, saved, dout, dt_out)
    calls, docs = st.plan(i), _docs_for(st, q.device)
    sl = q.shape[1]
    if R == 1 and not joint and len(calls) == 1 and calls[0][:4] == (0, sl, 0, sl):
        # One block covering everything (Ulysses, or a mesh of one): no accumulators needed.
        return be.backward(dout, q, k, v, out, lse, calls[0][4], st.scale,
                           **_doc_kw(docs(i), 0, sl, 0, sl)) + (None,) * 3
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
        _blocks_backward(be, dout, q, cur, out, lse, st.plan((i - j) % R), st.scale, dq, acc, docs((i - j) % R))
        if joint and j == 0:
            _joint_backward(st, saved, dout, dt_out, dq, (djq, djk, djv), acc)
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


def _joint_backward(st: RingSetup, saved: Saved, dout: Tensor, dt_out: Tensor, dq: Tensor,
                    djoint: Tuple[Tensor, Tensor, Tensor], dkv_own) -> None:
    """Joint-token gradients of this rank: image queries x joint K/V, text queries x this rank's
    own image K/V (into ``dkv_own``, the own block's (dk, dv) accumulators) and, on ring rank 0,
    text queries x joint K/V."""
    q, k, v, out, lse, jq, jk, jv, t_out, t_lse = saved
    be, (djq, djk, djv) = st.backend, djoint
    jkw = {} if st.joint_lens is None else {"k_lens": st.joint_lens}
    be.backward(dout, q, jk, jv, out, lse, False, st.scale, dq=dq, dk=djk, dv=djv, **jkw)
    n = st.kv_valid(st.rank)
    if n:
        be.backward(dt_out, jq, k[:, :n], v[:, :n], t_out, t_lse, False, st.scale,
                    dq=djq, dk=dkv_own[0][:, :n], dv=dkv_own[1][:, :n])
    if st.rank == 0:
        be.backward(dt_out, jq, jk, jv, t_out, t_lse, False, st.scale, dq=djq, dk=djk, dv=djv, **jkw)


# ----------------------------------------------------------------------------------------------
# The all-gather K/V ring: one all-gather of the group's K/V (per head chunk) instead of R-1 P2P
# steps, every visible block computed from it with the same plan; backward reduce-scatters dK/dV.
# ----------------------------------------------------------------------------------------------
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
    forced = os.environ.get("SPATTN_RING_IMPL", "")
    if forced in ("p2p", "allgather"):
        return forced
    if ring_engine is not None:
        return "p2p"
    if degree > 1 and device.type == "cpu" and degree * local_len <= 512:
        return "allgather"
    return "p2p"


def allgather_head_chunks(st: RingSetup, q: Tensor, k: Tensor) -> List[Tuple[Tuple[int, int], Tuple[int, int]]]:
    """(query head range, kv head range) per chunk. The gathered K/V of one chunk is
    R * 2 * B * Sl * hc * D elements; chunks keep it under ``$SPATTN_ALLGATHER_BYTES`` (default
    256 MiB; two chunks are alive at once, the next one arriving while this one computes). A
    backend with a non-uniform head map (``HeadMapBackend``) takes all heads in one chunk."""
    hq, hkv = q.shape[2], k.shape[2]
    budget = int(os.environ.get("SPATTN_ALLGATHER_BYTES", str(256 << 20)))
    need = st.size * 2 * k.numel() * k.element_size()
    n = min(hkv, max(1, -(-need // max(budget, 1))))
    if n == 1 or isinstance(st.backend, HeadMapBackend):
        return [((0, hq), (0, hkv))]
    g = hq // hkv
    return [((lo * g, hi * g), (lo, hi)) for lo, hi in balanced_ranges(hkv, n)]


def _start_gather(st: RingSetup, k: Tensor, v: Tensor, kh: Tuple[int, int]):
    kv = torch.stack([k[:, :, kh[0]:kh[1]], v[:, :, kh[0]:kh[1]]])  # K and V in one message
    parts = [torch.empty_like(kv) for _ in range(st.size)]
    count_bytes("all_gather", (st.size - 1) * kv.numel() * kv.element_size())
    return dist.all_gather(parts, kv, group=st.group, async_op=True), parts


def _allgather_forward(st: RingSetup, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """out (B, Sl, Hq, D) fp32, lse (B, Hq, Sl) of the local queries against every ring rank's K/V."""
    chunks = allgather_head_chunks(st, q, k)
    plans, docs = [st.plan(src) for src in range(st.size)], _docs_for(st, q.device)
    order = [(st.rank - j) % st.size for j in range(st.size)]  # the P2P ring's merge order
    res = None if len(chunks) == 1 else _running(q, q.shape[2])
    work = _start_gather(st, k, v, chunks[0][1])
    for c, ((q0, q1), kh) in enumerate(chunks):
        w, parts = work
        w.wait()
        if c + 1 < len(chunks):
            work = _start_gather(st, k, v, chunks[c + 1][1])
        qc, acc = q[:, :, q0:q1], [None, None]
        for src in order:
            _blocks_forward(st.backend, qc, parts[src], plans[src], st.scale, acc, docs(src))
        if acc[0] is None:
            acc = list(_running(qc, q1 - q0))
        if res is None:
            return acc[0], acc[1]
        res[0][:, :, q0:q1] = acc[0]
        res[1][:, q0:q1] = acc[1]
    return res


def _allgather_backward(st: RingSetup, saved: Saved, dout: Tensor, dt_out: Optional[Tensor]):
    q, k, v, out, lse, jq, jk, jv, t_out, t_lse = saved
    chunks = allgather_head_chunks(st, q, k)
    plans, docs = [st.plan(src) for src in range(st.size)], _docs_for(st, q.device)
    dq = torch.zeros_like(q, dtype=torch.float32)
    dkv = k.new_zeros((2,) + k.shape, dtype=torch.float32)  # this rank's own (dk, dv)
    pending = []
    work = _start_gather(st, k, v, chunks[0][1])
    for c, ((q0, q1), (h0, h1)) in enumerate(chunks):
        w, parts = work
        w.wait()
        if c + 1 < len(chunks):
            work = _start_gather(st, k, v, chunks[c + 1][1])
        grads = [parts[0].new_zeros(parts[0].shape, dtype=torch.float32) for _ in range(st.size)]
        qs = slice(q0, q1)
        for src in range(st.size):
            if plans[src]:
                _blocks_backward(st.backend, dout[:, :, qs], q[:, :, qs], parts[src], out[:, :, qs],
                                 lse[:, qs], plans[src], st.scale, dq[:, :, qs], grads[src], docs(src))
        mine = torch.empty_like(grads[0])
        count_bytes("reduce_scatter", (st.size - 1) * mine.numel() * mine.element_size())
        pending.append((dist.reduce_scatter(mine, grads, group=st.group, async_op=True), mine, (h0, h1)))
    for w, mine, (h0, h1) in pending:
        w.wait()
        dkv[:, :, :, h0:h1] += mine
    joint = jq is not None
    if joint:
        djq, djk, djv = (torch.zeros_like(t, dtype=torch.float32) for t in (jq, jk, jv))
        dt_out = torch.zeros_like(t_out) if dt_out is None else dt_out.contiguous()
        _joint_backward(st, saved, dout, dt_out, dq, (djq, djk, djv), dkv)
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
