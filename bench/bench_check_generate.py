"""What the cross-rank check costs a real job: `spattn generate` (its default run unless told otherwise)
with the check on and off, interleaved, medians of the generation times rank 0 reports.

    python bench/bench_check_generate.py --pairs 3                      # default run: 512x512, 20 steps
    python bench/bench_check_generate.py --pairs 3 -- --num-inference-steps 4 --width 256 --height 256
    python bench/bench_check_generate.py --in-process --pairs 20        # finer: one pair of ranks

Each run is a fresh `python -m spattn generate --no-baseline --json ...` with ``SPATTN_CHECK=1`` or
``0`` (runs alternate, so drift from other load hits both alike). Prints one row per run and the two
medians with their ratio; with ``--csv`` also writes the rows.

Fresh processes differ by more than the check costs (start-up, placement on the cores: single runs
spread by +-10% here). ``--in-process`` therefore also measures it inside one pair of ranks: the same
pipeline (generate's default run, or the flags after --), loaded once, parallelized over a mesh with
the check on or off in turn (``init_mesh(check=)``), each run warmed up by one step as generate does,
timed from a barrier; it adds the median of the paired differences (on minus off).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence


def _run(check: str, extra: Sequence[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "spattn", "generate", "--no-baseline", "--json", str(rows_path),
               "--output", str(Path(tmp) / "img.png"), *extra]
        env = {**os.environ, "SPATTN_CHECK": check}
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows = json.loads(rows_path.read_text())
        return float(rows[-1]["time_s"])


def _rank_ab(rank: int, world: int, init_method: str, cfg, pairs: int) -> Optional[list]:
    """One rank of the in-process A/B: [(check mode, seconds)] per run on rank 0."""
    import torch
    import torch.distributed as dist

    import spattn
    from spattn.cli import generate as gen
    from spattn.integrations.diffusers import parallelize_pipeline
    from spattn.launch import init_rank

    init_rank(rank, world, init_method, backend="gloo", timeout_s=600, threads=max(1, cfg.cores // world))
    gen._quiet_libraries()
    pipe = gen.load_pipeline(cfg, torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    runs = []
    for i in range(pairs):
        for check in ((1, 0) if i % 2 == 0 else (0, 1)):
            mesh = spattn.init_mesh(ulysses_degree=cfg.ulysses_degree, ring_degree=cfg.ring_degree,
                                    cfg_degree=cfg.cfg_degree, check=check)
            handle = parallelize_pipeline(pipe, mesh, backend=cfg.backend, vae=cfg.vae_parallel)
            try:
                gen.generate_image(pipe, cfg, 1)  # generate's warm-up: the first call, where the check waits
                dist.barrier()
                t0 = time.perf_counter()
                gen.generate_image(pipe, cfg, cfg.num_inference_steps)
                runs.append((check, time.perf_counter() - t0))
            finally:
                handle.remove()
    return runs if rank == 0 else None


def _in_process(pairs: int, extra: Sequence[str]) -> None:
    from spattn.cli import generate as gen
    from spattn.launch import LocalRanks

    p = argparse.ArgumentParser()
    gen.add_arguments(p)
    cfg = gen.validate(p.parse_args(["--no-baseline", *extra]))
    world = cfg.ulysses_degree * cfg.ring_degree * cfg.cfg_degree
    with LocalRanks(_rank_ab, world, args=(cfg, pairs)) as ranks:
        runs = ranks.wait(timeout=3600)
    for n, (check, t) in enumerate(runs):
        print(f"in-process run {n}: check={check}  {t:.3f} s", flush=True)
    on = [t for c, t in runs if c == 1]
    off = [t for c, t in runs if c == 0]
    diffs = [a - b for a, b in zip(on, off)]  # on and off of the same pair ran back to back
    m_on, m_off = statistics.median(on), statistics.median(off)
    print(f"in-process median with the check: {m_on:.3f} s, without: {m_off:.3f} s, on/off = {m_on / m_off:.4f} "
          f"({(m_on / m_off - 1) * 100:+.2f}%); median paired difference {statistics.median(diffs) * 1e3:+.1f} ms "
          f"({statistics.median(diffs) / m_off * 100:+.2f}%)")


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=3, help="on/off pairs of runs (default 3)")
    p.add_argument("--csv", help="write the rows here")
    p.add_argument("--in-process", action="store_true",
                   help="A/B inside one pair of ranks (module docstring) instead of fresh processes")
    p.add_argument("extra", nargs="*", help="flags for spattn generate (after --)")
    a = p.parse_args(argv)
    if a.in_process:
        _in_process(a.pairs, a.extra)
        return
    times = {"1": [], "0": []}
    rows = []
    for i in range(a.pairs):
        for check in (("1", "0") if i % 2 == 0 else ("0", "1")):
            t = _run(check, a.extra)
            times[check].append(t)
            rows.append({"run": len(rows), "check": check, "time_s": t})
            print(f"run {len(rows) - 1}: SPATTN_CHECK={check}  {t:.3f} s", flush=True)
    on, off = statistics.median(times["1"]), statistics.median(times["0"])
    print(f"median with the check: {on:.3f} s, without: {off:.3f} s, on/off = {on / off:.4f} "
          f"({(on / off - 1) * 100:+.1f}%)")
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["run", "check", "time_s"])
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
