"""``spattn generate``: the tiny pipelines, the ``--model DIR`` loading path, the multi-rank runs
against the single-device image, and one-line errors for bad flags.

Subprocess runs are kept tiny (64x64 or 32x48, 2 steps): the ranks are real processes.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from spattn.cli import generate  # noqa: E402
from spattn.cli.main import main  # noqa: E402
from spattn.integrations.diffusers.tiny import TINY_MODELS, build_tiny_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROW_FIELDS = ("configuration", "ulysses_degree", "ring_degree", "time_s", "speedup", "max_abs_diff")


def _config(argv):
    """The validated Config for ``spattn generate ARGV`` (the same parser and checks as the CLI)."""
    p = argparse.ArgumentParser()
    generate.add_arguments(p)
    return generate.validate(p.parse_args(argv))


def _spattn(*argv, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "spattn", "generate", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=int(os.environ.get("SPATTN_TEST_TIMEOUT", timeout)))


@pytest.fixture(scope="module")
def saved_pipelines(tmp_path_factory):
    """Each tiny pipeline saved with save_pretrained, as a user's local model directory."""
    out = {}
    for name in TINY_MODELS:
        d = tmp_path_factory.mktemp(name)
        build_tiny_pipeline(name).save_pretrained(d)
        out[name] = d
    return out


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_tiny_transformer_output_depends_on_image_and_text(name):
    # An exactness check is only worth something if attention matters: the random transformer's
    # output must be non-trivial and change with the text and with other image tokens.
    pipe = build_tiny_pipeline(name)
    cfg = _config(["--model", name, "--width", "32", "--height", "48", "--num-inference-steps", "1"])
    captured = []

    def grab(module, args, kwargs, output):
        captured.append((kwargs, output[0] if isinstance(output, tuple) else output))

    h = pipe.transformer.register_forward_hook(grab, with_kwargs=True)
    try:
        pipe.set_progress_bar_config(disable=True)
        generate.generate_image(pipe, cfg, steps=1)
    finally:
        h.remove()
    kwargs, out = captured[0]  # (Wan with guidance calls the transformer twice per step: cond, uncond)
    assert out.abs().mean() > 1e-2
    with torch.no_grad():
        def call(**change):
            return pipe.transformer(**{**kwargs, **change})[0]

        text = kwargs["encoder_hidden_states"]
        assert (call(encoder_hidden_states=text.roll(1, dims=-1)) - out).abs().max() > 1e-3
        # Changing the last image token changes the first one's output: tokens attend to each other.
        img = kwargs["hidden_states"].clone()
        img[:, -1] += 1.0
        assert (call(hidden_states=img)[:, 0] - out[:, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_model_dir_loads_the_same_pipeline(name, saved_pipelines):
    frames = ["--num-frames", "5"] if name == "tiny-wan" else []
    ref_cfg = _config(["--model", name, "--width", "64", "--height", "32", "--num-inference-steps", "2", *frames])
    dir_cfg = _config(["--model", str(saved_pipelines[name]), "--width", "64", "--height", "32",
                       "--num-inference-steps", "2", *frames])
    assert dir_cfg.pipeline_class == ref_cfg.pipeline_class
    images = []
    for cfg in (ref_cfg, dir_cfg):
        pipe = generate.load_pipeline(cfg, torch.device("cpu"))
        pipe.set_progress_bar_config(disable=True)
        images.append(generate.generate_image(pipe, cfg, cfg.num_inference_steps))
    a, b = images
    assert a.shape == ((5,) if frames else ()) + (32, 64, 3) and a.std() > 1e-3
    # Not bit-identical: loaded (memory-mapped) weights are aligned differently, so CPU kernels may
    # take other vector paths; the weights themselves round-trip exactly.
    assert np.abs(a - b).max() <= 1e-5


def _check_rows(rows, u, r):
    assert [row["configuration"] for row in rows] == ["Baseline (diffusers)", generate.configuration_name(u, r)]
    for row in rows:
        assert set(ROW_FIELDS) <= set(row)
        assert row["time_s"] > 0
    base, sp = rows
    assert (base["ulysses_degree"], base["ring_degree"], base["speedup"], base["max_abs_diff"]) == (1, 1, 1.0, 0.0)
    assert (sp["ulysses_degree"], sp["ring_degree"]) == (u, r)
    assert sp["speedup"] == pytest.approx(base["time_s"] / sp["time_s"], rel=1e-2)
    assert 0 <= sp["max_abs_diff"] <= 1e-4  # fp32: the sequence-parallel image is the single-device one
    return sp


def test_generate_ulysses2_matches_single_device(tmp_path):
    out, js = tmp_path / "img.png", tmp_path / "rows.json"
    res = _spattn("--ulysses-degree", "2", "--ring-degree", "1", "--baseline", "--json", str(js),
                  "--output", str(out), "--width", "64", "--height", "64", "--num-inference-steps", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    _check_rows(json.loads(js.read_text()), 2, 1)
    from PIL import Image

    assert Image.open(out).size == (64, 64)
    assert "| Configuration | Ulysses degree | Ring degree | Generation Time | Speedup | Max deviation |" in res.stdout
    assert "share the same" in res.stdout  # the CPU caveat


def test_generate_hybrid_2x2_flux_from_dir(tmp_path, saved_pipelines):
    # 4 ranks, Ulysses 2 x Ring 2, Flux loaded through --model DIR; the guide's alias flags.
    out, js = tmp_path / "img.png", tmp_path / "rows.json"
    res = _spattn("--model", str(saved_pipelines["tiny-flux"]), "--usp", "2", "--ring", "2", "--json", str(js),
                  "--output", str(out), "--width", "32", "--height", "48", "--num-inference-steps", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    _check_rows(json.loads(js.read_text()), 2, 2)
    assert out.is_file()


def test_generate_tiny_wan_ring2_writes_mp4(tmp_path):
    # Video: Ring's use case. The MP4 holds every frame; the deviation covers all of them.
    import imageio.v3 as iio

    out, js = tmp_path / "video.mp4", tmp_path / "rows.json"
    res = _spattn("--model", "tiny-wan", "--ring", "2", "--num-frames", "5", "--fps", "8", "--json", str(js),
                  "--output", str(out), "--width", "64", "--height", "48", "--num-inference-steps", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    _check_rows(json.loads(js.read_text()), 1, 2)
    assert iio.imread(out, extension=".mp4").shape[:3] == (5, 48, 64)
    assert "64x48 x 5 frames" in res.stdout and f"video: {out}" in res.stdout


def test_video_flags(capsys):
    _one_line_error(capsys, ["--num-frames", "5"], "makes images")
    _one_line_error(capsys, ["--model", "tiny-wan", "--num-frames", "6"], "use 5 or 9")
    _one_line_error(capsys, ["--model", "tiny-wan", "--output", "x.png"], "use a .mp4 path")
    assert _config(["--model", "tiny-wan"]).output == "spattn_generate.mp4"


def _one_line_error(capsys, argv, match):
    try:
        code = main(["generate", *argv])
    except SystemExit as e:  # argparse's own checks (types)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("spattn generate: error:") and match in err[0], err[0]


@pytest.mark.parametrize("argv, match", [
    (["--width", "100"], "multiple of 16"),
    (["--height", "8"], "use 16"),
    (["--model", "no-such-model"], "no such directory"),
    (["--model", "nobody-xyz/not-cached-model"], "not in the local Hugging Face cache"),
    (["--ulysses-degree", "4", "--ring-degree", "4"], "lower the degrees"),
    (["--dtype", "float16"], "needs a GPU"),
    (["--backend", "triton"], "needs a CUDA GPU"),
    (["--output", "/no/such/dir/x.png"], "does not exist"),
    (["--ulysses-degree", "0"], "positive integer"),
    (["--ring", "two"], "positive integer"),
])
def test_bad_flags_one_line_exit_2(capsys, argv, match):
    if torch.cuda.is_available() and match in ("lower the degrees", "needs a GPU", "needs a CUDA GPU"):
        pytest.skip("CPU-only limits")
    _one_line_error(capsys, argv, match)


def test_bad_model_dirs(capsys, tmp_path):
    _one_line_error(capsys, ["--model", str(tmp_path)], "no model_index.json")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    _one_line_error(capsys, ["--model", str(tmp_path)], "is not supported")


def test_degrees_must_match_launched_ranks(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    _one_line_error(capsys, ["--ulysses-degree", "2", "--ring-degree", "2"], "torchrun --nproc-per-node 4")


def test_default_degrees_follow_the_guide():
    assert (lambda c: (c.ulysses_degree, c.ring_degree))(_config([])) == (2, 1)
    assert (lambda c: (c.ulysses_degree, c.ring_degree))(_config(["--ring-degree", "2"])) == (1, 2)
    assert (lambda c: (c.ulysses_degree, c.ring_degree))(_config(["--usp", "4"])) == (4, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rank limit")
def test_bad_flag_in_a_real_process_has_no_traceback():
    res = _spattn("--ulysses-degree", "3", "--ring-degree", "3", "--width", "64", timeout=120)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_missing_diffusers_is_one_line(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    _one_line_error(capsys, [], 'pip install -e ".[diffusers]"')
