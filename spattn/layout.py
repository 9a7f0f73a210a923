"""Where each rank's tokens sit in the global sequence, and shard/gather along it.

Layouts (W = mesh.world_size, S = global length, padded up to a multiple of the chunk count):
- ``contiguous``: W chunks of c = ceil(S / W); sp_rank r holds chunk r.
- ``zigzag``: 2W chunks of c = ceil(S / 2W); sp_rank r holds chunks r and 2W-1-r, so every ring
  step of causal attention has the same amount of work.
Padding is always the global tail: positions >= S are padding, wherever they land.

After the Ulysses all-to-all, ring rank i holds the concatenation of its Ulysses group's pieces; put in
global order these are super-chunks of length L = ulysses_degree * c: super-chunk i (contiguous), or
super-chunks i and 2R-1-i (zigzag). ``RingGeometry`` describes that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from .mesh import SPMesh

Tensor = torch.Tensor
LAYOUTS = ("contiguous", "zigzag")

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

    @property
    def pieces_per_rank(self) -> int:
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
        return (sp_rank, 2 * self.world_size - 1 - sp_rank)

    def valid(self, start: int, length: int) -> int:
        """How many of positions [start, start+length) are real (not padding)."""
        return max(0, min(length, self.seq_len - start))


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
          layout: str = "contiguous") -> Tensor:
    """This rank's part of the full tensor ``x`` along ``dim`` (zero-padded when the length is not
    divisible), in the order ``spattn.attention`` assumes. ``seq_len`` defaults to ``x.shape[dim]``."""
    _check_layout(layout, "shard")
    dim = dim % x.dim()
    s = x.shape[dim]
    if seq_len is not None and seq_len != s:
        raise ValueError(f"spattn.shard: x has {s} positions along dim {dim} but seq_len={seq_len}; "
                         f"shard takes the full tensor")
    geo = Geometry(s, mesh.world_size, layout)
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
           layout: str = "contiguous") -> Tensor:
    """The full tensor back on every rank from each rank's shard (inverse of ``shard``).

    ``seq_len`` (default: local length x world size) trims the padding. Differentiable: the
    gradient of the (replicated) result is taken to be identical on every rank and to count once.
    """
    _check_layout(layout, "gather")
    dim = dim % x_local.dim()
    n = x_local.shape[dim]
    s = n * mesh.world_size if seq_len is None else int(seq_len)
    geo = Geometry(s, mesh.world_size, layout)
    if geo.local_len != n:
        raise ValueError(f"spattn.gather: local length {n} along dim {dim} does not match seq_len={s} over "
                         f"{mesh.world_size} ranks with layout {layout!r} (expected {geo.local_len})")
    if mesh.world_size == 1:
        return x_local.narrow(dim, 0, s)
    return _Gather.apply(x_local, mesh, dim, geo)
