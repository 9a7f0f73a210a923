"""The ring exchange: send a block to the next rank while receiving the previous one's (start/wait).

Python (batched isend/irecv) or the optional C++ engine (``spattn._ext``, loaded on first use);
exchanges and their receive buffers are cached per mesh. Bytes are counted in ``collectives``.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from .collectives import counted_ring

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
        return counted_ring(cache.get(group, like, engine, slot))
    return counted_ring(_new_ring_comm(group, like, engine))


def _new_ring_comm(group: ProcessGroup, like: Tensor, engine: str):
    if engine in ("auto", "cpp"):
        from .. import _ext  # lazy: the extension is optional

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
