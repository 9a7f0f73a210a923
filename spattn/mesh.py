"""The 2-D sequence-parallel mesh: Ulysses groups (inner, contiguous ranks) x ring groups (outer).

Global sequence position of a rank: ``sp_rank = ring_rank * ulysses_degree + ulysses_rank``. With the
contiguous layout, sp_rank r holds the r-th of ``world_size`` equal chunks of the sequence.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch.distributed as dist

ProcessGroup = dist.ProcessGroup

__all__ = ["SPMesh", "init_mesh"]


def _group_size(group: Optional[ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _group_rank(group: Optional[ProcessGroup]) -> int:
    return 0 if group is None else dist.get_rank(group)


class SPMesh:
    """Process groups of one sequence-parallel attention layout.

    Args:
        ulysses_group: group whose ranks exchange heads by all-to-all (``None``: degree 1).
        ring_group: group whose ranks pass K/V blocks around a ring (``None``: degree 1).

    Attributes:
        ulysses_degree, ring_degree, world_size (= their product),
        ulysses_rank, ring_rank: this rank's index in each group,
        sp_rank: this rank's position in the global sequence (0 .. world_size-1).
    """

    def __init__(self, ulysses_group: Optional[ProcessGroup] = None, ring_group: Optional[ProcessGroup] = None):
        for name, g in (("ulysses_group", ulysses_group), ("ring_group", ring_group)):
            if g is not None and not dist.is_initialized():
                raise RuntimeError(f"spattn.SPMesh: {name} given but torch.distributed is not initialized; "
                                   f"call torch.distributed.init_process_group first")
        if ulysses_group is not None and _group_size(ulysses_group) == 1:
            ulysses_group = None  # a group of one exchanges nothing
        if ring_group is not None and _group_size(ring_group) == 1:
            ring_group = None
        self.ulysses_group = ulysses_group
        self.ring_group = ring_group
        self.ulysses_degree = _group_size(ulysses_group)
        self.ring_degree = _group_size(ring_group)
        self.world_size = self.ulysses_degree * self.ring_degree
        self.ulysses_rank = _group_rank(ulysses_group)
        self.ring_rank = _group_rank(ring_group)
        self.sp_rank = self.ring_rank * self.ulysses_degree + self.ulysses_rank
        backends = {dist.get_backend(g) for g in (ulysses_group, ring_group) if g is not None}
        self.comm_backend: Optional[str] = backends.pop() if len(backends) == 1 else (
            None if not backends else "mixed")

    def groups(self) -> List[ProcessGroup]:
        """The non-trivial groups, inner (Ulysses) first."""
        return [g for g in (self.ulysses_group, self.ring_group) if g is not None]

    def __repr__(self) -> str:
        return (f"SPMesh(ulysses_degree={self.ulysses_degree}, ring_degree={self.ring_degree}, "
                f"sp_rank={self.sp_rank}/{self.world_size})")


def init_mesh(ulysses_degree: int = 1, ring_degree: int = 1, group: Optional[ProcessGroup] = None) -> SPMesh:
    """Build the ``ulysses_degree x ring_degree`` mesh over ``group`` (default: the whole world).

    Ulysses groups are contiguous ranks (they exchange the most data: give them the fastest links);
    ring groups are strided by ``ulysses_degree``. Must be called by every rank of ``group``.
    """
    for name, d in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree)):
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise ValueError(f"spattn.init_mesh: {name} must be a positive int, got {d!r}")
    if ulysses_degree * ring_degree == 1 and not dist.is_initialized():
        return SPMesh()
    if not dist.is_initialized():
        raise RuntimeError("spattn.init_mesh: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group(backend=...) first")
    size = dist.get_world_size(group)
    if ulysses_degree * ring_degree != size:
        raise ValueError(
            f"spattn.init_mesh: ulysses_degree ({ulysses_degree}) x ring_degree ({ring_degree}) = "
            f"{ulysses_degree * ring_degree} must equal the group size ({size}); e.g. "
            f"init_mesh(ulysses_degree={size}) or init_mesh(ring_degree={size})")
    ranks: Sequence[int] = dist.get_process_group_ranks(group) if group is not None else range(size)
    ranks = list(ranks)
    ulysses_sets = [ranks[i * ulysses_degree:(i + 1) * ulysses_degree] for i in range(ring_degree)]
    ring_sets = [ranks[u::ulysses_degree] for u in range(ulysses_degree)]
    me = dist.get_rank()
    # With the default group every rank creates every group in the same order (the portable way).
    # For a subgroup only its members call us, so each creates just the groups it belongs to.
    local = group is not None and size != dist.get_world_size()

    def build(sets: List[List[int]], degree: int) -> Optional[ProcessGroup]:
        if degree == 1:
            return None
        if degree == size:
            return group if group is not None else dist.group.WORLD
        mine = None
        for s in sets:
            if local and me not in s:
                continue
            g = dist.new_group(s, use_local_synchronization=local)
            if me in s:
                mine = g
        return mine

    return SPMesh(ulysses_group=build(ulysses_sets, ulysses_degree), ring_group=build(ring_sets, ring_degree))
