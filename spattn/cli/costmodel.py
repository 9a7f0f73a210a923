"""The cost model behind ``spattn plan``: predicted generation time per Ulysses x Ring factorization.

A roofline-style model of one diffusion-transformer generation on ``P = ulysses x ring`` devices:

    total = serial + steps * cfg / cfg_degree * layers * (attention + linear + exposed communication
                                                           + kernel gaps) + CFG exchange

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
  ``RING_COSTS`` maps each ring implementation spattn has (``ring_impl`` minus "auto") to its cost
  function: a new implementation is a new entry.
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
  efficiency 0.229 and 3.95 s/MPix besides the VAE and the kernel gaps (17.5 s undivided in all, 16% of
  the baseline). Predictions: Ulysses 2
  1.68x (guide 1.73x, -2.9%) and Ulysses 4 2.61x (guide 2.84x, -8.0%).
* a100 - fitted to Qwen-Image 1024x1024, 50 steps: baseline (45.2 s) and Ring 4 (23.3 s), giving
  efficiency 0.380 and 12.89 s/MPix besides the VAE and the kernel gaps (14.3 s undivided, 32%).
  Predictions: Ring 2 1.48x (guide 1.51x,
  -2.2%) and Ulysses 2 x Ring 2 1.93x (guide 1.87x, +3.2%).
* h100 - fitted to vLLM-Omni's Qwen-Image 512x512, 20 steps, true CFG: one GPU (3.5 s) and Ulysses 2
  x CFG 2 x VAE-patch 4 (2.34 s), giving efficiency 0.574 and a fixed 1.61 s per generation (text
  encoder on two prompts, request overhead: at 512x512 the only pixel-proportional undivided stage, the
  VAE, is modeled from its FLOPs and is 5 ms, so the rest is not per-pixel work). Prediction of the
  other published point, 1536x1536, 35 steps: one GPU 26.7 s (vLLM-Omni 27 s, -1%), Ulysses 2 x CFG 2
  x VAE 4 8.57 s (9.1 s, -6%), speedup 3.12x (2.97x, +5%). Without the kernel-gap term (below) the
  same fit predicted 33.3 s (+23%) and 10.1 s (+11%): at 512x512 a layer's fixed cost is a large share.

Kernel gaps: every layer pass pays ``KERNELS_PER_LAYER x KERNEL_GAP_US`` = 80 x 3 us, whatever its
size (80: non-view aten ops of one eager Qwen-Image block, counted; 3 us: the usual order of a launch
gap between dependent kernels). Counted and assumed, not fitted; with 1.5 or 5 us instead the h100
prediction above stays within 20% (tests/test_plan_cfg.py).
* l40 and explicit ``--tflops`` - efficiency: the mean of h800 and a100; serial work: the mean of their
  ``serial_s_per_mpix * peak`` (peak-equivalent seconds), divided by this peak. Not calibrated.

Everything else (FLOP counts, bytes, bandwidth, latency, overlap rules) is fixed up front, not fitted.
The efficiency absorbs what the model does not know about a run (kernel quality, a second CFG pass:
the guide does not say whether its runs used true CFG; ``--cfg 2`` doubles the transformer work).

CFG parallel (``cfg_degree`` 2, ``--cfg 2`` workloads): each branch runs one of the two passes per step on
its ``u x r`` ranks; per step the branches swap the transformer output (``image_tokens x 64`` bf16
values, latent channels x patch area) over the link, exposed. VAE: its decode FLOPs are counted from the
diffusers VAE (``ModelSpec.vae_tflops_per_mpix``), run at the preset's efficiency and, by default, split
over a branch's ``u x r`` ranks (spattn's patch-parallel VAE) plus the latency of ``VAE_SYNCS``
collectives and the image all-gather; the calibrated serial constant is what remains undivided (the
guide's rows are modeled with one rank decoding: ``--no-vae-parallel``).
For video (wan) the serial part is the image VAE's seconds per megapixel extrapolated to all frames:
a rough guess. ``--calibrate results.csv`` refits the two constants from the user's own measurements.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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
    # VAE decode FLOPs per output megapixel (per frame for video): counted with torch's FlopCounterMode
    # on the default diffusers VAE config (AutoencoderKLQwenImage: 10.8; Flux's AutoencoderKL: 9.6;
    # Wan 2.1's VAE is Qwen-Image's architecture). Structural, not fitted.
    vae_tflops_per_mpix: float = 10.8
    out_channels: int = 64        # transformer output per image token (latent channels x patch area)

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


MODELS: Dict[str, ModelSpec] = {
    # 60 MMDiT blocks, 24 x 128 (hidden 3072), MLP 4x, VAE /8 then 2x2 patches.
    "qwen-image": ModelSpec("qwen-image", layers=60, heads=24, head_dim=128, mlp_ratio=4.0, text_len=256),
    # 19 double + 38 single blocks; a single block's fused linears hold the same 12*h^2 as a stream of
    # a double block, so 57 attention layers, and the double blocks add a second (text) stream.
    "flux": ModelSpec("flux", layers=57, heads=24, head_dim=128, mlp_ratio=4.0, text_len=512,
                      vae_tflops_per_mpix=9.6),
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
    vae_tflops: float = 0.0       # VAE decode of the whole output (0: not modeled)
    vae_parallel: bool = True     # every rank of a CFG branch decodes a band of the image (spattn's default)
    out_channels: int = 64        # transformer output channels per image token (the CFG exchange)

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


LATENCY_US = {"nvlink": 15.0, "pcie": 30.0}

# Fitted by fit_constants() to the guide's rows named in the module docstring (tests/test_plan.py
# re-runs the fit and checks these numbers).
_H800 = dict(efficiency=0.2290, serial_s_per_mpix=3.954)
_A100 = dict(efficiency=0.3795, serial_s_per_mpix=12.889)
# Fitted to vLLM-Omni's Qwen-Image 512x512, 20 steps, true CFG on H100: one GPU 3.5 s, Ulysses 2 x CFG 2
# x VAE-patch 4 2.34 s; the undivided part as a fixed time per generation (see the module docstring).
_H100 = dict(efficiency=0.5739, serial_s_per_mpix=0.0, serial_s_fixed=1.608)
DEFAULT_EFFICIENCY = (_H800["efficiency"] + _A100["efficiency"]) / 2
_DEFAULT_SERIAL_PEAK_S = (_H800["serial_s_per_mpix"] * 989 + _A100["serial_s_per_mpix"] * 312) / 2  # s*TF/s


def default_serial(tflops: float) -> float:
    return _DEFAULT_SERIAL_PEAK_S / tflops


HARDWARE: Dict[str, Hardware] = {
    "h800": Hardware("h800", 989.0, 200.0, "nvlink", 3.35, latency_us=LATENCY_US["nvlink"],
                     calibrated="guide: Qwen-Image 2048x2048 baseline + Ulysses 8", **_H800),
    "h100": Hardware("h100", 989.0, 450.0, "nvlink", 3.35, latency_us=LATENCY_US["nvlink"],
                     calibrated="vLLM-Omni: Qwen-Image 512x512, 20 steps, true CFG: 1 GPU + Ulysses 2 x CFG 2",
                     **_H100),
    "a100": Hardware("a100", 312.0, 300.0, "nvlink", 2.0, latency_us=LATENCY_US["nvlink"],
                     calibrated="guide: Qwen-Image 1024x1024 baseline + Ring 4", **_A100),
    "l40": Hardware("l40", 181.0, 25.0, "pcie", 0.864, efficiency=DEFAULT_EFFICIENCY, serial_s_per_mpix=default_serial(181.0),
                    latency_us=LATENCY_US["pcie"], calibrated="not calibrated (mean of h800/a100 constants)"),
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
RING_COSTS: Dict[str, Callable[[Workload, Hardware, int, int, float], RingCost]] = {
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


VAE_SYNCS = 40  # collectives of a band-parallel VAE decode (halo exchanges, norm statistics), latency-bound
# Fixed cost of every transformer layer pass, whatever its size: the kernels of an eager diffusers block
# (80 non-view aten ops in a Qwen-Image block, counted with TorchDispatchMode; taken for every model)
# each leave a gap of a few microseconds (launch latency between dependent kernels) on the GPU.
KERNELS_PER_LAYER = 80
KERNEL_GAP_US = 3.0


def _cfg_exchange(w: Workload, hw: Hardware, c: int) -> Tuple[float, float]:
    """(bytes per rank, seconds) of CFG parallel's per-step swap of the transformer outputs between
    the ``c`` branches (an all-gather over the CFG group), for the whole generation; never overlapped."""
    if c == 1:
        return 0.0, 0.0
    sent = w.image_tokens * w.out_channels * BYTES_BF16 * (c - 1)
    return w.steps * sent, w.steps * (sent / (hw.link_gbps * 1e9) + hw.latency_us * 1e-6)


def _vae(w: Workload, hw: Hardware, rate: float, pv: int) -> Tuple[float, float]:
    """(compute, communication) seconds of the VAE decode on ``pv`` ranks: its FLOPs divided over the
    bands, plus the latency of its collectives and the all-gather of the image (bf16 RGB)."""
    if w.attention_only or w.vae_tflops <= 0:
        return 0.0, 0.0
    compute = w.vae_tflops * 1e12 / rate / pv
    if pv == 1:
        return compute, 0.0
    image = 3 * w.megapixels * 1e6 * BYTES_BF16 * (pv - 1) / pv
    return compute, image / (hw.link_gbps * 1e9) + VAE_SYNCS * hw.latency_us * 1e-6


def predict_row(w: Workload, hw: Hardware, u: int, r: int, ring_impl: str = "p2p",
                ulysses_pipeline: int = 1, cfg_degree: int = 1, vae_degree: Optional[int] = None) -> Dict:
    """Predicted cost of the ``cfg_degree x u x r`` factorization; times are seconds per rank for the
    generation. ``cfg_degree`` 2 splits the ``w.cfg`` passes per step over two branches; the VAE decodes
    on ``vae_degree`` ranks (default: a branch's ``u x r`` ranks when ``w.vae_parallel``, else 1)."""
    if w.cfg % cfg_degree:
        raise ValueError(f"spattn plan: cfg_degree {cfg_degree} needs a multiple of {cfg_degree} transformer passes "
                         f"per step (true CFG: --cfg 2), got {w.cfg}")
    pv = vae_degree if vae_degree is not None else (u * r if w.vae_parallel else 1)
    ring_impl, ring_why = resolve_ring_impl(w, u, r, ring_impl)
    if ring_impl not in RING_COSTS:
        raise ValueError(f"spattn plan: unknown ring implementation {ring_impl!r}; choose one of {sorted(RING_COSTS)}")
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
    ring = RING_COSTS[ring_impl](w, hw, u, r, attn_layer)
    passes = w.steps * (w.cfg // cfg_degree) * w.layers   # per rank: a CFG branch runs its share of passes
    comm = a2a_s + ring.time_s
    exposed = (a2a_s - a2a_hidden) + ring.exposed_s
    cfg_bytes, cfg_s = _cfg_exchange(w, hw, cfg_degree)
    vae_compute, vae_comm = _vae(w, hw, rate, pv)
    # The undivided rest (text encoder, scheduler, launch overheads): the preset's calibrated serial part.
    serial = vae_compute + vae_comm + hw.serial_s_fixed + (
        0.0 if w.attention_only else hw.serial_s_per_mpix * w.megapixels)
    launch = 0.0 if w.attention_only else KERNELS_PER_LAYER * KERNEL_GAP_US * 1e-6
    total = serial + passes * (attn_layer + lin_layer + ring.merge_s + exposed + launch) + cfg_s
    return dict(mode=mode_name(u, r, cfg_degree), cfg_degree=cfg_degree, ulysses_degree=u, ring_degree=r,
                gpus=p * cfg_degree, vae_degree=pv, ring_impl=ring_impl if r > 1 else None,
                ring_impl_reason=ring_why if r > 1 else None,
                attention_s=passes * attn_layer, linear_s=passes * lin_layer, merge_s=passes * ring.merge_s,
                comm_s=passes * comm + cfg_s,
                comm_hidden_s=passes * (comm - exposed), comm_exposed_s=passes * exposed + cfg_s,
                a2a_bytes_per_rank=passes * a2a_bytes, ring_bytes_per_rank=passes * ring.bytes_per_rank,
                cfg_bytes_per_rank=cfg_bytes, cfg_comm_s=cfg_s, vae_compute_s=vae_compute, vae_comm_s=vae_comm,
                launch_s=passes * launch, other_s=passes * (lin_layer + launch),
                serial_s=serial, total_s=total)


def factorizations(gpus: int, exact: bool = False) -> List[Tuple[int, int]]:
    """(ulysses, ring) degree pairs, by device count, Ulysses-heavy first: every pair whose product
    divides ``gpus`` (1x1 first: what a planner compares), or with ``exact`` only those using all
    ``gpus`` (what a benchmark on ``gpus`` ranks runs)."""
    out = []
    for p in (d for d in range(1, gpus + 1) if gpus % d == 0 and (not exact or d == gpus)):
        out += [(u, p // u) for u in range(p, 0, -1) if p % u == 0]
    return out


def mode_name(u: int, r: int, cfg_degree: int = 1) -> str:
    """The one display name of a ``u x r`` factorization: "1 device", "ulysses 4", "ring 2", "hybrid 2x2";
    with CFG parallel "cfg 2" or e.g. "ulysses 2 x cfg 2"."""
    if cfg_degree > 1:
        return f"cfg {cfg_degree}" if u * r == 1 else f"{mode_name(u, r)} x cfg {cfg_degree}"
    if u * r == 1:
        return "1 device"
    return f"ulysses {u}" if r == 1 else f"ring {r}" if u == 1 else f"hybrid {u}x{r}"


def custom_hardware(hw: Hardware, tflops: Optional[float] = None, link_gbps: Optional[float] = None,
                    link: Optional[str] = None) -> Hardware:
    """``hw`` with its peak, link bandwidth or link kind replaced; a new peak drops the preset's
    calibration for the uncalibrated defaults (the constants belong to the chip they were fitted on)."""
    tflops = hw.tflops if tflops is None else tflops
    link = hw.link if link is None else link
    changed = tflops != hw.tflops
    return replace(hw, name="custom", tflops=tflops, link_gbps=hw.link_gbps if link_gbps is None else link_gbps,
                   link=link, latency_us=LATENCY_US[link],
                   efficiency=DEFAULT_EFFICIENCY if changed else hw.efficiency,
                   serial_s_per_mpix=default_serial(tflops) if changed else hw.serial_s_per_mpix,
                   serial_s_fixed=0.0 if changed else hw.serial_s_fixed,
                   calibrated="not calibrated (mean of h800/a100 constants)" if changed else hw.calibrated)


def predict(w: Workload, hw: Hardware, gpus: int, ring_impl: str = "p2p", ulysses_pipeline: int = 1,
            cfg_degrees: Sequence[int] = (1,)) -> List[Dict]:
    """One row per factorization (the 1x1 row first), with ``speedup`` over it; ``cfg_degrees`` adds
    the CFG-parallel ``c x u x r`` rows (c > 1) whose device count divides ``gpus``, ordered by devices."""
    combos = [(1, u, r) for u, r in factorizations(gpus)] if 1 in cfg_degrees else [(1, 1, 1)]
    combos += [(c, u, r) for c in cfg_degrees if c > 1 and gpus % c == 0 for u, r in factorizations(gpus // c)]
    combos.sort(key=lambda x: x[0] * x[1] * x[2])   # stable: Ulysses-heavy first within a device count
    rows = [predict_row(w, hw, u, r, ring_impl, ulysses_pipeline, cfg_degree=c) for c, u, r in combos]
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
    # CFG parallel first among ties: its branches swap one small output per step, the least traffic.
    pick = min(ties, key=lambda x: (x["gpus"], -x.get("cfg_degree", 1), lean(x), x["total_s"]))
    if pick is best:
        why = f"fastest predicted ({fmt_num(pick['total_s'])} s, {pick['speedup']:.2f}x)"
    else:
        why = (f"within {slack:.0%} of the fastest ({best['mode']}, {fmt_num(best['total_s'])} s)"
               + (" on fewer devices" if pick["gpus"] < best["gpus"] else
                  f"; {'Ulysses' if hw.link == 'nvlink' else 'Ring'} first on {hw.link}, as the guide advises"))
    share = pick["comm_exposed_s"] / pick["total_s"] if pick["total_s"] else 0.0
    tail = (f"; exposed communication {fmt_num(pick['comm_exposed_s'])} s ({share:.0%}) over {hw.link}"
            if pick["gpus"] > 1 else "")
    serial = pick["serial_s"] / pick["total_s"] if pick["total_s"] else 0.0
    if pick["gpus"] > 1 and serial > 0.3:
        tail += f"; the undivided part (text encoder, VAE) is {serial:.0%} of it"
    return pick, why + tail


# ----------------------------------------------------------------------------------------------
# Calibration: least squares for (serial, 1/efficiency) given measured total times
# ----------------------------------------------------------------------------------------------


def fit_constants(w: Workload, hw: Hardware, measured: Sequence[Tuple],
                  ring_impl: str = "p2p", ulysses_pipeline: int = 1, serial_per_mpix: Optional[bool] = None) -> Dict:
    """Fit ``efficiency`` and ``serial_s_per_mpix`` so the model matches ``measured`` (u, r, seconds),
    or (u, r, seconds, cfg_degree) / (u, r, seconds, cfg_degree, vae_degree) for CFG / VAE parallel rows.

    T_i = serial + a * W_i + C_i: W_i the compute seconds at nominal peak, C_i the exposed
    communication (which depends on a through the overlap, so the linear fit is iterated). With two
    rows it is exact; with more it is least squares. With ``attention_only`` the serial part is a fixed
    time (``serial_s_fixed``) instead of seconds per megapixel; ``serial_per_mpix=False`` asks for that
    form for a whole generation too (the VAE decode, which grows with pixels, is in W_i either way).
    Returns the constants, the fitted hardware and the per-row residuals.
    """
    if len(measured) < 2:
        raise ValueError("spattn plan --calibrate: need at least two measured rows with different degrees "
                         "(e.g. the 1x1 baseline and one parallel run)")
    fit = hw
    measured = [tuple(m) + (1, None)[len(m) - 3:] for m in measured]   # (u, r, t, cfg_degree, vae_degree)
    for _ in range(20):
        xs, ys = [], []
        for u, r, t, c, pv in measured:
            at_peak = replace(fit, efficiency=1.0, serial_s_per_mpix=0.0, serial_s_fixed=0.0)
            row = predict_row(w, at_peak, u, r, ring_impl, ulysses_pipeline, c, pv)
            cur = predict_row(w, fit, u, r, ring_impl, ulysses_pipeline, c, pv)
            xs.append(row["attention_s"] + row["linear_s"] + row["vae_compute_s"])
            ys.append(t - cur["comm_exposed_s"] - cur["merge_s"] - cur["vae_comm_s"] - cur["launch_s"])
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
        per_mpix = w.megapixels > 0 and not w.attention_only and serial_per_mpix is not False
        new = replace(fit, efficiency=1.0 / a, serial_s_per_mpix=serial / w.megapixels if per_mpix else 0.0,
                      serial_s_fixed=0.0 if per_mpix else serial, calibrated="fitted to measured rows (--calibrate)")
        done = abs(new.efficiency - fit.efficiency) < 1e-9 * fit.efficiency
        fit = new
        if done:
            break
    resid = []
    for u, r, t, c, pv in measured:
        pred = predict_row(w, fit, u, r, ring_impl, ulysses_pipeline, c, pv)["total_s"]
        resid.append(dict(cfg_degree=c, ulysses_degree=u, ring_degree=r, measured_s=t, predicted_s=pred,
                          error=pred / t - 1))
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
    groups: Dict[Tuple[int, int, int], List[float]] = {}
    for row in rows:
        if any(str(row.get(k)) != v for k, v in conds):
            continue
        try:
            key = (int(row["ulysses_degree"]), int(row["ring_degree"]), int(row.get("cfg_degree") or 1))
            t = float(row["time_s"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"spattn plan: {path}: every row needs ulysses_degree, ring_degree and time_s "
                             f"({e!r} in {row})") from None
        groups.setdefault(key, []).append(t)
    if not groups:
        raise ValueError(f"spattn plan: {path}: no rows (after --where {list(where)})")
    cfg = any(c > 1 for _, _, c in groups)   # (u, r, t) unless CFG-parallel rows are there
    return [(u, r, sorted(ts)[len(ts) // 2]) + ((c,) if cfg else ())
            for (u, r, c), ts in sorted(groups.items())]


def fmt_num(x: float) -> str:
    """Seconds or GB with the digits that matter, from 0.0001 to 10000."""
    ax = abs(x)
    return ("0" if x == 0 else f"{x:.1f}" if ax >= 100 else f"{x:.2f}" if ax >= 1 else f"{x:.4f}" if ax >= 1e-3
            else f"{x:.1e}")
