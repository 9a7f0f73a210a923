"""Patch-parallel VAE decode benchmark: decode time and per-rank peak activation vs ranks (1, 2, 4),
for an image VAE (Qwen-Image, Flux) and a video VAE (Wan), against the same VAE on one process.

    python bench/bench_vae.py                         # tiny VAEs, 1/2/4 ranks, ~2-4 min on 2 CPU cores
    python bench/bench_vae.py --models qwen --ranks 1 2 --latent 16x16
    python bench/bench_vae.py --preset real --latent 128x128 --frames 5 --ranks 1 2 4 8   # GPUs: real channels

Per (model, ranks): the median decode time over ``--reps`` (the slowest rank sets the pace, ranks start
together after a barrier), the largest convolution input any rank held (elements, forward pre-hooks on
every conv: ``spattn.integrations.diffusers.ConvInputMeter``) and its ratio to one process's, the
peak GPU memory per rank (``torch.cuda.max_memory_allocated``; CPU: none), and the largest relative
deviation of the decoded output from the one-process decode. Prints a table, appends CSV rows keyed
by device and versions to bench/out/bench_vae.csv and saves bench/out/bench_vae.png.

Weights are random (built from configs, nothing downloaded): ``--preset tiny`` is the tests' toy
channel widths, ``--preset real`` the released models' architectures (Qwen-Image/Wan 2.1: base 96,
z 16; Flux: 128-512 channels, 16 latent channels). On CPU the ranks share the cores (each gets
cores // P threads, the one-process run all of them): the time column shows overhead, not GPU speedup;
the activation column is what parallel decode is for (a band is 1/P of the image plus halo rows).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from results import write_csv  # noqa: E402  (bench/results.py)

OUT_DIR = os.path.join(ROOT, "bench", "out")
MODELS = ("qwen", "wan", "flux")


def build_vae(model: str, preset: str):
    """A random-weight VAE of ``model``'s class at the ``preset`` size (same weights on every rank)."""
    import diffusers
    import torch

    torch.manual_seed(0)
    if model in ("qwen", "wan"):
        cls = diffusers.AutoencoderKLQwenImage if model == "qwen" else diffusers.AutoencoderKLWan
        kw = dict(base_dim=4, z_dim=4, num_res_blocks=1) if preset == "tiny" else dict(base_dim=96, z_dim=16)
        return cls(dim_mult=[1, 2, 4, 4], temperal_downsample=[False, True, True], **kw).eval()
    if preset == "tiny":
        kw = dict(latent_channels=4, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)
    else:
        kw = dict(latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                   up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False,
                                   use_post_quant_conv=False, **kw).eval()


def latent_shape(model: str, vae, h: int, w: int, frames: int):
    z = vae.config.z_dim if model in ("qwen", "wan") else vae.config.latent_channels
    if model == "flux":
        return (1, z, h, w)
    return (1, z, frames if model == "wan" else 1, h, w)   # Qwen-Image: images; Wan: video


def decode_run(rank: int, world: int, init_method: Optional[str], job: dict) -> None:
    """One rank (or the single process, world 1): time ``reps`` decodes, record the peaks, save results."""
    import torch
    import torch.distributed as dist

    import spattn
    from spattn.integrations.diffusers import ConvInputMeter, parallelize_vae

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if world > 1:
        from spattn.launch import init_rank

        device = init_rank(rank, world, init_method, threads=max(1, cores // world))
    else:
        device = torch.device(job["device"])
        torch.set_num_threads(cores)   # one process: the whole CPU, as a single-device user runs it
    dtype = getattr(torch, job["dtype"])
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()   # its note on casting a random-weight model with to() buries the table
    vae = build_vae(job["model"], job["preset"]).to(device=device, dtype=dtype)
    z = torch.randn(*job["shape"], generator=torch.Generator().manual_seed(1)).to(device, dtype)
    meter = ConvInputMeter(vae.decoder)
    mesh = spattn.init_mesh(ulysses_degree=world) if world > 1 else spattn.SPMesh()
    handle = parallelize_vae(vae, mesh) if world > 1 else None
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        out = vae.decode(z).sample   # warm-up (and the output compared below)
        meter.reset()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(job["reps"]):
            if world > 1:
                dist.barrier()
            sync()
            t0 = time.perf_counter()
            out = vae.decode(z).sample
            sync()
            times.append(time.perf_counter() - t0)
    stats = torch.tensor([statistics.median(times), float(meter.peak),
                          torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0],
                         dtype=torch.float64)
    if world > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)   # the slowest rank, the largest band
        handle.remove()
    if rank == 0:
        torch.save({"out": out.float().cpu(), "time_s": stats[0].item(), "peak_conv_input": int(stats[1].item()),
                    "peak_mem_mb": stats[2].item()}, job["result"])
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run_one(job: dict, world: int) -> dict:
    import torch

    from spattn.launch import LocalRanks

    # The one-process reference runs in a fresh process too, under the same OpenMP policy as the ranks
    # (busy-waiting threads on a shared CPU would make whichever runs in this process look slow).
    with LocalRanks(decode_run, world, args=(job,), env={"OMP_WAIT_POLICY": "PASSIVE"}) as ranks:
        ranks.wait()
    return torch.load(job["result"])


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def plot(rows: Sequence[Dict], path: str, title: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
    worlds = sorted({r["ranks"] for r in rows})
    for label in dict.fromkeys(r["vae"] for r in rows):
        pts = sorted((r["ranks"], r["time_s"], r["peak_ratio"]) for r in rows if r["vae"] == label)
        ax_t.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax_m.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=label)
    ax_m.plot(worlds, [1 / p for p in worlds], color="gray", linestyle="--", linewidth=1, label="1/P")
    ax_t.set_ylabel("decode time (s)")
    ax_t.set_yscale("log")
    ax_m.set_ylabel("largest conv input per rank / one process's")
    for ax in (ax_t, ax_m):
        ax.set_xlabel("ranks P")
        ax.set_xticks(worlds)
        ax.legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 110), fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=MODELS, default=["qwen", "wan"],
                   help="qwen: Qwen-Image image VAE; wan: Wan video VAE; flux: Flux AutoencoderKL (default qwen wan)")
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4], help="rank counts (default 1 2 4)")
    p.add_argument("--preset", choices=("tiny", "real"), default="tiny", help="channel widths (default tiny)")
    p.add_argument("--latent", default="24x20", help="latent HxW (default 24x20: a 192x160 image)")
    p.add_argument("--frames", type=int, default=3, help="latent frames of the video VAE (default 3: 9 frames)")
    p.add_argument("--reps", type=int, default=3, help="timed decodes per configuration (median; default 3)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--csv", default=os.path.join(OUT_DIR, "bench_vae.csv"), help="CSV to append rows to")
    p.add_argument("--png", default=os.path.join(OUT_DIR, "bench_vae.png"), help="plot path ('' for none)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    import diffusers
    import torch

    args = parser().parse_args(argv)
    try:
        h, w = (int(x) for x in args.latent.lower().split("x"))
    except ValueError:
        raise SystemExit(f"bench_vae: --latent {args.latent!r}: expected HxW, e.g. 24x20") from None
    if min(args.ranks) < 1 or h < max(args.ranks):
        raise SystemExit(f"bench_vae: every rank needs a latent row: --latent height {h} < {max(args.ranks)} ranks")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and max(args.ranks) > torch.cuda.device_count():
        raise SystemExit(f"bench_vae: {max(args.ranks)} ranks but {torch.cuda.device_count()} GPUs visible")
    dev_name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    ranks = sorted(set(args.ranks) | {1})   # the one-process run is the reference
    rows: List[Dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            vae = build_vae(model, args.preset)
            shape = latent_shape(model, vae, h, w, args.frames)
            kind = "video" if model == "wan" else "image"
            label = f"{model} {kind} {'x'.join(map(str, shape[2:]))}"
            ref = None
            for p in ranks:
                job = dict(model=model, preset=args.preset, shape=shape, reps=args.reps, device=device,
                           dtype=args.dtype, result=os.path.join(tmp, f"{model}_{p}.pt"))
                res = run_one(job, p)
                if ref is None:
                    ref = res
                err = ((res["out"] - ref["out"]).abs().max() / ref["out"].abs().max()).item()
                rows.append(dict(
                    timestamp=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), device=dev_name,
                    torch=torch.__version__, diffusers=diffusers.__version__, spattn_rev=_git_rev(),
                    python=platform.python_version(), preset=args.preset, dtype=args.dtype, vae=label, kind=kind,
                    latent=json.dumps(list(shape)), ranks=p, time_s=round(res["time_s"], 5),
                    speedup=round(ref["time_s"] / res["time_s"], 3), peak_conv_input=res["peak_conv_input"],
                    peak_ratio=round(res["peak_conv_input"] / ref["peak_conv_input"], 4),
                    peak_mem_mb=round(res["peak_mem_mb"], 1) if device == "cuda" else "",
                    max_rel_err=f"{err:.1e}"))
                r = rows[-1]
                print(f"{label:<28} P={p}: {r['time_s']:.3f}s ({r['speedup']:.2f}x)  peak conv input "
                      f"{r['peak_conv_input']:>10,} ({r['peak_ratio']:.3f} of P=1; 1/P={1 / p:.3f})"
                      f"{'  peak mem %.0f MiB' % r['peak_mem_mb'] if device == 'cuda' else ''}  rel err {err:.1e}",
                      flush=True)
    head = (f"bench_vae: {dev_name}, {args.preset} VAEs ({args.dtype}), latent {h}x{w}, median of {args.reps}, "
            f"torch {torch.__version__}, diffusers {diffusers.__version__}")
    print(f"\n# {head}")
    print("| VAE | ranks | decode time | vs P=1 | largest conv input / P=1 | max rel err |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['vae']} | {r['ranks']} | {r['time_s']:.3f}s | {r['speedup']:.2f}x | {r['peak_ratio']:.3f} | "
              f"{r['max_rel_err']} |")
    path = write_csv(rows, args.csv)
    print(f"csv: {path} (+{len(rows)} rows)")
    if args.png:
        png = plot(rows, args.png, head)
        if png:
            print(f"plot: {png}")
    return rows


if __name__ == "__main__":
    main()
