"""Benchmark spattn's Triton flash attention (forward with LSE, backward) against torch SDPA and, when
installed, the flash_attn package, in TFLOP/s over sequence lengths, head dims, causal and dtype.

    python bench/bench_kernels.py                      # on a GPU: table + CSV (+ PNG if matplotlib)
    python bench/bench_kernels.py --seqlens 1024 4096 --head-dims 128 --dtypes bf16
    python bench/bench_kernels.py --interpret          # no GPU: tiny interpreter smoke (correctness + timing)

FLOPs: forward 4 * B * H * Sq * Sk * D (halved when causal), backward 2.5x forward (5 matmuls vs 2).
Without a GPU (and without --interpret) it prints that a GPU is needed and exits 0.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import sys
import time
from typing import Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = ("fp16", "bf16", "fp32")


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=DTYPES)
    p.add_argument("--causal", nargs="+", default=["false", "true"], choices=["false", "true"])
    p.add_argument("--tokens", type=int, default=16384, help="batch * seqlen per measurement")
    p.add_argument("--heads", type=int, default=16, help="query heads")
    p.add_argument("--kv-heads", type=int, default=None, help="kv heads (GQA); default = --heads")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--interpret", action="store_true", help="no GPU: tiny Triton-interpreter smoke run")
    return p.parse_args(argv)


def _import_kernels():
    # kernels/ is leaf code: import it from this checkout (works installed or not).
    sys.path.insert(0, os.path.join(HERE, ".."))
    from kernels import flash_attn as fa  # noqa: E402
    return fa


def interpret_smoke() -> int:
    """One tiny causal GQA shape under the interpreter: check fwd/bwd against the reference and time it."""
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined
    import torch

    fa = _import_kernels()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 64, 4, 32, generator=g)
    k, v = torch.randn(1, 64, 2, 32, generator=g), torch.randn(1, 64, 2, 32, generator=g)
    t0 = time.perf_counter()
    out, lse = fa.flash_attn_fwd(q, k, v, causal=True)
    t_fwd = time.perf_counter() - t0
    dout = torch.randn(out.shape, generator=g)
    t0 = time.perf_counter()
    grads = fa.flash_attn_bwd(dout, q, k, v, out, lse, causal=True)
    t_bwd = time.perf_counter() - t0
    ref_out, ref_lse = fa.flash_attn_fwd_ref(q, k, v, causal=True)
    ref_grads = fa.flash_attn_bwd_ref(dout, q, k, v, out, lse, causal=True)
    errs = {"out": (out - ref_out).abs().max().item(), "lse": (lse - ref_lse).abs().max().item()}
    errs.update({n: (a - b).abs().max().item() for n, a, b in zip(("dq", "dk", "dv"), grads, ref_grads)})
    ok = all(e < 1e-4 for e in errs.values())
    print("interpreter smoke (1x64x4x32, 2 kv heads, causal, fp32): "
          + ", ".join(f"{n} err {e:.1e}" for n, e in errs.items())
          + f"; fwd {t_fwd * 1e3:.0f} ms, bwd {t_bwd * 1e3:.0f} ms (interpreter, not GPU speed) -> "
          + ("OK" if ok else "MISMATCH"))
    return 0 if ok else 1


def _providers(fa, torch) -> Dict[str, Dict[str, Callable]]:
    """name -> {"fwd": make(q, k, v, causal) -> thunk, "bwd": make(...) -> thunk}."""
    import torch.nn.functional as F

    def spattn_fwd(q, k, v, causal):
        return lambda: fa.flash_attn_fwd(q, k, v, causal)

    def spattn_bwd(q, k, v, causal):
        out, lse = fa.flash_attn_fwd(q, k, v, causal)
        dout = torch.randn_like(out)
        return lambda: fa.flash_attn_bwd(dout, q, k, v, out, lse, causal)

    def _sdpa(q, k, v, causal):
        group = q.shape[2] // k.shape[2]
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=causal, enable_gqa=group > 1)

    def autograd_bwd(fwd):
        def make(q, k, v, causal):
            qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
            out = fwd(qs, ks, vs, causal)
            dout = torch.randn_like(out)
            return lambda: torch.autograd.grad(out, (qs, ks, vs), dout, retain_graph=True)
        return make

    prov = {"spattn": {"fwd": spattn_fwd, "bwd": spattn_bwd},
            "sdpa": {"fwd": lambda q, k, v, c: (lambda: _sdpa(q, k, v, c)), "bwd": autograd_bwd(_sdpa)}}
    if importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_func

        def _fa2(q, k, v, causal):
            return flash_attn_func(q, k, v, causal=causal)

        prov["flash_attn"] = {"fwd": lambda q, k, v, c: (lambda: _fa2(q, k, v, c)), "bwd": autograd_bwd(_fa2)}
    return prov


def run_gpu(args: argparse.Namespace) -> List[Dict[str, object]]:
    import torch
    from triton.testing import do_bench

    fa = _import_kernels()
    prov = _providers(fa, torch)
    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    hkv = args.kv_heads or args.heads
    rows = []
    for dname in args.dtypes:
        for d in args.head_dims:
            for causal in (c == "true" for c in args.causal):
                for s in args.seqlens:
                    b = max(1, args.tokens // s)
                    q = torch.randn(b, s, args.heads, d, device="cuda", dtype=tdt[dname])
                    k = torch.randn(b, s, hkv, d, device="cuda", dtype=tdt[dname])
                    v = torch.randn_like(k)
                    flops = 4 * b * args.heads * s * s * d * (0.5 if causal else 1.0)
                    for name, p in prov.items():
                        if name == "flash_attn" and dname == "fp32":
                            continue  # flash_attn has no fp32 kernels
                        for phase, mult in (("fwd", 1.0), ("bwd", 2.5)):
                            try:
                                ms = do_bench(p[phase](q, k, v, causal), warmup=10, rep=50)
                                tflops = flops * mult / (ms * 1e-3) / 1e12
                            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # e.g. OOM at long seq
                                ms, tflops = float("nan"), float("nan")
                                print(f"  {name} {phase} {dname} d{d} s{s}: {type(e).__name__}", file=sys.stderr)
                            rows.append(dict(provider=name, phase=phase, dtype=dname, head_dim=d, causal=causal,
                                             seqlen=s, batch=b, heads=args.heads, kv_heads=hkv, ms=round(ms, 4),
                                             tflops=round(tflops, 2)))
                    del q, k, v
                    torch.cuda.empty_cache()
    return rows


def _table(rows: List[Dict[str, object]]) -> str:
    cols = ("provider", "phase", "dtype", "head_dim", "causal", "seqlen", "batch", "ms", "tflops")
    cells = [[str(r[c]) for c in cols] for r in rows]
    w = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    return "\n".join(["  ".join(c.ljust(n) for c, n in zip(cols, w))]
                     + ["  ".join(x.ljust(n) for x, n in zip(cell, w)) for cell in cells])


def _save(rows: List[Dict[str, object]], out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "bench_kernels.csv")
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    print(f"wrote {path}")
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib not installed: skipping the PNG (pip install matplotlib)")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["phase"], r["dtype"], r["head_dim"], r["causal"]) for r in rows}, key=str)
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.5 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (phase, dname, d, causal) in zip(axes.flat, panels):
        for name in sorted({r["provider"] for r in rows}):
            pts = [(r["seqlen"], r["tflops"]) for r in rows if r["provider"] == name and
                   (r["phase"], r["dtype"], r["head_dim"], r["causal"]) == (phase, dname, d, causal)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{phase} {dname} d{d}{' causal' if causal else ''}", fontsize=9)
        ax.set_xlabel("seqlen")
        ax.set_ylabel("TFLOP/s")
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = os.path.join(out_dir, "bench_kernels.png")
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main(argv=None) -> int:
    args = _parse(argv)
    if args.interpret:
        return interpret_smoke()
    import torch

    if not torch.cuda.is_available():
        print("bench_kernels: a CUDA GPU is needed for the benchmark (none found); "
              "use --interpret for a tiny correctness smoke run on CPU")
        return 0
    rows = run_gpu(args)
    print(_table(rows))
    _save(rows, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
