"""Scaling benchmark: sequence-parallel attention (Ulysses, Ring, hybrids) on P local ranks vs one
process running SDPA on the full sequence, forward and forward+backward.

    python bench/bench_sp.py                    # default sweep: P=2,4 x S=1024,2048 x (8x64, 4x128), ~1-2 min on 2 cores
    python bench/bench_sp.py --quick            # a few seconds: P=2, S=512, one shape
    python bench/bench_sp.py -P 4 --seqs 4096 --shapes 8x64 --causal --layout zigzag
    python bench/bench_sp.py --device cuda -P 2 4 --dtype bf16 --seqs 16384 32768 --shapes 24x128

Per configuration: the median time (the slowest rank sets the pace), its ratio to single-process
SDPA, the bytes each rank sent (counted at the communication layer, spattn.comm.count_comm) next to
the theoretical minimum of the mode, the peak memory per rank (CPU: resident-set high-water mark of
the rank process, which includes torch itself; GPU: torch.cuda.max_memory_allocated) and the max
error of the forward output against SDPA. Prints a table, appends CSV rows keyed by device and
versions to bench/out/bench_sp.csv, and saves bench/out/bench_sp.png (time ratio vs degree, one line
per mode).

On CPU the ranks share the machine's cores (each gets cores // P threads) and the baseline uses all
of them, so a ratio of 1.00 means communication and splitting cost nothing; it is not a GPU speedup
(for that: `spattn plan`, calibrated with these CSV rows via `--calibrate`).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from demo import DTYPES, timeit  # noqa: E402  (bench/demo.py)
from results import write_csv  # noqa: E402  (bench/results.py)
from spattn.cli.costmodel import factorizations, mode_name  # noqa: E402
from spattn.launch import LocalRanks, init_rank  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
PASSES = ("fwd", "fwd+bwd")
Shape = Tuple[int, int, int]  # seq, heads, head_dim


def min_bytes(u: int, r: int, seq: int, heads: int, kv_heads: int, dim: int, elem: int, pas: str) -> float:
    """Theoretical minimum bytes one rank sends, in the input dtype.

    Ulysses: (U-1)/U of this rank's q, k, v leaves, and of out on the way back; backward mirrors it
    (dout in, dq, dk, dv back). Ring: one K/V block of (S/R tokens x Hkv/U heads) per step, R-1
    steps; backward sends K/V again and the (dK, dV) partials R-1 hops.
    """
    p = u * r
    a2a = (2 * heads + 2 * kv_heads) * (seq / p) * dim * elem * (u - 1) / u
    block = 2 * (seq / r) * (kv_heads / u) * dim * elem
    ring = (r - 1) * block
    fwd = a2a + ring
    return fwd if pas == "fwd" else fwd + a2a + 2 * ring


# ----------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------
def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the resident-set high-water mark (VmHWM) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mib(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # never reset: lifetime peak
    except ImportError:
        return None


# ----------------------------------------------------------------------------------------------
# single-process baseline
# ----------------------------------------------------------------------------------------------
def _full_inputs(shape: Shape, kv_heads: int, dtype, batch: int):
    seq, heads, dim = shape
    g = torch.Generator().manual_seed(seq * 131 + heads * 7 + dim)
    q = torch.randn(batch, seq, heads, dim, generator=g).to(dtype)
    k, v = (torch.randn(batch, seq, kv_heads, dim, generator=g).to(dtype) for _ in range(2))
    dout = torch.randn(batch, seq, heads, dim, generator=g).to(dtype)
    return q, k, v, dout


def _sdpa(q, k, v, causal):
    if k.shape[2] != q.shape[2]:
        k, v = (x.repeat_interleave(q.shape[2] // x.shape[2], dim=2) for x in (k, v))
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=causal).transpose(1, 2)


def baseline(args, shape: Shape, device: torch.device) -> Dict[str, Tuple[float, Optional[float]]]:
    """Median seconds (and peak MiB) of SDPA on the full sequence in this process, per pass."""
    q, k, v, dout = (t.to(device) for t in _full_inputs(shape, args.kv_heads or shape[1], DTYPES[args.dtype], args.batch))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    def fwd():
        with torch.no_grad():
            _sdpa(q, k, v, args.causal)

    def fwdbwd():
        qg.grad = kg.grad = vg.grad = None
        _sdpa(qg, kg, vg, args.causal).backward(dout)

    out = {}
    for pas, fn in (("fwd", fwd), ("fwd+bwd", fwdbwd)):
        if pas not in args.passes:
            continue
        t = statistics.median(timeit(fn, args.iters, args.warmup, sync))
        _reset_peak(device)
        fn()
        out[pas] = (t, _peak_mib(device))
    return out


# ----------------------------------------------------------------------------------------------
# ranks
# ----------------------------------------------------------------------------------------------
def _rank_main(rank: int, world: int, init_method: str, args, shapes: Sequence[Shape]):
    import spattn
    from spattn import comm

    use_cuda = args.device == "cuda"
    device = init_rank(rank, world, init_method, backend="nccl" if use_cuda else "gloo", timeout_s=300)
    sync = (lambda: (torch.cuda.synchronize(), dist.barrier())) if use_cuda else dist.barrier
    meshes: Dict[Tuple[int, int], spattn.SPMesh] = {}
    modes = [m for m in factorizations(world, exact=True) if mode_name(*m).split()[0] in args.modes]
    rows = []
    for shape in shapes:
        kvh = args.kv_heads or shape[1]
        q, k, v, dout = (t.to(device) for t in _full_inputs(shape, kvh, DTYPES[args.dtype], args.batch))
        ref = _sdpa(q.float(), k.float(), v.float(), args.causal) if rank == 0 else None
        for u, r in modes:
            if (u, r) not in meshes:
                meshes[(u, r)] = spattn.init_mesh(ulysses_degree=u, ring_degree=r)
            mesh = meshes[(u, r)]
            kw = dict(layout=args.layout)
            ql, kl, vl = (spattn.shard(t, mesh, **kw).requires_grad_() for t in (q, k, v))
            dl = spattn.shard(dout, mesh, **kw)
            call = dict(causal=args.causal, backend=args.backend, ring_engine=args.engine, **kw)

            def fwd():
                with torch.no_grad():
                    return spattn.attention(ql, kl, vl, mesh, **call)

            def fwdbwd():
                ql.grad = kl.grad = vl.grad = None
                spattn.attention(ql, kl, vl, mesh, **call).backward(dl)

            for pas, fn in (("fwd", fwd), ("fwd+bwd", fwdbwd)):
                if pas not in args.passes:
                    continue
                t = statistics.median(timeit(fn, args.iters, args.warmup, sync=sync))
                _reset_peak(device)
                with comm.count_comm() as counter:
                    res = fn()
                sync()
                stats = (t, counter.total, counter.bytes["all_to_all"], counter.bytes["ring_p2p"], _peak_mib(device))
                every = [None] * world
                dist.all_gather_object(every, stats)
                err = None
                if pas == "fwd":
                    full = spattn.gather(res, mesh, **kw)
                    if rank == 0:
                        err = (full.float() - ref).abs().max().item()
                if rank == 0:
                    rows.append(dict(
                        mode=mode_name(u, r), ulysses_degree=u, ring_degree=r, world=world, seq=shape[0],
                        heads=shape[1], kv_heads=kvh, head_dim=shape[2], **{"pass": pas},
                        time_s=max(e[0] for e in every), bytes_per_rank=max(e[1] for e in every),
                        a2a_bytes=max(e[2] for e in every), ring_bytes=max(e[3] for e in every),
                        min_bytes_per_rank=min_bytes(u, r, shape[0] * args.batch, shape[1], kvh, shape[2],
                                                     q.element_size(), pas),
                        peak_mem_mib=max((e[4] or 0) for e in every), max_err=err))
    dist.barrier()
    dist.destroy_process_group()
    return rows if rank == 0 else None


def run_degree(args, world: int, shapes: Sequence[Shape]) -> List[Dict]:
    with LocalRanks(_rank_main, world, args=(args, shapes)) as ranks:
        return ranks.wait(timeout=args.timeout)


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------
def _mib(b: float) -> str:
    return f"{b / 2**20:.2f}"


def print_table(rows: Sequence[Dict], head: str) -> None:
    print(head)
    print(f"{'mode':<13}{'P':>3}{'seq':>7}{'HxD':>8}{'pass':>9}{'ms':>9}{'/sdpa':>7}{'MiB sent':>10}{'min MiB':>9}"
          f"{'sent/min':>9}{'peak MiB':>10}{'max err':>10}")
    for r in rows:
        ratio = r["time_s"] / r["sdpa_s"] if r.get("sdpa_s") else float("nan")
        over = f"{r['bytes_per_rank'] / r['min_bytes_per_rank']:.2f}" if r["min_bytes_per_rank"] else "-"
        err = "-" if r.get("max_err") is None else f"{r['max_err']:.1e}"
        peak = "-" if r.get("peak_mem_mib") is None else f"{r['peak_mem_mib']:.0f}"
        print(f"{r['mode']:<13}{r['world']:>3}{r['seq']:>7}{str(r['heads']) + 'x' + str(r['head_dim']):>8}{r['pass']:>9}"
              f"{r['time_s'] * 1e3:>9.1f}{ratio:>7.2f}{_mib(r['bytes_per_rank']):>10}{_mib(r['min_bytes_per_rank']):>9}"
              f"{over:>9}{peak:>10}{err:>10}")


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def environment(args) -> Dict[str, str]:
    if args.device == "cuda":
        dev = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    else:
        dev = f"cpu {platform.processor() or platform.machine()} {os.cpu_count()} cores"
    try:
        import triton

        tri = triton.__version__
    except ImportError:
        tri = "none"
    return dict(timestamp=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), device=dev,
                python=platform.python_version(), torch=torch.__version__, triton=tri, spattn_rev=_git_rev(),
                dtype=args.dtype, causal=str(args.causal), layout=args.layout, backend=args.backend,
                engine=args.engine, batch=str(args.batch))


def plot(rows: Sequence[Dict], path: str, title: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    sp = [r for r in rows if r["world"] > 1]
    if not sp:
        return None
    big = max(sp, key=lambda r: (r["seq"], r["heads"] * r["head_dim"]))  # the largest configuration
    pick = [r for r in sp if (r["seq"], r["heads"], r["head_dim"]) == (big["seq"], big["heads"], big["head_dim"])]
    passes = [p for p in PASSES if any(r["pass"] == p for r in pick)]
    fig, axes = plt.subplots(1, len(passes), figsize=(5 * len(passes), 3.8), squeeze=False)
    for ax, pas in zip(axes[0], passes):
        modes = sorted({r["mode"].split()[0] for r in pick})
        for m in modes:
            pts = sorted((r["world"], r["time_s"] / r["sdpa_s"], r["mode"]) for r in pick
                         if r["pass"] == pas and r["mode"].split()[0] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m if m != "hybrid" else
                    "hybrid (" + ", ".join(p[2].split()[1] for p in pts) + ")")
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="SDPA, 1 process")
        ax.set_xlabel("degree P (ranks)")
        ax.set_ylabel("time / single-process SDPA")
        ax.set_xticks(sorted({r["world"] for r in pick}))
        ax.set_title(f"{pas}: S={big['seq']}, {big['heads']}x{big['head_dim']}")
        ax.legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 110), fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-P", "--degrees", type=int, nargs="+", default=[2, 4], help="rank counts to sweep")
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048], help="global sequence lengths")
    p.add_argument("--shapes", nargs="+", default=["8x64", "4x128"], help="HEADSxHEAD_DIM pairs")
    p.add_argument("--kv-heads", type=int, default=None, help="GQA: key/value heads (default: = heads)")
    p.add_argument("--modes", nargs="+", default=["ulysses", "ring", "hybrid"], choices=["ulysses", "ring", "hybrid"])
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=list(PASSES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--layout", choices=["contiguous", "zigzag"], default="contiguous")
    p.add_argument("--backend", default="auto")
    p.add_argument("--engine", default="auto", help="ring engine: auto, python or cpp")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: NCCL, one GPU per rank")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a few seconds: P=2, S=512, 4x32, 2 iterations")
    p.add_argument("--csv", default=os.path.join(OUT_DIR, "bench_sp.csv"), help="CSV to append rows to")
    p.add_argument("--png", default=os.path.join(OUT_DIR, "bench_sp.png"), help="plot path ('' for none)")
    p.add_argument("--timeout", type=float, default=1800)
    return p


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = parser().parse_args(argv)
    if args.quick:
        args.degrees, args.seqs, args.shapes, args.iters = [2], [512], ["4x32"], 2
    shapes = []
    for s in args.shapes:
        h, d = (int(x) for x in s.lower().split("x"))
        shapes += [(seq, h, d) for seq in args.seqs]
    for seq, h, d in shapes:
        for p in args.degrees:
            if seq % (p * (2 if args.layout == "zigzag" else 1)):
                raise SystemExit(f"bench_sp: seq {seq} must be a multiple of P={p} (x2 for zigzag); "
                                 f"the benchmark keeps shards equal (spattn itself pads any length)")
    if args.device == "cuda":
        if not torch.cuda.is_available() or max(args.degrees) > torch.cuda.device_count():
            raise SystemExit(f"bench_sp: --device cuda needs {max(args.degrees)} GPUs, "
                             f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} visible")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    env = environment(args)
    t0 = time.monotonic()
    torch.set_num_threads(os.cpu_count() or 1)
    base = {shape: baseline(args, shape, device) for shape in shapes}
    rows = []
    for shape, per in base.items():
        for pas, (t, peak) in per.items():
            rows.append(dict(mode="sdpa (1 proc)", ulysses_degree=1, ring_degree=1, world=1, seq=shape[0],
                             heads=shape[1], kv_heads=args.kv_heads or shape[1], head_dim=shape[2], **{"pass": pas},
                             time_s=t, bytes_per_rank=0, a2a_bytes=0, ring_bytes=0, min_bytes_per_rank=0,
                             peak_mem_mib=peak, max_err=0.0))
    for world in args.degrees:
        rows += run_degree(args, world, shapes)
    for r in rows:
        r["sdpa_s"] = base[(r["seq"], r["heads"], r["head_dim"])][r["pass"]][0]
        r["ratio"] = r["time_s"] / r["sdpa_s"]
    rows.sort(key=lambda r: (r["seq"], r["heads"], r["head_dim"], r["pass"], r["world"], r["mode"]))
    threads = f"{max(1, (os.cpu_count() or 1) // max(args.degrees))}-{max(1, (os.cpu_count() or 1) // min(args.degrees))}"
    head = (f"# {env['device']}, torch {env['torch']}, spattn {env['spattn_rev']}; {args.dtype} B={args.batch} "
            f"causal={args.causal} layout={args.layout} backend={args.backend} engine={args.engine}; "
            f"median of {args.iters}" + ("" if args.device == "cuda" else
                                         f"; threads/rank {threads}, SDPA baseline uses all {os.cpu_count()} cores"))
    print_table(rows, head)
    out_rows = [{**env, **r} for r in rows]
    path = write_csv(out_rows, args.csv)
    print(f"csv: {path} (+{len(out_rows)} rows)")
    if args.png:
        png = plot(rows, args.png, head.lstrip("# "))
        if png:
            print(f"plot: {png}")
    bad = [r for r in rows if r.get("max_err") is not None and r["max_err"] > (1e-4 if args.dtype == "fp32" else 5e-2)]
    print(f"forward output vs SDPA: {'OK' if not bad else 'MISMATCH in ' + str([r['mode'] for r in bad])}; "
          f"{time.monotonic() - t0:.0f} s")
    if bad:
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    main()
