"""``spattn plan``: predict generation time and speedup per Ulysses x Ring factorization; recommend one.

A roofline-style model of one diffusion-transformer generation on ``P = ulysses x ring`` devices:

    total = serial + steps * cfg * layers * (attention + linear + exposed communication)

* attention (per rank): ``4 * (N/ring) * N * ceil(heads/ulysses) * head_dim`` FLOPs per layer, N = image
  (+ joint text) tokens; Wan adds its text cross-attention.
* linear ("other transformer compute"): ``2 * params_per_token * tokens`` with ``params_per_token =
  (4 + 2 * mlp_ratio) * hidden**2`` per layer and stream (q, k, v, out projections + MLP); image tokens
  are split over all P ranks, joint text tokens (MMDiT) run on every rank.
* compute seconds = FLOPs / (nominal peak * efficiency).
* Ulysses all-to-all: q, k, v and out, each ``(S/P) * hidden * 2 bytes * (U-1)/U`` sent per rank per
  layer, over the per-direction link bandwidth plus a latency per collective. Exposed unless pipelined
  (``--ulysses-pipeline N``: N-1 of N chunks hide behind attention compute; the guide's runs: 1).
* Ring, ``p2p`` implementation (ring-flash-attention style): ring-1 steps per layer, each sends one K/V
  block ``2 * (S/R) * ceil(H/U) * head_dim * 2 bytes`` to the next rank while the current block is
  computed; only the part of a step's transfer longer than its attention compute is exposed. Each step
  also merges its partial output into the fp32 running result (memory bound: HBM bandwidth).
  ``RING_IMPLS`` maps an implementation name to its cost function: an all-gather ring is a new entry.
* serial: what sequence parallelism does not divide (text encoding, VAE decode, scheduler),
  ``serial_s_per_mpix * megapixels`` (VAE decode dominates and scales with pixels).

Hardware numbers are nominal public peaks (bf16 dense tensor TFLOP/s; NVLink totals halved to the
per-direction figure; PCIe Gen4 x16 ~25 GB/s achieved per direction): h800 989 TF/s, NVLink 400 GB/s;
h100 (SXM) 989 TF/s, NVLink 900 GB/s; a100 312 TF/s, NVLink 600 GB/s; l40 181 TF/s, PCIe.

Calibration (the honesty rule: per preset at most two constants, fitted to that preset's baseline and
at most one parallel row of the guide; every other row is a prediction). The constants are
``efficiency`` (achieved fraction of the nominal peak) and ``serial_s_per_mpix``; ``fit_constants``
solves for them and tests/test_plan.py checks that the numbers below are what it returns:

* h800 - fitted to Qwen-Image 2048x2048, 50 steps: baseline (112.5 s) and Ulysses 8 (30.8 s), giving
  efficiency 0.229 and 4.17 s/MPix (17.5 s serial, 16% of the baseline). Predictions: Ulysses 2
  1.68x (guide 1.73x, -2.9%) and Ulysses 4 2.61x (guide 2.84x, -8.0%).
* a100 - fitted to Qwen-Image 1024x1024, 50 steps: baseline (45.2 s) and Ring 4 (23.3 s), giving
  efficiency 0.380 and 13.67 s/MPix (14.3 s serial, 32%). Predictions: Ring 2 1.48x (guide 1.51x,
  -2.2%) and Ulysses 2 x Ring 2 1.93x (guide 1.87x, +3.2%).
* h100 - the h800 constants (the same chip; only NVLink differs). Not calibrated on its own.
* l40 and explicit ``--tflops`` - efficiency: the mean of h800 and a100; serial work: the mean of their
  ``serial_s_per_mpix * peak`` (peak-equivalent seconds), divided by this peak. Not calibrated.

Everything else (FLOP counts, bytes, bandwidth, latency, overlap rules) is fixed up front, not fitted.
The efficiency absorbs what the model does not know about a run (kernel quality, a second CFG pass:
the guide does not say whether its runs used true CFG; ``--cfg 2`` doubles the transformer work).
For video (wan) the serial part is the image VAE's seconds per megapixel extrapolated to all frames:
a rough guess. ``--calibrate results.csv`` refits the two constants from the user's own measurements.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Sequence, Tuple

BYTES_BF16 = 2

# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Transformer shape of a diffusion model (per-layer quantities)."""

    name: str
    layers: int
    heads: int
    head_dim: int
    mlp_ratio: float
    text_len: int
    vae_factor: int = 8
    patch: int = 2
    joint_text: bool = True       # MMDiT: text tokens join attention and run through the linear layers
    extra_linear_h2: float = 0.0  # extra linear params per token per layer, in units of hidden**2
    video: bool = False           # tokens over latent frames: (frames - 1) // temporal + 1
    temporal: int = 4
    width: int = 1024
    height: int = 1024
    frames: int = 1

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


MODELS: Dict[str, ModelSpec] = {
    # 60 MMDiT blocks, 24 x 128 (hidden 3072), MLP 4x, VAE /8 then 2x2 patches.
    "qwen-image": ModelSpec("qwen-image", layers=60, heads=24, head_dim=128, mlp_ratio=4.0, text_len=256),
    # 19 double + 38 single blocks; a single block's fused linears hold the same 12*h^2 as a stream of
    # a double block, so 57 attention layers, and the double blocks add a second (text) stream.
    "flux": ModelSpec("flux", layers=57, heads=24, head_dim=128, mlp_ratio=4.0, text_len=512),
    # Wan 2.1 14B: 40 blocks, 40 x 128 (hidden 5120), FFN 13824 (2.7x); text (T5, 512) enters by
    # cross-attention: its q/out projections are 2*h^2 more per token. 480x832, 81 frames.
    "wan": ModelSpec("wan", layers=40, heads=40, head_dim=128, mlp_ratio=2.7, text_len=512, joint_text=False,
                     extra_linear_h2=2.0, video=True, width=832, height=480, frames=81),
}


@dataclass(frozen=True)
class Workload:
    """One generation, reduced to what the cost model needs."""

    model: str
    image_tokens: int
    text_tokens: int
    layers: int
    heads: int
    head_dim: int
    linear_params_per_token: float  # per layer (image stream)
    text_linear_params_per_token: float  # per layer, for the replicated text stream (0: none)
    joint_text: bool
    steps: int
    cfg: int                      # transformer passes per step (2 with true CFG batched separately)
    megapixels: float
    attention_only: bool = False  # a bare attention benchmark: no linear layers, no serial part

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


# ----------------------------------------------------------------------------------------------
# Hardware
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    name: str
    tflops: float            # nominal bf16 dense peak per device
    link_gbps: float         # per-direction bandwidth per device, GB/s
    link: str                # "nvlink" or "pcie"
    hbm_tbps: float          # device memory bandwidth, TB/s
    efficiency: float        # achieved fraction of peak (calibrated or defaulted, see module docstring)
    serial_s_per_mpix: float # seconds of undivided work per output megapixel
    latency_us: float        # per collective / P2P step
    calibrated: str          # where the two constants come from
    serial_s_fixed: float = 0.0  # a fixed undivided time; fitted instead of the per-MPix one for --attention-only


_LATENCY_US = {"nvlink": 15.0, "pcie": 30.0}

# Fitted by fit_constants() to the guide's rows named in the module docstring (tests/test_plan.py
# re-runs the fit and checks these numbers).
_H800 = dict(efficiency=0.2290, serial_s_per_mpix=4.173)
_A100 = dict(efficiency=0.3795, serial_s_per_mpix=13.67)
_DEFAULT_EFF = (_H800["efficiency"] + _A100["efficiency"]) / 2
_DEFAULT_SERIAL_PEAK_S = (_H800["serial_s_per_mpix"] * 989 + _A100["serial_s_per_mpix"] * 312) / 2  # s*TF/s


def _default_serial(tflops: float) -> float:
    return _DEFAULT_SERIAL_PEAK_S / tflops


HARDWARE: Dict[str, Hardware] = {
    "h800": Hardware("h800", 989.0, 200.0, "nvlink", 3.35, latency_us=_LATENCY_US["nvlink"],
                     calibrated="guide: Qwen-Image 2048x2048 baseline + Ulysses 8", **_H800),
    "h100": Hardware("h100", 989.0, 450.0, "nvlink", 3.35, latency_us=_LATENCY_US["nvlink"],
                     calibrated="h800's constants (same chip), not calibrated on an H100", **_H800),
    "a100": Hardware("a100", 312.0, 300.0, "nvlink", 2.0, latency_us=_LATENCY_US["nvlink"],
                     calibrated="guide: Qwen-Image 1024x1024 baseline + Ring 4", **_A100),
    "l40": Hardware("l40", 181.0, 25.0, "pcie", 0.864, efficiency=_DEFAULT_EFF, serial_s_per_mpix=_default_serial(181.0),
                    latency_us=_LATENCY_US["pcie"], calibrated="not calibrated (mean of h800/a100 constants)"),
}


# ----------------------------------------------------------------------------------------------
# The cost model
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RingCost:
    bytes_per_rank: float   # per layer
    time_s: float           # transfer time per layer
    exposed_s: float        # per layer, not hidden behind attention compute
    merge_s: float = 0.0    # per layer: folding partial results in (memory bound, on the compute stream)


def _ring_p2p(w: Workload, hw: Hardware, u: int, r: int, attn_layer_s: float) -> RingCost:
    """P2P ring: r-1 steps; step j sends the K/V block while block j is computed."""
    if r == 1:
        return RingCost(0.0, 0.0, 0.0)
    hr = math.ceil(w.heads / u)
    block = 2 * (w.image_tokens / r) * hr * w.head_dim * BYTES_BF16
    step_s = block / (hw.link_gbps * 1e9) + hw.latency_us * 1e-6
    attn_step_s = attn_layer_s / r  # the local queries against one of r key blocks
    steps = r - 1
    # Each step's partial result is merged into the running fp32 output: read and write it (fp32)
    # and read the block's output (bf16), over HBM.
    n_q = (w.image_tokens + (w.text_tokens if w.joint_text else 0)) / r
    merge = steps * n_q * hr * w.head_dim * (4 + 4 + BYTES_BF16) / (hw.hbm_tbps * 1e12)
    return RingCost(block * steps, step_s * steps, steps * max(0.0, step_s - attn_step_s), merge)


def _ring_allgather(w: Workload, hw: Hardware, u: int, r: int, attn_layer_s: float) -> RingCost:
    """All-gather ring: the same r-1 blocks arrive, but all before the local queries compute (one
    head chunk under spattn's default 256 MiB budget), so the transfer is exposed, not overlapped."""
    p2p = _ring_p2p(w, hw, u, r, attn_layer_s)
    return RingCost(p2p.bytes_per_rank, p2p.time_s, p2p.time_s, p2p.merge_s)


# name -> cost function (workload, hardware, ulysses, ring, attention seconds per layer) -> RingCost.
RING_IMPLS: Dict[str, Callable[[Workload, Hardware, int, int, float], RingCost]] = {
    "p2p": _ring_p2p, "allgather": _ring_allgather}


def resolve_ring_impl(w: Workload, u: int, r: int, ring_impl: str) -> Tuple[str, str]:
    """(implementation, reason): "auto" asks spattn's own rule (``spattn.parallel.ring_allgather.choose_ring_impl``,
    measured) what ``ring_impl="auto"`` would pick on a GPU for this ring's local sequence."""
    if ring_impl != "auto":
        return ring_impl, "chosen with --ring-impl"
    import torch

    from spattn.parallel.ring_allgather import choose_ring_impl  # the rule the library applies at run time

    local = math.ceil((w.image_tokens + (w.text_tokens if w.joint_text else 0)) / r)
    impl = choose_ring_impl(r, local, torch.device("cuda"))
    why = ("on GPUs auto keeps the P2P ring: its transfers overlap compute and it holds 2 K/V blocks, not R"
           if impl == "p2p" else "auto picks the all-gather ring here ($SPATTN_RING_IMPL)")
    return impl, why


def _flops(w: Workload, u: int, r: int) -> Tuple[float, float]:
    """(attention, linear) FLOPs per rank for one layer of one transformer pass."""
    p = u * r
    hr = math.ceil(w.heads / u)
    s, t = w.image_tokens, w.text_tokens
    if w.joint_text:
        n = s + t
        attn = 4.0 * (n / r) * n * hr * w.head_dim
    else:  # self-attention over the image/video tokens + cross-attention to the text
        attn = 4.0 * (s / r) * s * hr * w.head_dim + 4.0 * (s / r) * t * hr * w.head_dim
    lin = 2.0 * (w.linear_params_per_token * s / p + w.text_linear_params_per_token * t)
    return attn, lin


def predict_row(w: Workload, hw: Hardware, u: int, r: int, ring_impl: str = "p2p",
                ulysses_pipeline: int = 1) -> Dict:
    """Predicted cost of the ``u x r`` factorization; times are seconds per rank for the generation."""
    ring_impl, ring_why = resolve_ring_impl(w, u, r, ring_impl)
    if ring_impl not in RING_IMPLS:
        raise ValueError(f"spattn plan: unknown ring implementation {ring_impl!r}; choose one of {sorted(RING_IMPLS)}")
    rate = hw.tflops * 1e12 * hw.efficiency
    attn_f, lin_f = _flops(w, u, r)
    attn_layer, lin_layer = attn_f / rate, lin_f / rate
    p = u * r
    if u > 1:  # q, k, v in, out back: 4 tensors of (S/P, hidden) per rank, (U-1)/U of it leaves
        a2a_bytes = 4 * (w.image_tokens / p) * w.hidden * BYTES_BF16 * (u - 1) / u
        a2a_s = a2a_bytes / (hw.link_gbps * 1e9) + 2 * hw.latency_us * 1e-6
        n = max(1, ulysses_pipeline)
        a2a_hidden = min(a2a_s * (n - 1) / n, attn_layer * (n - 1) / n)
    else:
        a2a_bytes = a2a_s = a2a_hidden = 0.0
    ring = RING_IMPLS[ring_impl](w, hw, u, r, attn_layer)
    passes = w.steps * w.cfg * w.layers
    comm = a2a_s + ring.time_s
    exposed = (a2a_s - a2a_hidden) + ring.exposed_s
    serial = hw.serial_s_fixed + (0.0 if w.attention_only else hw.serial_s_per_mpix * w.megapixels)
    total = serial + passes * (attn_layer + lin_layer + ring.merge_s + exposed)
    mode = "1 device" if p == 1 else f"ulysses {u}" if r == 1 else f"ring {r}" if u == 1 else f"hybrid {u}x{r}"
    return dict(mode=mode, ulysses_degree=u, ring_degree=r, gpus=p, ring_impl=ring_impl if r > 1 else None,
                ring_impl_reason=ring_why if r > 1 else None,
                attention_s=passes * attn_layer, linear_s=passes * lin_layer, merge_s=passes * ring.merge_s,
                comm_s=passes * comm,
                comm_hidden_s=passes * (comm - exposed), comm_exposed_s=passes * exposed,
                a2a_bytes_per_rank=passes * a2a_bytes, ring_bytes_per_rank=passes * ring.bytes_per_rank,
                serial_s=serial, total_s=total)


def factorizations(gpus: int) -> List[Tuple[int, int]]:
    """Every (ulysses, ring) whose product divides ``gpus``, 1x1 first, by degree, Ulysses-heavy first."""
    out = []
    for p in (d for d in range(1, gpus + 1) if gpus % d == 0):
        out += [(u, p // u) for u in range(p, 0, -1) if p % u == 0]
    return out


def predict(w: Workload, hw: Hardware, gpus: int, ring_impl: str = "p2p", ulysses_pipeline: int = 1) -> List[Dict]:
    """One row per factorization (the 1x1 row first), with ``speedup`` over it."""
    rows = [predict_row(w, hw, u, r, ring_impl, ulysses_pipeline) for u, r in factorizations(gpus)]
    base = rows[0]["total_s"]
    for row in rows:
        row["speedup"] = base / row["total_s"]
        row["parallel_efficiency"] = row["speedup"] / row["gpus"]
    return rows


def recommend(rows: Sequence[Dict], hw: Hardware, slack: float = 0.05) -> Tuple[Dict, str]:
    """The row to use. Rows within ``slack`` of the fastest are a tie (the model is not that
    accurate): among them the fewest devices, then the guide's best practice for the link (NVLink:
    the most Ulysses; PCIe: the most Ring), then the time."""
    best = min(rows, key=lambda x: x["total_s"])
    ties = [x for x in rows if x["total_s"] <= best["total_s"] * (1 + slack)]
    lean = (lambda x: -x["ulysses_degree"]) if hw.link == "nvlink" else (lambda x: -x["ring_degree"])
    pick = min(ties, key=lambda x: (x["gpus"], lean(x), x["total_s"]))
    if pick is best:
        why = f"fastest predicted ({_n(pick['total_s'])} s, {pick['speedup']:.2f}x)"
    else:
        why = (f"within {slack:.0%} of the fastest ({best['mode']}, {_n(best['total_s'])} s)"
               + (" on fewer devices" if pick["gpus"] < best["gpus"] else
                  f"; {'Ulysses' if hw.link == 'nvlink' else 'Ring'} first on {hw.link}, as the guide advises"))
    share = pick["comm_exposed_s"] / pick["total_s"] if pick["total_s"] else 0.0
    tail = (f"; exposed communication {_n(pick['comm_exposed_s'])} s ({share:.0%}) over {hw.link}"
            if pick["gpus"] > 1 else "")
    serial = pick["serial_s"] / pick["total_s"] if pick["total_s"] else 0.0
    if pick["gpus"] > 1 and serial > 0.3:
        tail += f"; the undivided part (text encoder, VAE) is {serial:.0%} of it"
    return pick, why + tail


# ----------------------------------------------------------------------------------------------
# Calibration: least squares for (serial, 1/efficiency) given measured total times
# ----------------------------------------------------------------------------------------------


def fit_constants(w: Workload, hw: Hardware, measured: Sequence[Tuple[int, int, float]],
                  ring_impl: str = "p2p", ulysses_pipeline: int = 1) -> Dict:
    """Fit ``efficiency`` and ``serial_s_per_mpix`` so the model matches ``measured`` (u, r, seconds).

    T_i = serial + a * W_i + C_i: W_i the compute seconds at nominal peak, C_i the exposed
    communication (which depends on a through the overlap, so the linear fit is iterated). With two
    rows it is exact; with more it is least squares. With ``attention_only`` the serial part is a fixed
    time (``serial_s_fixed``) instead of seconds per megapixel.
    Returns the constants, the fitted hardware and the per-row residuals.
    """
    if len(measured) < 2:
        raise ValueError("spattn plan --calibrate: need at least two measured rows with different degrees "
                         "(e.g. the 1x1 baseline and one parallel run)")
    fit = hw
    for _ in range(20):
        xs, ys = [], []
        for u, r, t in measured:
            row = predict_row(w, replace(fit, efficiency=1.0, serial_s_per_mpix=0.0), u, r, ring_impl, ulysses_pipeline)
            cur = predict_row(w, fit, u, r, ring_impl, ulysses_pipeline)
            xs.append(row["attention_s"] + row["linear_s"])
            ys.append(t - cur["comm_exposed_s"] - cur["merge_s"])
        n = len(xs)
        mx, my = sum(xs) / n, sum(ys) / n
        sxx = sum((x - mx) ** 2 for x in xs)
        if sxx == 0:
            raise ValueError("spattn plan --calibrate: the measured rows all have the same parallel work; "
                             "include the 1x1 baseline and at least one parallel row")
        a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
        serial = my - a * mx
        if a <= 0:
            raise ValueError("spattn plan --calibrate: the measurements get slower with more devices; the "
                             "s + p/P model does not fit them (check the rows and the model flags)")
        per_mpix = w.megapixels > 0 and not w.attention_only
        new = replace(fit, efficiency=1.0 / a, serial_s_per_mpix=serial / w.megapixels if per_mpix else 0.0,
                      serial_s_fixed=0.0 if per_mpix else serial, calibrated="fitted to measured rows (--calibrate)")
        done = abs(new.efficiency - fit.efficiency) < 1e-9 * fit.efficiency
        fit = new
        if done:
            break
    resid = []
    for u, r, t in measured:
        pred = predict_row(w, fit, u, r, ring_impl, ulysses_pipeline)["total_s"]
        resid.append(dict(ulysses_degree=u, ring_degree=r, measured_s=t, predicted_s=pred, error=pred / t - 1))
    return dict(efficiency=fit.efficiency, serial_s_per_mpix=fit.serial_s_per_mpix,
                serial_s=fit.serial_s_fixed + fit.serial_s_per_mpix * w.megapixels, hardware=fit, rows=resid)


def read_measurements(path: str, where: Sequence[str] = ()) -> List[Tuple[int, int, float]]:
    """(ulysses_degree, ring_degree, time_s) rows from a CSV (bench/bench_sp.py) or a JSON list
    (``spattn generate --json``). ``where``: KEY=VALUE filters on other columns. Repeated degrees
    are averaged (median)."""
    with open(path, newline="") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = list(csv.DictReader(text.splitlines()))
    conds = []
    for c in where:
        if "=" not in c:
            raise ValueError(f"spattn plan: --where takes KEY=VALUE, got {c!r}")
        conds.append(tuple(c.split("=", 1)))
    groups: Dict[Tuple[int, int], List[float]] = {}
    for row in rows:
        if any(str(row.get(k)) != v for k, v in conds):
            continue
        try:
            key = (int(row["ulysses_degree"]), int(row["ring_degree"]))
            t = float(row["time_s"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"spattn plan: {path}: every row needs ulysses_degree, ring_degree and time_s "
                             f"({e!r} in {row})") from None
        groups.setdefault(key, []).append(t)
    if not groups:
        raise ValueError(f"spattn plan: {path}: no rows (after --where {list(where)})")
    return [(u, r, sorted(ts)[len(ts) // 2]) for (u, r), ts in sorted(groups.items())]


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("Modeled, not measured: nominal peaks, two calibrated constants per preset (see "
                "`python -c 'import spattn.cli.plan as m; print(m.__doc__)'`).")
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
    m.add_argument("--cfg", type=int, default=1, help="transformer passes per step (2: true CFG run separately)")
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
    s.add_argument("--ring-impl", default="auto", choices=["auto"] + sorted(RING_IMPLS),
                   help="ring implementation assumed (auto: what spattn's ring_impl='auto' picks on GPUs)")
    s.add_argument("--ulysses-pipeline", type=int, default=1,
                   help="all-to-all pipeline chunks (1: exposed, as the guide's runs; spattn's default is 4)")
    c = p.add_argument_group("calibration / output")
    c.add_argument("--calibrate", metavar="FILE", help="refit the two constants from measured rows (CSV or JSON)")
    c.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="with --calibrate: use only rows where column KEY equals VALUE (repeatable)")
    c.add_argument("--json", action="store_true", help="print the rows as a JSON list")


def workload_from_args(a: argparse.Namespace) -> Workload:
    spec = MODELS[a.model]
    heads = a.heads or spec.heads
    head_dim = a.head_dim or spec.head_dim
    layers = a.layers or spec.layers
    text = spec.text_len if a.text_len is None else a.text_len
    mlp = spec.mlp_ratio if a.mlp_ratio is None else a.mlp_ratio
    width, height = a.width or spec.width, a.height or spec.height
    frames = (a.frames or spec.frames) if spec.video else 1
    vae, patch = a.vae_factor or spec.vae_factor, a.patch or spec.patch
    for name, val in (("--gpus", a.gpus), ("--num-inference-steps", a.num_inference_steps), ("--cfg", a.cfg),
                      ("--heads", heads), ("--head-dim", head_dim), ("--layers", layers), ("--width", width),
                      ("--height", height), ("--frames", frames), ("--patch", patch), ("--vae-factor", vae),
                      ("--ulysses-pipeline", a.ulysses_pipeline)):
        if val < 1:
            raise ValueError(f"{name} must be >= 1, got {val}")
    if text < 0 or mlp < 0:
        raise ValueError("--text-len and --mlp-ratio must be >= 0")
    if a.tokens is not None:
        if a.tokens < 1:
            raise ValueError(f"--tokens must be >= 1, got {a.tokens}")
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
                    spec.joint_text, a.num_inference_steps, a.cfg, mpix, attention_only=a.attention_only)


def hardware_from_args(a: argparse.Namespace) -> Hardware:
    hw = HARDWARE[a.hardware]
    if a.tflops is not None or a.link_gbps is not None or a.link is not None:
        tflops = a.tflops or hw.tflops
        link = a.link or hw.link
        changed = tflops != hw.tflops
        hw = replace(hw, name="custom", tflops=tflops, link_gbps=a.link_gbps or hw.link_gbps, link=link,
                     latency_us=_LATENCY_US[link],
                     efficiency=_DEFAULT_EFF if changed else hw.efficiency,
                     serial_s_per_mpix=_default_serial(tflops) if changed else hw.serial_s_per_mpix,
                     calibrated="not calibrated (mean of h800/a100 constants)" if changed else hw.calibrated)
    for name, val in (("--tflops", hw.tflops), ("--link-gbps", hw.link_gbps)):
        if val <= 0:
            raise ValueError(f"{name} must be > 0, got {val}")
    if a.efficiency is not None:
        if not 0 < a.efficiency <= 1.5:
            raise ValueError(f"--efficiency must be in (0, 1.5], got {a.efficiency}")
        hw = replace(hw, efficiency=a.efficiency, calibrated="--efficiency given")
    if a.serial_s_per_mpix is not None:
        hw = replace(hw, serial_s_per_mpix=a.serial_s_per_mpix, calibrated="--serial-s-per-mpix given")
    return hw


def _n(x: float) -> str:
    """Seconds or GB with the digits that matter, from 0.0001 to 10000."""
    ax = abs(x)
    return ("0" if x == 0 else f"{x:.1f}" if ax >= 100 else f"{x:.2f}" if ax >= 1 else f"{x:.4f}" if ax >= 1e-3
            else f"{x:.1e}")


COLUMNS = (("attn s", "attention_s", 1), ("other s", "linear_s", 1), ("comm s", "comm_s", 1),
           ("hidden", "comm_hidden_s", 1), ("exposed", "comm_exposed_s", 1), ("a2a GB", "a2a_bytes_per_rank", 1e9),
           ("ring GB", "ring_bytes_per_rank", 1e9), ("serial s", "serial_s", 1), ("total s", "total_s", 1))


def format_table(rows: Sequence[Dict]) -> str:
    lines = [f"{'mode':<12}{'U':>3}{'R':>3}{'ring':>6}" + "".join(f" {h:>8}" for h, _, _ in COLUMNS) + f" {'speedup':>8}"]
    for r in rows:
        lines.append(f"{r['mode']:<12}{r['ulysses_degree']:>3}{r['ring_degree']:>3}{r['ring_impl'] or '-':>6}"
                     + "".join(f" {_n(r[k] / div):>8}" for _, k, div in COLUMNS) + f" {r['speedup']:>7.2f}x")
    return "\n".join(lines)


def run(a: argparse.Namespace) -> int:
    try:
        w = workload_from_args(a)
        hw = hardware_from_args(a)
        fitted = None
        if a.calibrate:
            measured = read_measurements(a.calibrate, a.where)
            fitted = fit_constants(w, hw, measured, a.ring_impl, a.ulysses_pipeline)
            hw = fitted["hardware"]
        rows = predict(w, hw, a.gpus, a.ring_impl, a.ulysses_pipeline)
    except (ValueError, OSError) as e:
        print(f"spattn plan: {e}", file=sys.stderr)
        return 2
    pick, why = recommend(rows, hw)
    for row in rows:
        row["recommended"] = row is pick
        row["reason"] = why if row is pick else None
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"# {w.model}: {w.image_tokens} image tokens + {w.text_tokens} text, {w.layers} layers, "
          f"{w.heads}x{w.head_dim}, {w.steps} steps x {w.cfg} pass(es)")
    print(f"# {hw.name}: {hw.tflops:g} TFLOP/s nominal x efficiency {hw.efficiency:.3f}, {hw.link} "
          f"{hw.link_gbps:g} GB/s per direction, serial {hw.serial_s_per_mpix:.2f} s/MPix ({hw.calibrated})")
    print("# MODELED, not measured; times are per rank for the whole generation, comm = all-to-all + ring P2P")
    if fitted:
        print(f"# calibrated from {a.calibrate}: efficiency {fitted['efficiency']:.3f}, serial "
              f"{_n(fitted['serial_s'])} s")
        if fitted["efficiency"] > 1:
            print("# warning: the fitted efficiency is above the nominal peak: --tflops is too low for this machine, "
                  "or the measured ranks shared their compute (e.g. CPU ranks on one machine)")
        for r in fitted["rows"]:
            print(f"#   {r['ulysses_degree']}x{r['ring_degree']}: measured {r['measured_s']:.3f} s, model "
                  f"{r['predicted_s']:.3f} s ({r['error']:+.1%})")
    print(format_table(rows))
    print(f"recommend: ulysses {pick['ulysses_degree']} x ring {pick['ring_degree']} - {why}")
    return 0
