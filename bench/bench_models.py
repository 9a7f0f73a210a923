"""Benchmark: a tiny-but-not-trivial Qwen-Image DiT, single process vs spattn vs diffusers' own context
parallelism, side by side on P local gloo ranks (forward, the inference step a pipeline runs).

    python bench/bench_models.py                         # P=2, 32x32 latent patches (1024 image tokens)
    python bench/bench_models.py -P 4 --grid 48 --csv bench/out/models.csv

Every implementation runs the same random-weight ``QwenImageTransformer2DModel`` (seeded) on the same
inputs: batch 2, text padded to ``--text`` tokens. Two input sets: "none" (no text mask) and "text"
(the second prompt is shorter, ``encoder_hidden_states_mask`` marks its padding, as pipelines do).
Each row gives the forward time (median; the slowest rank), its ratio to the single process (the
faster of all cores and one thread; the ranks split the cores evenly), and the max deviation from
the single-process output relative to the output's scale. Rows that fail say why.

spattn: ``spattn.integrations.diffusers.parallelize(model, mesh)`` for every Ulysses x Ring
factorization of P (and any image token count).

diffusers (0.42.1): ``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=U,
ring_degree=R))`` with the "native" attention backend, on a deep copy of the model per factorization
(diffusers has no way to undo it). Patched for this CPU-only machine, in this script only:
  1. ``torch.accelerator.device_count`` returns 1 (diffusers computes its device as
     ``rank % device_count()``, which divides by zero on a machine with no accelerator); the device
     mesh is then ``init_device_mesh("cpu", ...)`` over gloo.
  2. ``attention_dispatch._native_attention_forward_op`` answers ``return_lse=True`` (diffusers' ring
     asks every step for ``(out, lse)``; the native op refuses) with plain-torch math: scores, the
     mask (bool: False -> -inf, or additive), logsumexp, softmax @ v; lse as (batch, seq, heads).
     Other calls go to the original op. Forward only: the patched op saves nothing for backward.
Its sharder needs the image and text lengths divisible by P (diffusers' "anything" modes are
Ulysses-only or Ring-only); pick ``--grid``/``--text`` accordingly or its rows report the error.
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from demo import timeit as _timeit_all  # noqa: E402  (bench/demo.py, shared with bench_sp)
from spattn.cli.costmodel import factorizations  # noqa: E402
from spattn.launch import LocalRanks, RankFailed, init_rank  # noqa: E402


VARIANTS = {"none": [False], "text": [True], "both": [False, True]}   # --mask -> with a text mask?


def build(args) -> torch.nn.Module:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    d = args.head_dim
    rope = (d - 2 * (3 * d // 8 // 2 * 2), 3 * d // 8 // 2 * 2, 3 * d // 8 // 2 * 2)   # (t, h, w), sums to d
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=args.layers, attention_head_dim=d,
        num_attention_heads=args.heads, joint_attention_dim=128, axes_dims_rope=rope).eval()


def inputs(args, masked: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    b, t, s = 2, args.text, args.grid * args.grid
    mask = None
    if masked:
        mask = torch.ones(b, t, dtype=torch.bool)
        mask[1, t // 2:] = False
    return dict(hidden_states=torch.randn(b, s, 64, generator=g),
                encoder_hidden_states=torch.randn(b, t, 128, generator=g), encoder_hidden_states_mask=mask,
                timestep=torch.tensor([0.5, 0.5]), img_shapes=[[(1, args.grid, args.grid)]] * b,
                return_dict=False)


def _timeit(fn, iters: int, warmup: int, sync=None) -> float:
    """Median seconds of ``iters`` timed calls after ``warmup``."""
    return statistics.median(_timeit_all(fn, iters, warmup, sync))


# ---- diffusers' context parallelism on CPU: the two patches of the docstring ---------------------------

def _patch_diffusers_for_cpu() -> None:
    from diffusers.models import attention_dispatch as ad

    torch.accelerator.device_count = lambda: 1
    native = ad._native_attention_forward_op

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        if not return_lse:
            return native(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, False,
                          _save_ctx, _parallel_config)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))           # (B, H, S, D)
        s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
        lse = torch.logsumexp(s, dim=-1)                                      # (B, H, S)
        out = (torch.softmax(s, dim=-1) @ v).transpose(1, 2)                  # (B, S, H, D)
        return out, lse.transpose(1, 2)

    ad._native_attention_forward_op = forward_op


# ---- ranks ----------------------------------------------------------------------------------------------

def _rank_main(rank: int, world: int, init_method: str, args):
    import spattn
    from spattn.integrations.diffusers import parallelize

    init_rank(rank, world, init_method, backend="gloo", timeout_s=args.timeout)
    _patch_diffusers_for_cpu()
    model = build(args)
    rows = []

    def run(impl, u, r, m, kw, masked):
        try:
            with torch.no_grad():
                state = {}
                t = _timeit(lambda: state.__setitem__("o", m(**kw)[0]), args.iters, args.warmup, dist.barrier)
            out, note = state["o"], ""
        except Exception as e:  # reported in the table, on every rank alike
            t, out, note = float("nan"), None, f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"
        # a rank that failed must not leave the others in a collective: agree on success first
        ok = torch.tensor([0.0 if out is None else 1.0])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        times = [None] * world
        dist.all_gather_object(times, (t, note))
        if ok.item() == 0:
            note = note or next(n for _, n in times if n)
            out = None
        if rank == 0:
            rows.append(dict(impl=impl, u=u, r=r, mask="text" if masked else "none",
                             fwd_s=max(x for x, _ in times), note=note,
                             out=None if out is None else out.float().numpy()))

    for masked in VARIANTS[args.mask]:
        kw = inputs(args, masked)
        for u, r in factorizations(world, exact=True):
            mesh = spattn.init_mesh(ulysses_degree=u, ring_degree=r)
            with parallelize(model, mesh, backend=args.backend):
                run("spattn", u, r, model, kw, masked)
        if not args.no_diffusers:
            from diffusers import ContextParallelConfig

            for u, r in factorizations(world, exact=True):
                m = copy.deepcopy(model)   # enable_parallelism cannot be undone
                m.enable_parallelism(config=ContextParallelConfig(ulysses_degree=u, ring_degree=r))
                run("diffusers", u, r, m, kw, masked)
    dist.destroy_process_group()
    return rows if rank == 0 else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-P", "--world", type=int, default=2, help="ranks (gloo, local)")
    p.add_argument("--grid", type=int, default=32, help="image tokens per side after 2x2 patches (32 -> 1024)")
    p.add_argument("--text", type=int, default=64, help="text tokens (padded length)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--mask", choices=["none", "text", "both"], default="both",
                   help="run without a text mask, with one, or both")
    p.add_argument("--backend", default="auto", help="spattn single-device backend")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-diffusers", action="store_true", help="skip diffusers' context parallelism")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--csv", help="also write the rows to this CSV file")
    args = p.parse_args()

    # single process: the reference output and the time to beat, the faster of all cores and one
    # thread (on a shared, oversubscribed machine OpenMP with all cores can be several times slower)
    model = build(args)
    ref, base = {}, {}
    for masked in VARIANTS[args.mask]:
        kw = inputs(args, masked)
        for threads in sorted({os.cpu_count() or 1, 1}):
            torch.set_num_threads(threads)
            with torch.no_grad():
                t = _timeit(lambda: ref.__setitem__(masked, model(**kw)[0]), args.iters, args.warmup)
            if masked not in base or t < base[masked][0]:
                base[masked] = (t, threads)

    with LocalRanks(_rank_main, args.world, args=(args,)) as ranks:
        try:  # rank 0's rows; a rank that dies or raises is named, with its traceback
            raw = ranks.wait(timeout=args.timeout)
        except (RankFailed, TimeoutError) as e:
            raise SystemExit(f"bench_models: {e}")

    rows = []
    for masked in sorted(base):
        tag = "text" if masked else "none"
        t_base, threads = base[masked]
        rows.append(dict(impl="single process", u=1, r=1, mask=tag, fwd_s=t_base, ratio=1.0, dev=0.0,
                         note=f"{threads} thread(s)"))
        for x in (x for x in raw if x["mask"] == tag):
            want = ref[masked]
            dev = float("nan") if x["out"] is None else \
                (torch.from_numpy(x["out"]) - want).abs().max().item() / want.abs().max().item()
            note = x["note"] or ("WRONG (> 1e-4)" if dev > 1e-4 else "")
            rows.append(dict(impl=x["impl"], u=x["u"], r=x["r"], mask=x["mask"], fwd_s=x["fwd_s"],
                             ratio=x["fwd_s"] / t_base, dev=dev, note=note))

    s = args.grid * args.grid
    print(f"# Qwen-Image-like DiT: {args.layers} layers, {args.heads} heads x {args.head_dim}, batch 2, "
          f"{s} image + {args.text} text tokens, fp32, P={args.world}, {os.cpu_count()} cores")
    print(f"{'impl':<15} {'U x R':>5} {'mask':>5} {'fwd ms':>9} {'vs 1proc':>8} {'max dev':>9}  note")
    for x in rows:
        ur = f"{x['u']}x{x['r']}"
        print(f"{x['impl']:<15} {ur:>5} {x['mask']:>5} {x['fwd_s'] * 1e3:9.1f} {x['ratio']:8.2f} "
              f"{x['dev']:9.1e}  {x['note']}")
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
