"""What the cross-rank check costs a real job: `spattn generate` (its default run unless told otherwise)
with the check on and off, interleaved, medians of the generation times rank 0 reports.

    python bench/bench_check_generate.py --pairs 3                      # default run: 512x512, 20 steps
    python bench/bench_check_generate.py --pairs 3 -- --num-inference-steps 4 --width 256 --height 256

Each run is a fresh `python -m spattn generate --no-baseline --json ...` with ``SPATTN_CHECK=1`` or
``0`` (runs alternate, so drift from other load hits both alike). Prints one row per run and the two
medians with their ratio; with ``--csv`` also writes the rows.
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


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=3, help="on/off pairs of runs (default 3)")
    p.add_argument("--csv", help="write the rows here")
    p.add_argument("extra", nargs="*", help="flags for spattn generate (after --)")
    a = p.parse_args(argv)
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
