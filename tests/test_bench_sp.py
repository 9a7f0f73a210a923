"""bench/bench_sp.py --quick end to end (no timing asserted): rows, counted bytes vs the closed-form
minimum, forward output vs SDPA, CSV columns that `spattn plan --calibrate` reads, and the plot."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

from spattn.cli import costmodel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_sp_quick(tmp_path):
    out_csv, png = tmp_path / "sp.csv", tmp_path / "sp.png"
    proc = subprocess.run([sys.executable, "bench/bench_sp.py", "--quick", "--csv", str(out_csv), "--png", str(png)],
                          cwd=ROOT, capture_output=True, text=True,
                          timeout=float(os.environ.get("SPATTN_TEST_TIMEOUT", "600")))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "forward output vs SDPA: OK" in proc.stdout
    rows = list(csv.DictReader(open(out_csv)))
    modes = {(r["mode"], r["pass"]) for r in rows}
    assert modes == {(m, p) for m in ("sdpa (1 proc)", "ulysses 2", "ring 2") for p in ("fwd", "fwd+bwd")}
    for r in rows:
        assert r["device"] and r["torch"] and float(r["time_s"]) > 0
        if r["mode"] == "sdpa (1 proc)":
            continue
        sent, least = float(r["bytes_per_rank"]), float(r["min_bytes_per_rank"])
        if r["pass"] == "fwd" or r["mode"] == "ulysses 2":
            assert sent == least, r  # forward and Ulysses send exactly the minimum
        else:
            # ring backward: (dK, dV) partials make a full lap (R hops, not R-1); fp32 here = input dtype
            assert sent == least * 4 / 3, r
        if r["pass"] == "fwd":
            assert float(r["max_err"]) < 1e-5
    assert png.stat().st_size > 0
    measured = costmodel.read_measurements(str(out_csv), ["pass=fwd"])
    assert sorted((u, r) for u, r, _ in measured) == [(1, 1), (1, 2), (2, 1)]
