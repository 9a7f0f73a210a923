"""LSE merge micro-benchmark: the fused C++ kernel (spattn._C.merge_cpu_) vs the eager torch merge.

    python bench/bench_merge.py            # default shapes, fp32/bf16/fp16 blocks, all CPU threads
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch


def _best_ms(fn: Callable[[], None], reset: Callable[[], None], iters: int) -> float:
    """Fastest of ``iters`` timed calls (after two warm-up calls) in ms (robust on a shared machine); ``reset`` (untimed) restores
    the inputs before each call, so every call merges the same values."""
    ts = []
    for i in range(iters + 2):
        reset()
        t0 = time.perf_counter()
        fn()
        if i >= 2:
            ts.append((time.perf_counter() - t0) * 1e3)
    return min(ts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="1x2048x8x64,2x4096x16x128,1x512x4x67",
                   help="comma-separated BxSxHxD of the running output")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from spattn import _ext, ops

    C = _ext.load(required=True)
    print(f"LSE merge in place, CPU, {torch.get_num_threads()} threads, best of {args.iters}")
    print(f"{'shape (B,S,H,D)':<18} {'block':>6} {'eager':>10} {'fused':>10} {'speedup':>8}")
    for spec in args.shapes.split(","):
        b, s, h, d = (int(x) for x in spec.split("x"))
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            out0, lse0 = torch.randn(b, s, h, d), torch.randn(b, h, s)
            blk, blk_lse = torch.randn(b, s, h, d).to(dtype), torch.randn(b, h, s)
            out, lse = out0.clone(), lse0.clone()

            def reset() -> None:  # repeated merges would drift into denormals and time those instead
                out.copy_(out0)
                lse.copy_(lse0)

            eager = _best_ms(lambda: ops._merge_torch_(out, lse, blk, blk_lse), reset, args.iters)
            fused = _best_ms(lambda: C.merge_cpu_(out, lse, blk, blk_lse), reset, args.iters)
            name = str(dtype).replace("torch.", "")
            print(f"{spec:<18} {name:>8} {eager:>8.3f}ms {fused:>8.3f}ms {eager / fused:>7.1f}x")


if __name__ == "__main__":
    main()
