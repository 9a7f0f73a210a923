"""Local ranks: free ports, N spawned processes, and a teardown that leaves none behind.

The one launcher for everything that starts ranks on this machine (the CLI, the engine, benchmarks,
tests), so ports, environment, failure reports and clean-up are written once:

    with LocalRanks(rank_main, world=4, args=(cfg,)) as ranks:   # rank_main(rank, world, init_method, cfg)
        rows = ranks.wait()         # rank 0's return value; raises RankFailed naming a failed rank

    sys.exit(run_ranks(rank_main, 4, (cfg,), prog="spattn x"))  # a command: Ctrl-C/SIGTERM -> one line

Children never outlive the launcher: each asks the kernel to kill it when its parent dies
(``PR_SET_PDEATHSIG`` on Linux), ignores SIGINT (Ctrl-C to the terminal's process group reaches the
launcher alone, which tears the ranks down once instead of printing N tracebacks), and ``close()``
(also on ``__exit__``) sends SIGTERM, then SIGKILL after a grace period.
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

__all__ = ["free_port", "local_init_method", "LocalRanks", "RankFailed", "init_rank", "run_ranks",
           "signals_as_exit"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_init_method() -> str:
    """A ``tcp://127.0.0.1:PORT`` init method for ``torch.distributed.init_process_group``."""
    return f"tcp://127.0.0.1:{free_port()}"


def init_rank(rank: int, world: int, init_method: Optional[str], *, backend: Optional[str] = None,
              timeout_s: float = 600.0, threads: Optional[int] = None):
    """Initialize ``torch.distributed`` for one local rank; returns its device.

    NCCL with one GPU per rank when there are enough GPUs, else gloo on CPU with the cores shared
    (``threads`` per rank, default cores // world). ``init_method=None`` reads torchrun's environment.
    """
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    use_cuda = backend != "gloo" and torch.cuda.is_available() and torch.cuda.device_count() >= world
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world))
    kw = {} if init_method is None else {"init_method": init_method, "rank": rank, "world_size": world}
    if use_cuda:
        kw["device_id"] = device  # NCCL binds its communicator to this GPU up front
    dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), timeout=timedelta(seconds=timeout_s), **kw)
    return device


class RankFailed(RuntimeError):
    """A local rank raised or died; ``rank`` names it, the message holds its traceback."""

    def __init__(self, rank: int, message: str):
        super().__init__(message)
        self.rank = rank


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except OSError:  # best effort: close() still kills the ranks
            pass
    if os.getppid() != parent:  # the launcher died while we were starting, before prctl could see it
        os._exit(1)


def _child(fn: Callable, rank: int, world: int, init_method: str, args: tuple, queues, parent: int) -> None:
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher owns Ctrl-C
    errors, results = queues
    try:
        out = fn(rank, world, init_method, *args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise SystemExit(1)
    if rank == 0 and out is not None:
        results.put(out)  # read by the launcher while it waits (a large one would block otherwise)


def _set_sigint(handler):
    """Install a SIGINT handler; returns the previous one, or None off the main thread (where Python
    cannot change handlers and nothing is changed)."""
    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:
        return None


class LocalRanks:
    """``world`` processes (spawn context) each running ``fn(rank, world, init_method, *args)``.

    ``fn`` and ``args`` must be picklable (module-level). ``env`` entries are set for the children
    only (they are read at the children's imports, before ``fn`` runs). What rank 0's ``fn`` returns
    (if not None) is ``wait()``'s value: it travels pickled, so return plain data (numpy, not
    tensors, whose shared memory dies with the rank).
    """

    def __init__(self, fn: Callable, world: int, args: Sequence = (), *, env: Optional[Dict[str, str]] = None,
                 init_method: Optional[str] = None):
        ctx = mp.get_context("spawn")
        self.world = world
        self.init_method = init_method or local_init_method()
        self._errors, self._results = ctx.SimpleQueue(), ctx.SimpleQueue()
        self.result: Any = None
        queues = (self._errors, self._results)
        self.procs: List[mp.Process] = [
            ctx.Process(target=_child, args=(fn, r, world, self.init_method, tuple(args), queues, os.getpid()),
                        daemon=True)
            for r in range(world)]
        saved = {k: os.environ.get(k) for k in (env or {})}
        # Children are born ignoring SIGINT (an ignored disposition survives exec): a Ctrl-C to the
        # process group while a child is still importing would otherwise print its traceback.
        old_int = _set_sigint(signal.SIG_IGN)
        try:
            os.environ.update(env or {})
            for p in self.procs:
                p.start()
        except BaseException:
            self.close()  # never leave half a world running
            raise
        finally:
            if old_int is not None:
                _set_sigint(old_int)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    @property
    def pids(self) -> List[int]:
        return [p.pid for p in self.procs]

    def dead(self) -> List[int]:
        """Ranks that have exited (cleanly or not)."""
        return [r for r, p in enumerate(self.procs) if not p.is_alive()]

    def failure(self) -> Optional[RankFailed]:
        """The first failure so far (a raised exception, or an exit that was not clean), else None."""
        if not self._errors.empty():
            rank, tb = self._errors.get()
            return RankFailed(rank, f"rank {rank} failed:\n{tb}")
        for r, p in enumerate(self.procs):
            if p.exitcode not in (None, 0):
                how = f"signal {-p.exitcode}" if p.exitcode < 0 else f"exit code {p.exitcode}"
                return RankFailed(r, f"rank {r} (pid {p.pid}) died ({how})")
        return None

    def wait(self, timeout: Optional[float] = None, poll_s: float = 0.05) -> Any:
        """Until every rank exits; returns rank 0's return value. Raises ``RankFailed`` as soon as one
        fails (the others are then torn down) and ``TimeoutError`` past ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while not self._results.empty():
                self.result = self._results.get()
            err = self.failure()
            if err is not None:
                self.close()
                raise err
            if all(p.exitcode is not None for p in self.procs):
                while not self._results.empty():
                    self.result = self._results.get()
                return self.result
            if deadline is not None and time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"{self.world} local ranks did not finish within {timeout:.0f}s")
            time.sleep(poll_s)

    def close(self, grace_s: float = 2.0) -> None:
        """SIGTERM every live rank, SIGKILL what is left after ``grace_s``; idempotent."""
        for p in self.procs:
            if p.pid is not None and p.is_alive():
                p.terminate()
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            if p.pid is None:  # never started
                continue
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout=1.0)

    def __enter__(self) -> "LocalRanks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextmanager
def signals_as_exit() -> Iterator[None]:
    """Within the block, SIGTERM raises ``KeyboardInterrupt`` like SIGINT does, so one ``except
    KeyboardInterrupt`` (and the ``with LocalRanks`` around it) handles both."""
    def _raise(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_ranks(fn: Callable, world: int, args: Sequence = (), *, prog: str, env: Optional[Dict[str, str]] = None,
              timeout: Optional[float] = None) -> int:
    """Run ``LocalRanks(fn, world, args, env=env)`` to the end as a command does; returns its exit code.

    0 when every rank exits cleanly. A failed rank: ``PROG: rank R failed:`` and its traceback on
    stderr, the others torn down, 1. SIGINT or SIGTERM to this process (or Ctrl-C to its process
    group, which the ranks ignore): the ranks are killed at once and ONE line is printed,
    ``PROG: interrupted (SIGINT); stopped N local ranks``, exit code 128 + the signal number.
    """
    ranks: Optional[LocalRanks] = None
    try:
        with signals_as_exit():
            ranks = LocalRanks(fn, world, args, env=env)
            ranks.wait(timeout)
        return 0
    except KeyboardInterrupt as e:
        # A second signal while tearing down must not interrupt the teardown (nor print a traceback).
        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, signal.SIG_IGN)
            except ValueError:  # not the main thread: nothing to shield
                pass
        try:
            if ranks is not None:
                ranks.close(grace_s=0.5)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        name = e.args[0] if e.args else "SIGINT"
        print(f"{prog}: interrupted ({name}); stopped {world} local ranks", file=sys.stderr, flush=True)
        return 128 + int(getattr(signal, name, signal.SIGINT))
    except RankFailed as e:
        print(f"{prog}: {e}", file=sys.stderr, flush=True)
        return 1
    except TimeoutError as e:
        print(f"{prog}: {e}", file=sys.stderr, flush=True)
        return 1
