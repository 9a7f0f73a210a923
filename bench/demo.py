"""Run sequence-parallel attention on P local CPU ranks (gloo), check it against SDPA on the full
sequence, and time forward and backward per mode against single-process SDPA using all the cores.

    python bench/demo.py                        # short default run: P=2, S=1024
    python bench/demo.py -P 4 --seq 4096 --causal

Each rank gets ``cores // P`` torch threads, so the SP run and the baseline use the same machine.
A ratio <= 1.00 means the sequence-parallel step costs no more than the single-process one, i.e. all
communication was hidden behind compute. CPU timings are noisy: compare ratios within one run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from spattn.cli.costmodel import factorizations, mode_name  # noqa: E402
from spattn.launch import LocalRanks, init_rank  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _inputs(args, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.seq, args.heads, args.head_dim)
    kv_shape = shape[:2] + (args.kv_heads or args.heads, args.head_dim)
    t = [torch.randn(s, generator=g).to(DTYPES[args.dtype]) for s in (shape, kv_shape, kv_shape, shape)]
    return t


def timeit(fn, iters: int, warmup: int, sync=None) -> List[float]:
    """Seconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed ones (``sync`` around each)."""
    times = []
    for i in range(warmup + iters):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def baseline(args) -> Tuple[float, float, Tuple[torch.Tensor, ...]]:
    """Single-process SDPA on the full sequence with all cores: (fwd s, bwd s, reference tensors)."""
    torch.set_num_threads(os.cpu_count() or 1)
    q, k, v, dout = _inputs(args)
    qt, kt, vt = (t.transpose(1, 2).requires_grad_() for t in (q, k, v))
    gqa = (args.kv_heads or args.heads) != args.heads

    def fwd():
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=args.causal, enable_gqa=gqa)

    state = {}
    f = timeit(lambda: state.__setitem__("o", fwd()), args.iters, args.warmup)

    def bwd():
        qt.grad = kt.grad = vt.grad = None
        state["o"].backward(dout.transpose(1, 2), retain_graph=True)

    b = timeit(bwd, args.iters, args.warmup)
    o = state["o"].transpose(1, 2).detach()
    return statistics.median(f), statistics.median(b), (o, qt.grad.transpose(1, 2), kt.grad.transpose(1, 2),
                                                        vt.grad.transpose(1, 2))


def _rank_main(rank: int, world: int, init_method: str, args, modes):
    import spattn

    init_rank(rank, world, init_method, backend="gloo", timeout_s=300)
    q, k, v, dout = _inputs(args)
    out_rows = []
    for u, r in modes:
        mesh = spattn.init_mesh(ulysses_degree=u, ring_degree=r)
        kw = dict(layout=args.layout)
        ql, kl, vl = (spattn.shard(t, mesh, **kw).requires_grad_() for t in (q, k, v))
        dl = spattn.shard(dout, mesh, **kw)
        state = {}

        def fwd():
            state["o"] = spattn.attention(ql, kl, vl, mesh, causal=args.causal, backend=args.backend,
                                          ring_engine=args.engine, **kw)

        def bwd():
            ql.grad = kl.grad = vl.grad = None
            state["o"].backward(dl, retain_graph=True)

        f = timeit(fwd, args.iters, args.warmup, sync=dist.barrier)
        b = timeit(bwd, args.iters, args.warmup, sync=dist.barrier)
        full = [spattn.gather(t.detach(), mesh, **kw) for t in (state["o"], ql.grad, kl.grad, vl.grad)]
        times = [None] * world
        dist.all_gather_object(times, (statistics.median(f), statistics.median(b)))
        if rank == 0:  # the slowest rank sets the pace
            # numpy, not tensors: torch would share them by file descriptor, gone when this process exits
            out_rows.append((u, r, max(t[0] for t in times), max(t[1] for t in times),
                             [t.float().numpy() for t in full]))
    dist.destroy_process_group()
    return out_rows if rank == 0 else None


def run(args) -> List[Dict]:
    """Run baseline and every mode; return one row per mode."""
    modes = (factorizations(args.world, exact=True) if not args.modes
             else [tuple(map(int, m.split("x"))) for m in args.modes])
    base_f, base_b, ref = baseline(args)
    with LocalRanks(_rank_main, args.world, args=(args, modes)) as ranks:
        rows_raw = ranks.wait(timeout=args.timeout)
    rows = []
    for u, r, f, b, full in rows_raw:
        errs = [(torch.from_numpy(a).double() - e.double()).abs().max().item() for a, e in zip(full, ref)]
        rows.append(dict(mode=mode_name(u, r), u=u, r=r, fwd_s=f, bwd_s=b, fwd_ratio=f / base_f,
                         bwd_ratio=b / base_b, err_out=errs[0], err_grad=max(errs[1:])))
    return [dict(mode="sdpa (1 proc)", u=1, r=1, fwd_s=base_f, bwd_s=base_b, fwd_ratio=1.0, bwd_ratio=1.0,
                 err_out=0.0, err_grad=0.0)] + rows


def print_table(rows: Sequence[Dict], args) -> None:
    print(f"# S={args.seq} B={args.batch} H={args.heads} KVH={args.kv_heads or args.heads} D={args.head_dim} "
          f"{args.dtype} causal={args.causal} layout={args.layout} P={args.world} "
          f"threads/rank={max(1, (os.cpu_count() or 1) // args.world)} backend={args.backend} engine={args.engine}")
    print(f"{'mode':<18}{'fwd ms':>9}{'bwd ms':>9}{'fwd/sdpa':>10}{'bwd/sdpa':>10}{'max|out err|':>14}{'max|grad err|':>15}")
    for r in rows:
        print(f"{r['mode']:<18}{r['fwd_s'] * 1e3:>9.1f}{r['bwd_s'] * 1e3:>9.1f}{r['fwd_ratio']:>10.2f}"
              f"{r['bwd_ratio']:>10.2f}{r['err_out']:>14.2e}{r['err_grad']:>15.2e}")


def parser(**defaults) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-P", "--world", type=int, default=defaults.get("world", 2), help="number of gloo ranks")
    p.add_argument("--modes", nargs="*", help="UxR pairs, e.g. 2x1 1x2 (default: all factorizations of P)")
    p.add_argument("--seq", type=int, default=defaults.get("seq", 1024))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--layout", choices=["contiguous", "zigzag"], default="contiguous")
    p.add_argument("--backend", default="auto")
    p.add_argument("--engine", default="auto", help="ring engine: auto, python or cpp")
    p.add_argument("--iters", type=int, default=defaults.get("iters", 3))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--csv", help="also write the rows to this CSV file")
    return p


def main(argv: Optional[Sequence[str]] = None, **defaults) -> List[Dict]:
    args = parser(**defaults).parse_args(argv)
    rows = run(args)
    print_table(rows, args)
    tol = 1e-4 if args.dtype == "fp32" else 5e-2
    bad = [r["mode"] for r in rows if max(r["err_out"], r["err_grad"]) > tol * 10]
    print("correctness vs SDPA:", "OK" if not bad else f"MISMATCH in {bad}")
    if args.csv:
        import csv

        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if bad:
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    main()
