"""A shared-memory board where the ranks of one host post small int rows to each other without a
collective: what the cross-rank check (spattn.check) uses for its per-call signatures, which every
rank must publish but only a rank whose signature changed must read.

    file in /dev/shm, mapped by every rank:  (ranks, SLOTS, 2 + width) int64
    rank r's post number n lives in row r, slot n % SLOTS, as [n, values..., seal]

``seal`` is a hash of (n, values): a reader that catches a post half-written (no lock, no memory
barrier) sees a seal that does not match and reads again. Posting costs a few microseconds and wakes
nobody; reading spins on the mapping. A rank cannot be SLOTS posts ahead of a peer that is waiting
for one of its posts: each post is followed by collectives that peer must join.
"""
from __future__ import annotations

import mmap
import os
import secrets
import socket
import struct
import time
from typing import Dict, List, Optional, Sequence

import torch.distributed as dist

__all__ = ["Board", "open_board"]

SLOTS = 64
_DIR = "/dev/shm"
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


def _seal(n: int, values: Sequence[int]) -> int:
    return hash((n, *values)) or 1  # (never 0: a fresh, all-zero slot is not a post)


class Board:
    """A board mapped from ``path``: ``ranks`` rows of SLOTS posts of ``width`` int64 values each;
    this process writes row ``me`` only."""

    def __init__(self, path: str, ranks: int, me: int, width: int) -> None:
        self.ranks, self.me, self.width = ranks, me, width
        self._fmt = struct.Struct(f"<{width + 2}q")
        self._size = ranks * SLOTS * self._fmt.size
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < self._size:
                os.ftruncate(fd, self._size)  # every rank asks for the same size: later calls are no-ops
            self._mm = mmap.mmap(fd, self._size)
        finally:
            os.close(fd)

    def _offset(self, rank: int, n: int) -> int:
        return (rank * SLOTS + n % SLOTS) * self._fmt.size

    def post(self, n: int, values: Sequence[int]) -> None:
        """Publish ``values`` (``width`` ints) as this rank's post number ``n`` (n >= 1, increasing)."""
        self._fmt.pack_into(self._mm, self._offset(self.me, n), n, *values, _seal(n, values))

    def read(self, rank: int, n: int) -> Optional[List[int]]:
        """``rank``'s post number ``n``, or None while it has not made it (or it is half-written)."""
        row = self._fmt.unpack_from(self._mm, self._offset(rank, n))
        if row[0] != n or row[-1] != _seal(n, row[1:-1]):
            return None
        return list(row[1:-1])

    def wait(self, n: int, timeout: float) -> Dict[int, Optional[List[int]]]:
        """Every rank's post number ``n``, waiting up to ``timeout`` seconds for them; ranks that did not
        post in time map to None."""
        got: Dict[int, Optional[List[int]]] = {r: None for r in range(self.ranks)}
        deadline, pause = time.monotonic() + timeout, 0.0
        while True:
            for r in range(self.ranks):
                if got[r] is None:
                    got[r] = self.read(r, n)
            if all(v is not None for v in got.values()) or time.monotonic() > deadline:
                return got
            time.sleep(pause)  # 0 first (yield the core), then up to 2 ms: a peer may be seconds away
            pause = min(0.002, pause * 2 + 5e-5)

    def close(self) -> None:
        try:
            self._mm.close()
        except (BufferError, ValueError):
            pass


def _host_id() -> str:
    try:
        with open(_BOOT_ID) as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def open_board(group: dist.ProcessGroup, width: int) -> Optional[Board]:
    """A board over the ranks of ``group`` (a gloo group), indexed by group rank; collective (three
    small object all-gathers, once). None where the ranks do not all share this host's /dev/shm
    (several hosts, other IPC namespaces, no /dev/shm): the caller then exchanges rows otherwise."""
    size, me = dist.get_world_size(group), dist.get_rank(group)
    usable = os.path.isdir(_DIR) and os.access(_DIR, os.W_OK)
    ids: List[Optional[tuple]] = [None] * size
    dist.all_gather_object(ids, (_host_id() if usable else None, os.getpid(), secrets.token_hex(6)), group=group)
    if any(i[0] is None or i[0] != ids[0][0] for i in ids):
        return None
    path = os.path.join(_DIR, f"spattn-board-{ids[0][1]}-{ids[0][2]}")
    board: Optional[Board] = None
    try:
        board = Board(path, size, me, width)
        board.post(1 << 62, [me] * width)  # a token: proves the peers share this file
    except OSError:
        board = None
    seen: List[Optional[bool]] = [None] * size
    ok = board is not None
    dist.all_gather_object(seen, ok, group=group)  # every rank has posted (or failed) its token
    ok = ok and all(seen) and all(board.read(r, 1 << 62) == [r] * width for r in range(size))
    dist.all_gather_object(seen, ok, group=group)  # every rank has read every token
    if me == 0:
        try:
            os.unlink(path)  # mapped everywhere by now: nothing left behind, whatever happens next
        except OSError:
            pass
    if not all(seen):
        if board is not None:
            board.close()
        return None
    return board
