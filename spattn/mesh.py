"""The sequence-parallel mesh: Ulysses groups (inner, contiguous ranks) x ring groups (outer), and
optionally CFG halves around them (outermost: world = cfg x ulysses x ring).

Global sequence position of a rank: ``sp_rank = ring_rank * ulysses_degree + ulysses_rank``. With the
contiguous layout, sp_rank r holds the r-th of ``world_size`` equal chunks of the sequence. With
``cfg_degree > 1`` each CFG part is a contiguous block of ``ulysses x ring`` ranks running one branch
of classifier-free guidance; ``cfg_group`` joins the ranks of equal ``sp_rank`` across the parts.
"""
from __future__ import annotations

import gc
import itertools
import threading
from collections import OrderedDict
from datetime import timedelta
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from . import config
from .check import CheckState, new_side_group, open_check_board
from .comm.ring_comm import RingCommCache

ProcessGroup = dist.ProcessGroup
_MESH_IDS = itertools.count(1)

__all__ = ["SPMesh", "init_mesh"]


def _group_size(group: Optional[ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _group_rank(group: Optional[ProcessGroup]) -> int:
    return 0 if group is None else dist.get_rank(group)


def _check_member(group, where: str) -> None:
    """A rank outside a group gets a placeholder from dist.new_group, not a group: say so."""
    if group is None:
        return
    if not isinstance(group, ProcessGroup) or dist.get_rank(group) < 0:
        raise ValueError(f"{where}: this rank (global rank {dist.get_rank()}) is not a member of the given "
                         f"process group; build the mesh only on the ranks of that group "
                         f"(e.g. `if dist.get_rank() in ranks: init_mesh(..., group=g)`)")


class SPMesh:
    """Process groups of one sequence-parallel attention layout.

    Args:
        ulysses_group: group whose ranks exchange heads by all-to-all (``None``: degree 1).
        ring_group: group whose ranks pass K/V blocks around a ring (``None``: degree 1).
        owned: the groups were made for this mesh alone (init_mesh on gloo), so it may destroy them
            when its ranks fall out of step; the cross-rank check then waits only when a call's
            signature changes (spattn.check).

    Attributes:
        ulysses_degree, ring_degree, world_size (= their product),
        ulysses_rank, ring_rank: this rank's index in each group,
        sp_rank: this rank's position in the global sequence (0 .. world_size-1).
    """

    PLAN_CACHE_SIZE = 64  # plans of distinct calls kept (a model has a handful of attention shapes)

    def __init__(self, ulysses_group: Optional[ProcessGroup] = None, ring_group: Optional[ProcessGroup] = None,
                 *, check_group: Optional[ProcessGroup] = None, cfg_group: Optional[ProcessGroup] = None,
                 check: Optional[int] = None, timeout_s: Optional[float] = None, owned: bool = False):
        for name, g in (("ulysses_group", ulysses_group), ("ring_group", ring_group), ("cfg_group", cfg_group)):
            if g is not None and not dist.is_initialized():
                raise RuntimeError(f"spattn.SPMesh: {name} given but torch.distributed is not initialized; "
                                   f"call torch.distributed.init_process_group first")
        for name, g in (("ulysses_group", ulysses_group), ("ring_group", ring_group)):
            _check_member(g, f"spattn.SPMesh: {name}")
        if cfg_group is not None and _group_size(cfg_group) == 1:
            cfg_group = None
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
        # CFG parallel: not part of the attention's groups (attention never communicates over it).
        self.cfg_group = cfg_group
        self.cfg_degree = _group_size(cfg_group)
        self.cfg_rank = _group_rank(cfg_group)
        # Groups this mesh made itself (init_mesh on gloo): it may destroy them when its ranks fall out of
        # step, which wakes a peer blocked in one of them (spattn.check relies on it to skip waits).
        self.owns_groups = bool(owned) and self.world_size * self.cfg_degree > 1
        backends = {dist.get_backend(g) for g in (ulysses_group, ring_group) if g is not None}
        self.comm_backend: Optional[str] = backends.pop() if len(backends) == 1 else (
            None if not backends else "mixed")
        self.comm_cache = RingCommCache()  # ring exchanges (and their buffers) reused across calls
        # The cross-rank argument check (spattn.check): its mode and timeout (None: the environment's),
        # its gloo side group(s) (init_mesh passes one over the whole mesh, otherwise they are made on
        # the first checked call), how many checks ran, and why the ranks fell out of step, if they did.
        self._check = None if check is None else config.check_mode_of(check, "SPMesh(check=...)")
        self._timeout_s = None if timeout_s is None else config.timeout_of(timeout_s, "SPMesh(timeout_s=...)")
        self._check_groups: Optional[List[ProcessGroup]] = [check_group] if check_group is not None else None
        self._check_calls = 0
        self._check_broken: Optional[str] = None
        self.check_state = CheckState()  # the last agreed signature and the check's gathers in flight
        # This mesh's id as an op argument (spattn.parallel.op) and the plans of its calls, by call.
        self.op_id: int = next(_MESH_IDS)
        self._plans: "OrderedDict[object, object]" = OrderedDict()
        self._calls: "OrderedDict[tuple, object]" = OrderedDict()  # validated calls by inputs' metadata

    @property
    def check_calls(self) -> int:
        """How many cross-rank checks this mesh ran (every rank counts the same)."""
        return self._check_calls

    @property
    def check_broken(self) -> Optional[str]:
        """Why this mesh's ranks fell out of step (a failed check), or None."""
        return self._check_broken

    def count_check(self) -> int:
        """One more cross-rank check: its number (the same on every rank)."""
        self._check_calls += 1
        return self._check_calls

    def mark_broken(self, why: str) -> None:
        """The ranks fell out of step: every later call on this mesh fails fast with ``why``, and the
        groups it owns are released (``release_groups``)."""
        self._check_broken = why
        self.release_groups()

    def release_groups(self) -> None:
        """Destroy the groups this mesh made (only those: never the world or a caller's group). Their
        connections close, so a peer blocked in one of them (it entered a collective this rank will
        never join) fails at once instead of after the group's timeout. The mesh is unusable after."""
        if not self.owns_groups:
            return
        groups = [g for g in (self.ulysses_group, self.ring_group, self.cfg_group) if g is not None]
        self.ulysses_group = self.ring_group = self.cfg_group = _RELEASED
        self.owns_groups = False
        self.comm_cache.clear()  # ring exchanges (and the C++ engine) hold the groups too
        self._plans.clear()
        self._calls.clear()
        for g in groups:
            try:
                dist.destroy_process_group(g)
            except Exception:  # already gone (e.g. torch.distributed shut down): nothing to release
                pass
        # The connections close when the last reference goes; a transfer still blocked inside the
        # group would hold its destructor, so the references are dropped off this thread.
        threading.Thread(target=_drop, args=(groups,), daemon=True, name="spattn-release").start()

    @property
    def check_mode(self) -> int:
        """Cross-rank check mode: 0 off, 1 signature, 2 + joint contents (default ``SPATTN_CHECK``)."""
        return config.settings().check if self._check is None else self._check

    @property
    def timeout_s(self) -> float:
        """How long the cross-rank check waits for the other ranks (default ``SPATTN_TIMEOUT_S``)."""
        return config.settings().timeout_s if self._timeout_s is None else self._timeout_s

    @property
    def check_groups(self) -> Optional[List[ProcessGroup]]:
        return self._check_groups

    def set_check_groups(self, groups: List[ProcessGroup]) -> None:
        """The check's side groups, made on this mesh's first checked call (spattn.check)."""
        self._check_groups = list(groups)

    def call_for(self, key: tuple, build: Callable):
        """The validated call (``AttnCall``) for inputs with metadata ``key``, built by ``build()`` once
        (validation reads only metadata: a forward and its backward, or a model's layers, share it)."""
        hit = self._calls.get(key)
        if hit is None:
            hit = build()
            if len(self._calls) >= 4 * self.PLAN_CACHE_SIZE:
                self._calls.popitem(last=False)
            self._calls[key] = hit
        return hit

    def plan_for(self, call, build: Callable):
        """The plan of ``call`` (an ``AttnCall``), built by ``build(call)`` once per distinct call."""
        key = call.plan_key()
        plan = self._plans.get(key)
        if plan is None:
            plan = build(call)
            if len(self._plans) >= self.PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
            self._plans[key] = plan
        else:
            self._plans.move_to_end(key)
        return plan

    def groups(self) -> List[ProcessGroup]:
        """The non-trivial groups, inner (Ulysses) first."""
        return [g for g in (self.ulysses_group, self.ring_group) if g is not None]

    def __repr__(self) -> str:
        cfg = f"cfg_degree={self.cfg_degree}, cfg_rank={self.cfg_rank}, " if self.cfg_degree > 1 else ""
        return (f"SPMesh({cfg}ulysses_degree={self.ulysses_degree}, ring_degree={self.ring_degree}, "
                f"sp_rank={self.sp_rank}/{self.world_size})")


class _Released:
    """Stands for a group a broken mesh released: any use is an error, never the default group."""

    def __repr__(self) -> str:
        return "<process group released: this mesh's ranks fell out of step; build a new mesh>"


_RELEASED = _Released()


def _timeout_of(group: ProcessGroup):
    """The collective timeout ``group`` was made with (None where torch does not tell)."""
    try:
        return group._get_backend(torch.device("cpu")).options._timeout
    except Exception:  # not gloo, or torch's internals moved: new_group's default
        return None


def _drop(groups: List[ProcessGroup]) -> None:
    groups.clear()
    gc.collect()


def init_mesh(ulysses_degree: int = 1, ring_degree: int = 1, group: Optional[ProcessGroup] = None,
              cfg_degree: int = 1, *, check: Optional[int] = None, timeout_s: Optional[float] = None) -> SPMesh:
    """Build the ``cfg_degree x ulysses_degree x ring_degree`` mesh over ``group`` (default: the world).

    Ulysses groups are contiguous ranks (they exchange the most data: give them the fastest links);
    ring groups are strided by ``ulysses_degree``. With ``cfg_degree > 1`` the group is cut into
    ``cfg_degree`` contiguous parts, each its own ``ulysses x ring`` mesh (one CFG branch each), and
    ``mesh.cfg_group`` joins the ranks holding the same sequence shard in every part (they exchange
    only the branches' outputs, the least data: the outermost, slowest links). Must be called by
    every rank of ``group``.

    ``check``: the cross-rank argument check's mode (0 off, 1 signature, 2 + joint contents; default
    ``$SPATTN_CHECK`` or 1); ``timeout_s``: how long it waits for the other ranks (default
    ``$SPATTN_TIMEOUT_S`` or 30). ``attention(check=...)`` overrides the mode per call.
    """
    for name, d in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree), ("cfg_degree", cfg_degree)):
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise ValueError(f"spattn.init_mesh: {name} must be a positive int, got {d!r}")
    sp = ulysses_degree * ring_degree
    opts = dict(check=check, timeout_s=timeout_s)
    mode = config.check_mode_of(check, "init_mesh(check=...)") if check is not None else config.settings().check
    timeout = config.timeout_of(timeout_s, "init_mesh(timeout_s=...)") if timeout_s is not None else None
    if sp * cfg_degree == 1 and not dist.is_initialized():
        return SPMesh(**opts)
    if not dist.is_initialized():
        raise RuntimeError("spattn.init_mesh: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group(backend=...) first")
    _check_member(group, "spattn.init_mesh: group")
    size = dist.get_world_size(group)
    if sp * cfg_degree != size:
        cfg = f"cfg_degree ({cfg_degree}) x " if cfg_degree > 1 else ""
        raise ValueError(
            f"spattn.init_mesh: {cfg}ulysses_degree ({ulysses_degree}) x ring_degree ({ring_degree}) = "
            f"{sp * cfg_degree} must equal the group size ({size}); e.g. "
            f"init_mesh(ulysses_degree={size // cfg_degree if size % cfg_degree == 0 else size}"
            f"{f', cfg_degree={cfg_degree}' if cfg_degree > 1 and size % cfg_degree == 0 else ''})")
    ranks: Sequence[int] = dist.get_process_group_ranks(group) if group is not None else range(size)
    ranks = list(ranks)
    parts = [ranks[c * sp:(c + 1) * sp] for c in range(cfg_degree)]  # one SP mesh per CFG branch
    ulysses_sets = [p[i * ulysses_degree:(i + 1) * ulysses_degree] for p in parts for i in range(ring_degree)]
    ring_sets = [p[u::ulysses_degree] for p in parts for u in range(ulysses_degree)]
    cfg_sets = [ranks[i::sp] for i in range(sp)]
    me = dist.get_rank()
    # With the default group every rank creates every group in the same order (the portable way).
    # For a subgroup only its members call us, so each creates just the groups it belongs to.
    local = group is not None and size != dist.get_world_size()
    # On gloo every group is the mesh's own, even one spanning the whole group: a mesh whose ranks fall
    # out of step destroys its groups to wake a blocked peer (SPMesh.release_groups), and must not
    # destroy the caller's. Other backends share the caller's group where it is the same set of ranks.
    own = dist.get_backend(group) == "gloo"
    # The groups' collective timeout: with the check on, the check's (a peer that does not join a
    # collective within it is named, as one that does not join the check's gather); else the parent's.
    group_timeout = (timedelta(seconds=timeout if timeout is not None else config.settings().timeout_s) if mode
                     else _timeout_of(group if group is not None else dist.group.WORLD))

    def build(sets: List[List[int]], degree: int) -> Optional[ProcessGroup]:
        if degree == 1:
            return None
        if degree == size and not own:
            return group if group is not None else dist.group.WORLD
        mine = None
        for s in sets:
            if local and me not in s:
                continue
            g = dist.new_group(s, use_local_synchronization=local, timeout=group_timeout)
            if me in s:
                mine = g
        return mine

    ug, rg = build(ulysses_sets, ulysses_degree), build(ring_sets, ring_degree)
    cg = build(cfg_sets, cfg_degree)
    # The check's host-side twin of this rank's SP mesh, created here where every rank is known to
    # call (group creation is itself collective); skipped when the check is off.
    side = None
    if mode and sp > 1:
        for p in parts:
            if local and me not in p:
                continue
            g = new_side_group(p, local, timeout)
            if me in p:
                side = g
    mesh = SPMesh(ulysses_group=ug, ring_group=rg, check_group=side, cfg_group=cg, owned=own, **opts)
    if side is not None:  # where the signatures are posted (None: ranks on several hosts gather them)
        mesh.check_state.board = open_check_board(side)
    return mesh
