"""Ranks that ran an attn_implementation="spattn" forward (ring engine and all) and called
destroy_process_group exit cleanly: exit code 0 and no ``terminate called`` abort, run after run.

The abort was timing-dependent (about 1 run in 4), so the script runs several times as fresh
processes: SPATTN_EXIT_RUNS (default 3) pairs of ranks per mode; the 30-run measurement sets it to 30.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from spattn.launch import free_port  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "exit_rank.py")
RUNS = int(os.environ.get("SPATTN_EXIT_RUNS", "3"))


def run_pair(ulysses: int, mode: str) -> list:
    """(exit code, stderr) of both ranks of one run."""
    port = str(free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, SCRIPT, str(r), "2", port, str(ulysses), mode], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(2)]
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        out.append((p.returncode, err))
    return out


@pytest.mark.parametrize("ulysses,mode", [(1, "fwd"), (2, "train")], ids=["ring-forward", "ulysses-train"])
def test_clean_exit_after_spattn_forward(ulysses, mode):
    failures = []
    for i in range(RUNS):
        for rank, (code, err) in enumerate(run_pair(ulysses, mode)):
            if code != 0 or "terminate called" in err:
                failures.append(f"run {i} rank {rank}: exit code {code}\n{err[-2000:]}")
    assert not failures, f"{len(failures)} unclean exits in {RUNS} runs:\n" + "\n".join(failures[:3])
