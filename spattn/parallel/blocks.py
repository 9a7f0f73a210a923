"""Block plans and block execution: which (query, key) blocks of a ring step are visible, and running them.

``BlockPlan`` is the planner of one ring call on this rank: each rank's post-Ulysses sequence is a
list of segments of length L at known global starts (1 segment contiguous, 2 zigzag, up to 16
balanced), so a (query, key) segment pair is either fully visible, the causal diagonal, or masked;
``calls(src)`` turns that into as few backend calls as possible and skips masked work entirely.
``RingRun`` pairs a plan with what runs it: the ring's group, the backend, the exchange's buffers.

Packed documents (``BlockPlan.docs``): a backend that masks documents itself (``supports_docs``, the
Triton kernels) gets one call per visible (query segment, key segment) pair with the pair's per-token
document ids; any other backend gets one call per visible document sub-block (``_plan_docs``).

Sliding windows (``BlockPlan.window``): the plan is one call per visible (query segment, key segment)
pair (or document sub-block), each cut to the rows and keys the window lets meet (``window.cut``);
pairs wholly outside it are skipped, and ``window_skipped`` counts them. Each call then carries its
global positions (``q_offset``, ``k_offset``) and the window, which the backend masks at the edges.

The block runners fold each call into the running (out, lse) with ``ops.merge_`` (forward) or
accumulate its gradients (backward); they are shared by the P2P and the all-gather rings.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..comm.ring_comm import RingCommCache
from ..layout import padded_rows
from ..ops import block_backward, block_forward, merge_
from .window import NO_WINDOW, cut

Tensor = torch.Tensor
Call = Tuple[int, int, int, int, bool]  # q_lo, q_hi, k_lo, k_hi, causal (local sequence indices)


@dataclass(frozen=True)
class BlockPlan:
    """Which (query, key) blocks one ring rank computes: pure arithmetic on positions, no process group,
    no backend (the tests and benchmarks build it for every rank of a ring in one process)."""

    size: int                 # ring degree R
    rank: int                 # this rank's index in the ring
    seg_len: int              # L: length of one segment
    starts: Tuple[Tuple[int, ...], ...]  # per ring rank: global start of each of its segments
    seq_len: int              # global number of real positions (>= that is padding)
    causal: bool
    docs: Optional[Tuple[int, ...]] = None  # packed documents: global boundaries 0 = b_0 < ... < b_n
    kernel_docs: bool = False  # documents masked inside the backend (it takes ``q_doc`` / ``k_doc``)
    window: Tuple[int, int] = NO_WINDOW  # sliding window (left, right) over global positions
    image_pos: int = 0        # joint order: global position of image token 0 (front: the text length)
    text_pos: int = 0         # joint order: global position of text token 0 (rear: seq_len)

    @property
    def windowed(self) -> bool:
        return self.window != NO_WINDOW

    def pos(self, r: int, local: int) -> int:
        """Global position of ring rank r's local index ``local`` (calls never cross a segment)."""
        return self.starts[r][local // self.seg_len] + local % self.seg_len

    def valid(self, start: int) -> int:
        return max(0, min(self.seg_len, self.seq_len - start))

    def kv_valid(self, r: int) -> int:
        """Real keys of rank r's block: padding is a global suffix, so they are a prefix."""
        return sum(self.valid(s) for s in self.starts[r])

    def pad_rows(self) -> List[Tuple[int, int]]:
        """Local row ranges of this rank that are padding."""
        return padded_rows(self.starts[self.rank], self.seg_len, self.seq_len)

    def doc_ids(self, r: int, device: torch.device) -> Tensor:
        """int32 (n_segments * L,): document of each local position of ring rank r (padding: the last
        document; no call reaches it). Non-decreasing within a segment, which is all one call spans."""
        pos = torch.tensor(self.starts[r], dtype=torch.int64)[:, None] + torch.arange(self.seg_len)
        bounds = torch.tensor(self.docs[1:-1], dtype=torch.int64)
        return torch.bucketize(pos.reshape(-1), bounds, right=True).to(device=device, dtype=torch.int32)

    def calls(self, src: int) -> List[Call]:
        """Backend calls for the local queries against ring rank ``src``'s key block."""
        if self.windowed:
            return [c for c, _ in self._plan_window(src)]
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

    def _plan_window(self, src: int) -> List[Tuple[Call, Call]]:
        """(cut call, the pair's call it came from) for every pair the window lets meet: the unwindowed
        per-pair plan (documents included), each call cut to the window (``window.cut``)."""
        if self.docs is not None:
            base = self._plan_doc_pairs(src) if self.kernel_docs else self._plan_docs(src)
        else:
            base = self._plan_pairs(src)
        out = []
        for c in base:
            r = cut(c, self.pos(self.rank, c[0]), self.pos(src, c[2]), self.window, self.causal)
            if r is not None:
                out.append((r[0], c))
        return out

    def window_skipped(self, src: int) -> int:
        """Calls of the unwindowed per-pair plan against ``src`` that the window skips entirely."""
        if not self.windowed:
            return 0
        if self.docs is not None:
            base = self._plan_doc_pairs(src) if self.kernel_docs else self._plan_docs(src)
        else:
            base = self._plan_pairs(src)
        return len(base) - len(self._plan_window(src))

    def _plan_pairs(self, src: int) -> List[Call]:
        """One call per (query segment, key segment) pair with a causally visible key: keys of an
        earlier segment in full, the same segment top-left causal (a windowed plan's starting point)."""
        L, qs, ks = self.seg_len, self.starts[self.rank], self.starts[src]
        calls: List[Call] = []
        for a, qa in enumerate(qs):
            for b, ka in enumerate(ks):
                nq, nk = self.valid(qa), self.valid(ka)
                if nq and nk and not (self.causal and ka > qa):
                    calls.append((a * L, a * L + nq, b * L, b * L + nk, self.causal and ka == qa))
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


@dataclass(frozen=True)
class RingRun:
    """One ring call on this rank: its block plan and what runs it (the ring's group, the backend, the
    exchange engine and buffers). Built by ``hybrid.build_plan``; the joint key lengths are per call."""

    blocks: BlockPlan
    group: Optional[dist.ProcessGroup]
    backend: object
    scale: float
    engine: str = "auto"
    joint_lens: Optional[Tensor] = None  # int32 (B,): valid joint keys per batch element (None: all)
    impl: str = "p2p"         # "p2p" (K/V blocks travel the ring) or "allgather" (gather, one pass)
    comm_cache: Optional[RingCommCache] = None  # the mesh's: ring buffers reused across calls
    allgather_bytes: int = 256 << 20  # all-gather ring: K/V budget of one head chunk


def visible_pairs(calls: Sequence[Call]) -> int:
    """(query, key) pairs a list of calls computes: q*k for a full call, k*(k+1)/2 + (q-k)*k for a
    top-left causal one (the work measure of bench_varlen's balance figures)."""
    n = 0
    for q0, q1, k0, k1, causal in calls:
        sq, sk = q1 - q0, k1 - k0
        n += (min(sq, sk) * (min(sq, sk) + 1) // 2 + max(0, sq - sk) * sk) if causal else sq * sk
    return n


CallKw = Optional[Callable[[int, int, int, int], dict]]


def call_kw(kw: CallKw, q0: int, q1: int, k0: int, k1: int) -> dict:
    """The backend keywords of call (q0, q1, k0, k1) (``kw``: from ``call_kw_for``), {} without any."""
    return {} if kw is None else kw(q0, q1, k0, k1)


def blocks_forward(be, q: Tensor, kv, calls: Sequence[Call], scale: float, acc: List, kw: CallKw = None) -> None:
    """Fold the calls' results into the running ``acc = [out, lse]``. While nothing is folded in
    (``acc == [None, None]``) a block covering every row becomes the accumulator itself: no zero
    fill, no copy, no merge. ``kw``: the calls' backend keywords (document ids, window positions)."""
    for q0, q1, k0, k1, causal in calls:
        o, l = block_forward(be, q[:, q0:q1], kv[0][:, k0:k1], kv[1][:, k0:k1], causal, scale,
                             **call_kw(kw, q0, q1, k0, k1))
        if acc[0] is None:
            if q0 == 0 and q1 == q.shape[1]:
                acc[:] = [o.float().contiguous(), l.contiguous()]
                continue
            acc[:] = running(q, q.shape[2])
        merge_(acc[0][:, q0:q1], acc[1][:, :, q0:q1], o, l)


def blocks_backward(st: RingRun, rows: Tuple[Tensor, Tensor, Tensor, Tensor], kv, calls: Sequence[Call],
                    acc: Tuple[Tensor, Tensor], kw: CallKw = None) -> None:
    """Add the calls' gradients into ``acc`` = (dq, dkv): rows = (dout, q, out, lse) of the local
    queries, kv = the key block (k, v) (stacked or a pair), dkv its (dk, dv) accumulators."""
    dout, q, out, lse = rows
    dq, dkv = acc
    for q0, q1, k0, k1, causal in calls:
        block_backward(st.backend, (dout[:, q0:q1], q[:, q0:q1], out[:, q0:q1], lse[:, :, q0:q1]),
                       (kv[0][:, k0:k1], kv[1][:, k0:k1]), causal, st.scale,
                       (dq[:, q0:q1], dkv[0][:, k0:k1], dkv[1][:, k0:k1]), **call_kw(kw, q0, q1, k0, k1))


def call_kw_for(bp: BlockPlan, device: torch.device) -> Callable[[int], CallKw]:
    """src -> the backend keywords of each call against ``src``'s key block: document ids for a backend
    that masks them, the window with the call's global positions; None when a plain call needs none."""
    ids = [bp.doc_ids(r, device) for r in range(bp.size)] if bp.kernel_docs else None
    if ids is None and not bp.windowed:
        return lambda src: None

    def for_src(src: int):
        def kw(q0: int, q1: int, k0: int, k1: int) -> dict:
            d = {} if ids is None else {"q_doc": ids[bp.rank][q0:q1], "k_doc": ids[src][k0:k1]}
            if bp.windowed:
                d.update(window=bp.window, q_offset=bp.pos(bp.rank, q0), k_offset=bp.pos(src, k0))
            return d
        return kw
    return for_src


def running(q: Tensor, heads: int) -> Tuple[Tensor, Tensor]:
    """Empty running result: out 0 (fp32), lse -inf."""
    b, s = q.shape[:2]
    return (q.new_zeros((b, s, heads, q.shape[3]), dtype=torch.float32),
            torch.full((b, heads, s), float("-inf"), dtype=torch.float32, device=q.device))


Saved = Tuple[Optional[Tensor], ...]


def joint_calls(bp: BlockPlan, kind: str, n_rows: int, n_keys: int) -> List[Tuple[Call, dict]]:
    """The backend calls of one joint block with their keywords. ``kind``: "image" (the local image
    queries x the joint K/V), "text" (the text queries x this rank's own image keys, ``n_keys`` real
    ones) or "text_joint" (text x joint K/V, ring rank 0). Without a window: the whole block, one call.
    With one: a call per image segment, cut to the rows and keys it lets meet in the joint order
    (joint keys keep their full range: their per-batch lengths count from key 0)."""
    whole = [((0, n_rows, 0, n_keys, False), {})]
    if not bp.windowed:
        return whole if n_rows and n_keys else []
    L, own = bp.seg_len, bp.starts[bp.rank]
    if kind == "text_joint":
        pieces = [((0, n_rows, 0, n_keys, False), bp.text_pos, bp.text_pos)]
    elif kind == "image":
        pieces = [((a * L, a * L + bp.valid(s), 0, n_keys, False), bp.image_pos + s, bp.text_pos)
                  for a, s in enumerate(own) if bp.valid(s)]
    else:
        pieces = [((0, n_rows, b * L, b * L + bp.valid(s), False), bp.text_pos, bp.image_pos + s)
                  for b, s in enumerate(own) if bp.valid(s)]
    calls = []
    for c, qp, kp in pieces:
        r = cut(c, qp, kp, bp.window, False)
        if r is None:
            continue
        (q0, q1, k0, k1, _), qo, ko = r
        if kind != "text":  # joint keys: full range (lengths), the window masks them by position
            k0, k1, ko = c[2], c[3], kp
        calls.append(((q0, q1, k0, k1, False), {"window": bp.window, "q_offset": qo, "k_offset": ko}))
    return calls


def joint_backward(st: RingRun, saved: Saved, dout: Tensor, dt_out: Tensor, dq: Tensor,
                    djoint: Tuple[Tensor, Tensor, Tensor], dkv_own) -> None:
    """Joint-token gradients of this rank: image queries x joint K/V, text queries x this rank's
    own image K/V (into ``dkv_own``, the own block's (dk, dv) accumulators) and, on ring rank 0,
    text queries x joint K/V (the calls of ``joint_calls``)."""
    q, k, v, out, lse, jq, jk, jv, t_out, t_lse = saved
    be, (djq, djk, djv) = st.backend, djoint
    jkw = {} if st.joint_lens is None else {"k_lens": st.joint_lens}
    blocks = [("image", (dout, q, out, lse), (jk, jv), (dq, djk, djv), jkw),
              ("text", (dt_out, jq, t_out, t_lse), (k, v), (djq, dkv_own[0], dkv_own[1]), {})]
    if st.blocks.rank == 0:
        blocks.append(("text_joint", (dt_out, jq, t_out, t_lse), (jk, jv), (djq, djk, djv), jkw))
    for kind, rows, kv, acc, extra in blocks:
        n_keys = st.blocks.kv_valid(st.blocks.rank) if kind == "text" else kv[0].shape[1]
        for (q0, q1, k0, k1, _), kw in joint_calls(st.blocks, kind, rows[1].shape[1], n_keys):
            block_backward(be, tuple(t[:, q0:q1] if t.dim() == 4 else t[:, :, q0:q1] for t in rows),
                           (kv[0][:, k0:k1], kv[1][:, k0:k1]), False, st.scale,
                           (acc[0][:, q0:q1], acc[1][:, k0:k1], acc[2][:, k0:k1]), **extra, **kw)
