"""Communication: the ring exchange (explicit start/wait) and the Ulysses all-to-all.

Everything that differs between CPU/gloo and GPU/NCCL stays in this module, so the strategies run
the same code in tests here and on GPUs.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

Tensor = torch.Tensor
ProcessGroup = dist.ProcessGroup


# ----------------------------------------------------------------------------------------------
# Ring exchange
# ----------------------------------------------------------------------------------------------
class RingComm:
    """One ring exchange stream: send a tensor to the next rank, receive the previous rank's into
    one of two preallocated buffers, with explicit ``start`` / ``wait`` so the caller computes in
    between.

    Buffer reuse rule (double buffering): ``start(send)`` receives into the buffer that was *not*
    returned by the last ``wait()``; so a caller may compute on (and send) the block it got from the
    last ``wait()`` while the next block arrives.

    Args:
        group: the ring process group (ranks ordered as the ring).
        like: a tensor whose shape/dtype/device the exchanged messages have.
    """

    def __init__(self, group: ProcessGroup, like: Tensor):
        self.group = group
        self.size = dist.get_world_size(group)
        rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (rank - 1) % self.size)
        self._bufs = [torch.empty_like(like, memory_format=torch.contiguous_format) for _ in range(2)]
        self._free = 0          # index of the buffer the next start() receives into
        self._reqs: Optional[List] = None
        self._recv: Optional[Tensor] = None

    def start(self, send: Tensor) -> None:
        if self._reqs is not None:
            raise RuntimeError("RingComm.start called twice without wait()")
        recv = self._bufs[self._free]
        ops = [dist.P2POp(dist.isend, send.contiguous(), self.next, self.group),
               dist.P2POp(dist.irecv, recv, self.prev, self.group)]
        self._reqs = dist.batch_isend_irecv(ops)
        self._recv = recv

    def wait(self) -> Tensor:
        if self._reqs is None:
            raise RuntimeError("RingComm.wait called without start()")
        for r in self._reqs:
            r.wait()
        self._reqs = None
        self._free ^= 1
        recv, self._recv = self._recv, None
        return recv


def make_ring_comm(group: ProcessGroup, like: Tensor, engine: str = "auto",
                   cache: Optional["RingCommCache"] = None, slot: str = "kv"):
    """Ring exchange object for ``group``: the C++ engine when built (and asked for), else Python.

    engine: "auto" (C++ if available), "python", or "cpp" (error if the extension is missing).
    cache: reuse the exchange (and its two receive buffers) made for the same group, message shape,
    dtype, device, engine and ``slot`` by an earlier call; ``slot`` keeps exchanges that are in use
    at the same time apart (the backward's K/V and dK/dV rings).
    """
    if engine not in ("auto", "python", "cpp"):
        raise ValueError(f"spattn: unknown ring engine {engine!r}; choose 'auto', 'python' or 'cpp'")
    if cache is not None:  # counting is decided per call, so a cached exchange is wrapped per call
        return _counted(cache.get(group, like, engine, slot))
    return _counted(_new_ring_comm(group, like, engine))


def _new_ring_comm(group: ProcessGroup, like: Tensor, engine: str):
    if engine in ("auto", "cpp"):
        from . import _ext  # lazy: the extension is optional

        cls = _ext.ring_engine_class(required=(engine == "cpp"))
        if cls is not None:
            return cls(group, like)
    return RingComm(group, like)


class _Tracked:
    """A cached exchange that knows whether a transfer is in flight (an exception part-way through a
    ring leaves it so: such an exchange is replaced, never reused)."""

    def __init__(self, comm):
        self.comm, self.busy = comm, False

    def start(self, send: Tensor) -> None:
        self.busy = True
        self.comm.start(send)

    def wait(self) -> Tensor:
        out = self.comm.wait()
        self.busy = False
        return out


class RingCommCache:
    """Ring exchanges of one mesh, reused across calls so their receive buffers are allocated once
    per (group, shape, dtype, device, engine, slot), not twice per call.

    A buffer returned by ``wait()`` is overwritten by a later call: callers copy what they keep.
    ``allocations`` counts exchanges created (two receive buffers each); a steady loop adds none.
    """

    def __init__(self, max_entries: int = 16):
        self._entries: Dict[tuple, _Tracked] = {}
        self.max_entries = max_entries
        self.allocations = 0

    def get(self, group: ProcessGroup, like: Tensor, engine: str, slot: str) -> _Tracked:
        key = (id(group), tuple(like.shape), like.dtype, like.device, engine, slot)
        hit = self._entries.get(key)
        if hit is not None and not hit.busy and hit.comm.group is group:
            self._entries[key] = self._entries.pop(key)  # most recently used last
            return hit
        if len(self._entries) >= self.max_entries:  # many shapes (e.g. varying lengths): drop the oldest
            self._entries.pop(next(iter(self._entries)))
        hit = self._entries[key] = _Tracked(_new_ring_comm(group, like, engine))
        self.allocations += 1
        return hit

    def clear(self) -> None:
        self._entries.clear()


def default_ring_engine() -> str:
    """Ring engine used when the caller does not choose: ``SPATTN_RING_ENGINE`` or "auto"."""
    return os.environ.get("SPATTN_RING_ENGINE", "auto")


# ----------------------------------------------------------------------------------------------
# Ulysses all-to-all: sequence-sharded <-> head-sharded, for several tensors in one collective
# ----------------------------------------------------------------------------------------------
HeadRanges = Sequence[Sequence[int]]  # per destination rank t: (lo, hi) head range it receives


class A2ASpec:
    """How a group of tensors is exchanged between sequence- and head-sharding.

    Args:
        group: the Ulysses group (size U).
        ranges: per tensor, per destination rank, the (lo, hi) head range that rank gets. Ranges of
            different ranks may overlap (a KV head needed by two ranks is sent to both).
        pieces: the local sequence consists of ``pieces`` equal pieces (1, or 2 for zigzag).
        order: the head-sharded sequence is the pieces of all ranks in this order of
            (source rank, piece) pairs; it must list every pair once.
    """

    def __init__(self, group: ProcessGroup, ranges: Sequence[HeadRanges], pieces: int,
                 order: Sequence[Sequence[int]]):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.ranges = [[tuple(r) for r in rs] for rs in ranges]
        self.pieces = pieces
        self.order = [tuple(o) for o in order]


def _counts(spec: A2ASpec, b: int, s: int, d: int):
    """Per-rank element counts: what this rank sends to each t, and receives from each source."""
    send = [sum(b * s * (rs[t][1] - rs[t][0]) * d for rs in spec.ranges) for t in range(spec.size)]
    recv = [sum(b * s * (rs[spec.rank][1] - rs[spec.rank][0]) * d for rs in spec.ranges)] * spec.size
    return send, recv


def _blocks(flat: Tensor, counts: Sequence[int], shapes_per_rank) -> List[List[Tensor]]:
    """Views of a flat all-to-all buffer: per rank, per tensor, a (B, s, n, D) block."""
    out, off = [], 0
    for t, shapes in enumerate(shapes_per_rank):
        row = []
        for shp in shapes:
            n = shp[0] * shp[1] * shp[2] * shp[3]
            row.append(flat[off:off + n].view(shp))
            off += n
        out.append(row)
    return out


class A2AWork:
    """An all-to-all in flight: ``wait()`` finishes it and returns the unpacked tensors."""

    def __init__(self, work, finish):
        self._work, self._finish = work, finish

    def wait(self) -> List[Tensor]:
        self._work.wait()
        return self._finish()


def start_seq_to_head(xs: Sequence[Tensor], spec: A2ASpec) -> A2AWork:
    """(B, s, H_i, D) sequence shards -> (B, U*s, n_i, D) this rank's heads over the group's sequence.
    Packs and starts the exchange; the result is unpacked by ``wait()``."""
    b, s, _, d = xs[0].shape
    c = s // spec.pieces
    send_n, recv_n = _counts(spec, b, s, d)
    send = xs[0].new_empty(sum(send_n))
    recv = xs[0].new_empty(sum(recv_n))
    send_shapes = [[(b, s, rs[t][1] - rs[t][0], d) for rs in spec.ranges] for t in range(spec.size)]
    for t, row in enumerate(_blocks(send, send_n, send_shapes)):
        for x, rs, blk in zip(xs, spec.ranges, row):
            blk.copy_(x[:, :, rs[t][0]:rs[t][1]])
    count_bytes("all_to_all", (sum(send_n) - send_n[spec.rank]) * send.element_size())
    work = dist.all_to_all_single(recv, send, recv_n, send_n, group=spec.group, async_op=True)

    def finish() -> List[Tensor]:
        mine = [(b, s, rs[spec.rank][1] - rs[spec.rank][0], d) for rs in spec.ranges]
        blocks = _blocks(recv, recv_n, [mine] * spec.size)
        outs = []
        for i, shp in enumerate(mine):
            out = xs[i].new_empty((b, spec.size * s, shp[2], d))
            for j, (u, p) in enumerate(spec.order):
                out[:, j * c:(j + 1) * c].copy_(blocks[u][i][:, p * c:(p + 1) * c])
            outs.append(out)
        return outs

    return A2AWork(_Keep(work, send), finish)


def start_head_to_seq(ys: Sequence[Tensor], spec: A2ASpec, outs: Sequence[Tensor],
                      add: Optional[Sequence[bool]] = None) -> A2AWork:
    """Inverse of ``start_seq_to_head``: (B, U*s, n_i, D) -> written into ``outs[i]`` (B, s, H_i, D)
    at the heads of every rank's range. ``add[i]`` (default True) adds instead of copying: that is
    what makes overlapping ranges (a KV head sent to several ranks) sum their gradients, and then
    ``outs[i]`` must start at zero."""
    add = [True] * len(ys) if add is None else add
    b, total, _, d = ys[0].shape
    s = total // spec.size
    c = s // spec.pieces
    recv_n, send_n = _counts(spec, b, s, d)  # the reverse direction of seq_to_head
    send = ys[0].new_empty(sum(send_n))
    recv = ys[0].new_empty(sum(recv_n))
    mine = [(b, s, y.shape[2], d) for y in ys]
    send_blocks = _blocks(send, send_n, [mine] * spec.size)
    for j, (u, p) in enumerate(spec.order):
        for i, y in enumerate(ys):
            send_blocks[u][i][:, p * c:(p + 1) * c].copy_(y[:, j * c:(j + 1) * c])
    count_bytes("all_to_all", (sum(send_n) - send_n[spec.rank]) * send.element_size())
    work = dist.all_to_all_single(recv, send, recv_n, send_n, group=spec.group, async_op=True)

    def finish() -> List[Tensor]:
        recv_shapes = [[(b, s, rs[t][1] - rs[t][0], d) for rs in spec.ranges] for t in range(spec.size)]
        blocks = _blocks(recv, recv_n, recv_shapes)
        for i, rs in enumerate(spec.ranges):
            for t in range(spec.size):
                dst = outs[i][:, :, rs[t][0]:rs[t][1]]
                dst.add_(blocks[t][i]) if add[i] else dst.copy_(blocks[t][i])
        return list(outs)

    return A2AWork(_Keep(work, send), finish)


class _Keep:
    """Holds the send buffer alive until the transfer reading it is waited for."""

    def __init__(self, work, *keep):
        self.work, self.keep = work, keep

    def wait(self):
        self.work.wait()
        self.keep = ()


# ----------------------------------------------------------------------------------------------
# Byte counters: what this rank sends, per collective kind (bench/bench_sp.py, tests)
# ----------------------------------------------------------------------------------------------
COMM_KINDS = ("ring_p2p", "all_to_all", "all_gather", "all_reduce")


class CommCounter:
    """Bytes (and calls) this rank sent inside a ``count_comm()`` block, per kind of COMM_KINDS.

    Counted where a transfer starts: ring P2P sends (one K/V or dK/dV message per step), the part of an
    all-to-all that leaves this rank, and the all-gathers / all-reduces of joint (text) tokens counted
    as their ring algorithms send them (all-gather: (n-1) pieces; all-reduce: 2 (n-1)/n of the tensor).
    """

    def __init__(self) -> None:
        self.bytes: Dict[str, int] = {k: 0 for k in COMM_KINDS}
        self.calls: Dict[str, int] = {k: 0 for k in COMM_KINDS}

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + int(nbytes)
        self.calls[kind] = self.calls.get(kind, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def __repr__(self) -> str:
        return f"CommCounter({self.bytes})"


_COUNTERS: List[CommCounter] = []  # active count_comm() blocks in this process (empty: counting off)


def count_bytes(kind: str, nbytes: int) -> None:
    """Record ``nbytes`` sent by this rank; one empty-list test when no counter is active."""
    if _COUNTERS:
        for c in _COUNTERS:
            c.add(kind, nbytes)


@contextlib.contextmanager
def count_comm() -> Iterator[CommCounter]:
    """``with count_comm() as c: ...`` counts this rank's sent bytes per kind into ``c.bytes``."""
    c = CommCounter()
    _COUNTERS.append(c)
    try:
        yield c
    finally:
        _COUNTERS.remove(c)


class _CountingRing:
    """A ring exchange (Python or C++ engine) whose ``start`` records the bytes it sends."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def start(self, send: Tensor) -> None:
        count_bytes("ring_p2p", send.numel() * send.element_size())
        self._inner.start(send)

    def wait(self) -> Tensor:
        return self._inner.wait()

    def __getattr__(self, name):  # group, size, next, prev, ...
        return getattr(self._inner, name)


def _counted(comm):
    """Wrap a ring exchange for counting only while a count_comm() block is active (free otherwise)."""
    return _CountingRing(comm) if _COUNTERS else comm
