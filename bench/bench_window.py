"""Sliding windows: how much work a window saves, in the torch backend and in the ring's block plan.

    python bench/bench_window.py                     # defaults below
    python bench/bench_window.py --seq 8192 --windows 128 1024 --reps 3

Rows: forward and forward+backward time of one causal block (torch backend, CPU, fp32) with the full
causal mask and with each window, and for a ring of R ranks (zigzag layout) the (query, key) pairs the
windowed plan hands the backends (sum of query rows x keys over its calls; the kernels skip the masked
half of causal diagonals on top), the (rank, source) ring blocks with any call, and the (query segment,
key segment) pairs the window skips, against the plain causal plan.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from spattn.backends import get_backend
from spattn.layout import Geometry
from spattn.parallel.blocks import BlockPlan


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def backend_rows(seq: int, heads: int, head_dim: int, windows, reps: int):
    be = get_backend("torch", torch.device("cpu"))
    q, k, v = (torch.randn(1, seq, heads, head_dim) for _ in range(3))
    rows = []
    for w in [None] + list(windows):
        kw = {} if w is None else {"window": (w - 1, 0)}
        out, lse = be.forward(q, k, v, True, head_dim ** -0.5, **kw)
        dout = torch.randn_like(out)
        fwd = _time(lambda: be.forward(q, k, v, True, head_dim ** -0.5, **kw), reps)
        both = _time(lambda: (be.forward(q, k, v, True, head_dim ** -0.5, **kw),
                              be.backward(dout, q, k, v, out, lse, True, head_dim ** -0.5, **kw)), reps)
        rows.append(("causal" if w is None else f"window {w}", fwd, both))
    return rows


def plan_rows(seq: int, ring: int, windows):
    geo = Geometry(seq, ring, "zigzag")
    starts = geo.ring_starts(ring, 1)
    rows = []
    for w in [None] + list(windows):
        pairs = blocks = skipped = 0
        for i in range(ring):
            st = BlockPlan(ring, i, geo.chunk, starts, seq, True,
                           window=(-1, -1) if w is None else (w - 1, -1))
            for src in range(ring):
                calls = st.calls(src)
                blocks += bool(calls)
                skipped += st.window_skipped(src)
                pairs += sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1, _ in calls)
        rows.append(("causal" if w is None else f"window {w}", blocks, skipped, pairs))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--windows", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--ring", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch backend, one causal block: seq {a.seq}, {a.heads} heads x {a.head_dim}, fp32, CPU "
          f"({torch.get_num_threads()} threads), median of {a.reps}")
    print(f"{'mask':>12} {'fwd ms':>9} {'fwd+bwd ms':>11}")
    for name, fwd, both in backend_rows(a.seq, a.heads, a.head_dim, a.windows, a.reps):
        print(f"{name:>12} {fwd:>9.1f} {both:>11.1f}")
    print(f"\nring plan: {a.ring} ranks, zigzag, seq {a.seq}")
    print(f"{'mask':>12} {'ring blocks computed':>21} {'segment pairs skipped':>22} {'call area':>15}")
    for name, blocks, skipped, pairs in plan_rows(a.seq, a.ring, a.windows):
        print(f"{name:>12} {blocks:>21} {skipped:>22} {pairs:>15}")


if __name__ == "__main__":
    main()
