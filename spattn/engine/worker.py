"""The rank side of the engine: load and parallelize the pipeline once, then run each job the driver
posts on the channel (every rank the same request, same seeds), rank 0 posting the result.

Cancellation: at every denoising step end rank 0 reads the job's cancel key and broadcasts the flag to
all ranks (one tiny collective); all ranks then stop at the same step boundary, none inside a collective.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
import traceback
from typing import Any, Dict, List, Optional

from .channel import Channel, ChannelClosed

# Testing aid: "RANKS:WORD[;RANKS:WORD]" (RANKS "all" or "0,1") makes those ranks raise at the first step end
# of any request whose prompt contains WORD (a rank failing mid-request, on every rank or on some).
FAULT_ENV = "SPATTN_ENGINE_FAULT"
HEARTBEAT_S = 1.0


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What every rank needs (picklable)."""

    model: str
    dtype: str
    backend: str
    ulysses_degree: int
    ring_degree: int
    store_host: str
    store_port: int
    prefix: str                 # key namespace of this set of ranks (a restart gets a new one)
    threads: Optional[int]      # CPU threads per rank
    cfg_degree: int = 1         # 2: the two guidance branches on two halves of the ranks
    vae_parallel: bool = True   # decode with every SP rank when the VAE is supported


class _Cancelled(Exception):
    pass


def spawned_rank(rank: int, world: int, init_method: str, spec: WorkerSpec) -> None:
    """``LocalRanks`` target: one rank of a spawned engine."""
    import torch.distributed as dist

    from spattn.launch import init_rank

    # A long collective timeout: the driver never waits on a stuck rank (it restarts or kills them).
    device = init_rank(rank, world, init_method, timeout_s=900.0, threads=spec.threads)
    try:
        serve_rank(rank, world, device, spec)
    finally:
        dist.destroy_process_group()


def _heartbeat(spec: WorkerSpec, rank: int, stop: threading.Event) -> None:
    try:
        ch = Channel(spec.store_host, spec.store_port)
        while not stop.wait(HEARTBEAT_S):
            ch.count(f"{spec.prefix}/hb/{rank}")
    except RuntimeError:  # the driver left: the main loop notices and exits
        pass


def serve_rank(rank: int, world: int, device, spec: WorkerSpec) -> None:
    """Load, parallelize, report ready, then run jobs until a stop job or the driver's disappearance."""
    import spattn
    from spattn.integrations.diffusers import parallelize_pipeline

    from .pipelines import load_pipeline, quiet_libraries

    quiet_libraries()
    channel = Channel(spec.store_host, spec.store_port)
    pipe = load_pipeline(spec.model, spec.dtype, device)
    pipe.set_progress_bar_config(disable=True)
    handle = None
    if world > 1:   # world = cfg x ulysses x ring; the VAE decoded by each branch's SP ranks (handle.vae)
        mesh = spattn.init_mesh(ulysses_degree=spec.ulysses_degree, ring_degree=spec.ring_degree,
                                cfg_degree=spec.cfg_degree)
        handle = parallelize_pipeline(pipe, mesh, backend=spec.backend, vae=spec.vae_parallel)
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(spec, rank, stop), daemon=True).start()
    channel.put(f"{spec.prefix}/ready/{rank}", os.getpid())
    fault = os.environ.get(FAULT_ENV)
    try:
        seq = 0
        while True:
            seq += 1
            try:
                job = channel.poll(f"{spec.prefix}/job/{seq}")
            except ChannelClosed:
                return
            if job["kind"] == "stop":
                return
            status = _run_job(pipe, handle, job, (rank, world, device), channel, spec.prefix, fault)
            channel.put(f"{spec.prefix}/done/{seq}/{rank}", status)
    finally:
        stop.set()
        if handle is not None:
            handle.remove()


def _call_kwargs(pipe, reqs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One pipeline call for requests that share a batch key; one generator per image (seed, seed+1, ...)
    so that each image is the one its request gets alone."""
    import torch

    p = reqs[0]["params"]
    n = p["num_images_per_prompt"]
    kw: Dict[str, Any] = dict(
        prompt=[r["prompt"] for r in reqs], width=p["width"], height=p["height"],
        num_inference_steps=p["num_inference_steps"],
        generator=[torch.Generator("cpu").manual_seed(r["params"]["seed"] + j) for r in reqs for j in range(n)])
    if p["negative_prompt"] is not None:
        kw["negative_prompt"] = [r["params"]["negative_prompt"] for r in reqs]
    if p["guidance_scale"] is not None:
        kw["guidance_scale"] = p["guidance_scale"]
    if p["true_cfg_scale"] is not None:
        kw["true_cfg_scale"] = p["true_cfg_scale"]
    elif type(pipe).__name__ == "QwenImagePipeline" and p["negative_prompt"] is None:
        kw["true_cfg_scale"] = 1.0  # no negative prompt: plain conditional sampling (as spattn generate)
    if p["num_frames"] is not None:
        kw["num_frames"] = p["num_frames"]
    else:
        kw["num_images_per_prompt"] = n
    return kw


def _faulty(fault: Optional[str], rank: int, reqs: List[Dict[str, Any]]) -> bool:
    for spec in (fault or "").split(";"):
        if ":" in spec:
            ranks, word = spec.split(":", 1)
            if (ranks == "all" or str(rank) in ranks.split(",")) and any(word in r["prompt"] for r in reqs):
                return True
    return False


def _run_job(pipe, handle, job: Dict[str, Any], where: tuple, channel: Channel, prefix: str,
             fault: Optional[str]) -> tuple:
    """Run one batch on this rank (``where`` = (rank, world, device)); rank 0 posts ``res``. Returns this
    rank's status ("ok" | "cancelled" | "error", msg). ``handle``: the ``PipelineHandle`` (None: one rank)."""
    import warnings

    import torch
    import torch.distributed as dist

    rank, world, device = where

    seq, reqs = job["seq"], job["requests"]
    cancel_key, prog_key = f"{prefix}/cancel/{seq}", f"{prefix}/prog/{seq}"
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    inject = _faulty(fault, rank, reqs)

    def on_step_end(pipeline, i, t, tensors):
        if inject:
            raise RuntimeError(f"injected fault on rank {rank} at step {i + 1} ({FAULT_ENV})")
        if rank == 0:
            channel.put(prog_key, i + 1)
            flag.fill_(int(channel.has(cancel_key)))
        if world > 1:
            dist.broadcast(flag, src=0)  # every rank stops at this same step boundary, or none does
        if int(flag.item()):
            raise _Cancelled()
        return {}

    kw = _call_kwargs(pipe, reqs)
    # Only rank 0 returns images: the others skip the VAE decode, unless every rank decodes its band.
    vae_parallel = handle is not None and handle.vae is not None
    kw["output_type"] = "np" if rank == 0 or vae_parallel else "latent"
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():   # a CFG engine without guidance: reported as idle_fraction instead
            warnings.filterwarnings("ignore", message="spattn CFG parallel")
            out = pipe(callback_on_step_end=on_step_end, **kw)
    except _Cancelled:
        if rank == 0:
            channel.put(f"{prefix}/res/{seq}", {"status": "cancelled"})
        return ("cancelled", None)
    except Exception as e:  # the request fails alone; the rank keeps serving
        msg = f"rank {rank}: {type(e).__name__}: {e}"
        if rank == 0:
            channel.put(f"{prefix}/res/{seq}", {"status": "error", "message": msg,
                                                "traceback": traceback.format_exc()})
        return ("error", msg)
    exec_s = time.perf_counter() - t0
    if rank == 0:
        if cuda:
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        video = kw.get("num_frames") is not None
        arrays = out.frames if video else out.images
        n = 1 if video else kw["num_images_per_prompt"]
        per_request = [arrays[i] if video else arrays[i * n:(i + 1) * n] for i in range(len(reqs))]
        run = None if handle is None else handle.last_run
        channel.put(f"{prefix}/res/{seq}", {"status": "ok", "arrays": per_request, "exec_s": exec_s,
                                            "peak_memory_bytes": int(peak), "vae_parallel": vae_parallel,
                                            "idle_fraction": 0.0 if run is None else run.idle_fraction,
                                            "cfg": bool(run is not None and run.cfg)})
    return ("ok", None)
