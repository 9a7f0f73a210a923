"""Benchmark: cost per call of the cross-rank argument check (spattn.check), on CPU gloo ranks.

    python bench/bench_check.py                 # P = 2 and 4, 2000 checks each
    python bench/bench_check.py -P 8 --iters 5000

Per world size, prints the median and p90 microseconds of (a) building the signature, (b) the
signature exchange (check=1: posted to the shared-memory board on one host, else all-gathered),
(c) the same with the joint-contents digest (check=2, a 1x64x8x64 text), and (d) one tiny attention
forward with the check off and on, as the difference a user sees.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from spattn.launch import LocalRanks, init_rank  # noqa: E402


def _stats(ts):
    ts = sorted(ts)
    return statistics.median(ts) * 1e6, ts[int(0.9 * (len(ts) - 1))] * 1e6


def _rank_main(rank: int, world: int, init_method: str, iters: int):
    import torch
    import torch.distributed as dist

    init_rank(rank, world, init_method, backend="gloo", timeout_s=60, threads=1)
    import spattn
    from spattn import check
    from spattn.call import Inputs, Options, build_call

    mesh = spattn.init_mesh(ring_degree=world)
    g = torch.Generator().manual_seed(0)  # the text must be identical on every rank
    q = torch.randn(1, 16, 8, 64, generator=g)
    t = torch.randn(1, 64, 8, 64, generator=g)
    x, xj = Inputs(q, q, q), Inputs(q, q, q, t, t, t)
    call = build_call(x, mesh, Options(causal=True, seq_len=16 * world, check=1))
    call_j = build_call(xj, mesh, Options(seq_len=16 * world, check=2))
    res = {}

    def timed(fn):
        for _ in range(50):
            fn()
        dist.barrier()
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return _stats(ts)

    res["signature"] = timed(lambda: check.signature(call, x))
    res["check (mode 1)"] = timed(lambda: check.check_signature(mesh, check.signature(call, x)))
    res["check (mode 2, text 64)"] = timed(lambda: check.check_signature(mesh, check.signature(call_j, xj)))
    for mode in (0, 1):
        res[f"attention fwd, check={mode}"] = timed(lambda: spattn.attention(q, q, q, mesh, causal=True, check=mode))
    dist.barrier()
    dist.destroy_process_group()
    return res if rank == 0 else None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-P", type=int, nargs="+", default=[2, 4], help="world sizes")
    p.add_argument("--iters", type=int, default=2000)
    args = p.parse_args(argv)
    print(f"{'P':>2}  {'what':<32} {'median us':>10} {'p90 us':>10}")
    for world in args.P:
        with LocalRanks(_rank_main, world, args=(args.iters,)) as ranks:
            res = ranks.wait(timeout=600)
        for name, (med, p90) in res.items():
            print(f"{world:>2}  {name:<32} {med:>10.1f} {p90:>10.1f}")


if __name__ == "__main__":
    main()
