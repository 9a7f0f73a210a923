"""``spattn.Engine``: a sequence-parallel diffusers pipeline kept loaded on its ranks, serving requests.

    with Engine("tiny-qwen-image", ulysses_degree=2) as engine:          # ranks start once
        outs = engine.generate(["a cat", "a dog"], SamplingParams(width=512, height=512, seed=0))

The driver (this process) queues requests, batches compatible ones (``max_batch_size``) and posts each
batch as one job on the host channel; every rank runs it, rank 0 posts the result. A watchdog turns a
dead rank into ``EngineDeadError`` for every in-flight and later request (within a second or two); a
rank that raised while the others sat in a collective makes the driver restart the ranks (spawned
engines) so the next request is served. ``close()`` (also on exit, Ctrl-C, SIGTERM via the launcher's
handling) leaves no rank behind: the ranks die with the driver.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
import uuid
from collections import deque
from typing import Any, Deque, Dict, List, Mapping, Optional, Sequence, Union

from .channel import Channel, ChannelClosed
from .params import (EngineBusyError, EngineDeadError, GenerationOutput, RequestCancelled, RequestFailed,
                     SamplingParams, batch_key, resolve_params)
from .pipelines import ModelInfo, resolve_model
from .worker import WorkerSpec, serve_rank, spawned_rank

MAX_CPU_RANKS = 8
DTYPES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("auto", "torch", "triton", "reference")
DESYNC_GRACE_S = 5.0     # a rank failed; the others did not finish within this: they are stuck in a collective
HEARTBEAT_DEAD_S = 6.0   # torchrun ranks: no heartbeat for this long means dead
ParamsLike = Union[SamplingParams, Mapping[str, Any], None]


class Request:
    """One submitted prompt: ``result()`` waits for its ``GenerationOutput``; ``cancel()`` stops it at the
    next denoising step. ``status``: queued | in_progress | completed | failed | cancelled."""

    def __init__(self, prompt: str, params: SamplingParams, resolved: Dict[str, Any]):
        self.request_id = f"req-{uuid.uuid4().hex}"
        self.prompt = prompt
        self.params = params
        self.resolved = resolved
        self.status = "queued"
        self.steps_done = 0
        self.batch_size = 0
        self.submitted = time.monotonic()
        self.started: Optional[float] = None
        self._done = threading.Event()
        self._output: Optional[GenerationOutput] = None
        self._error: Optional[BaseException] = None
        self._cancel = False

    @property
    def progress(self) -> float:
        """Fraction of denoising steps done, 0..1."""
        return 1.0 if self.status == "completed" else self.steps_done / self.resolved["num_inference_steps"]

    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Ask the engine to drop this request (queued: at once; running: at the next step end)."""
        self._cancel = True

    def result(self, timeout: Optional[float] = None) -> GenerationOutput:
        """The output; raises ``RequestFailed``, ``RequestCancelled``, ``EngineDeadError`` or ``TimeoutError``."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout}s")
        if self._error is not None:
            raise self._error
        assert self._output is not None
        return self._output

    def _finish(self, status: str, output: Optional[GenerationOutput] = None,
                error: Optional[BaseException] = None) -> None:
        if self._done.is_set():
            return
        self.status, self._output, self._error = status, output, error
        self._done.set()


def _launched() -> Optional[tuple]:
    """(rank, world) under torchrun (RANK/WORLD_SIZE set), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


class Engine:
    """A pipeline loaded once on ``cfg_degree x ulysses_degree x ring_degree`` ranks, serving ``generate`` calls.

    Args:
        model: a built-in tiny pipeline (tiny-qwen-image, tiny-flux, tiny-wan), a local diffusers
            directory or a cached hub id (as ``spattn generate --model``).
        ulysses_degree, ring_degree: the sequence-parallel mesh. Spawned here
            (gloo on CPU, NCCL with one GPU each) unless under torchrun, where rank 0 drives and the
            other ranks serve inside ``Engine(...)`` until rank 0 closes it (``engine.is_driver``).
        cfg_degree: 2 runs the two classifier-free guidance branches (Qwen-Image ``negative_prompt`` /
            ``true_cfg_scale``, Wan ``guidance_scale``) at the same time on two halves of the ranks,
            each half ``ulysses x ring``; ranks = cfg x ulysses x ring. A request without guidance
            still runs (both halves repeat it): its ``metrics["idle_fraction"]`` is 0.5.
        vae_parallel: decode with every rank (exact patch-parallel VAE, each CFG branch over its own
            ranks) when the model's VAE is supported; False decodes on rank 0 alone (as
            ``spattn generate --no-vae-parallel``).
        backend, dtype: as ``spattn generate`` (dtype "auto": bfloat16 on GPU, float32 on CPU).
        max_batch_size: compatible queued requests (same size, steps, guidance) run as one pipeline call.
        max_queue: queued requests beyond this raise ``EngineBusyError`` (None: unbounded).
        startup_timeout_s: loading longer than this is an error.
    """

    def __init__(self, model: str, *, ulysses_degree: int = 1, ring_degree: int = 1, cfg_degree: int = 1,
                 backend: str = "auto", dtype: str = "auto", vae_parallel: bool = True, max_batch_size: int = 1,
                 max_queue: Optional[int] = None, startup_timeout_s: float = 900.0):
        import torch

        for name, v in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree),
                        ("cfg_degree", cfg_degree), ("max_batch_size", max_batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if cfg_degree > 2:
            raise ValueError(f"cfg_degree: {cfg_degree}, but classifier-free guidance has two branches; use "
                             f"cfg_degree=2 and give the other ranks to ulysses_degree / ring_degree")
        if not isinstance(vae_parallel, bool):
            raise ValueError(f"vae_parallel: expected True or False, got {vae_parallel!r}")
        if max_queue is not None and (not isinstance(max_queue, int) or max_queue < 1):
            raise ValueError(f"max_queue: expected a positive integer or None, got {max_queue!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
        self.info: ModelInfo = resolve_model(model)
        world = cfg_degree * ulysses_degree * ring_degree
        cuda = torch.cuda.is_available()
        launched = _launched()
        degrees = f"ulysses_degree {ulysses_degree} x ring_degree {ring_degree} = {world} ranks"
        if cfg_degree > 1:
            degrees = f"cfg_degree {cfg_degree} x {degrees}"
        if launched is not None and launched[1] != world:
            raise ValueError(f"{degrees}, but the launcher started {launched[1]}; pick degrees whose product is "
                             f"{launched[1]}")
        if launched is None and cuda and world > torch.cuda.device_count():
            raise ValueError(f"{degrees}, but only {torch.cuda.device_count()} GPUs are visible; lower the degrees")
        if launched is None and not cuda and world > MAX_CPU_RANKS:
            raise ValueError(f"{degrees}: at most {MAX_CPU_RANKS} local CPU ranks; lower the degrees")
        self.dtype = dtype if dtype != "auto" else ("bfloat16" if cuda else "float32")
        if self.dtype == "float16" and not cuda:
            raise ValueError("dtype: float16 needs a GPU; use bfloat16 or float32 on CPU")
        if backend == "triton" and not cuda:
            raise ValueError("backend: triton needs a CUDA GPU; use auto (torch on CPU)")
        self.model, self.world = model, world
        self.ulysses_degree, self.ring_degree, self.backend = ulysses_degree, ring_degree, backend
        self.cfg_degree, self.vae_parallel = cfg_degree, vae_parallel
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.startup_timeout_s = startup_timeout_s
        self.is_driver = launched is None or launched[0] == 0
        self._cv = threading.Condition()
        self._queue: Deque[Request] = deque()
        self._running: List[Request] = []
        self._closed = False
        self._dead: Optional[EngineDeadError] = None
        self._state = "loading"
        self._ranks = None            # LocalRanks (spawned) or None (torchrun)
        self._local_worker: Optional[threading.Thread] = None
        self._pids: List[int] = []
        self._generation = itertools.count()
        self._exec_s: Deque[float] = deque(maxlen=20)
        self.counters = {"completed": 0, "failed": 0, "cancelled": 0, "rejected": 0}
        if launched is None:
            self._channel = Channel("127.0.0.1", 0, is_master=True)
            self._start_spawned()
        else:
            self._start_launched(*launched)
            if not self.is_driver:
                return
        self._scheduler = threading.Thread(target=self._schedule_loop, name="spattn-engine-scheduler", daemon=True)
        self._scheduler.start()
        self._watchdog = threading.Thread(target=self._watch_loop, name="spattn-engine-watchdog", daemon=True)
        self._watchdog.start()

    # ------------------------------------------------------------------------------------ ranks
    def _spec(self, host: str) -> WorkerSpec:
        import torch

        cuda = torch.cuda.is_available()
        threads = None if cuda else max(1, (os.cpu_count() or 1) // self.world)
        self._prefix = f"g{next(self._generation)}"
        return WorkerSpec(self.info.path, self.dtype, self.backend, self.ulysses_degree, self.ring_degree,
                          host, self._channel.port, self._prefix, threads, cfg_degree=self.cfg_degree,
                          vae_parallel=self.vae_parallel)

    def _start_spawned(self) -> None:
        import torch

        from spattn.launch import LocalRanks

        spec = self._spec("127.0.0.1")
        # CPU ranks share the cores: spinning OpenMP threads would steal them (read at the children's import).
        env = {} if torch.cuda.is_available() else {"OMP_WAIT_POLICY": "PASSIVE"}
        self._seq = 0
        box: Dict[str, Any] = {}
        started, stop = threading.Event(), threading.Event()

        def keeper() -> None:
            # PR_SET_PDEATHSIG fires when the *thread* that spawned a child exits, so the spawning thread
            # lives as long as its ranks (Engine may be built in a short-lived thread, e.g. a server's loader).
            try:
                box["ranks"] = LocalRanks(spawned_rank, self.world, args=(spec,), env=env)
            except BaseException as e:  # noqa: BLE001 - re-raised in the constructing thread
                box["error"] = e
            started.set()
            stop.wait()

        threading.Thread(target=keeper, name="spattn-engine-ranks", daemon=True).start()
        started.wait()
        if "error" in box:
            raise box["error"]
        self._ranks, self._keeper_stop = box["ranks"], stop
        try:
            self._wait_ready()
        except BaseException:
            self._close_ranks()
            raise

    def _close_ranks(self) -> None:
        self._ranks.close()
        self._keeper_stop.set()

    def _start_launched(self, rank: int, world: int) -> None:
        """Under torchrun: rank 0 hosts the channel (its port broadcast once) and runs its rank in a thread."""
        import torch.distributed as dist

        from spattn.launch import init_rank

        device = init_rank(rank, world, None, timeout_s=900.0) if not dist.is_initialized() else None
        if device is None:
            import torch

            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
                else torch.device("cpu")
        port = [None]
        if rank == 0:
            self._channel = Channel("0.0.0.0", 0, is_master=True)
            port = [self._channel.port]
        dist.broadcast_object_list(port, src=0)
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        if rank != 0:
            self._channel = Channel(host, port[0])
        spec = self._spec(host)
        self._seq = 0
        if rank != 0:  # serve until rank 0 closes the engine
            serve_rank(rank, world, device, spec)
            self._closed, self._state = True, "closed"
            return
        self._local_worker = threading.Thread(target=serve_rank, args=(0, world, device, spec),
                                              name="spattn-engine-rank0", daemon=True)
        self._local_worker.start()
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        pids = {}
        while len(pids) < self.world:
            failure = self._rank_failure()
            if failure is not None:
                raise RuntimeError(f"spattn.Engine({self.model!r}) failed to start: {failure}")
            for r in range(self.world):
                if r not in pids and self._channel.has(f"{self._prefix}/ready/{r}"):
                    pids[r] = self._channel.get(f"{self._prefix}/ready/{r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"spattn.Engine({self.model!r}): ranks not ready after "
                                   f"{self.startup_timeout_s:.0f}s")
            time.sleep(0.05)
        self._pids = [pids[r] for r in range(self.world)]
        self._beats = {r: (0, time.monotonic()) for r in range(self.world)}
        self._state = "ok"

    def _rank_failure(self, heartbeats: bool = True) -> Optional[EngineDeadError]:
        """A dead rank, named; None while all live. ``heartbeats``: also check torchrun ranks' heartbeats
        (watchdog thread only: it owns that channel)."""
        if self._ranks is not None:
            f = self._ranks.failure()
            if f is None:
                dead = self._ranks.dead()
                if dead:
                    return EngineDeadError(f"rank {dead[0]} (pid {self._ranks.pids[dead[0]]}) exited", dead[0])
                return None
            lines = str(f).strip().splitlines()  # "rank r failed:" + the traceback's last line
            return EngineDeadError(" ".join(lines[:1] + lines[-1:]) if len(lines) > 1 else str(f), f.rank)
        if self._local_worker is not None and not self._local_worker.is_alive() and not self._closed:
            return EngineDeadError("rank 0's serving thread exited", 0)
        if heartbeats and self._state == "ok":  # torchrun ranks: heartbeats
            now = time.monotonic()
            for r in range(self.world):
                key = f"{self._prefix}/hb/{r}"
                n = self._watch_channel.count(key, 0)
                last_n, seen = self._beats[r]
                if n != last_n:
                    self._beats[r] = (n, now)
                elif now - seen > HEARTBEAT_DEAD_S:
                    return EngineDeadError(f"rank {r} (pid {self._pids[r]}) stopped answering "
                                           f"(no heartbeat for {now - seen:.0f}s)", r)
        return None

    def _watch_loop(self) -> None:
        self._watch_channel = Channel(self._channel.host if self._ranks is None else "127.0.0.1", self._channel.port)
        while not self._closed and self._dead is None:
            if self._state == "ok":
                failure = self._rank_failure()
                if failure is not None:
                    self._die(failure)
                    return
            time.sleep(0.2)

    def _die(self, error: EngineDeadError) -> None:
        """A rank is dead: fail everything in flight and queued, and every later request."""
        with self._cv:
            if self._dead is not None or self._closed:
                return
            self._dead, self._state = error, "dead"
            victims = list(self._running) + list(self._queue)
            self._queue.clear()
            self._cv.notify_all()
        for req in victims:
            req._finish("failed", error=EngineDeadError(f"spattn engine is dead: {error}", error.rank))
            self.counters["failed"] += 1
        if self._ranks is not None:  # the others may sit in a collective with the dead one: end them
            threading.Thread(target=self._close_ranks, daemon=True).start()

    # --------------------------------------------------------------------------------- requests
    def submit(self, prompt: str, params: ParamsLike = None) -> Request:
        """Queue one prompt; returns its ``Request`` at once. Bad fields raise ``ValueError`` here."""
        self._require_driver()
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt: expected a non-empty string, got {prompt!r}")
        if params is None:
            params = SamplingParams()
        elif isinstance(params, Mapping):
            params = SamplingParams.from_dict(params)
        req = Request(prompt, params, resolve_params(params, self.info))
        self._check_vae_rows(req.resolved["height"])
        with self._cv:
            self._raise_if_unusable()
            if self.max_queue is not None and len(self._queue) >= self.max_queue:
                self.counters["rejected"] += 1
                raise EngineBusyError(f"queue full ({self.max_queue} requests waiting); retry later",
                                      retry_after_s=self.retry_after_s())
            self._queue.append(req)
            self._cv.notify_all()
        return req

    def generate(self, prompts: Union[str, Sequence[str]],
                 sampling_params: Union[ParamsLike, Sequence[ParamsLike]] = None,
                 timeout: Optional[float] = None) -> List[GenerationOutput]:
        """Generate for each prompt (one ``SamplingParams`` for all, or one per prompt); thread-safe.
        Returns the outputs in prompt order; raises the first failure (``RequestFailed``,
        ``EngineDeadError``, ...) after cancelling the rest."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"sampling_params: {len(sampling_params)} given for {len(prompts)} prompts")
            per = list(sampling_params)
        else:
            per = [sampling_params] * len(prompts)
        reqs: List[Request] = []
        try:
            for p, sp in zip(prompts, per):
                reqs.append(self.submit(p, sp))
            return [r.result(timeout) for r in reqs]
        except BaseException:
            for r in reqs:
                r.cancel()
            raise

    def _check_vae_rows(self, height: int) -> None:
        """The parallel VAE gives each SP rank at least one latent row: refuse a smaller image here, not
        on the ranks (``spattn generate`` instead turns the parallel VAE off for it by default)."""
        sp = self.ulysses_degree * self.ring_degree
        rows = height // (self.info.spatial_multiple // 2)
        if self.vae_parallel and sp > 1 and rows < sp:
            raise ValueError(f"height: {height} gives {rows} latent rows, fewer than the {sp} ranks that decode "
                             f"each image; use height >= {sp * (self.info.spatial_multiple // 2)}, or an engine "
                             f"with vae_parallel=False (spattn serve --no-vae-parallel)")

    def _require_driver(self) -> None:
        if not self.is_driver:
            raise RuntimeError("this rank serves rank 0's requests; only rank 0 (engine.is_driver) submits")

    def _raise_if_unusable(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"spattn engine is dead: {self._dead}", self._dead.rank)
        if self._closed:
            raise EngineDeadError("spattn engine is closed")

    def retry_after_s(self) -> float:
        """A guess at when the queue has room: recent batch times x batches queued."""
        per = sum(self._exec_s) / len(self._exec_s) if self._exec_s else 1.0
        return max(1.0, per * (len(self._queue) / self.max_batch_size + 1))

    def stats(self) -> Dict[str, Any]:
        return {"queued": len(self._queue), "running": len(self._running), **self.counters}

    def health(self) -> Dict[str, Any]:
        """``{"status": loading|ok|dead|closed, "ranks": [{"rank", "pid", "alive"}], "error", "dead_rank"}``."""
        if self._ranks is not None:
            alive = [p.is_alive() for p in self._ranks.procs]
            pids = self._ranks.pids
        else:
            pids, alive = self._pids, [self._dead is None or self._dead.rank != r for r in range(self.world)]
        ranks = [{"rank": r, "pid": pid, "alive": a} for r, (pid, a) in enumerate(zip(pids, alive))]
        out: Dict[str, Any] = {"status": self._state, "model": self.model, "ranks": ranks,
                               "cfg_degree": self.cfg_degree, "ulysses_degree": self.ulysses_degree,
                               "ring_degree": self.ring_degree, "vae_parallel": self.vae_parallel, **self.stats()}
        if self._dead is not None:
            out["error"] = str(self._dead)
            out["dead_rank"] = self._dead.rank
        return out

    # -------------------------------------------------------------------------------- scheduling
    def _take_batch(self) -> List[Request]:
        """Under the lock: the oldest live request and up to max_batch_size - 1 compatible later ones."""
        for req in [r for r in self._queue if r._cancel]:
            self._queue.remove(req)
            req._finish("cancelled", error=RequestCancelled(f"request {req.request_id} cancelled"))
            self.counters["cancelled"] += 1
        if not self._queue:
            return []
        head = self._queue.popleft()
        batch, key = [head], batch_key(head.resolved)
        for req in list(self._queue):
            if len(batch) >= self.max_batch_size:
                break
            if batch_key(req.resolved) == key:
                self._queue.remove(req)
                batch.append(req)
        return batch

    def _schedule_loop(self) -> None:
        self._sched_channel = Channel(self._channel.host if self._ranks is None else "127.0.0.1", self._channel.port)
        while True:
            with self._cv:
                while not self._queue and not self._closed and self._dead is None:
                    self._cv.wait(0.5)
                if self._closed or self._dead is not None:
                    return
                batch = self._take_batch()
                if not batch:
                    continue
                self._running = batch
                now = time.monotonic()
                for req in batch:
                    req.status, req.started, req.batch_size = "in_progress", now, len(batch)
            try:
                self._run(batch)
            except ChannelClosed:
                return
            except Exception as e:  # noqa: BLE001 - a driver bug must fail the batch, never hang its callers
                for req in batch:
                    req._finish("failed", error=RequestFailed(f"engine driver error: {type(e).__name__}: {e}"))
            finally:
                with self._cv:
                    self._running = []

    def _run(self, batch: List[Request]) -> None:
        ch, self._seq = self._sched_channel, self._seq + 1
        seq, prefix = self._seq, self._prefix
        ch.put(f"{prefix}/job/{seq}", {"kind": "generate", "seq": seq, "requests": [
            {"id": r.request_id, "prompt": r.prompt, "params": r.resolved} for r in batch]})
        res_key, cancel_sent, failed_at = f"{prefix}/res/{seq}", False, None
        while True:
            if self._dead is not None or self._closed:
                return  # _die / close failed the batch
            if ch.has(res_key):
                res = ch.get(res_key)
                break
            if not cancel_sent and all(r._cancel for r in batch):
                ch.put(f"{prefix}/cancel/{seq}", 1)
                cancel_sent = True
            if ch.has(f"{prefix}/prog/{seq}"):
                steps = ch.get(f"{prefix}/prog/{seq}")
                for r in batch:
                    r.steps_done = steps
            failed = self._rank_errors(seq)
            if failed and failed_at is None:
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > DESYNC_GRACE_S:
                self._desync(batch, failed[0])
                return
            time.sleep(0.01)
        if res["status"] == "error":
            # A collective that failed because a peer died: the engine is dead, not just this request.
            time.sleep(0.2)
            failure = self._rank_failure(heartbeats=False)
            if failure is not None:
                self._die(failure)
                return
        self._deliver(batch, res)
        # Every rank must have left the job (none stuck in a collective) before the next one is posted.
        deadline = time.monotonic() + DESYNC_GRACE_S
        while True:
            done = [r for r in range(1, self.world) if ch.has(f"{prefix}/done/{seq}/{r}")]
            if len(done) == self.world - 1:
                break
            if self._dead is not None or self._closed:
                return
            if res["status"] != "ok" and time.monotonic() > deadline:
                self._desync([], f"rank 0: {res.get('message', res['status'])}")
                return
            time.sleep(0.005)
        ch.delete(f"{prefix}/job/{seq}", res_key, f"{prefix}/cancel/{seq}", f"{prefix}/prog/{seq}",
                  *[f"{prefix}/done/{seq}/{r}" for r in range(1, self.world)])

    def _rank_errors(self, seq: int) -> List[str]:
        out = []
        for r in range(1, self.world):
            key = f"{self._prefix}/done/{seq}/{r}"
            if self._sched_channel.has(key):
                status, msg = self._sched_channel.get(key)
                if status == "error":
                    out.append(msg)
        return out

    def _desync(self, batch: List[Request], message: str) -> None:
        """A rank raised while others sat in a collective: fail the batch, restart the ranks (spawned)."""
        for req in batch:
            req._finish("failed", error=RequestFailed(message))
            self.counters["failed"] += 1
        if self._ranks is None:  # torchrun ranks cannot be restarted from here
            self._die(EngineDeadError(f"ranks out of step after a failure ({message}); restart the job"))
            return
        self._state = "restarting"
        self._close_ranks()
        try:
            self._start_spawned()
        except BaseException as e:  # noqa: BLE001 - any start failure makes the engine dead
            self._state = "ok"
            self._die(EngineDeadError(f"restart after a rank failure failed: {e}"))

    def _deliver(self, batch: List[Request], res: Dict[str, Any]) -> None:
        from PIL import Image
        import numpy as np

        status = res["status"]
        if status == "ok":
            self._exec_s.append(res["exec_s"])
        for i, req in enumerate(batch):
            if status == "cancelled" or (status == "ok" and req._cancel):
                req._finish("cancelled", error=RequestCancelled(f"request {req.request_id} cancelled"))
                self.counters["cancelled"] += 1
                continue
            if status == "error":
                req._finish("failed", error=RequestFailed(res["message"]))
                self.counters["failed"] += 1
                continue
            array = res["arrays"][i]
            pil = [Image.fromarray((np.clip(a, 0, 1) * 255).round().astype("uint8")) for a in array]
            p = req.resolved
            out = GenerationOutput(
                request_id=req.request_id, prompt=req.prompt, seed=p["seed"],
                images=[] if self.info.is_video else pil, video=pil if self.info.is_video else None,
                array=array, fps=p["fps"],
                metrics={"queue_s": req.started - req.submitted, "exec_s": res["exec_s"],
                         "steps": p["num_inference_steps"], "peak_memory_bytes": res["peak_memory_bytes"],
                         "batch_size": len(batch), "cfg_degree": self.cfg_degree,
                         "cfg_parallel": bool(res.get("cfg")) and self.cfg_degree > 1,
                         "idle_fraction": res.get("idle_fraction", 0.0),
                         "vae_parallel": bool(res.get("vae_parallel"))})
            req.steps_done = p["num_inference_steps"]
            req._finish("completed", output=out)
            self.counters["completed"] += 1

    # ---------------------------------------------------------------------------------- closing
    def close(self, timeout_s: float = 10.0) -> None:
        """Fail queued and running requests, stop the ranks (SIGTERM, then SIGKILL); idempotent."""
        if not self.is_driver:
            return
        with self._cv:
            if self._closed:
                return
            self._closed = True
            if self._dead is None:
                self._state = "closed"
            victims = list(self._running) + list(self._queue)
            self._queue.clear()
            self._cv.notify_all()
        for req in victims:
            req._finish("failed", error=EngineDeadError("spattn engine closed before the request finished"))
        try:  # ranks stop after the job they run (spawned ranks running one are killed below instead)
            seq = self._seq + 1
            self._channel.put(f"{self._prefix}/job/{seq}", {"kind": "stop", "seq": seq})
        except RuntimeError:
            pass
        if self._ranks is not None:
            deadline = time.monotonic() + (1.0 if victims else timeout_s / 2)
            while self._ranks.dead() != list(range(self.world)) and time.monotonic() < deadline:
                time.sleep(0.05)
            self._close_ranks()
        elif self._local_worker is not None:
            self._local_worker.join(timeout_s)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # a forgotten engine must not leave ranks behind
        try:
            if getattr(self, "_ranks", None) is not None and not self._closed:
                self._close_ranks()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
