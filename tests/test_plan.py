"""`spattn plan`: the model reproduces the guide's benchmark table, honestly calibrated.

Per hardware preset two constants (efficiency, serial seconds per megapixel) are fitted to the
guide's baseline and ONE parallel row; the other rows are predictions, checked here within 15%.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import re

import pytest
from dataclasses import replace

from spattn.cli import costmodel, plan
from spattn.cli.main import main

# (hardware, width, steps, ulysses, ring, guide seconds, guide speedup, role)
GUIDE = [
    ("h800", 2048, 1, 1, 112.5, 1.00, "calibration (baseline)"),
    ("h800", 2048, 2, 1, 65.2, 1.73, "prediction"),
    ("h800", 2048, 4, 1, 39.6, 2.84, "prediction"),
    ("h800", 2048, 8, 1, 30.8, 3.65, "calibration (parallel row)"),
    ("a100", 1024, 1, 1, 45.2, 1.00, "calibration (baseline)"),
    ("a100", 1024, 1, 2, 29.9, 1.51, "prediction"),
    ("a100", 1024, 1, 4, 23.3, 1.94, "calibration (parallel row)"),
    ("a100", 1024, 2, 2, 24.3, 1.87, "prediction"),
]
GPUS = {"h800": 8, "a100": 4}


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    plan.add_arguments(p)
    return p.parse_args(list(argv))


def _plan_json(*argv: str):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["plan", *argv, "--json"])
    assert rc == 0
    return json.loads(buf.getvalue())


def _guide_rows(hw: str):
    width = 2048 if hw == "h800" else 1024
    rows = _plan_json("--model", "qwen-image", "--width", str(width), "--height", str(width),
                      "--num-inference-steps", "50", "--gpus", str(GPUS[hw]), "--hardware", hw,
                      "--no-vae-parallel")   # the guide's runs decoded on one rank
    return {(r["ulysses_degree"], r["ring_degree"]): r for r in rows}


@pytest.mark.parametrize("hw,width,u,r,secs,speedup,role", GUIDE,
                         ids=[f"{g[0]}-{g[1]}-u{g[2]}r{g[3]}-{g[6].split()[0]}" for g in GUIDE])
def test_reproduces_guide_row(hw, width, u, r, secs, speedup, role):
    row = _guide_rows(hw)[(u, r)]
    err_speedup = row["speedup"] / speedup - 1
    err_time = row["total_s"] / secs - 1
    msg = (f"{hw} {width}^2 U{u}xR{r} ({role}): guide {secs} s / {speedup}x, model {row['total_s']:.1f} s / "
           f"{row['speedup']:.2f}x, errors {err_time:+.1%} / {err_speedup:+.1%}")
    print(msg)
    assert abs(err_speedup) <= 0.15, msg
    assert abs(err_time) <= 0.15, msg
    if role.startswith("calibration"):  # fitted rows are matched up to the rounding of the constants
        assert abs(err_time) < 0.005, msg


def test_prediction_errors_table():
    """The errors of the predicted rows, all in one place (what the README quotes)."""
    errs = {}
    for hw, width, u, r, secs, speedup, role in GUIDE:
        if role == "prediction":
            errs[(hw, u, r)] = _guide_rows(hw)[(u, r)]["speedup"] / speedup - 1
    print({k: f"{v:+.1%}" for k, v in errs.items()})
    assert len(errs) == 4 and max(abs(e) for e in errs.values()) <= 0.15


@pytest.mark.parametrize("hw", ["h800", "a100"])
def test_preset_constants_are_the_fit_to_two_guide_rows(hw):
    """The hard-coded constants are what fit_constants returns for the baseline + the one parallel
    row named in the module docstring, nothing else."""
    width = 2048 if hw == "h800" else 1024
    a = _args("--width", str(width), "--height", str(width), "--hardware", hw, "--no-vae-parallel")
    used = [(u, r, s) for h, _, u, r, s, _, role in GUIDE if h == hw and role.startswith("calibration")]
    assert len(used) == 2
    fit = costmodel.fit_constants(plan.workload_from_args(a), plan.hardware_from_args(a), used)
    preset = costmodel.HARDWARE[hw]
    assert fit["efficiency"] == pytest.approx(preset.efficiency, rel=2e-3)
    assert fit["serial_s_per_mpix"] == pytest.approx(preset.serial_s_per_mpix, rel=2e-3)
    assert 0 < preset.efficiency <= 1  # below the nominal peak


def test_rows_cover_every_factorization_and_fields():
    rows = _plan_json("--width", "2048", "--height", "2048", "--gpus", "8", "--hardware", "h800")
    got = [(r["ulysses_degree"], r["ring_degree"]) for r in rows]
    picked = [r for r in rows if r["recommended"]]
    assert len(picked) == 1 and picked[0]["reason"]
    assert got[0] == (1, 1) and rows[0]["speedup"] == 1.0
    assert sorted(got) == sorted({(u, p // u) for p in (1, 2, 4, 8) for u in (1, 2, 4, 8) if p % u == 0})
    for r in rows:
        for key in ("total_s", "speedup", "attention_s", "linear_s", "comm_s", "comm_exposed_s", "comm_hidden_s",
                    "serial_s", "a2a_bytes_per_rank", "ring_bytes_per_rank", "ring_impl"):
            assert key in r
        parts = r["serial_s"] + r["attention_s"] + r["linear_s"] + r["merge_s"] + r["comm_exposed_s"] + r["launch_s"]
        assert r["total_s"] == pytest.approx(parts)
        assert r["comm_exposed_s"] <= r["comm_s"] + 1e-12
        assert (r["ring_impl"] == "p2p") == (r["ring_degree"] > 1)
        assert (r["a2a_bytes_per_rank"] > 0) == (r["ulysses_degree"] > 1)


def test_bytes_match_closed_form():
    """Ulysses 8 on 2048^2 Qwen-Image: 4 tensors of (16384/8) x 3072 bf16, 7/8 leaves, per layer."""
    row = {(r["ulysses_degree"], r["ring_degree"]): r
           for r in _plan_json("--width", "2048", "--height", "2048", "--gpus", "8")}
    per_layer = 4 * (16384 / 8) * 3072 * 2 * 7 / 8
    assert row[(8, 1)]["a2a_bytes_per_rank"] == pytest.approx(per_layer * 60 * 50)
    ring_per_layer = 7 * 2 * (16384 / 8) * 24 * 128 * 2
    assert row[(1, 8)]["ring_bytes_per_rank"] == pytest.approx(ring_per_layer * 60 * 50)


def test_pcie_exposes_more_communication_than_nvlink():
    fast = _plan_json("--width", "2048", "--height", "2048", "--gpus", "8", "--hardware", "h100")
    slow = _plan_json("--width", "2048", "--height", "2048", "--gpus", "8", "--hardware", "h100",
                      "--link", "pcie", "--link-gbps", "25")
    for a, b in zip(fast, slow):
        assert b["comm_exposed_s"] >= a["comm_exposed_s"]
    assert slow[-1]["speedup"] < fast[-1]["speedup"]


def test_calibrate_recovers_synthetic_constants(tmp_path):
    """A CSV generated by the model with known constants is fitted back to them (least squares over
    four rows, one of them noisy-free duplicates), and the refit is used for the table."""
    a = _args("--width", "1024", "--height", "1024", "--hardware", "a100", "--gpus", "4")
    w = plan.workload_from_args(a)
    true = replace(costmodel.HARDWARE["a100"], efficiency=0.55, serial_s_per_mpix=9.0)
    path = tmp_path / "bench.csv"
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["mode", "ulysses_degree", "ring_degree", "time_s", "seq"])
        wr.writeheader()
        for u, r in [(1, 1), (2, 1), (1, 2), (2, 2), (1, 4)]:
            t = costmodel.predict_row(w, true, u, r)["total_s"]
            wr.writerow(dict(mode="x", ulysses_degree=u, ring_degree=r, time_s=t, seq=4096))
            wr.writerow(dict(mode="x", ulysses_degree=u, ring_degree=r, time_s=t * 50, seq=999))  # filtered out
    measured = costmodel.read_measurements(str(path), ["seq=4096"])
    fit = costmodel.fit_constants(w, costmodel.HARDWARE["a100"], measured)
    assert fit["efficiency"] == pytest.approx(0.55, rel=1e-6)
    assert fit["serial_s_per_mpix"] == pytest.approx(9.0, rel=1e-6)
    assert max(abs(r["error"]) for r in fit["rows"]) < 1e-9
    rows = _plan_json("--width", "1024", "--height", "1024", "--hardware", "a100", "--gpus", "4",
                      "--calibrate", str(path), "--where", "seq=4096")
    want = costmodel.predict(w, true, 4)
    assert [r["total_s"] for r in rows] == pytest.approx([r["total_s"] for r in want], rel=1e-6)


def test_calibrate_s_plus_p_over_p_from_generate_json(tmp_path):
    """`spattn generate --json` rows (time_s per configuration) following T = s + p/P exactly give
    back s (serial) and p (the divided part)."""
    a = _args("--tokens", "4096", "--text-len", "0", "--hardware", "a100")
    w = plan.workload_from_args(a)
    s, p = 10.0, 30.0
    rows = [dict(configuration=f"{u}x{r}", ulysses_degree=u, ring_degree=r, time_s=s + p / (u * r))
            for u, r in [(1, 1), (2, 1), (4, 1)]]
    path = tmp_path / "gen.json"
    path.write_text(json.dumps(rows))
    fit = costmodel.fit_constants(w, costmodel.HARDWARE["a100"], costmodel.read_measurements(str(path)))
    # Ulysses adds a little exposed communication, so the fit is close to, not exactly, (s, p). The
    # undivided part is the serial constant plus the per-layer kernel gaps (the same on every rank).
    one = costmodel.predict_row(w, fit["hardware"], 1, 1)
    assert fit["serial_s"] + one["launch_s"] == pytest.approx(s, rel=0.05)
    assert one["attention_s"] + one["linear_s"] == pytest.approx(p, rel=0.05)


def test_calibrate_attention_only_fits_a_fixed_serial_time():
    """bench/bench_sp.py rows model one attention call: the serial part is a fixed time."""
    a = _args("--attention-only", "--tokens", "2048", "--heads", "8", "--head-dim", "64", "--layers", "1",
              "--num-inference-steps", "1", "--text-len", "0", "--tflops", "1", "--link", "pcie")
    w = plan.workload_from_args(a)
    hw = plan.hardware_from_args(a)
    true = replace(hw, efficiency=0.3, serial_s_fixed=0.002)
    measured = [(u, r, costmodel.predict_row(w, true, u, r)["total_s"]) for u, r in [(1, 1), (2, 1), (1, 2), (2, 2)]]
    fit = costmodel.fit_constants(w, hw, measured)
    assert fit["efficiency"] == pytest.approx(0.3, rel=1e-6)
    assert fit["serial_s"] == pytest.approx(0.002, rel=1e-6)
    assert fit["hardware"].serial_s_per_mpix == 0.0


@pytest.mark.parametrize("argv,fix", [
    (["--gpus", "0"], "--gpus must be >= 1"),
    (["--width", "1000"], "multiples of"),
    (["--calibrate", "/nonexistent/x.csv"], "No such file"),
    (["--efficiency", "3"], "--efficiency"),
])
def test_bad_input_is_one_line(argv, fix, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert fix in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--heads", "--layers", "--head-dim", "--patch", "--frames", "--link-gbps",
                                  "--tflops", "--vae-factor", "--width", "--tokens"])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_meaningless_values_are_rejected_not_replaced_by_the_preset(flag, value, capsys):
    # 0 used to fall back to the preset's value silently (``a.heads or spec.heads``) and exit 0.
    assert main(["plan", "--model", "wan", flag, value]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"spattn plan: {flag} must be") and value in err[0], err


def test_every_bad_flag_gets_its_own_line(capsys):
    assert main(["plan", "--heads", "0", "--layers", "0", "--link-gbps", "-1", "--where", "pass=fwd"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(line.startswith("spattn plan: ") for line in err), err
    assert [line.split()[2] for line in err] == ["--heads", "--layers", "--link-gbps", "--where"]
    # --where filters --calibrate's rows: alone it would be ignored, so it is refused.
    assert "--calibrate" in err[3]
    # --frames means nothing for an image model.
    assert main(["plan", "--model", "qwen-image", "--frames", "81"]) == 2
    assert "video" in capsys.readouterr().err


def test_table_columns_stay_apart_at_large_degrees(capsys):
    assert main(["plan", "--gpus", "1000"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if not x.startswith(("#", "recommend"))]
    # Columns are separated by at least two spaces (names hold single spaces: "hybrid 2x2", "attn s").
    head, body = re.split(r"\s{2,}", lines[0]), [re.split(r"\s{2,}", x) for x in lines[1:]]
    factor_rows = len(costmodel.factorizations(1000))
    assert len(body) == factor_rows == 100  # sum of the divisor counts of 1000's 16 divisors
    for cells in body:
        assert len(cells) == len(head) == 14, cells
        u, r = int(cells[1]), int(cells[2])
        assert 1000 % (u * r) == 0
    assert body[-1][:4] == ["ring 1000", "1", "1000", "p2p"]


def test_factorizations_and_mode_names_are_the_ones_every_tool_uses():
    assert costmodel.factorizations(4) == [(1, 1), (2, 1), (1, 2), (4, 1), (2, 2), (1, 4)]
    assert costmodel.factorizations(4, exact=True) == [(4, 1), (2, 2), (1, 4)]
    assert [costmodel.mode_name(u, r) for u, r in costmodel.factorizations(4)] == [
        "1 device", "ulysses 2", "ring 2", "ulysses 4", "hybrid 2x2", "ring 4"]


def test_presets_and_table_output(capsys):
    for model in costmodel.MODELS:
        assert main(["plan", "--model", model, "--gpus", "4"]) == 0
        out = capsys.readouterr().out
        assert "MODELED" in out and "recommend: ulysses" in out and "1 device" in out
    assert main(["plan", "--model", "wan", "--frames", "81", "--hardware", "l40", "--gpus", "2"]) == 0
    assert "pcie" in capsys.readouterr().out


def test_ring_impl_auto_says_what_the_library_picks_and_why():
    from spattn.parallel.ring_allgather import choose_ring_impl

    import torch

    rows = _plan_json("--width", "2048", "--height", "2048", "--gpus", "4", "--hardware", "h100")
    ring_rows = [r for r in rows if r["ring_degree"] > 1]
    assert ring_rows
    for r in ring_rows:  # the plan asks the run-time rule itself, for a GPU
        assert r["ring_impl"] == choose_ring_impl(r["ring_degree"], 16384 // r["ring_degree"], torch.device("cuda"))
        assert r["ring_impl_reason"]
    # The all-gather ring sends the same bytes but cannot overlap them with compute.
    ag = {(r["ulysses_degree"], r["ring_degree"]): r for r in _plan_json(
        "--width", "2048", "--height", "2048", "--gpus", "4", "--hardware", "h100", "--ring-impl", "allgather")}
    for r in ring_rows:
        a = ag[(r["ulysses_degree"], r["ring_degree"])]
        assert a["ring_bytes_per_rank"] == r["ring_bytes_per_rank"]
        assert a["comm_exposed_s"] >= r["comm_exposed_s"] and a["total_s"] >= r["total_s"]
