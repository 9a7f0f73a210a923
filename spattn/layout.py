"""Where each rank's tokens sit in the global sequence, and shard/gather along it.

Layouts (W = mesh.world_size, S = global length, padded up to a multiple of the chunk count):
- ``contiguous``: W chunks of c = ceil(S / W); sp_rank r holds chunk r.
- ``zigzag``: 2W chunks of c = ceil(S / 2W); sp_rank r holds chunks r and 2W-1-r, so every ring
  step of causal attention has the same amount of work.
- ``balanced``: for packed documents (``cu_seqlens``): W * K chunks (K: 2 to 16, see below) dealt
  out K per ring rank by their causal work (greedy, largest first, to the least loaded rank), so every
  rank computes about the same number of visible (query, key) pairs whatever the document lengths.
  The assignment is a pure function of (S, W, Ulysses degree, document boundaries): identical on
  every rank, and shard/gather/attention must all be given the same ``cu_seqlens``.
Padding is always the global tail: positions >= S are padding, wherever they land.

After the Ulysses all-to-all, ring rank i holds the concatenation of its Ulysses group's pieces; put in
global order these are super-chunks of length L = ulysses_degree * c: super-chunk i (contiguous), or
super-chunks i and 2R-1-i (zigzag). ``RingGeometry`` describes that.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .mesh import SPMesh

Tensor = torch.Tensor
LAYOUTS = ("contiguous", "zigzag", "balanced")
# Chunks per rank of the balanced layout: as many as fit chunks of at least BALANCED_MIN_CHUNK
# positions, between 2 and BALANCED_PIECES. Measured with bench/bench_varlen.py balance (8 ranks,
# lognormal documents, mean 1-4K, 32K-128K tokens): the worst rank's causal work over the mean is
# about +9% with 8 chunks per rank and about +1% with 16 (zigzag: +50% to +250%). Tiny chunks cost
# more in per-call overhead than they win in balance (4K tokens on 4 CPU ranks, 64-token chunks:
# about 2x zigzag's time), hence the minimum.
BALANCED_PIECES = 16
BALANCED_MIN_CHUNK = 256

__all__ = ["LAYOUTS", "Geometry", "shard", "gather", "local_seq_len"]


def _check_layout(layout: str, where: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"spattn.{where}: layout must be one of {LAYOUTS}, got {layout!r}")


@dataclass(frozen=True)
class Geometry:
    """Sequence geometry of one call: global length S over W ranks in a layout."""

    seq_len: int
    world_size: int
    layout: str = "contiguous"
    ulysses: int = 1                       # balanced only: Ulysses degree (chunks go by ring rank)
    docs: Optional[Tuple[int, ...]] = None  # balanced only: document boundaries (None: one document)

    @property
    def pieces_per_rank(self) -> int:
        if self.layout == "balanced":
            return max(2, min(BALANCED_PIECES, self.seq_len // (self.world_size * BALANCED_MIN_CHUNK)))
        return 1 if self.layout == "contiguous" else 2

    @property
    def chunk(self) -> int:
        n = self.world_size * self.pieces_per_rank
        return -(-self.seq_len // n)

    @property
    def local_len(self) -> int:
        return self.chunk * self.pieces_per_rank

    @property
    def padded_len(self) -> int:
        return self.local_len * self.world_size

    def chunk_ids(self, sp_rank: int) -> Tuple[int, ...]:
        """Global chunk indices held by ``sp_rank``, in local order."""
        if self.layout == "contiguous":
            return (sp_rank,)
        if self.layout == "zigzag":
            return (sp_rank, 2 * self.world_size - 1 - sp_rank)
        U = self.ulysses
        i, u = divmod(sp_rank, U)
        return tuple(s * U + u for s in self.ring_segments(i, self.world_size // U))

    def ring_segments(self, ring_rank: int, ring_degree: int) -> Tuple[int, ...]:
        """Super-chunks (U consecutive chunks, one from each Ulysses rank) that ring rank holds after
        the Ulysses all-to-all, in local order."""
        R, i = ring_degree, ring_rank
        if self.layout == "contiguous":
            return (i,)
        if self.layout == "zigzag":
            return (i, 2 * R - 1 - i)
        if R * self.ulysses != self.world_size:
            raise ValueError(f"balanced layout: ring degree {R} x Ulysses degree {self.ulysses} != world size "
                             f"{self.world_size}")
        docs = self.docs if self.docs is not None else (0, self.seq_len)
        return balanced_assignment(self.seq_len, R, self.ulysses * self.chunk, self.pieces_per_rank, docs)[i]

    def padded_rows(self, sp_rank: int) -> List[Tuple[int, int]]:
        """This rank's local row ranges that are padding."""
        return padded_rows([cid * self.chunk for cid in self.chunk_ids(sp_rank)], self.chunk, self.seq_len)

    def ring_starts(self, ring_degree: int, ulysses_degree: int) -> Tuple[Tuple[int, ...], ...]:
        """Per ring rank, the global start of each of its post-Ulysses segments (length U * chunk)."""
        L = ulysses_degree * self.chunk
        return tuple(tuple(s * L for s in self.ring_segments(r, ring_degree)) for r in range(ring_degree))

    def valid(self, start: int, length: int) -> int:
        """How many of positions [start, start+length) are real (not padding)."""
        return max(0, min(length, self.seq_len - start))


def padded_rows(starts: Sequence[int], seg_len: int, seq_len: int) -> List[Tuple[int, int]]:
    """Local row ranges that are padding, for a shard made of segments of ``seg_len`` positions at
    global ``starts`` (padding is every position >= ``seq_len``): the one rule for padded rows."""
    rows = [(a * seg_len + max(0, min(seg_len, seq_len - s)), (a + 1) * seg_len) for a, s in enumerate(starts)]
    return [r for r in rows if r[0] < r[1]]


def ulysses_order(geo: "Geometry", ulysses_degree: int) -> List[Tuple[int, int]]:
    """The head-sharded sequence after the Ulysses all-to-all, as (source Ulysses rank, local piece)
    pairs in global order: piece 0 of every rank, then (zigzag) piece 1 in reverse rank order;
    contiguous / balanced: every local piece j is super-chunk j's U-th part u."""
    U = ulysses_degree
    if geo.layout == "zigzag":
        return [(r, 0) for r in range(U)] + [(r, 1) for r in reversed(range(U))]
    return [(r, j) for j in range(geo.pieces_per_rank) for r in range(U)]


def causal_work(seq_len: int, seg: int, n: int, docs: Sequence[int]) -> List[int]:
    """Visible causal (query, key) pairs of the queries in each of ``n`` segments of length ``seg``:
    position p of a document starting at d sees p - d + 1 keys (padding sees none)."""
    work = [0] * n
    for d0, d1 in zip(docs, docs[1:]):
        for s in range(d0 // seg, min(n, -(-d1 // seg))):
            a, b = max(d0, s * seg), min(d1, (s + 1) * seg)
            if a < b:  # sum of (p - d0 + 1) for p in [a, b)
                work[s] += (b - a) * (a + b - 1 - 2 * d0 + 2) // 2
    return work


@lru_cache(maxsize=64)
def balanced_assignment(seq_len: int, ring_degree: int, seg: int, pieces: int,
                        docs: Tuple[int, ...]) -> Tuple[Tuple[int, ...], ...]:
    """Segments of length ``seg`` per ring rank, ``pieces`` each, sorted: largest causal work first
    to the least loaded rank that still has room (ties: lower index). Deterministic."""
    n = ring_degree * pieces
    work = causal_work(seq_len, seg, n, docs)
    load, held = [0] * ring_degree, [[] for _ in range(ring_degree)]
    for s in sorted(range(n), key=lambda x: (-work[x], x)):
        r = min((r for r in range(ring_degree) if len(held[r]) < pieces), key=lambda r: (load[r], r))
        load[r] += work[s]
        held[r].append(s)
    return tuple(tuple(sorted(h)) for h in held)


def doc_bounds(cu_seqlens: Optional[Tensor], layout: str, seq_len: int, where: str) -> Optional[Tuple[int, ...]]:
    """Document boundaries as a tuple for the balanced layout (None for the others: they ignore them)."""
    if layout != "balanced" or cu_seqlens is None:
        return None
    b = tuple(int(x) for x in cu_seqlens.reshape(-1).tolist())
    if len(b) < 2 or b[0] != 0 or b[-1] != seq_len or any(x >= y for x, y in zip(b, b[1:])):
        raise ValueError(f"spattn.{where}: cu_seqlens must be increasing boundaries 0 = b_0 < ... < b_n = "
                         f"seq_len ({seq_len}), got {list(b[:4])}{' ...' if len(b) > 4 else ''}")
    return b


def local_seq_len(seq_len: int, mesh: SPMesh, layout: str = "contiguous") -> int:
    """Length of each rank's (padded) shard for a global length ``seq_len``."""
    _check_layout(layout, "local_seq_len")
    return Geometry(seq_len, mesh.world_size, layout).local_len


def _pad_to(x: Tensor, dim: int, length: int) -> Tensor:
    extra = length - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def shard(x: Tensor, mesh: SPMesh, dim: int = 1, seq_len: Optional[int] = None,
          layout: str = "contiguous", cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """This rank's part of the full tensor ``x`` along ``dim`` (zero-padded when the length is not
    divisible), in the order ``spattn.attention`` assumes. ``seq_len`` defaults to ``x.shape[dim]``.
    ``cu_seqlens``: the document boundaries the balanced layout deals chunks by (ignored otherwise)."""
    _check_layout(layout, "shard")
    dim = dim % x.dim()
    s = x.shape[dim]
    if seq_len is not None and seq_len != s:
        raise ValueError(f"spattn.shard: x has {s} positions along dim {dim} but seq_len={seq_len}; "
                         f"shard takes the full tensor")
    geo = Geometry(s, mesh.world_size, layout, mesh.ulysses_degree, doc_bounds(cu_seqlens, layout, s, "shard"))
    xp = _pad_to(x, dim, geo.padded_len)
    c = geo.chunk
    parts = [xp.narrow(dim, cid * c, c) for cid in geo.chunk_ids(mesh.sp_rank)]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)).contiguous()


def all_gather_mesh(x: Tensor, mesh: SPMesh) -> List[Tensor]:
    """All ranks' ``x`` (same shape everywhere), indexed by sp_rank."""
    parts = [x]
    for g in mesh.groups():  # Ulysses (inner) first, so the index is ring_rank * U + ulysses_rank
        stacked = torch.stack(parts)  # one collective per group, however many parts we hold
        out = [torch.empty_like(stacked) for _ in range(dist.get_world_size(g))]
        dist.all_gather(out, stacked, group=g)
        parts = [o[j] for o in out for j in range(len(parts))]
    return parts


def _assemble(parts: List[Tensor], geo: Geometry, dim: int) -> Tensor:
    """Put every rank's shard at its global place; drop the padded tail."""
    c = geo.chunk
    chunks: List[Optional[Tensor]] = [None] * (geo.world_size * geo.pieces_per_rank)
    for r, p in enumerate(parts):
        for j, cid in enumerate(geo.chunk_ids(r)):
            chunks[cid] = p.narrow(dim, j * c, c)
    return torch.cat(chunks, dim=dim).narrow(dim, 0, geo.seq_len)


class _Gather(torch.autograd.Function):
    # The result is replicated on every rank. Convention for replicated activations: the gradient
    # arriving is the same on every rank and counts once, so backward keeps this rank's slice.
    @staticmethod
    def forward(ctx, x, mesh, dim, geo):
        ctx.mesh, ctx.dim, ctx.geo = mesh, dim, geo
        return _assemble(all_gather_mesh(x, mesh), geo, dim)

    @staticmethod
    def backward(ctx, g):
        geo, dim = ctx.geo, ctx.dim
        gp = _pad_to(g, dim, geo.padded_len)
        c = geo.chunk
        parts = [gp.narrow(dim, cid * c, c) for cid in geo.chunk_ids(ctx.mesh.sp_rank)]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)), None, None, None


def gather(x_local: Tensor, mesh: SPMesh, dim: int = 1, seq_len: Optional[int] = None,
           layout: str = "contiguous", cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """The full tensor back on every rank from each rank's shard (inverse of ``shard``).

    ``seq_len`` (default: local length x world size) trims the padding; ``cu_seqlens`` as for ``shard``. Differentiable: the
    gradient of the (replicated) result is taken to be identical on every rank and to count once.
    """
    _check_layout(layout, "gather")
    dim = dim % x_local.dim()
    n = x_local.shape[dim]
    s = n * mesh.world_size if seq_len is None else int(seq_len)
    geo = Geometry(s, mesh.world_size, layout, mesh.ulysses_degree, doc_bounds(cu_seqlens, layout, s, "gather"))
    if geo.local_len != n:
        raise ValueError(f"spattn.gather: local length {n} along dim {dim} does not match seq_len={s} over "
                         f"{mesh.world_size} ranks with layout {layout!r} (expected {geo.local_len})")
    if mesh.world_size == 1:
        return x_local.narrow(dim, 0, s)
    return _Gather.apply(x_local, mesh, dim, geo)
