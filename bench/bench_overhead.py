"""Per-call overhead of spattn.attention on a mesh of one (no communication), against SDPA: what the
dispatch through the custom op, validation and planning cost when the attention itself is tiny.

    python bench/bench_overhead.py                   # (1, 64, 4, 32), causal, best / median of 2000
    python bench/bench_overhead.py --seq 256 --iters 500

Prints best and median microseconds for: spattn forward + backward, spattn forward (no grad), and
SDPA forward + backward on the same tensors. One thread, CPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import spattn  # noqa: E402


def _times(fn: Callable[[], None], iters: int, warmup: int = 200) -> List[float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--iters", type=int, default=2000)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    mesh = spattn.init_mesh()
    q = torch.randn(1, a.seq, a.heads, a.head_dim, requires_grad=True)

    def fwd_bwd() -> None:
        spattn.attention(q, q, q, mesh, causal=True).sum().backward()

    def fwd() -> None:
        with torch.no_grad():
            spattn.attention(q, q, q, mesh, causal=True)

    def sdpa_fwd_bwd() -> None:
        t = q.transpose(1, 2)
        F.scaled_dot_product_attention(t, t, t, is_causal=True).sum().backward()

    print(f"torch {torch.__version__}, q {tuple(q.shape)}, causal, 1 thread, {a.iters} iterations")
    for name, fn in (("spattn fwd+bwd", fwd_bwd), ("spattn fwd", fwd), ("sdpa fwd+bwd", sdpa_fwd_bwd)):
        ts = _times(fn, a.iters)
        print(f"{name:16s} best {min(ts) * 1e6:8.0f} us   median {statistics.median(ts) * 1e6:8.0f} us")


if __name__ == "__main__":
    main()
