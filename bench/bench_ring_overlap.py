"""Ring step timing: compute alone, transfer alone, and the overlapped step, per ring engine.

    python bench/bench_ring_overlap.py                       # 2 gloo ranks on CPU
    python bench/bench_ring_overlap.py --ranks 4 --seq 1024
    python bench/bench_ring_overlap.py --device cuda         # NCCL, one GPU per rank

A ring step is ``start(kv); attention(q, kv); wait()``. With perfect overlap it costs
max(compute, transfer), without any it costs their sum; the table prints overlapped / max.
Times are per step, the median over iterations, the slowest rank.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from spattn.launch import LocalRanks, init_rank  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], None], iters: int, warmup: int, device: torch.device) -> float:
    """Median wall time of fn in ms, slowest rank; ranks start each iteration together."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: List[float] = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _rank_main(rank: int, world: int, init_method: str, args: argparse.Namespace):
    device = init_rank(rank, world, init_method, backend="nccl" if args.device == "cuda" else "gloo")
    from spattn import _ext, ops
    from spattn.comm import make_ring_comm

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    g = torch.Generator(device=device).manual_seed(rank)
    shape = (args.batch, args.seq, args.heads, args.dim)
    q = torch.randn(shape, generator=g, device=device, dtype=dtype)
    kv = torch.randn((2,) + shape, generator=g, device=device, dtype=dtype)  # K and V: one message

    def compute(block: torch.Tensor) -> None:
        if args.sleep_compute_ms:  # stands in for compute that leaves the CPU free (a GPU kernel)
            time.sleep(args.sleep_compute_ms / 1e3)
        else:
            ops.attention_with_lse(q, block[0], block[1], backend=args.backend)

    rows: Dict[str, Dict[str, float]] = {}
    engines = [e for e in args.engines.split(",") if e != "cpp" or _ext.available()]
    with torch.no_grad():
        for engine in engines:
            comm = make_ring_comm(dist.group.WORLD, kv, engine)
            state = {"cur": kv}

            def transfer() -> None:
                comm.start(state["cur"])
                state["cur"] = comm.wait()

            launch: List[float] = []

            def overlapped() -> None:
                t0 = time.perf_counter()
                comm.start(state["cur"])
                launch.append((time.perf_counter() - t0) * 1e3)
                compute(state["cur"])
                state["cur"] = comm.wait()

            rows[engine] = {
                "compute": _median_ms(lambda: compute(state["cur"]), args.iters, args.warmup, device),
                "transfer": _median_ms(transfer, args.iters, args.warmup, device),
                "overlapped": _median_ms(overlapped, args.iters, args.warmup, device),
            }
            # Time inside start(): near 0 means the transfer really runs in the background.
            t = torch.tensor([statistics.median(launch)], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            rows[engine]["start"] = float(t)
    dist.barrier()
    dist.destroy_process_group()
    return rows if rank == 0 else None


def _table(rows: Dict[str, Dict[str, float]], args: argparse.Namespace) -> str:
    mb = 2 * args.batch * args.seq * args.heads * args.dim * {"fp32": 4, "bf16": 2, "fp16": 2}[args.dtype] / 2**20
    head = (f"ring step, {args.ranks} {'NCCL' if args.device == 'cuda' else 'gloo'} ranks, "
            f"block B={args.batch} S={args.seq} H={args.heads} D={args.dim} {args.dtype}, "
            f"K/V message {mb:.1f} MiB, median of {args.iters}, slowest rank"
            + (f", compute = sleep {args.sleep_compute_ms} ms" if args.sleep_compute_ms else ""))
    lines = [head, f"{'engine':<8} {'compute':>10} {'transfer':>10} {'overlapped':>11} {'sum':>9} "
                   f"{'max':>9} {'overl/max':>10} {'overl/sum':>10} {'in start()':>11}"]
    for engine, r in rows.items():
        s, m = r["compute"] + r["transfer"], max(r["compute"], r["transfer"])
        lines.append(f"{engine:<8} {r['compute']:>8.2f}ms {r['transfer']:>8.2f}ms {r['overlapped']:>9.2f}ms "
                     f"{s:>7.2f}ms {m:>7.2f}ms {r['overlapped'] / m:>10.2f} {r['overlapped'] / s:>10.2f} "
                     f"{r['start']:>9.3f}ms")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048, help="local sequence length (one ring block)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", help="attention backend for the compute part")
    p.add_argument("--engines", default="python,cpp")
    p.add_argument("--sleep-compute-ms", type=float, default=0.0,
                   help="replace the attention by a sleep of this many ms: shows whether the transfer "
                        "progresses in the background when compute does not occupy the CPU")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.ranks:
        raise SystemExit(f"--device cuda needs {args.ranks} GPUs, found {torch.cuda.device_count()}")
    with LocalRanks(_rank_main, args.ranks, args=(args,)) as ranks:
        print(_table(ranks.wait(), args))


if __name__ == "__main__":
    main()
