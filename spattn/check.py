"""The cross-rank argument check: every rank of a mesh must call ``spattn.attention`` with the same
shapes and options, or the collectives inside pair up wrongly and hang (or, on gloo, abort the
process). This module makes that an error on every rank, by default, without a blocking collective on
the hot path.

    per call: this rank's signature, one int64 per field (N_FIELDS of them)
        --posted to a shared-memory board (spattn.comm.board) when every rank of the mesh is on this
          host: a few microseconds, no collective, nobody woken; else an asynchronous all-gather over
          a small gloo side group (fixed size: cannot hang on the mismatch itself)-->
        every rank's row, read (board) or compared (gather) only when it is needed:
    * a signature that differs from the last one all ranks agreed on (the first call, a new shape,
      a new option) waits for its gather before any collective of the call: equal rows, or the same
      ValueError everywhere naming the rank(s) and the field(s) that differ, with each rank's value;
    * a signature equal to the last agreed one does not wait: its post is read by whoever needs it
      (its gather completes in the background and is compared at a later call), or when a collective
      fails. Ranks that all repeat the agreed
      signature agree with each other, so nothing can pair up wrongly. A rank whose signature changed
      while another's did not waits, sees the difference, raises, and destroys the mesh's groups
      (``SPMesh.release_groups``): the other rank, blocked in a collective it entered alone, gets a
      closed connection at once and reports the same difference (``run_guarded``). Never a
      silent wait, and no blocking collective on the hot path of a steady loop.

    That needs groups the mesh may destroy: ``init_mesh`` on gloo makes its own. A mesh over groups
    it does not own (the caller's, or NCCL, whose peers a destroyed communicator does not wake)
    waits for every call's gather before its first collective instead.

Inputs that a parallelized model assumes identical on every rank (latents, timestep, text
embeddings; an LLM's full ``input_ids``) are verified the same way: ``verify_identical`` starts the
gather of their digests (a content hash, not a copy) and the model's next attention call compares
it, raising on every rank with the name of the input that differs.

The side group lives on the host (gloo, even when the mesh talks NCCL), so the check never
synchronizes a GPU (``verify_identical`` reads its tensors' digests: one small device-to-host copy
per model call). It is created once per mesh and carries its own timeout (``SPATTN_TIMEOUT_S``): a
rank that raised earlier, or died, makes the others fail within that time with an error naming the
missing rank(s), never a silent wait.

``SPATTN_CHECK``: unset or ``1`` = signature check (default); ``2`` = also a digest of the joint
(text) tensors' contents, which must be identical on every rank (reads the tensors: on a GPU that
is a device sync, hence opt-in); ``0`` = off (production runs that trust their callers).
"""
from __future__ import annotations

import os
import socket
import struct
import time
import zlib
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar

import numpy
import torch
import torch.distributed as dist

from . import config
from .comm.board import Board, open_board

Tensor = torch.Tensor
ProcessGroup = dist.ProcessGroup
T = TypeVar("T")

__all__ = ["open_check_board", "check_mode", "timeout_s", "signature", "check_across_ranks", "check_signature", "side_groups", "RankFailure",
           "FIELDS", "run_guarded", "CheckState", "verify_identical"]

# Fields of the signature, in order. Shapes are spread over one field per dimension and small
# options are encoded directly, so an error can print every rank's value, not a hash.
FIELDS: Tuple[str, ...] = (
    "global_rank",          # not compared: who sent the row
    "batch", "q_len", "q_heads", "head_dim", "kv_len", "kv_heads", "v_head_dim",
    "dtype", "device_type", "causal", "layout", "seq_len", "softmax_scale", "return_lse",
    "requires_grad",        # bit mask q, k, v, joint_q, joint_k, joint_v (and grad mode): backward collectives
    "ulysses_degree", "ring_degree", "ulysses_chunks", "backend", "ring_engine",
    "joint_len", "joint_heads", "joint_kv_heads", "joint_strategy",
    "joint_mask",           # -1: absent; else its number of elements
    "joint_kv_len",         # joint keys after the mask's compaction (-1: no joint tensors)
    "documents",            # cu_seqlens: -1 absent; else a hash of the boundaries (read on the host)
    "ring_impl",
    "window_left", "window_right",  # window_size, normalized (-1: unbounded)
    "joint_digest",         # SPATTN_CHECK=2 only: digest of the joint tensors' contents (else 0)
)
N_FIELDS = len(FIELDS)
_IDX = {f: i for i, f in enumerate(FIELDS)}

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn,
           torch.float8_e5m2)
_ENUMS: Dict[str, Tuple[str, ...]] = {
    "device_type": ("cpu", "cuda", "meta", "xpu", "mps"),
    "layout": ("contiguous", "zigzag"),
    "backend": ("auto", "torch", "reference", "triton"),
    "ring_engine": ("auto", "python", "cpp"),
    "joint_strategy": ("front", "rear"),
    "ring_impl": ("auto", "p2p", "allgather"),
}


def check_mode() -> int:
    """The environment's check mode (``SPATTN_CHECK``, read once): 0 off, 1 signature (default), 2 +
    joint contents. ``init_mesh(check=)`` / ``attention(check=)`` override it."""
    return config.settings().check


def timeout_s() -> float:
    """The environment's check timeout (``SPATTN_TIMEOUT_S``, read once); ``init_mesh(timeout_s=)`` overrides it."""
    return config.settings().timeout_s


def _enum(field: str, value: str) -> int:
    vals = _ENUMS[field]
    # Unknown names (a backend registered later) still compare correctly through a stable hash.
    return vals.index(value) if value in vals else (1 << 40) + zlib.crc32(value.encode())


def _decode(field: str, v: int) -> str:
    if field == "dtype":
        return str(_DTYPES[v]) if 0 <= v < len(_DTYPES) else f"dtype#{v}"
    if field in _ENUMS:
        vals = _ENUMS[field]
        return repr(vals[v]) if 0 <= v < len(vals) else f"<name hash {v - (1 << 40):#x}>"
    if field == "softmax_scale":
        return repr(struct.unpack("<d", struct.pack("<q", v))[0])
    if field in ("causal", "return_lse"):
        return str(bool(v))
    if field == "requires_grad":
        names = ("q", "k", "v", "joint_q", "joint_k", "joint_v")
        on = [n for i, n in enumerate(names) if v >> i & 1]
        return "{" + ", ".join(on) + "}" + ("" if v >> 6 & 1 else " (grad mode off)")
    if field in ("joint_len", "joint_mask", "joint_heads", "joint_kv_heads", "documents") and v < 0:
        return "absent"
    return str(v)


def _digest(ts: Sequence[Optional[Tensor]]) -> int:
    """Content digest, equal iff the tensors are bitwise equal (and equally shaped) but for a chance
    of about 2**-32 per differing tensor. On the CPU a CRC of the bytes (copied only if strided); on a
    device, bit patterns weighted by position and summed there (int64 wrap-around), so one scalar
    crosses to the host."""
    acc = 0
    for n, t in enumerate(ts):
        if t is None:
            continue
        t = t.detach()
        shape = zlib.crc32(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.device.type == "cpu":
            if t.dtype.is_floating_point or t.dtype == torch.bool:  # (bfloat16 is no numpy type)
                t = t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
            part = shape << 32 | zlib.crc32(numpy.ascontiguousarray(t.numpy()))  # any strides, even 0
        else:
            flat = t.contiguous().reshape(-1)
            if flat.dtype.is_floating_point:
                ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
                flat = flat.view(ints)
            flat = flat.to(torch.int64)
            w = torch.arange(1, flat.numel() + 1, dtype=torch.int64, device=flat.device) * 2654435761
            part = int((flat * w).sum().item()) + shape
        acc = (acc * 1000003 + part + n) & ((1 << 62) - 1)
    return acc


def signature(call, x) -> Tensor:
    """This rank's call signature (an ``AttnCall`` and its ``Inputs``): an int64 tensor of ``N_FIELDS``
    on the CPU (no device sync; mode 2 reads the joint tensors)."""
    o, mesh = call.opts, call.mesh
    (b, sq, hq, d), (_, sk, hk, _), dv = call.q_shape, call.k_shape, call.v_shape[3]
    jt = (x.jq, x.jk, x.jv) if call.joint else ()
    sig = {
        "global_rank": dist.get_rank() if dist.is_initialized() else 0,
        "batch": b, "q_len": sq, "q_heads": hq, "head_dim": d, "kv_len": sk, "kv_heads": hk, "v_head_dim": dv,
        "dtype": _DTYPES.index(call.dtype) if call.dtype in _DTYPES else 100 + zlib.crc32(str(call.dtype).encode()),
        "device_type": _enum("device_type", call.device.type), "causal": int(bool(o.causal)),
        "layout": _enum("layout", call.layout), "seq_len": call.seq_len,
        "softmax_scale": struct.unpack("<q", struct.pack("<d", float(call.scale)))[0],
        "return_lse": int(bool(o.return_lse)), "requires_grad": call.requires_grad,
        "ulysses_degree": mesh.ulysses_degree, "ring_degree": mesh.ring_degree,
        "ulysses_chunks": call.ulysses_chunks, "backend": _enum("backend", o.backend),
        "ring_engine": _enum("ring_engine", call.ring_engine),
        "joint_len": call.joint_q_shape[1] if jt else -1, "joint_heads": call.joint_q_shape[2] if jt else -1,
        "joint_kv_heads": call.joint_kv_shape[2] if jt else -1,
        "joint_strategy": _enum("joint_strategy", o.joint_strategy) if jt else -1,
        "joint_mask": call.joint_q_shape[0] * call.joint_q_shape[1] if call.joint_masked else -1,
        "joint_kv_len": call.joint_kv_shape[1] if jt else -1,
        "documents": zlib.crc32(repr(tuple(call.docs)).encode()) if call.docs is not None else -1,
        "ring_impl": _enum("ring_impl", o.ring_impl),
        "joint_digest": _digest(jt + (x.jlens,)) if call.check >= 2 and jt else 0,
        "window_left": call.window[0], "window_right": call.window[1],
    }
    return torch.tensor([int(sig[f]) for f in FIELDS], dtype=torch.int64)


def check_across_ranks(call, x) -> None:
    """The per-call cross-rank signature check, on by default; check mode 0 skips it (a mesh whose
    ranks fell out of step fails fast either way: its groups may be released)."""
    if call.mesh.check_broken:
        raise _broken(call.mesh)
    if not call.check or call.mesh.world_size == 1:
        return
    sig = call.__dict__.get("_signature")
    if sig is None:
        sig = signature(call, x)
        if call.check == 1:  # a function of the call alone (mode 2 reads the contents): kept with it
            object.__setattr__(call, "_signature", sig)
    check_signature(call.mesh, sig)


class RankFailure(RuntimeError):
    """Another rank of the mesh raised, died, or did not join a collective in time."""


def _broken(mesh) -> RankFailure:
    return RankFailure(f"spattn.attention: this mesh's ranks fell out of step earlier ({mesh.check_broken}); "
                       f"build a new mesh (or restart) after fixing that")


# ----------------------------------------------------------------------------------------------
# The side group(s): gloo, host only, own timeout
# ----------------------------------------------------------------------------------------------
def _register_self() -> None:
    """Record host:pid of this rank in the default store once, so a peer can tell 'dead' from
    'slow' when a collective fails."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"spattn/pid/{dist.get_rank()}", f"{socket.gethostname()}:{os.getpid()}")
    except Exception:  # diagnosis is best effort: no store, no names
        pass


def new_side_group(ranks: Sequence[int], local: bool, timeout: Optional[float] = None) -> ProcessGroup:
    """A gloo group over ``ranks`` with the check's timeout (default: the environment's). Collective
    like ``dist.new_group``: with ``local`` only the members call it."""
    _register_self()
    t = timeout_s() if timeout is None else timeout
    return dist.new_group(list(ranks), backend="gloo", timeout=timedelta(seconds=t),
                          use_local_synchronization=local)


def side_groups(mesh) -> List[ProcessGroup]:
    """The mesh's check group: one gloo group over every rank of the mesh (init_mesh brings it; for a
    mesh built from the user's own groups it is made on the first checked call, by every rank of the
    mesh). One group over all ranks, not one per mesh group: a rank waiting in a collective must be
    able to see a mismatch between any two ranks, not only among its own peers."""
    groups = mesh.check_groups
    if groups is None:
        ranks = set(dist.get_process_group_ranks(mesh.groups()[0]))
        if len(mesh.groups()) == 2:  # every Ulysses peer's ring group: the whole mesh
            twin = new_side_group(sorted(ranks), True, mesh.timeout_s)
            rings: List[Optional[List[int]]] = [None] * dist.get_world_size(twin)
            dist.all_gather_object(rings, dist.get_process_group_ranks(mesh.ring_group), group=twin)
            ranks = {r for ring in rings for r in ring}
        groups = [new_side_group(sorted(ranks), True, mesh.timeout_s)]
        mesh.set_check_groups(groups)
        mesh.check_state.board = open_check_board(groups[0])
    return groups


_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _gather_async(out: Tensor, row: Tensor, group: ProcessGroup):
    """Start the all-gather of ``row`` into ``out`` over the (gloo) side group. Straight to the gloo
    backend where torch exposes it: half the start cost of the torch.distributed wrapper (about 50
    vs 110 us here), which every attention call pays."""
    if not torch.compiler.is_compiling():  # (dynamo traces the public call, not the backend object)
        try:
            return group._get_backend(row.device)._allgather_base(out, row)
        except (AttributeError, RuntimeError):  # torch's internals moved: the public call
            pass
    return _all_gather(out, row, group=group, async_op=True)


MAX_PENDING = 32  # gathers left in flight before the oldest is waited for (it finished long ago)


@dataclass
class _Gather:
    """One row all-gathered over every side group, in flight: a call's signature, or a model's
    input digests (``names`` then says which input each column holds)."""

    number: int                   # the check's running number on this mesh (the same on every rank)
    works: List[object]           # async work per side group
    outs: List[Tensor]            # (group size, row length) per side group
    names: Optional[Tuple[str, ...]] = None
    hint: str = ""


class CheckState:
    """Per mesh: the last signature every rank was seen to agree on, the board the signatures are
    posted to (None: they are gathered), the gathers in flight, the number of the last signature
    posted, and how many calls waited for the others' (a steady loop over an owned mesh waits once)."""

    def __init__(self) -> None:
        self.agreed: Optional[List[int]] = None
        self.board: Optional[Board] = None
        self.pending: Deque[_Gather] = deque()
        self.posted = 0
        self.waits = 0


USE_BOARD = True  # tests switch it off to exercise the gathers (the path of meshes spanning hosts)


def open_check_board(group: ProcessGroup) -> Optional[Board]:
    """The board for the signatures of the mesh whose check group is ``group`` (None where its ranks
    span hosts); collective over ``group``, once per mesh, where the group is made."""
    return open_board(group, N_FIELDS) if USE_BOARD else None


def _start(mesh, row: Tensor, names=None, hint: str = "") -> _Gather:
    """Start the all-gather of ``row`` over the mesh's side group; it is compared later (``_finish``)."""
    if mesh.check_broken:
        raise _broken(mesh)
    groups = side_groups(mesh)
    row = row.view(1, -1).contiguous()
    outs = [row.new_empty((g.size(), row.shape[1])) for g in groups]
    works = [_gather_async(o, row, g) for o, g in zip(outs, groups)]
    g = _Gather(mesh.count_check(), works, outs, names, hint)
    mesh.check_state.pending.append(g)
    return g


def _finish(mesh, g: _Gather) -> None:
    """Wait for ``g`` (RankFailure naming the missing ranks past the timeout) and compare its rows
    (the same ValueError on every rank when they differ)."""
    t0 = time.monotonic()
    try:
        for w in g.works:
            w.wait()
    except Exception as e:  # gloo timeout or a closed connection: name who is missing
        why = _missing(mesh, g.number, time.monotonic() - t0)
        mesh.mark_broken(why)
        raise RankFailure(f"spattn.attention: the cross-rank argument check failed: {why} "
                          f"[{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}]") from e
    by_rank = {r[0]: r for r in torch.cat(g.outs).tolist()}  # a rank in both side groups: one row
    _compare(mesh, [by_rank[r] for r in sorted(by_rank)], g.names, g.hint)


def _compare(mesh, rows: List[List[int]], names: Optional[Tuple[str, ...]] = None, hint: str = "") -> None:
    """Every rank's row (column 0: its global rank; in rank order), compared as Python ints (a handful,
    every call): the same ValueError on every rank where they differ, naming what differs."""
    if all(r[1:] == rows[0][1:] for r in rows):
        return
    t = torch.tensor(rows, dtype=torch.int64)
    bad = (t != t[0]).any(dim=0)
    bad[0] = False  # column 0 is who sent the row
    # A peer may be inside this call's collectives already (it repeated the agreed signature and did
    # not wait): they are abandoned, so on every rank the mesh is done. Build a new one.
    mesh.mark_broken("ranks called attention with different arguments")
    raise ValueError(_mismatch(t, bad, names, hint))


def _missing(mesh, number: int, waited: float) -> str:
    """Who did not reach check number ``number`` (describe_missing over the check's group)."""
    groups = side_groups(mesh)
    ranks = sorted({r for grp in groups for r in dist.get_process_group_ranks(grp)})
    key = "check/" + "/".join(_group_name(grp) for grp in groups)  # the same string on every rank
    return describe_missing(ranks, key, number, waited, mesh.timeout_s)


def _mismatch(rows: Tensor, bad: Tensor, names: Optional[Tuple[str, ...]], hint: str) -> str:
    cols = bad.nonzero().flatten().tolist()
    odd = [int(r[0]) for r in rows if not torch.equal(r[1:], rows[0][1:])]
    if len(odd) * 2 > rows.shape[0]:  # no majority in agreement with the lowest rank: name its side
        odd = [int(rows[0][0])]
    if names is not None:
        differ = [names[c - 1] for c in cols]
        return (f"spattn: the inputs of this parallelized model differ across ranks: {', '.join(differ)} "
                f"(ranks {odd} disagree with the rest). Sequence parallelism needs the same full inputs on "
                f"every rank; {hint or 'set the same seed on every rank'}.")
    lines = [f"  {FIELDS[c]}: " + ", ".join(f"rank {int(r[0])}: {_decode(FIELDS[c], int(r[c]))}" for r in rows)
             for c in cols]
    return ("spattn.attention: ranks called attention with different arguments (the "
            "collectives would pair up wrongly and hang). Differing fields, per global rank:\n"
            + "\n".join(lines) + f"\nOdd one(s) out: ranks {odd}. Every rank of the mesh must "
            "pass equal-shaped shards (use spattn.shard) and the same options; then build a new mesh "
            "(spattn.init_mesh): this one's collectives may have been left mid-way.")


def _reap(mesh, everything: bool) -> None:
    """Compare the gathers in flight that are done, in order (all of them, waiting, with
    ``everything``; the oldest also when more than MAX_PENDING are in flight)."""
    pending = mesh.check_state.pending
    while pending:
        g = pending[0]
        if not (everything or len(pending) > MAX_PENDING or all(w.is_completed() for w in g.works)):
            break
        pending.popleft()
        _finish(mesh, g)


def check_signature(mesh, sig: Tensor) -> None:
    """This call's signature against every rank's (module docstring): waits only when ``sig`` is not
    the last signature all ranks agreed on (every call, on a mesh that does not own its groups); raises
    the same ValueError on every rank when the rows differ, RankFailure when a rank does not join
    within the check's timeout."""
    if mesh.check_broken:
        raise _broken(mesh)
    side_groups(mesh)  # made (with the board) on a hand-built mesh's first call
    state, row = mesh.check_state, sig.tolist()
    if state.board is None:
        _start(mesh, sig)
    else:
        state.posted = mesh.count_check()
        state.board.post(state.posted, row)
    if mesh.owns_groups and row == state.agreed:
        _reap(mesh, everything=False)  # earlier gathers that are done: an input digest that differs
        return
    state.waits += 1
    _reap(mesh, everything=True)
    if state.board is not None:
        t0 = time.monotonic()
        absent = _compare_posts(mesh, state.posted, mesh.timeout_s)
        if absent:
            why = _absent_text(absent, time.monotonic() - t0, mesh.timeout_s)
            mesh.mark_broken(why)
            raise RankFailure(f"spattn.attention: the cross-rank argument check failed: {why}")
    state.agreed = row


def _compare_posts(mesh, n: int, timeout: float) -> List[int]:
    """Every rank's signature post number ``n`` from the board, waiting up to ``timeout`` s for them:
    the same ValueError on every rank when they differ (the mesh is then broken); else the global ranks
    that did not post in time."""
    got = mesh.check_state.board.wait(n, timeout)
    _compare(mesh, sorted(v for v in got.values() if v is not None))
    ranks = dist.get_process_group_ranks(mesh.check_groups[0])
    return [ranks[r] for r, v in got.items() if v is None]


def verify_identical(mesh, tensors: Mapping[str, Optional[Tensor]], hint: str = "") -> None:
    """Check that ``tensors`` (name -> tensor, the same names on every rank of ``mesh``) hold the same
    values on every rank, without waiting: the digests' gather completes in the background and the
    first ``spattn.attention`` call on the mesh that finds it done compares it (usually the next one
    or the one after), and the next ``verify_identical`` call at the latest, raising on every rank a
    ValueError that names the differing inputs and ``hint`` (the likely fix). No-op with the check off
    or on a mesh of one. Must be called by every rank of the mesh, the same number of times."""
    if mesh.world_size == 1 or not mesh.check_mode or not dist.is_initialized():
        return
    # The previous model call's digests are compared now at the latest (their gather finished long ago,
    # so this does not wait in practice): a difference is an error by the next model call for sure.
    pending = mesh.check_state.pending
    while any(g.names is not None for g in pending):
        _finish(mesh, pending.popleft())
    names = tuple(tensors)
    row = torch.tensor([dist.get_rank()] + [_digest((t,)) if t is not None else -1 for t in tensors.values()],
                       dtype=torch.int64)
    _start(mesh, row, names, hint)


def diagnose(mesh) -> List[int]:
    """After a failed collective: raise the argument mismatch the board or a finished gather shows, if
    any (the real cause, rather than the peer's absence it led to). Returns the ranks the board shows
    did not reach the last checked call (a second's grace)."""
    if mesh is None:
        return []
    absent = []
    if mesh.check_state.board is not None and mesh.check_state.posted:
        absent = _compare_posts(mesh, mesh.check_state.posted, 1.0)
    for g in list(mesh.check_state.pending):
        deadline = time.monotonic() + 1.0
        while not all(w.is_completed() for w in g.works) and time.monotonic() < deadline:
            time.sleep(0.01)
        if all(w.is_completed() for w in g.works):
            mesh.check_state.pending.remove(g)
            _finish(mesh, g)
    return absent


def _group_name(g: ProcessGroup) -> str:
    name = getattr(g, "group_name", None)
    return str(name) if name else "-".join(map(str, dist.get_process_group_ranks(g)))


def describe_missing(ranks: Sequence[int], key: str, call: int, waited: float,
                     timeout: Optional[float] = None) -> str:
    """Best-effort names for the ranks that failed a collective: dead processes (same host, pid
    gone) and ranks that did not report this call within a short grace period."""
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:
        return f"ranks {list(ranks)} did not all join within {waited:.1f}s (no store to tell which)"
    me = dist.get_rank()
    try:
        store.set(f"spattn/{key}/{me}", str(call))
    except Exception:
        return (f"the rendezvous store is unreachable: the rank hosting it (usually global rank 0) "
                f"has likely died; waited {waited:.1f}s")
    # Who reported this call (or a later one)? Poll briefly: the others time out at about the same
    # moment. What was learned survives the store going away (its host, rank 0, may exit first).
    pids = _pids(store, [r for r in ranks if r != me])
    reported, store_lost = {me}, False
    timeout = timeout_s() if timeout is None else timeout
    deadline = time.monotonic() + min(3.0, timeout)
    while not store_lost:
        for r in ranks:
            if r in reported:
                continue
            k = f"spattn/{key}/{r}"
            try:
                if store.check([k]) and int(store.get(k)) >= call:
                    reported.add(r)
            except Exception:
                store_lost = True
                break
        silent = [r for r in ranks if r not in reported]
        if not silent or time.monotonic() > deadline or set(silent) <= set(_dead_of(pids, silent)):
            break
        time.sleep(0.05)
    silent = [r for r in ranks if r not in reported]
    return _who(_dead_of(pids, silent), silent, store_lost, waited, timeout)


def _absent_text(ranks: Sequence[int], waited: float, timeout: float) -> str:
    """describe_missing's words for ``ranks``, known (from the board) not to have reached the call."""
    try:
        dead = _dead(dist.distributed_c10d._get_default_store(), ranks)
    except Exception:  # no store: dead or alive cannot be told
        dead = []
    return _who(dead, ranks, False, waited, timeout)


def _who(dead: Sequence[int], silent: Sequence[int], store_lost: bool, waited: float, timeout: float) -> str:
    late = [r for r in silent if r not in dead]
    parts = []
    if dead:
        parts.append(f"rank(s) {list(dead)} died (process gone)")
    if late:
        parts.append(f"rank(s) {late} did not reach this call (they raised earlier, are stuck elsewhere, "
                     f"or called attention a different number of times)")
    if store_lost:
        parts.append("the rendezvous store went away while asking (its host, usually rank 0, exited)")
    if not parts:
        parts.append(f"every rank reached the call but the exchange failed after {waited:.1f}s")
    return "; ".join(parts) + f" (waited {waited:.1f}s; check timeout {timeout:g}s)"


def _pids(store, ranks: Sequence[int]) -> Dict[int, Tuple[str, int]]:
    """host, pid of each rank, as recorded when its mesh was built (missing ones skipped)."""
    out = {}
    for r in ranks:
        try:
            k = f"spattn/pid/{r}"
            if store.check([k]):
                h, pid = store.get(k).decode().rsplit(":", 1)
                out[r] = (h, int(pid))
        except Exception:
            continue
    return out


def _dead_of(pids: Dict[int, Tuple[str, int]], ranks: Sequence[int]) -> List[int]:
    host = socket.gethostname()
    return [r for r in ranks if r in pids and pids[r][0] == host and not _alive(pids[r][1])]


def _dead(store, ranks: Sequence[int]) -> List[int]:
    return _dead_of(_pids(store, ranks), ranks)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (dead, not yet reaped by its parent) still answers kill(0).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def run_guarded(mesh, what: str, fn: Callable[..., T], *args) -> T:
    """``fn(*args)``: the part of a call that communicates (``what``: "forward" or "backward"), with its
    failures explained. A communication error inside (a peer died or timed out, or released the
    mesh's groups after a mismatch) is re-raised as the argument mismatch the check saw, if any, else
    as RankFailure naming dead peers where that can be told; either way the mesh is marked broken and
    its own groups are released, so a peer blocked on this rank fails in turn. The error is raised
    after the handler, unchained: the failed frames (which hold the groups) are gone by then, so
    releasing the groups really closes their connections."""
    t0 = time.monotonic()
    try:
        return fn(*args)
    except (RankFailure, ValueError, TypeError):
        raise
    except Exception as e:
        if not _is_comm_error(e):
            raise
        detail = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    absent = diagnose(mesh)  # a mismatch seen by the check is the cause: raise that instead (it releases the groups)
    pending = mesh.check_state.pending
    if absent:
        who = _absent_text(absent, time.monotonic() - t0, mesh.timeout_s)
    elif pending and mesh.check_groups:  # a check gather still open: some rank never reached that call
        who = _missing(mesh, pending[-1].number, time.monotonic() - t0)
    else:
        try:
            ranks = sorted({r for g in mesh.groups() for r in dist.get_process_group_ranks(g)})
            store = dist.distributed_c10d._get_default_store()
            dead = _dead(store, [r for r in ranks if r != dist.get_rank()])
            who = f"rank(s) {dead} died (process gone)" if dead else \
                f"a peer among ranks {ranks} failed or timed out (no dead process found on this host)"
        except Exception:
            who = "the rendezvous store is unreachable: the rank hosting it (usually global rank 0) has likely died"
    mesh.mark_broken(f"communication failed during {what}")
    raise RankFailure(f"spattn.attention: communication failed during {what}: {who} [{detail}]")


def _is_comm_error(e: BaseException) -> bool:
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and any(s in msg for s in (
        "Gloo", "gloo", "Connection closed", "Connection reset", "Timed out", "timed out", "NCCL", "Broken pipe"))
