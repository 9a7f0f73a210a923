"""``spattn generate``: the guide's text-to-image run, with the transformer's attention sequence-parallel.

    spattn generate --model tiny-qwen-image --ulysses-degree 2 --ring-degree 1 --baseline
    spattn generate --model tiny-wan --ring-degree 2 --num-frames 9 --width 64 --height 64   # video: MP4

Every rank runs the same diffusers pipeline with the same seed (identical full inputs); the
transformer, parallelized by ``spattn.integrations.diffusers.parallelize``, splits the image tokens
internally and returns the full output on every rank, so the scheduler, VAE and text encoder run
unchanged. With ``--cfg-degree 2`` and a ``--negative-prompt`` the two guidance branches run at the
same time on two halves of the ranks (``parallelize_pipeline``; world = cfg x ulysses x ring). Rank 0 times the generation, writes the PNG, the table and the ``--json`` rows. With
``--baseline`` rank 0 first runs the unmodified pipeline on one device with the same seed (all the
CPU cores on CPU) and the table gives the speedup and the largest pixel deviation from it.

Launch: under ``torchrun`` (RANK/WORLD_SIZE set) the launched ranks are used (NCCL on GPUs, gloo on
CPU); otherwise ``ulysses_degree x ring_degree`` local ranks are spawned here. Every bad flag is
reported as one line naming the fix (exit code 2) before anything is spawned.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import List, Optional, Tuple

from .argtypes import positive_int

MAX_CPU_RANKS = 8
DTYPES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("auto", "torch", "triton", "reference")
DEFAULT_PROMPT = "A cat sitting on a windowsill"


class UsageError(Exception):
    """A bad flag: reported as one line on stderr, exit code 2."""


@dataclasses.dataclass
class Config:
    """Everything a rank needs (validated, picklable for spawn)."""

    model: str                 # a tiny name or a local pipeline directory
    model_label: str           # what the user passed
    pipeline_class: str
    prompt: str
    ulysses_degree: int
    ring_degree: int
    width: int
    height: int
    num_inference_steps: int
    seed: int
    dtype: str                 # resolved: float32 / bfloat16 / float16
    backend: str
    output: str
    json_path: Optional[str]
    baseline: bool
    warmup: bool
    cores: int
    # Guidance (CFG): the two branches run at once on two halves of the ranks with cfg_degree 2.
    cfg_degree: int = 1
    negative_prompt: Optional[str] = None
    true_cfg_scale: Optional[float] = None   # resolved: > 1 with a negative prompt, else None
    guidance_scale: Optional[float] = None   # guidance-distilled models only
    vae_parallel: bool = True  # decode with every rank (patch-parallel VAE), when the VAE is supported
    num_frames: Optional[int] = None   # video models (WanPipeline): frames, 4k+1; None for images
    fps: int = 16                      # video models: MP4 frame rate

    @property
    def world(self) -> int:
        return self.cfg_degree * self.ulysses_degree * self.ring_degree


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument
    g("--model", default="tiny-qwen-image",
      help="diffusers pipeline directory or cached hub id (Qwen-Image, Flux), or a built-in tiny random "
           "pipeline: tiny-qwen-image (default), tiny-flux")
    g("--prompt", default=DEFAULT_PROMPT, help=f"text prompt (default: {DEFAULT_PROMPT!r})")
    g("--ulysses-degree", "--usp", dest="ulysses_degree", type=positive_int, default=None,
      help="ranks splitting attention heads by all-to-all (default 1; 2 when neither degree is given)")
    g("--ring-degree", "--ring", dest="ring_degree", type=positive_int, default=None,
      help="ranks passing K/V around a ring (default 1); ranks used = ulysses x ring")
    g("--cfg-degree", "--cfg-parallel", dest="cfg_degree", type=positive_int, default=1,
      help="2: run the conditional and unconditional branches of classifier-free guidance at the same time "
           "on two halves of the ranks (needs --negative-prompt); ranks used = cfg x ulysses x ring (default 1)")
    g("--negative-prompt", default=None,
      help="negative prompt: turns on true classifier-free guidance (two transformer calls per step)")
    g("--true-cfg-scale", type=float, default=None,
      help="true CFG scale, > 1 (default 4.0 with --negative-prompt, as Qwen-Image's pipeline)")
    g("--guidance-scale", type=float, default=None,
      help="embedded guidance of guidance-distilled models (e.g. FLUX.1-dev); the pipeline default otherwise")
    g("--width", type=positive_int, default=512, help="image width, a multiple of 16 (default 512)")
    g("--height", type=positive_int, default=512, help="image height, a multiple of 16 (default 512)")
    g("--num-inference-steps", type=positive_int, default=20, help="denoising steps (default 20)")
    g("--seed", type=int, default=0, help="generator seed, the same on every rank (default 0)")
    g("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    g("--backend", choices=BACKENDS, default="auto", help="spattn attention backend (default auto)")
    g("--output", default="spattn_generate.png",
      help="PNG written by rank 0 (default spattn_generate.png; spattn_generate.mp4 for video models)")
    g("--num-frames", type=positive_int, default=None,
      help="video models (tiny-wan, Wan): frames, 4k+1 (default 81; 17 for tiny-wan)")
    g("--fps", type=positive_int, default=16, help="video models: MP4 frames per second (default 16)")
    g("--json", dest="json_path", metavar="PATH", default=None,
      help="write the table as a JSON list of rows (baseline first)")
    g("--baseline", action=argparse.BooleanOptionalAction, default=True,
      help="also run the unmodified pipeline on one device with the same seed; report speedup and max "
           "pixel deviation (default on; --no-baseline skips it)")
    g("--warmup", action=argparse.BooleanOptionalAction, default=True,
      help="one untimed 1-step generation per configuration before timing (default on)")
    g("--vae-parallel", action=argparse.BooleanOptionalAction, default=None,
      help="decode with every rank, each on a band of image rows (exact; default on when the latent has at "
           "least one row per rank); --no-vae-parallel decodes on each rank alone")

    def one_line_error(message: str) -> None:  # argparse's usage block is not one line
        print(f"spattn generate: error: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = one_line_error  # type: ignore[method-assign]


# ----------------------------------------------------------------------------------------- validation
def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _resolve_model(model: str):
    """-> (path or tiny name, pipeline class name, spatial multiple for width/height)."""
    info = _model_info(model)
    return info.path, info.pipeline_class, info.spatial_multiple


def _model_info(model: str):
    from spattn.engine.pipelines import resolve_model  # shared with spattn.Engine

    try:
        return resolve_model(model)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _launched_world() -> Optional[int]:
    """WORLD_SIZE when started by torchrun (or another launcher setting RANK/WORLD_SIZE), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return None


def validate(args: argparse.Namespace) -> Config:
    """Check every flag before anything is spawned; raises ``UsageError`` with a one-line fix."""
    import importlib.util

    import torch

    missing = [m for m in ("diffusers", "transformers", "PIL") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"{', '.join(missing)} not installed; pip install -e \".[diffusers]\" "
                         f"(or pip install diffusers transformers accelerate pillow)")
    model, cls, multiple = _resolve_model(args.model)
    num_frames, output = _video_flags(args, _model_info(args.model))
    for name in ("width", "height"):
        v = getattr(args, name)
        if v % multiple:
            lo, hi = v // multiple * multiple, (v // multiple + 1) * multiple
            use = f"{lo} or {hi}" if lo else f"{hi}"
            raise UsageError(f"--{name} {v}: {cls} needs a multiple of {multiple} (VAE factor x 2x2 patches); "
                             f"use {use}")
    # As in the guide each degree defaults to 1; with neither given, show sequence parallelism: Ulysses
    # over the launched ranks under torchrun, else over 2 local ranks.
    launched = _launched_world()
    cfg_degree = getattr(args, "cfg_degree", 1)
    true_cfg, guidance = _guidance(args, cls, model)
    if args.ulysses_degree is None and args.ring_degree is None:
        # With CFG parallel the halves already use the ranks: Ulysses only over what is left.
        args.ulysses_degree = (launched // cfg_degree or 1) if launched else (2 if cfg_degree == 1 else 1)
    args.ulysses_degree = args.ulysses_degree or 1
    args.ring_degree = args.ring_degree or 1
    world = cfg_degree * args.ulysses_degree * args.ring_degree
    cuda = torch.cuda.is_available()
    degrees = f"--ulysses-degree {args.ulysses_degree} x --ring-degree {args.ring_degree} = {world} ranks"
    if cfg_degree > 1:
        degrees = f"--cfg-degree {cfg_degree} x {degrees}"
    if launched is not None and launched != world:
        raise UsageError(f"{degrees}, but the launcher started {launched}; pick degrees whose product is "
                         f"{launched} or launch {world} processes (torchrun --nproc-per-node {world})")
    if launched is None:
        if cuda and world > torch.cuda.device_count():
            raise UsageError(f"{degrees}, but only {torch.cuda.device_count()} GPUs are visible; lower the degrees")
        if not cuda and world > MAX_CPU_RANKS:
            raise UsageError(f"{degrees}: at most {MAX_CPU_RANKS} local CPU ranks; lower the degrees "
                             f"(or launch with torchrun across machines)")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if cuda else "float32")
    if dtype == "float16" and not cuda:
        raise UsageError("--dtype float16 needs a GPU; use --dtype bfloat16 or float32 on CPU")
    if args.backend == "triton" and not cuda:
        raise UsageError("--backend triton needs a CUDA GPU; use --backend auto (torch on CPU)")
    for flag, target in (("--output", args.output), ("--json", args.json_path)):
        if target is not None:
            parent = Path(target).expanduser().resolve().parent
            if not parent.is_dir():
                raise UsageError(f"{flag} {target}: directory {parent} does not exist; create it or choose another path")
    # The parallel VAE needs a latent row per rank: on by default when it fits, an error only when asked for.
    latent_rows = args.height // (multiple // 2)
    sp = args.ulysses_degree * args.ring_degree  # each CFG branch decodes over its own SP ranks
    vae_parallel = args.vae_parallel if args.vae_parallel is not None else latent_rows >= sp
    if vae_parallel and sp > 1 and latent_rows < sp:
        raise UsageError(f"--vae-parallel: --height {args.height} gives {latent_rows} latent rows, fewer than the "
                         f"{sp} ranks that decode; use --height {sp * (multiple // 2)} or more, or --no-vae-parallel")
    return Config(
        model=model, model_label=args.model, pipeline_class=cls, prompt=args.prompt,
        ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree, width=args.width, height=args.height,
        num_inference_steps=args.num_inference_steps, seed=args.seed, dtype=dtype, backend=args.backend,
        output=output, json_path=args.json_path, baseline=args.baseline, warmup=args.warmup, cores=_cores(),
        cfg_degree=cfg_degree, negative_prompt=args.negative_prompt, true_cfg_scale=true_cfg, guidance_scale=guidance,
        vae_parallel=vae_parallel, num_frames=num_frames, fps=args.fps,
    )


def _guidance(args: argparse.Namespace, cls: str, model: str):
    """-> (true_cfg_scale or None, guidance_scale or None) after the guidance flags' checks."""
    cfg_degree = getattr(args, "cfg_degree", 1)
    neg, scale, guidance = (getattr(args, n, None) for n in ("negative_prompt", "true_cfg_scale", "guidance_scale"))
    if cfg_degree > 2:
        raise UsageError(f"--cfg-degree {cfg_degree}: classifier-free guidance has two branches; use --cfg-degree 2 "
                         f"and give the other ranks to --ulysses-degree / --ring-degree")
    if scale is not None and neg is None:
        raise UsageError(f"--true-cfg-scale {scale} needs --negative-prompt (an empty one is \" \")")
    if neg is not None:
        scale = 4.0 if scale is None else scale
        if scale <= 1:
            raise UsageError(f"--true-cfg-scale {scale}: the pipeline ignores --negative-prompt unless the scale is "
                             f"> 1; use e.g. --true-cfg-scale 4")
    if guidance is not None and not _guidance_distilled(model):
        raise UsageError(f"--guidance-scale {guidance}: this {cls} is not guidance-distilled (no guidance "
                         f"embedding), so the pipeline would ignore it; use --negative-prompt with --true-cfg-scale")
    return (scale if neg is not None else None), guidance


def _guidance_distilled(model: str) -> bool:
    """Whether the transformer embeds a guidance scale (FLUX.1-dev, distilled Qwen-Image variants)."""
    from spattn.integrations.diffusers.tiny import TINY_MODELS

    if model in TINY_MODELS:
        return False   # both tiny transformers are built with guidance_embeds=False
    try:
        return bool(json.loads((Path(model) / "transformer" / "config.json").read_text()).get("guidance_embeds"))
    except (OSError, ValueError):
        return False


def _video_flags(args: argparse.Namespace, info) -> tuple:
    """(num_frames or None, output path): --num-frames only for video models, which write MP4."""
    if not info.is_video:
        if args.num_frames is not None:
            raise UsageError(f"--num-frames: {info.pipeline_class} makes images; drop it or use a video model (tiny-wan)")
        return None, args.output
    frames = args.num_frames or (17 if args.model == "tiny-wan" else 81)
    k = info.frame_multiple
    if (frames - 1) % k:
        lo = (frames - 1) // k * k + 1
        raise UsageError(f"--num-frames {frames}: {info.pipeline_class} needs {k}k+1 frames (its VAE compresses "
                         f"time by {k}); use {lo} or {lo + k}")
    output = args.output
    if output == "spattn_generate.png":
        output = "spattn_generate.mp4"
    elif not output.lower().endswith(".mp4"):
        raise UsageError(f"--output {output}: {info.pipeline_class} writes a video; use a .mp4 path")
    return frames, output


# ---------------------------------------------------------------------------------------------- ranks
def load_pipeline(cfg: Config, device):
    """The pipeline named by ``cfg`` on ``device``: a built-in tiny one or ``from_pretrained`` (local files)."""
    from spattn.engine.pipelines import load_pipeline as load

    return load(cfg.model, cfg.dtype, device)


def _call_kwargs(cfg: Config) -> dict:
    kw = {}
    if cfg.negative_prompt is not None:   # true CFG (Qwen-Image, Flux): two transformer calls per step
        kw.update(negative_prompt=cfg.negative_prompt, true_cfg_scale=cfg.true_cfg_scale)
    elif cfg.pipeline_class == "QwenImagePipeline":
        kw.setdefault("true_cfg_scale", 1.0)  # no negative prompt: plain conditional sampling
    if cfg.guidance_scale is not None:
        kw["guidance_scale"] = cfg.guidance_scale
    return kw


def generate_image(pipe, cfg: Config, steps: int, decode: bool = True, decode_threads: Optional[int] = None):
    """One generation with ``cfg``'s seed: float image (height, width, 3) (video: (frames, height, width,
    3)), values in [0, 1], or None
    with ``decode=False`` (the denoising loop only; no VAE decode). ``decode_threads``: CPU threads
    from the end of the denoising loop on (the VAE decode)."""
    import torch

    kw = _call_kwargs(cfg)
    if cfg.num_frames is not None:
        kw["num_frames"] = cfg.num_frames
    if decode_threads is not None:
        def more_threads(pipeline, i, t, tensors):
            if i == steps - 1:
                torch.set_num_threads(decode_threads)
            return {}

        kw["callback_on_step_end"] = more_threads
    generator = torch.Generator("cpu").manual_seed(cfg.seed)  # same noise on every device and rank
    out = pipe(prompt=cfg.prompt, width=cfg.width, height=cfg.height, num_inference_steps=steps,
               generator=generator, output_type="np" if decode else "latent", **kw)
    if not decode:
        return None
    return out.frames[0] if cfg.num_frames is not None else out.images[0]  # video: (frames, H, W, 3)


def _quiet_libraries() -> None:
    """Library warnings about casting and optional extras would bury the table."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(pipe, cfg: Config, device, desc: str, show: bool, barrier=None, decode: bool = True,
           decode_threads: Optional[int] = None):
    """(image, seconds) of one generation; the warm-up (1 step) is not timed."""
    import torch

    threads = torch.get_num_threads()
    if cfg.warmup:
        pipe.set_progress_bar_config(disable=True)
        generate_image(pipe, cfg, 1, decode, decode_threads)
        torch.set_num_threads(threads)
    pipe.set_progress_bar_config(disable=not show, desc=desc, leave=False)
    if barrier is not None:
        barrier()  # every rank starts the timed run together
    _sync(device)
    t0 = time.perf_counter()
    image = generate_image(pipe, cfg, cfg.num_inference_steps, decode, decode_threads)
    _sync(device)
    seconds = time.perf_counter() - t0
    torch.set_num_threads(threads)
    return image, seconds


def configuration_name(ulysses_degree: int, ring_degree: int, cfg_degree: int = 1) -> str:
    if cfg_degree > 1:
        sp = configuration_name(ulysses_degree, ring_degree)
        return "CFG-Parallel" if sp.startswith("Single") else f"CFG-Parallel + {sp}"
    if ulysses_degree > 1 and ring_degree > 1:
        return "Hybrid"
    if ring_degree > 1:
        return "Ring-Attention"
    if ulysses_degree > 1:
        return "Ulysses-SP"
    return "Single device (spattn)"


def rank_main(rank: int, world: int, cfg: Config, init_method: Optional[str]) -> None:
    """One rank: load the pipeline, (rank 0) the baseline, then the parallel run; rank 0 reports."""
    import torch
    import torch.distributed as dist

    import spattn

    _quiet_libraries()
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    threads = max(1, cfg.cores // int(os.environ.get("LOCAL_WORLD_SIZE", world)))  # ranks on this machine
    if not cuda:
        torch.set_num_threads(threads)
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        # The other ranks wait in a barrier while rank 0 runs the baseline: allow a long one.
        kw = dict(backend="nccl" if cuda else "gloo", timeout=timedelta(hours=2), device_id=device if cuda else None)
        if init_method is None:  # torchrun: MASTER_ADDR/PORT in the environment
            dist.init_process_group(**kw)
        else:
            dist.init_process_group(init_method=init_method, rank=rank, world_size=world, **kw)
    barrier = dist.barrier if world > 1 else None
    try:
        pipe = load_pipeline(cfg, device)
        rows: List[dict] = []
        base_image = base_time = None
        if cfg.baseline:
            if barrier is not None:
                barrier()  # the other ranks are idle (not still loading) while rank 0 runs the baseline
            if rank == 0:  # one device: the whole CPU, as a single-device user would run it
                if not cuda:
                    torch.set_num_threads(cfg.cores)
                base_image, base_time = _timed(pipe, cfg, device, "baseline", show=True)
                if not cuda:
                    torch.set_num_threads(threads)
                rows.append(_row(cfg, "Baseline (diffusers)", base_time, base_time, 0.0, degrees=(1, 1),
                                 ranks=(1, cfg.cores if not cuda else None)))
                rows[-1]["vae_parallel"] = False
            if barrier is not None:
                barrier()
        from spattn.integrations.diffusers import parallelize_pipeline

        mesh = spattn.init_mesh(ulysses_degree=cfg.ulysses_degree, ring_degree=cfg.ring_degree,
                                cfg_degree=cfg.cfg_degree)
        # CFG halves too, when cfg_degree 2; the VAE decoded by every SP rank when supported (handle.vae)
        handle = parallelize_pipeline(pipe, mesh, backend=cfg.backend, vae=cfg.vae_parallel)
        vae_handle = handle.vae
        try:
            desc = f"ulysses {cfg.ulysses_degree} x ring {cfg.ring_degree}"
            if cfg.cfg_degree > 1:
                desc = f"cfg {cfg.cfg_degree} x {desc}"
            # Parallel VAE: every rank decodes its band. Otherwise only rank 0 needs the image: on CPU
            # the other ranks skip the VAE decode (on GPUs each rank would decode on its own device at no
            # cost to rank 0; here they would share its cores) and rank 0 decodes on all cores.
            cpu = not cuda and world > 1 and vae_handle is None
            with warnings.catch_warnings():   # a CFG mesh without guidance: said once below, not per rank
                warnings.filterwarnings("ignore", message="spattn CFG parallel")
                image, seconds = _timed(pipe, cfg, device, desc, show=rank == 0, barrier=barrier,
                                        decode=rank == 0 or not cpu,
                                        decode_threads=cfg.cores if cpu and rank == 0 else None)
            idle = handle.last_run.idle_fraction if handle.last_run is not None else 0.0
        finally:
            handle.remove()   # the VAE's patches too
        if rank == 0:
            diff = None if base_image is None else float(abs(image.astype("float64") - base_image).max())
            rows.append(_row(cfg, configuration_name(cfg.ulysses_degree, cfg.ring_degree, cfg.cfg_degree),
                             seconds, base_time, diff, degrees=(cfg.ulysses_degree, cfg.ring_degree),
                             ranks=(world, threads if not cuda else None)))
            rows[-1].update(cfg_degree=cfg.cfg_degree, idle_fraction=idle, vae_parallel=vae_handle is not None)
            _report(cfg, rows, image, device, world, threads)
        if barrier is not None:
            barrier()
    finally:
        if own_group:
            dist.destroy_process_group()


def _row(cfg: Config, name: str, seconds: float, base_time: Optional[float], diff: Optional[float],
         degrees: Tuple[int, int], ranks: Tuple[int, Optional[int]]) -> dict:
    """One row of the table and the JSON: ``degrees`` (Ulysses, ring), ``ranks`` (world, threads per rank)."""
    return {
        "configuration": name, "ulysses_degree": degrees[0], "ring_degree": degrees[1], "time_s": round(seconds, 4),
        "speedup": None if base_time is None else round(base_time / seconds, 4), "max_abs_diff": diff,
        "ranks": ranks[0], "threads_per_rank": ranks[1], "model": cfg.model_label, "width": cfg.width,
        "height": cfg.height, "num_inference_steps": cfg.num_inference_steps, "dtype": cfg.dtype,
        "backend": cfg.backend, "seed": cfg.seed, "cfg_degree": 1, "idle_fraction": 0.0,
        "negative_prompt": cfg.negative_prompt, "true_cfg_scale": cfg.true_cfg_scale,
    }


def _device_label(device, world: int, threads: int, cores: int) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} x {world} (NCCL)"
    return f"CPU, {cores} cores, {world} gloo ranks x {threads} threads"


def format_table(rows: List[dict]) -> str:
    """The guide's benchmark table plus the deviation column."""
    cfg_col = any(row.get("cfg_degree", 1) > 1 for row in rows)   # the guide's columns unless CFG parallel ran
    head = "| Configuration |" + (" CFG degree |" if cfg_col else "") + \
        " Ulysses degree | Ring degree | Generation Time | Speedup | Max deviation |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for row in rows:
        base = row["configuration"].startswith("Baseline")
        u = "-" if base else str(row["ulysses_degree"])
        r = "-" if base else str(row["ring_degree"])
        c = f" {'-' if base else row.get('cfg_degree', 1)} |" if cfg_col else ""
        sp = "-" if row["speedup"] is None else f"{row['speedup']:.2f}x"
        dev = "-" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.1e}"
        lines.append(f"| {row['configuration']} |{c} {u} | {r} | {row['time_s']:.2f}s | {sp} | {dev} |")
    return "\n".join(lines)


def _report(cfg: Config, rows: List[dict], image, device, world: int, threads: int) -> None:
    import numpy as np
    from PIL import Image

    if cfg.num_frames is not None:
        from diffusers.utils import export_to_video

        export_to_video(list(np.clip(image, 0, 1)), cfg.output, fps=cfg.fps)
    else:
        Image.fromarray((np.clip(image, 0, 1) * 255).round().astype("uint8")).save(cfg.output, format="PNG")
    frames = "" if cfg.num_frames is None else f" x {cfg.num_frames} frames"
    print(f"\n{cfg.model_label} ({cfg.pipeline_class}), {cfg.width}x{cfg.height}{frames}, {cfg.num_inference_steps} steps, "
          f"{cfg.dtype}, backend {cfg.backend}, seed {cfg.seed}; {_device_label(device, world, threads, cfg.cores)}")
    if cfg.negative_prompt is not None:
        print(f"guidance: true CFG {cfg.true_cfg_scale:g}, negative prompt {cfg.negative_prompt!r}")
    print(format_table(rows))
    if rows and rows[-1].get("idle_fraction"):
        print(f"Note: no classifier-free guidance in this request, so the {cfg.cfg_degree} CFG halves repeated the "
              f"same work: {rows[-1]['idle_fraction']:.0%} of the ranks were idle (add --negative-prompt, or drop "
              f"--cfg-degree).")
    print("Max deviation: largest |pixel difference| (values in [0, 1]) from the single-device image.")
    if rows and rows[-1].get("vae_parallel"):
        print(f"VAE decode: patch-parallel, every rank decodes a band of rows ({world} ranks; --no-vae-parallel "
              f"to decode on one)")
    print(f"{'video' if cfg.num_frames is not None else 'image'}: {cfg.output}")
    if cfg.json_path:
        Path(cfg.json_path).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"rows: {cfg.json_path}")
    if device.type == "cpu":
        print(f"Note: on CPU all {world} ranks share the same {cfg.cores} cores (the baseline uses all of them), so "
              "this table shows exactness and overhead, not GPU speedups; `spattn plan` predicts GPU times "
              "(e.g. spattn plan --model qwen-image --width 2048 --height 2048 --gpus 4 --hardware h100).")
    sys.stdout.flush()


def _spawned(rank: int, world: int, init_method: str, cfg: Config) -> None:
    rank_main(rank, world, cfg, init_method)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = validate(args)
    except UsageError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank finds it: say it once
            print(f"spattn generate: error: {e}", file=sys.stderr)
        return 2
    launched = _launched_world()
    if launched is not None:
        rank_main(int(os.environ["RANK"]), launched, cfg, None)
    elif cfg.world == 1:
        rank_main(0, 1, cfg, None)
    else:
        import torch

        from spattn.launch import run_ranks

        env = {}
        if not torch.cuda.is_available() and "OMP_WAIT_POLICY" not in os.environ:
            # The ranks share the cores: OpenMP threads spinning while they wait would steal them from
            # the other ranks (and from the baseline). The children read this at their torch import.
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        # SIGINT/SIGTERM (or Ctrl-C to the group) stops the ranks at once with one line; a failed
        # rank is named with its traceback.
        return run_ranks(_spawned, cfg.world, (cfg,), prog="spattn generate", env=env)
    return 0
