"""Run a test body on N gloo ranks, reusing one pool of processes per world size for the session.

    from dist_harness import run_on_ranks
    result = run_on_ranks(4, my_module_level_fn, arg1, arg2)   # rank 0's return value

The function runs on every rank after ``torch.distributed`` is initialized (gloo, CPU, torch threads =
cores // N). The ranks are started, and reaped or killed, by ``spattn.launch.LocalRanks``: they die with
the test process and ignore the Ctrl-C that interrupts a test run. An exception on any rank fails the call with that rank's traceback; a call that does
not finish within ``timeout`` seconds fails too, and the pool is killed and rebuilt on the next call,
so a hang costs one test, never the CI run.
"""
from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import queue
import time
import traceback
from typing import Any, Callable, Dict, Optional

from spattn.launch import LocalRanks

# A collective stuck because another rank died gives up after this long instead of 30 minutes.
GLOO_TIMEOUT_S = float(os.environ.get("SPATTN_TEST_GLOO_TIMEOUT", "60"))
DEFAULT_TIMEOUT_S = float(os.environ.get("SPATTN_TEST_TIMEOUT", "180"))


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _worker(rank: int, world: int, init_method: str, tasks, results) -> None:
    import faulthandler

    from spattn.launch import init_rank

    faulthandler.enable()  # a crashing rank prints where it died instead of vanishing
    try:
        init_rank(rank, world, init_method, backend="gloo", timeout_s=GLOO_TIMEOUT_S)
        results.put((rank, "ready", None))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        return
    import torch.distributed as dist

    while True:
        item = tasks[rank].get()
        if item is None:
            break
        fn, args, kwargs = item
        try:
            results.put((rank, "ok", fn(*args, **kwargs)))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    """``world`` long-lived gloo ranks (started by spattn.launch.LocalRanks) that run one task at a time."""

    def __init__(self, world: int, start_timeout: float = 300.0):
        ctx = mp.get_context("spawn")
        self.world = world
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.ranks: Optional[LocalRanks] = LocalRanks(_worker, world, args=(self.tasks, self.results))
        self._collect("startup", start_timeout)

    @property
    def procs(self) -> list:
        return self.ranks.procs if self.ranks is not None else []

    def alive(self) -> bool:
        return bool(self.procs) and all(p.is_alive() for p in self.procs)

    def _collect(self, what: str, timeout: float) -> Dict[int, Any]:
        deadline = time.monotonic() + timeout
        got: Dict[int, Any] = {}
        errors: Dict[int, str] = {}
        first_error: Optional[float] = None
        while len(got) + len(errors) < self.world:
            if errors:  # after a failure, give the others a short grace period, not the full timeout
                deadline = min(deadline, first_error + 5.0)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:  # short waits: a rank that died (segfault, os._exit) fails the call at once
                rank, status, payload = self.results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r in range(self.world) if r not in got and r not in errors
                        and not self.procs[r].is_alive()]
                for r in dead:
                    errors[r] = f"rank {r} died (exit code {self.procs[r].exitcode}) without an answer\n"
                if dead and first_error is None:
                    first_error = time.monotonic()
                continue
            (errors if status == "error" else got)[rank] = payload
            if status == "error" and first_error is None:
                first_error = time.monotonic()
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
        """Ask the ranks to leave their process group, then let the launcher reap (or kill) them."""
        if self.ranks is None:
            return
        for t in self.tasks:
            try:
                t.put(None)
            except (ValueError, OSError):
                pass
        deadline = time.monotonic() + 2.0
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        self.ranks.close(grace_s=0.5)
        self.ranks = None


_POOLS: Dict[int, RankPool] = {}


def run_on_ranks(world: int, fn: Callable, *args, timeout: float = DEFAULT_TIMEOUT_S, **kwargs) -> Any:
    """Run module-level ``fn(*args, **kwargs)`` on ``world`` gloo ranks; return rank 0's result."""
    pool = _POOLS.get(world)
    if pool is None or not pool.alive():
        if pool is not None:
            pool.close()
        pool = _POOLS[world] = RankPool(world)
    return pool.run(fn, *args, timeout=timeout, **kwargs)


@atexit.register
def close_all() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
