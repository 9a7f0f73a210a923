"""Run a test body on N gloo ranks, reusing one pool of processes per world size for the session.

    from dist_harness import run_on_ranks
    result = run_on_ranks(4, my_module_level_fn, arg1, arg2)   # rank 0's return value

The function runs on every rank after ``torch.distributed`` is initialized (gloo, CPU, torch threads =
cores // N). An exception on any rank fails the call with that rank's traceback; a call that does
not finish within ``timeout`` seconds fails too, and the pool is killed and rebuilt on the next call,
so a hang costs one test, never the CI run.
"""
from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Dict

# A collective stuck because another rank died gives up after this long instead of 30 minutes.
GLOO_TIMEOUT_S = float(os.environ.get("SPATTN_TEST_GLOO_TIMEOUT", "60"))
DEFAULT_TIMEOUT_S = float(os.environ.get("SPATTN_TEST_TIMEOUT", "180"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tasks, results) -> None:
    import faulthandler

    import torch
    import torch.distributed as dist

    faulthandler.enable()  # a crashing rank prints where it died instead of vanishing
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=GLOO_TIMEOUT_S))
        results.put((rank, "ready", None))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        return
    while True:
        item = tasks.get()
        if item is None:
            break
        fn, args, kwargs = item
        try:
            results.put((rank, "ok", fn(*args, **kwargs)))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    def __init__(self, world: int, start_timeout: float = 300.0):
        ctx = mp.get_context("spawn")
        self.world = world
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world)]
        port = _free_port()
        self.procs = [ctx.Process(target=_worker, args=(r, world, port, self.tasks[r], self.results), daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()
        self._collect("startup", start_timeout)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def _collect(self, what: str, timeout: float) -> Dict[int, Any]:
        deadline = time.monotonic() + timeout
        got: Dict[int, Any] = {}
        errors: Dict[int, str] = {}
        while len(got) + len(errors) < self.world:
            # After a failure, give the others a short grace period, not the full timeout.
            left = deadline - time.monotonic()
            if errors:
                left = min(left, 5.0)
            if left <= 0:
                break
            try:
                rank, status, payload = self.results.get(timeout=left)
            except queue.Empty:
                break
            (errors if status == "error" else got)[rank] = payload
        if errors or len(got) < self.world:
            self.close()
            missing = sorted(set(range(self.world)) - set(got) - set(errors))
            msg = [f"{what} failed on {self.world} ranks"]
            msg += [f"--- rank {r} traceback ---\n{tb}" for r, tb in sorted(errors.items())]
            if missing:
                msg.append(f"ranks {missing} did not finish within {timeout:.0f}s "
                           f"(hung or waiting on a failed rank); pool killed")
            raise RuntimeError("\n".join(msg))
        return got

    def run(self, fn: Callable, *args, timeout: float = DEFAULT_TIMEOUT_S, **kwargs) -> Any:
        for t in self.tasks:
            t.put((fn, args, kwargs))
        return self._collect(getattr(fn, "__name__", "task"), timeout)[0]

    def close(self) -> None:
        for t in self.tasks:
            try:
                t.put(None)
            except (ValueError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
        self.procs = []


_POOLS: Dict[int, RankPool] = {}


def run_on_ranks(world: int, fn: Callable, *args, timeout: float = DEFAULT_TIMEOUT_S, **kwargs) -> Any:
    """Run module-level ``fn(*args, **kwargs)`` on ``world`` gloo ranks; return rank 0's result."""
    pool = _POOLS.get(world)
    if pool is None or not pool.procs or not pool.alive():
        if pool is not None:
            pool.close()
        pool = _POOLS[world] = RankPool(world)
    return pool.run(fn, *args, timeout=timeout, **kwargs)


@atexit.register
def close_all() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
