"""Packed documents (cu_seqlens): load balance, skipped work and time; P2P vs all-gather ring.

    python bench/bench_varlen.py balance [--world 8] [--seqs 32768,65536,131072] [--means 1024,2048,4096]
    python bench/bench_varlen.py time [--worlds 2,4] [--seqs 1024,4096] [--heads 8] [--head-dim 64] [--packing both]
        [--layout zigzag]

balance: exact figures from the ring plan alone (no attention is run, so any size is cheap): for
lognormal document lengths (long-tailed, sigma 1) packed into one sequence, per rank the visible
(query, key) pairs its plan computes over all ring steps; imbalance = max/mean - 1 over ranks;
skipped = 1 - visible pairs / the pairs the same tokens as one (causal) document would compute;
calls = backend calls per rank (max). Ring-only meshes (U=1) are the hardest case: with Ulysses each
rank computes its heads of the whole ring rank's sequence, so the ring degree is what matters.

time: fwd and fwd+bwd wall time (median of --reps) on gloo CPU ranks, packed vs one document,
ring_impl p2p vs allgather. Small sizes only: this is a 2-core machine.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import List, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from spattn.launch import LocalRanks, init_rank  # noqa: E402
from spattn.layout import Geometry  # noqa: E402
from spattn.parallel.blocks import BlockPlan, visible_pairs  # noqa: E402


def lognormal_docs(seq: int, mean: float, sigma: float, seed: int) -> List[int]:
    """Document lengths (>= 1) with a lognormal law of the given mean, truncated to fill ``seq``."""
    g = torch.Generator().manual_seed(seed)
    mu = math.log(mean) - sigma * sigma / 2
    out, total = [], 0
    while total < seq:
        n = max(1, int(round(math.exp(mu + sigma * torch.randn((), generator=g).item()))))
        n = min(n, seq - total)
        out.append(n)
        total += n
    return out


def ring_plans(seq: int, R: int, U: int, layout: str, causal: bool, docs) -> List[BlockPlan]:
    """The BlockPlan of every ring rank, built as spattn.attention builds it."""
    b = None if docs is None else tuple(int(x) for x in torch.tensor([0] + list(docs)).cumsum(0))
    geo = Geometry(seq, U * R, layout, U, b)
    L = U * geo.chunk
    starts = tuple(tuple(s * L for s in geo.ring_segments(r, R)) for r in range(R))
    return [BlockPlan(R, i, L, starts, seq, causal, docs=b) for i in range(R)]


def plan_stats(seq: int, R: int, U: int, layout: str, causal: bool, docs) -> Tuple[List[int], int]:
    """(visible pairs per ring rank, max backend calls per rank)."""
    pairs, calls = [], 0
    for st in ring_plans(seq, R, U, layout, causal, docs):
        plans = [st.calls(src) for src in range(R)]
        pairs.append(sum(visible_pairs(p) for p in plans))
        calls = max(calls, sum(len(p) for p in plans))
    return pairs, calls


def balance(args) -> None:
    R = args.world
    print(f"ring degree {R} (U=1), causal, lognormal doc lengths sigma={args.sigma}, {args.seeds} seeds each")
    print(f"{'seq':>7} {'mean':>5} {'docs':>5} {'layout':>10} {'imbalance':>9} {'worst':>6} {'skipped':>8} "
          f"{'calls':>6} {'1-doc imb':>9}")
    for seq in args.seqs:
        for mean in args.means:
            for layout in ("contiguous", "zigzag", "balanced"):
                imbs, skips, ndocs, calls = [], [], [], 0
                one, _ = plan_stats(seq, R, 1, layout, True, None)
                for seed in range(args.seeds):
                    docs = lognormal_docs(seq, mean, args.sigma, seed)
                    pairs, c = plan_stats(seq, R, 1, layout, True, docs)
                    imbs.append(max(pairs) / statistics.mean(pairs) - 1)
                    skips.append(1 - sum(pairs) / sum(one))
                    ndocs.append(len(docs))
                    calls = max(calls, c)
                print(f"{seq:>7} {mean:>5} {statistics.mean(ndocs):>5.0f} {layout:>10} "
                      f"{statistics.mean(imbs):>8.1%} {max(imbs):>6.1%} {statistics.mean(skips):>8.1%} "
                      f"{calls:>6} {max(one) / statistics.mean(one) - 1:>8.1%}")


# ----------------------------------------------------------------------------------------------
# Timing on gloo ranks
# ----------------------------------------------------------------------------------------------
def _rank(rank: int, world: int, init_method: str, cfg: dict):
    import torch.distributed as dist

    import spattn

    init_rank(rank, world, init_method, backend="gloo")
    mesh = spattn.init_mesh(ulysses_degree=1, ring_degree=world)
    rows = []
    for seq in cfg["seqs"]:
        g = torch.Generator().manual_seed(0)
        H, D = cfg["heads"], cfg["head_dim"]
        full = [torch.randn(1, seq, H, D, generator=g) for _ in range(4)]
        docs = lognormal_docs(seq, cfg["mean"], 1.0, 0)
        cu = torch.tensor([0] + docs).cumsum(0)
        lay = cfg["layout"]
        for packing, cs in (("packed", cu), ("one-doc", None))[cfg["packings"]]:
            loc = [spattn.shard(t, mesh, layout=lay, cu_seqlens=cs) for t in full]
            times = {impl: ([], []) for impl in ("p2p", "allgather")}
            for rep in range(cfg["reps"] + 1):
                for impl in times:  # interleaved, so load drift on a shared machine hits both alike
                    q, k, v = (t.clone().requires_grad_() for t in loc[:3])
                    dist.barrier()
                    t0 = time.perf_counter()
                    out = spattn.attention(q, k, v, mesh, causal=True, layout=lay, cu_seqlens=cs,
                                           ring_impl=impl)
                    dist.barrier()
                    t1 = time.perf_counter()
                    out.backward(loc[3])
                    dist.barrier()
                    t2 = time.perf_counter()
                    if rep:  # the first run warms up
                        times[impl][0].append(t1 - t0)
                        times[impl][1].append(t2 - t0)
            for impl, (tf, tb) in times.items():
                rows.append((seq, packing, len(docs) if cs is not None else 1, impl,
                             statistics.median(tf) * 1e3, statistics.median(tb) * 1e3))
    dist.destroy_process_group()
    return rows if rank == 0 else None


def timing(args) -> None:
    packings = {"both": slice(0, 2), "packed": slice(0, 1), "one-doc": slice(1, 2)}[args.packing]
    cfg = dict(seqs=args.seqs, heads=args.heads, head_dim=args.head_dim, reps=args.reps, mean=args.mean,
               packings=packings, layout=args.layout)
    print(f"causal, {args.layout}, fp32, heads {args.heads}, head_dim {args.head_dim}, packed = lognormal docs "
          f"mean {args.mean}; median of {args.reps}; times in ms (wall, rank 0, gloo CPU)")
    print(f"{'world':>5} {'seq':>6} {'packing':>8} {'docs':>5} {'impl':>10} {'fwd':>9} {'fwd+bwd':>9}")
    for world in args.worlds:
        with LocalRanks(_rank, world, args=(cfg,)) as ranks:
            rows = ranks.wait()
        for seq, packing, nd, impl, f, b in rows:
            print(f"{world:>5} {seq:>6} {packing:>8} {nd:>5} {impl:>10} {f:>9.1f} {b:>9.1f}")


def main() -> None:
    ints = (lambda s: [int(x) for x in s.split(",")])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("balance")
    b.add_argument("--world", type=int, default=8)
    b.add_argument("--seqs", type=ints, default=[32768, 65536, 131072])
    b.add_argument("--means", type=ints, default=[1024, 2048, 4096])
    b.add_argument("--sigma", type=float, default=1.0)
    b.add_argument("--seeds", type=int, default=5)
    t = sub.add_parser("time")
    t.add_argument("--worlds", type=ints, default=[2, 4])
    t.add_argument("--seqs", type=ints, default=[1024, 4096])
    t.add_argument("--heads", type=int, default=8)
    t.add_argument("--head-dim", type=int, default=64)
    t.add_argument("--mean", type=int, default=256)
    t.add_argument("--reps", type=int, default=3)
    t.add_argument("--packing", choices=["both", "packed", "one-doc"], default="both")
    t.add_argument("--layout", choices=["contiguous", "zigzag", "balanced"], default="zigzag")
    args = ap.parse_args()
    balance(args) if args.cmd == "balance" else timing(args)


if __name__ == "__main__":
    main()
