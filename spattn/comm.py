"""Communication: the ring exchange (explicit start/wait) and the Ulysses all-to-all.

Everything that differs between CPU/gloo and GPU/NCCL stays in this module, so the strategies run
the same code in tests here and on GPUs.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

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


def make_ring_comm(group: ProcessGroup, like: Tensor, engine: str = "auto"):
    """Ring exchange object for ``group``: the C++ engine when built (and asked for), else Python.

    engine: "auto" (C++ if available), "python", or "cpp" (error if the extension is missing).
    """
    if engine not in ("auto", "python", "cpp"):
        raise ValueError(f"spattn: unknown ring engine {engine!r}; choose 'auto', 'python' or 'cpp'")
    if engine in ("auto", "cpp"):
        from . import _ext  # lazy: the extension is optional

        cls = _ext.ring_engine_class(required=(engine == "cpp"))
        if cls is not None:
            return cls(group, like)
    return RingComm(group, like)


def default_ring_engine() -> str:
    """Ring engine used when the caller does not choose: ``SPATTN_RING_ENGINE`` or "auto"."""
    return os.environ.get("SPATTN_RING_ENGINE", "auto")
