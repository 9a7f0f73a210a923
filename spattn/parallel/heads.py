"""Head plans: which query/KV heads each rank of the Ulysses group computes, per pipeline chunk.

Query heads are split into contiguous, balanced ranges: with H heads on U ranks, H % U ranks get
ceil(H/U) heads and the others floor(H/U). That is exact for any H (no padded heads, no zero heads
sent) and the slowest rank does ceil(H/U) heads, the same as padding H up to a multiple of U would
give, while sending less.

Each rank receives exactly the KV heads its query heads read (GQA: query head h reads kv head
h // (Hq/Hkv)). When the query ranges do not line up with KV groups, a KV head is sent to every rank
that needs it and to no other: the extra traffic is ``sum(len(kv_ranges)) - Hkv`` heads of K and of V
(e.g. 24 query / 8 KV heads on 16 ranks: 16 KV head-slices instead of 8; 1 KV head on 8 ranks: 8).
Their gradients are summed on the way back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

Range = Tuple[int, int]


def balanced_ranges(n: int, parts: int) -> List[Range]:
    """Split ``range(n)`` into ``parts`` contiguous ranges whose sizes differ by at most one."""
    base, extra = divmod(n, parts)
    out, lo = [], 0
    for p in range(parts):
        hi = lo + base + (1 if p < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


@dataclass(frozen=True)
class HeadPlan:
    q_ranges: Tuple[Range, ...]
    kv_ranges: Tuple[Range, ...]
    group_size: int  # Hq // Hkv

    def local_kv_index(self, rank: int) -> Optional[torch.Tensor]:
        """For rank's local query heads, the local kv head each reads, or None when that is the
        plain GQA pattern ``i // (nq // nkv)`` the backends handle without copying."""
        (qlo, qhi), (klo, khi) = self.q_ranges[rank], self.kv_ranges[rank]
        nq, nkv = qhi - qlo, khi - klo
        if nq == 0:
            return None
        idx = [h // self.group_size - klo for h in range(qlo, qhi)]
        if nkv and nq % nkv == 0 and idx == [i // (nq // nkv) for i in range(nq)]:
            return None
        return torch.tensor(idx, dtype=torch.long)


def _kv_range(lo: int, hi: int, g: int) -> Range:
    return (lo // g, (hi - 1) // g + 1) if hi > lo else (0, 0)


def head_plan(heads_q: int, heads_kv: int, degree: int) -> HeadPlan:
    g = heads_q // heads_kv
    q_ranges = balanced_ranges(heads_q, degree)
    return HeadPlan(tuple(q_ranges), tuple(_kv_range(lo, hi, g) for lo, hi in q_ranges), g)


def pipeline_plans(plan: HeadPlan, target: int) -> List[HeadPlan]:
    """Split every rank's heads into n chunks, so the all-to-all of chunk c+1 (and the return of
    chunk c-1) overlaps the attention of chunk c. n is the largest value <= ``target`` that gives
    every rank with heads at least one head per chunk and sends no KV head twice (no extra traffic)."""
    g = plan.group_size
    sizes = [hi - lo for lo, hi in plan.q_ranges]
    for n in range(max(1, min([target] + [x for x in sizes if x])), 0, -1):
        subs = [[(lo + a, lo + b) for a, b in balanced_ranges(hi - lo, n)] for lo, hi in plan.q_ranges]
        chunks = [HeadPlan(tuple(sub[c] for sub in subs), tuple(_kv_range(*sub[c], g) for sub in subs), g)
                  for c in range(n)]
        kv_sent = [sum(ch.kv_ranges[t][1] - ch.kv_ranges[t][0] for ch in chunks) for t in range(len(sizes))]
        if kv_sent == [hi - lo for lo, hi in plan.kv_ranges]:
            return chunks
    return [plan]


class HeadMapBackend:
    """A backend adapter for a non-uniform local query->kv head map: expands K/V per block (local
    memory only; what travels the ring stays unexpanded) and sums the expanded gradients back."""

    def __init__(self, backend, index: torch.Tensor):
        self.inner, self.index, self.name = backend, index, backend.name
        self.supports_docs = getattr(backend, "supports_docs", False)  # q_doc / k_doc pass through **kw
        self.supports_window = getattr(backend, "supports_window", False)  # window, q/k_offset: **kw too

    def available(self, device):
        return self.inner.available(device)

    def _expand(self, x):
        return x.index_select(2, self.index.to(x.device))

    def forward(self, q, k, v, causal, scale, **kw):  # kw: optional k_lens, passed through
        return self.inner.forward(q, self._expand(k), self._expand(v), causal, scale, **kw)

    def backward(self, dout, q, k, v, out, lse, causal, scale, dq=None, dk=None, dv=None, **kw):
        dq, gk, gv = self.inner.backward(dout, q, self._expand(k), self._expand(v), out, lse, causal,
                                         scale, dq=dq, **kw)
        idx = self.index.to(k.device)
        if dk is None:
            dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        dk.index_add_(2, idx, gk.to(dk.dtype))
        dv.index_add_(2, idx, gv.to(dv.dtype))
        return dq, dk, dv
