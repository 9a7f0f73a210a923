"""The Ulysses all-to-all: sequence-sharded <-> head-sharded, several tensors in one collective."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from .collectives import all_to_all_single, wait_work

Tensor = torch.Tensor
ProcessGroup = dist.ProcessGroup


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
        wait_work(self._work)
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
    work = all_to_all_single(recv, send, recv_n, send_n, spec.group, spec.rank)

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
    work = all_to_all_single(recv, send, recv_n, send_n, spec.group, spec.rank)

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
        wait_work(self.work)
        self.keep = ()


