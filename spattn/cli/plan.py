"""``spattn plan``: the command line over the cost model (spattn/cli/costmodel.py): flags in, table out.

The model itself, its formulas, hardware presets and calibration honesty rule are documented at the
top of ``spattn.cli.costmodel``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Dict, Sequence

from .costmodel import (HARDWARE, MODELS, RING_COSTS, Hardware, Workload, custom_hardware, fit_constants, fmt_num,
                        predict, read_measurements, recommend)

# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("Modeled, not measured: nominal peaks, two calibrated constants per preset (see "
                "`python -c 'import spattn.cli.costmodel as m; print(m.__doc__)'`).")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="qwen-image", choices=sorted(MODELS), help="model preset (default qwen-image)")
    m.add_argument("--width", type=int, help="image width in pixels (preset default otherwise)")
    m.add_argument("--height", type=int, help="image height in pixels")
    m.add_argument("--frames", type=int, help="video frames (wan)")
    m.add_argument("--tokens", type=int, help="image/video tokens per sample (overrides width/height)")
    m.add_argument("--patch", type=int, help="patch size on the latents")
    m.add_argument("--vae-factor", type=int, help="VAE downsampling factor")
    m.add_argument("--heads", type=int)
    m.add_argument("--head-dim", type=int)
    m.add_argument("--layers", type=int)
    m.add_argument("--text-len", type=int, help="text tokens")
    m.add_argument("--mlp-ratio", type=float)
    m.add_argument("--cfg", type=int, default=None,
                   help="transformer passes per step (2: true CFG run separately; default 2 with --cfg-degree 2, else 1)")
    m.add_argument("--num-inference-steps", type=int, default=50)
    m.add_argument("--attention-only", action="store_true",
                   help="model only the attention call (bench/bench_sp.py workloads): no linear layers, no serial part")
    h = p.add_argument_group("hardware")
    h.add_argument("--gpus", type=int, default=8, help="devices available (every divisor degree is planned)")
    h.add_argument("--hardware", default="h800", choices=sorted(HARDWARE), help="nominal preset (default h800)")
    h.add_argument("--tflops", type=float, help="peak TFLOP/s per device (overrides the preset)")
    h.add_argument("--link-gbps", type=float, help="per-direction GB/s per device (overrides the preset)")
    h.add_argument("--link", choices=["nvlink", "pcie"], help="link kind (overrides the preset)")
    h.add_argument("--efficiency", type=float, help="achieved fraction of peak (overrides the preset's constant)")
    h.add_argument("--serial-s-per-mpix", type=float, help="undivided seconds per output megapixel (override)")
    s = p.add_argument_group("strategy")
    s.add_argument("--cfg-degree", type=int, default=None,
                   help="CFG parallel: 2 also plans the two guidance branches on two halves of the GPUs (implies "
                        "--cfg 2); 1: never. Default: planned whenever --cfg 2")
    s.add_argument("--vae-parallel", action=argparse.BooleanOptionalAction, default=True,
                   help="the VAE decode is split over a CFG branch's ulysses x ring ranks, as spattn generate does "
                        "(default); --no-vae-parallel models one rank decoding")
    s.add_argument("--ring-impl", default="auto", choices=["auto"] + sorted(RING_COSTS),
                   help="ring implementation assumed (auto: what spattn's ring_impl='auto' picks on GPUs)")
    s.add_argument("--ulysses-pipeline", type=int, default=1,
                   help="all-to-all pipeline chunks (1: exposed, as the guide's runs; spattn's default is 4)")
    c = p.add_argument_group("calibration / output")
    c.add_argument("--calibrate", metavar="FILE", help="refit the two constants from measured rows (CSV or JSON)")
    c.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="with --calibrate: use only rows where column KEY equals VALUE (repeatable)")
    c.add_argument("--json", action="store_true", help="print the rows as a JSON list")


def _given(value, default):
    """The flag's value when given (0 included: it is then rejected, never silently replaced)."""
    return default if value is None else value


def check_args(a: argparse.Namespace) -> list:
    """One message per meaningless flag value (each flag that was given, checked before planning)."""
    errors = []
    positive_int = ("gpus", "num_inference_steps", "cfg", "cfg_degree", "heads", "head_dim", "layers", "width", "height",
                    "frames", "patch", "vae_factor", "tokens", "ulysses_pipeline")
    for key in positive_int:
        val = getattr(a, key)
        if val is not None and val < 1:
            errors.append(f"--{key.replace('_', '-')} must be >= 1, got {val}")
    for key in ("tflops", "link_gbps"):
        val = getattr(a, key)
        if val is not None and not val > 0:
            errors.append(f"--{key.replace('_', '-')} must be > 0, got {val:g}")
    for key in ("text_len", "mlp_ratio", "serial_s_per_mpix"):
        val = getattr(a, key)
        if val is not None and not val >= 0:
            errors.append(f"--{key.replace('_', '-')} must be >= 0, got {val:g}")
    if a.efficiency is not None and not 0 < a.efficiency <= 1.5:
        errors.append(f"--efficiency must be in (0, 1.5], got {a.efficiency:g}")
    if a.where and not a.calibrate:
        errors.append("--where filters the rows of --calibrate FILE; give --calibrate too, or drop --where")
    if a.frames is not None and not MODELS[a.model].video:
        errors.append(f"--frames applies to video models (wan), not {a.model}")
    cfg_degree = getattr(a, "cfg_degree", None)
    if cfg_degree is not None and cfg_degree > 2:
        errors.append(f"--cfg-degree {cfg_degree}: classifier-free guidance has two branches; use --cfg-degree 2")
    elif cfg_degree == 2 and a.cfg is not None and a.cfg != 2:
        errors.append(f"--cfg-degree 2 runs the two passes of true CFG on two halves of the GPUs, but --cfg is "
                      f"{a.cfg}; use --cfg 2 (or drop --cfg)")
    return errors


def cfg_degrees(a: argparse.Namespace) -> tuple:
    """The CFG degrees to plan: 1, and 2 when the workload has two passes per step (unless --cfg-degree 1)."""
    passes = passes_per_step(a)
    return (1,) if getattr(a, "cfg_degree", None) == 1 or passes % 2 else (1, 2)


def passes_per_step(a: argparse.Namespace) -> int:
    return a.cfg if a.cfg is not None else (2 if getattr(a, "cfg_degree", None) == 2 else 1)


def workload_from_args(a: argparse.Namespace) -> Workload:
    spec = MODELS[a.model]
    heads = _given(a.heads, spec.heads)
    head_dim = _given(a.head_dim, spec.head_dim)
    layers = _given(a.layers, spec.layers)
    text = _given(a.text_len, spec.text_len)
    mlp = _given(a.mlp_ratio, spec.mlp_ratio)
    width, height = _given(a.width, spec.width), _given(a.height, spec.height)
    frames = _given(a.frames, spec.frames) if spec.video else 1
    vae, patch = _given(a.vae_factor, spec.vae_factor), _given(a.patch, spec.patch)
    errors = check_args(a)
    if errors:
        raise ValueError("\n".join(errors))
    if a.tokens is not None:
        tokens = a.tokens
    else:
        step = vae * patch
        if width % step or height % step:
            raise ValueError(f"--width/--height must be multiples of vae_factor x patch = {step} for {spec.name} "
                             f"(got {width}x{height}); e.g. --width {width // step * step or step}")
        lat_frames = (frames - 1) // spec.temporal + 1 if spec.video else 1
        tokens = lat_frames * (width // step) * (height // step)
    h2 = (heads * head_dim) ** 2
    per_token = (4 + 2 * mlp + spec.extra_linear_h2) * h2
    if a.attention_only:
        per_token, text_per_token = 0.0, 0.0
    elif spec.joint_text:
        # MMDiT: the text stream has its own weights (Flux: only in its 19 double blocks; the single
        # blocks run text through the shared weights, so text costs a full stream there too).
        text_per_token = per_token
    else:
        text_per_token = 0.0  # cross-attention K/V projections of the text: 2*h^2*text once, negligible
    mpix = 0.0 if a.attention_only else width * height * frames / 1e6
    return Workload(spec.name, tokens, text, layers, heads, head_dim, per_token, text_per_token,
                    spec.joint_text, a.num_inference_steps, passes_per_step(a), mpix, attention_only=a.attention_only,
                    vae_tflops=spec.vae_tflops_per_mpix * mpix, vae_parallel=getattr(a, "vae_parallel", True),
                    out_channels=spec.out_channels)


def hardware_from_args(a: argparse.Namespace) -> Hardware:
    errors = check_args(a)
    if errors:
        raise ValueError("\n".join(errors))
    hw = HARDWARE[a.hardware]
    if a.tflops is not None or a.link_gbps is not None or a.link is not None:
        hw = custom_hardware(hw, a.tflops, a.link_gbps, a.link)
    if a.efficiency is not None:
        hw = replace(hw, efficiency=a.efficiency, calibrated="--efficiency given")
    if a.serial_s_per_mpix is not None:
        hw = replace(hw, serial_s_per_mpix=a.serial_s_per_mpix, calibrated="--serial-s-per-mpix given")
    return hw


COLUMNS = (("attn s", "attention_s", 1), ("other s", "other_s", 1),  # other: linear layers + kernel gaps
           ("comm s", "comm_s", 1),
           ("hidden", "comm_hidden_s", 1), ("exposed", "comm_exposed_s", 1), ("a2a GB", "a2a_bytes_per_rank", 1e9),
           ("ring GB", "ring_bytes_per_rank", 1e9), ("serial s", "serial_s", 1), ("total s", "total_s", 1))


def format_table(rows: Sequence[Dict]) -> str:
    """Columns as wide as their widest cell, so large degrees (``--gpus 1000``) never run together.
    A CFG degree column (C) appears when CFG-parallel rows are planned."""
    cfg = any(r.get("cfg_degree", 1) > 1 for r in rows)
    head = ["mode"] + (["C"] if cfg else []) + ["U", "R", "ring"] + [h for h, _, _ in COLUMNS] + ["speedup"]
    body = [[r["mode"]] + ([str(r["cfg_degree"])] if cfg else []) + [str(r["ulysses_degree"]), str(r["ring_degree"]),
                                                                     r["ring_impl"] or "-"]
            + [fmt_num(r[k] / div) for _, k, div in COLUMNS] + [f"{r['speedup']:.2f}x"] for r in rows]
    widths = [max(len(c) for c in col) for col in zip(head, *body)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join(line(c) for c in [head] + body)


def run(a: argparse.Namespace) -> int:
    try:
        w = workload_from_args(a)
        hw = hardware_from_args(a)
        fitted = None
        if a.calibrate:
            measured = read_measurements(a.calibrate, a.where)
            fitted = fit_constants(w, hw, measured, a.ring_impl, a.ulysses_pipeline)
            hw = fitted["hardware"]
        rows = predict(w, hw, a.gpus, a.ring_impl, a.ulysses_pipeline, cfg_degrees(a))
    except (ValueError, OSError) as e:
        for msg in str(e).splitlines():  # one line per problem
            print(msg if msg.startswith("spattn plan") else f"spattn plan: {msg}", file=sys.stderr)
        return 2
    pick, why = recommend(rows, hw)
    for row in rows:
        row["recommended"] = row is pick
        row["reason"] = why if row is pick else None
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"# {w.model}: {w.image_tokens} image tokens + {w.text_tokens} text, {w.layers} layers, "
          f"{w.heads}x{w.head_dim}, {w.steps} steps x {w.cfg} pass(es)"
          + (", CFG parallel planned (C = 2: one pass per step per branch)" if 2 in cfg_degrees(a) else "")
          + (f"; VAE decode {w.vae_tflops:.0f} TFLOP, split over a branch's U x R ranks" if w.vae_parallel and w.vae_tflops
             else "; VAE decoded by one rank" if w.vae_tflops else ""))
    print(f"# {hw.name}: {hw.tflops:g} TFLOP/s nominal x efficiency {hw.efficiency:.3f}, {hw.link} "
          f"{hw.link_gbps:g} GB/s per direction, serial {hw.serial_s_per_mpix:.2f} s/MPix ({hw.calibrated})")
    print("# MODELED, not measured; times are per rank for the whole generation, comm = all-to-all + ring P2P")
    if fitted:
        print(f"# calibrated from {a.calibrate}: efficiency {fitted['efficiency']:.3f}, serial "
              f"{fmt_num(fitted['serial_s'])} s")
        if fitted["efficiency"] > 1:
            print("# warning: the fitted efficiency is above the nominal peak: --tflops is too low for this machine, "
                  "or the measured ranks shared their compute (e.g. CPU ranks on one machine)")
        for r in fitted["rows"]:
            print(f"#   {r['ulysses_degree']}x{r['ring_degree']}: measured {r['measured_s']:.3f} s, model "
                  f"{r['predicted_s']:.3f} s ({r['error']:+.1%})")
    print(format_table(rows))
    cfg = f" x cfg {pick['cfg_degree']}" if pick.get("cfg_degree", 1) > 1 else ""
    print(f"recommend: ulysses {pick['ulysses_degree']} x ring {pick['ring_degree']}{cfg} - {why}")
    return 0
