"""spattn.launch: the one local-rank launcher (ports, spawn, failures named, nothing left behind)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from spattn.launch import LocalRanks, RankFailed, free_port
from dist_harness import pid_alive


def _ok(rank, world, init_method, path):
    with open(f"{path}.{rank}", "w") as f:
        f.write(f"{rank}/{world} {init_method}")
    return {"rank": rank, "payload": list(range(100_000))}  # larger than a pipe's buffer


def _raise_on_1(rank, world, init_method):
    if rank == 1:
        raise ValueError("boom on one")
    time.sleep(60)


def _sleep(rank, world, init_method, ready_dir=None):
    if ready_dir:  # tell the test this rank is running (past its imports, death signal armed)
        open(os.path.join(ready_dir, str(rank)), "w").close()
    time.sleep(60)


def test_free_port_is_bindable():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))


def test_ranks_run_and_exit_cleanly(tmp_path):
    with LocalRanks(_ok, 3, args=(str(tmp_path / "r"),)) as ranks:
        out = ranks.wait(timeout=120)
    assert out["rank"] == 0 and out["payload"] == list(range(100_000))  # rank 0's return value
    got = sorted(p.read_text().split()[0] for p in tmp_path.iterdir())
    assert got == ["0/3", "1/3", "2/3"]


def test_failure_names_the_rank_and_tears_down_the_others():
    ranks = LocalRanks(_raise_on_1, 3)
    with pytest.raises(RankFailed, match="boom on one") as e:
        ranks.wait(timeout=60)
    assert e.value.rank == 1
    assert not any(p.is_alive() for p in ranks.procs)


@pytest.mark.parametrize("when", ["running", "starting"])
def test_children_die_with_the_launcher(when, tmp_path):
    # A launcher killed with SIGKILL cannot clean up: the kernel must take its ranks with it, both
    # once they run (the death signal) and while they still import (they see their parent gone).
    ready = str(tmp_path) if when == "running" else None
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from spattn.launch import LocalRanks
        from test_launch import _sleep
        r = LocalRanks(_sleep, 2, args=({ready!r},))
        print(*r.pids, flush=True)
        time.sleep(120)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pids = [int(x) for x in p.stdout.readline().split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 120  # a loaded machine can take a while to import torch twice
    while ready and len(os.listdir(ready)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=10)
    deadline = time.monotonic() + (10 if ready else 120)
    while time.monotonic() < deadline and any(pid_alive(pid) for pid in pids):
        time.sleep(0.1)
    assert not any(pid_alive(pid) for pid in pids)



def test_run_ranks_names_the_failed_rank_and_returns_1(capsys):
    from spattn.launch import run_ranks

    t0 = time.monotonic()
    assert run_ranks(_raise_on_1, 2, prog="spattn test") == 1
    assert time.monotonic() - t0 < 50  # rank 0 (sleeping 60 s) was torn down, not waited for
    err = capsys.readouterr().err
    assert err.startswith("spattn test: rank 1 failed:") and "ValueError: boom on one" in err
