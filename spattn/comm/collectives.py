"""Counted collectives: every byte a rank sends is counted here, per kind, and strategy code calls
these (never ``torch.distributed`` directly) for its all-gathers, all-reduces and reduce-scatters."""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Sequence

import torch
import torch.distributed as dist

Tensor = torch.Tensor
ProcessGroup = dist.ProcessGroup


# ----------------------------------------------------------------------------------------------
# Waiting: every wait of a transfer goes through wait_work (one place to change how waits behave)
# ----------------------------------------------------------------------------------------------
def wait_work(work) -> None:
    """``work.wait()``: finish a transfer started with ``async_op=True``."""
    work.wait()


# ----------------------------------------------------------------------------------------------
COMM_KINDS = ("ring_p2p", "all_to_all", "all_gather", "all_reduce", "reduce_scatter")


class CommCounter:
    """Bytes (and calls) this rank sent inside a ``count_comm()`` block, per kind of COMM_KINDS.

    Counted where a transfer starts: ring P2P sends (one K/V or dK/dV message per step), the part of an
    all-to-all that leaves this rank, and all-gathers / reduce-scatters / all-reduces counted as their
    ring algorithms send them (all-gather and reduce-scatter: (n-1) pieces; all-reduce: 2 (n-1)/n of
    the tensor).
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


def counted_ring(comm):
    """Wrap a ring exchange for counting only while a count_comm() block is active (free otherwise)."""
    return _CountingRing(comm) if _COUNTERS else comm


# ----------------------------------------------------------------------------------------------
# The collectives strategies use, each counting what it sends (the one place bytes are counted)
# ----------------------------------------------------------------------------------------------
def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def all_gather(x: Tensor, group: ProcessGroup, async_op: bool = False):
    """Every rank's ``x`` (same shape) in rank order: ``parts``, or ``(work, parts)`` with ``async_op``."""
    n = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(n)]
    count_bytes("all_gather", (n - 1) * _nbytes(x))
    work = dist.all_gather(parts, x.contiguous(), group=group, async_op=async_op)
    return (work, parts) if async_op else parts


def reduce_scatter(inputs: Sequence[Tensor], group: ProcessGroup, async_op: bool = False):
    """Sum over ranks of ``inputs[this rank]``: ``out``, or ``(work, out)`` with ``async_op``."""
    out = torch.empty_like(inputs[0])
    count_bytes("reduce_scatter", (len(inputs) - 1) * _nbytes(out))
    work = dist.reduce_scatter(out, list(inputs), group=group, async_op=async_op)
    return (work, out) if async_op else out


def all_reduce_over(flat: Tensor, groups: Sequence[ProcessGroup]) -> Tensor:
    """In-place sum of ``flat`` over every group in turn (a mesh's groups: the whole mesh)."""
    for g in groups:
        n = dist.get_world_size(g)
        count_bytes("all_reduce", 2 * (n - 1) * _nbytes(flat) // n)
        dist.all_reduce(flat, group=g)
    return flat


def all_to_all_single(recv: Tensor, send: Tensor, recv_n: Sequence[int], send_n: Sequence[int],
                      group: ProcessGroup, rank: int):
    """Started all-to-all of flat buffers by element counts; counts what leaves this rank."""
    count_bytes("all_to_all", (sum(send_n) - send_n[rank]) * send.element_size())
    return dist.all_to_all_single(recv, send, list(recv_n), list(send_n), group=group, async_op=True)
