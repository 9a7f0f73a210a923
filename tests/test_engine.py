"""spattn.Engine: ranks kept alive across requests. Checked against the single-device pipeline (<= 1e-3),
``spattn generate``'s PNG with the same flags (identical), the same request run alone when batched
(<= 1e-5); bad requests, a request failing on every rank or on one rank, cancellation, concurrent
callers, a killed rank. One 2-rank tiny-qwen-image engine serves the module (64x64, 2 steps); two more
start for CFG parallel (cfg_degree=2: same image as `spattn generate --cfg-degree 2`, idle_fraction) and
vae_parallel=False (the same image as the parallel decode, <= 1e-5)."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from spattn.engine import (Engine, EngineDeadError, RequestCancelled, RequestFailed,  # noqa: E402
                           SamplingParams)
from spattn.engine.pipelines import resolve_model  # noqa: E402
from spattn.engine.params import resolve_params  # noqa: E402
from dist_harness import pid_alive  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(width=64, height=64, num_inference_steps=2)
FAULTS = "all:explode;1:wobble"   # every rank raises on "explode", rank 1 alone on "wobble"


@pytest.fixture(scope="module")
def engine():
    os.environ["SPATTN_ENGINE_FAULT"] = FAULTS  # read by the spawned ranks
    try:
        eng = Engine("tiny-qwen-image", ulysses_degree=2, max_batch_size=4)
    finally:
        os.environ.pop("SPATTN_ENGINE_FAULT")
    try:
        yield eng
    finally:
        pids = [r["pid"] for r in eng.health()["ranks"]]
        eng.close()
        _assert_gone(pids)


def _assert_gone(pids, within_s=10.0):
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if pid_alive(p)]
        if not alive:
            return
        time.sleep(0.1)
    raise AssertionError(f"rank processes still alive: {alive}")



@pytest.fixture(scope="module")
def single_device():
    """The unmodified tiny pipeline in this process: the one-device reference."""
    from spattn.integrations.diffusers.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("tiny-qwen-image")
    pipe.set_progress_bar_config(disable=True)

    def run(prompt: str, seed: int) -> np.ndarray:
        g = torch.Generator("cpu").manual_seed(seed)
        return pipe(prompt=prompt, generator=g, output_type="np", true_cfg_scale=1.0, **SMALL).images[0]

    return run


# ------------------------------------------------------------------------------- bad requests
@pytest.mark.parametrize("fields, name", [
    (dict(width=65), "width"), (dict(height=8), "height"), (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_images_per_prompt=11), "num_images_per_prompt"), (dict(num_frames=9), "num_frames"),
    (dict(fps=8), "fps"), (dict(seed=-1), "seed"), (dict(guidance_scale="high"), "guidance_scale"),
])
def test_bad_field_is_a_value_error_naming_it(fields, name):
    info = resolve_model("tiny-qwen-image")
    with pytest.raises(ValueError, match=rf"^{name}: "):
        resolve_params(SamplingParams(**fields), info)


def test_unknown_field_and_video_rules():
    with pytest.raises(ValueError, match=r"^foo: unknown sampling field"):
        SamplingParams.from_dict({"width": 64, "foo": 1})
    wan = resolve_model("tiny-wan")
    with pytest.raises(ValueError, match=r"^true_cfg_scale: WanPipeline does not take it"):
        resolve_params(SamplingParams(true_cfg_scale=2.0), wan)
    with pytest.raises(ValueError, match=r"^num_frames: 8 is not 4k\+1.*use 5 or 9"):
        resolve_params(SamplingParams(num_frames=8), wan)
    ok = resolve_params(SamplingParams(num_frames=9, seed=None), wan)
    assert ok["num_frames"] == 9 and ok["fps"] == 16 and isinstance(ok["seed"], int)


def test_engine_arguments_checked_before_any_rank():
    with pytest.raises(ValueError, match="ulysses_degree"):
        Engine("tiny-qwen-image", ulysses_degree=0)
    with pytest.raises(ValueError, match="no such directory"):
        Engine("./no-such-model")
    with pytest.raises(ValueError, match="cfg_degree: 3, but classifier-free guidance has two branches"):
        Engine("tiny-qwen-image", cfg_degree=3)
    with pytest.raises(ValueError, match="vae_parallel: expected True or False"):
        Engine("tiny-qwen-image", vae_parallel="yes")
    with pytest.raises(ValueError, match="at most 8 local CPU ranks"):
        if torch.cuda.is_available():
            pytest.skip("GPU machine: the CPU rank limit does not apply")
        Engine("tiny-qwen-image", ulysses_degree=3, ring_degree=3)


def test_submit_rejects_bad_fields_before_the_ranks(engine):
    before = engine.stats()
    with pytest.raises(ValueError, match="^width: 100 is not a multiple of 16"):
        engine.generate("a cat", {"width": 100, "height": 64})
    with pytest.raises(ValueError, match="^bogus: unknown sampling field"):
        engine.generate("a cat", {"bogus": 1})
    assert engine.stats() == before


# ----------------------------------------------------------------------------------- exactness
def test_same_seed_as_single_device_and_spattn_generate(engine, single_device, tmp_path):
    out, = engine.generate("a cat on a windowsill", SamplingParams(seed=3, **SMALL))
    assert out.request_id.startswith("req-") and out.seed == 3 and out.video is None
    assert out.array.shape == (1, 64, 64, 3) and out.images[0].size == (64, 64)
    assert set(out.metrics) >= {"queue_s", "exec_s", "steps", "peak_memory_bytes"} and out.metrics["steps"] == 2
    ref = single_device("a cat on a windowsill", 3)
    assert np.abs(out.array[0].astype(np.float64) - ref).max() <= 1e-3
    assert ref.std() > 0.05  # not a flat image

    png = tmp_path / "gen.png"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "spattn", "generate", "--model", "tiny-qwen-image", "--prompt",
                        "a cat on a windowsill", "--usp", "2", "--width", "64", "--height", "64",
                        "--num-inference-steps", "2", "--seed", "3", "--no-baseline", "--no-warmup",
                        "--output", str(png)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    from PIL import Image

    theirs = np.asarray(Image.open(png)).astype(np.float64) / 255
    ours = np.asarray(out.images[0]).astype(np.float64) / 255
    assert np.abs(theirs - ours).max() <= 1e-5


def test_batched_requests_equal_each_run_alone(engine):
    params = [SamplingParams(seed=s, **SMALL) for s in (11, 12, 13, 14)]
    prompts = ["a red car", "a small house", "a blue lake in the mountain", "sky"]
    alone = [engine.generate(p, sp)[0] for p, sp in zip(prompts, params)]
    assert all(o.metrics["batch_size"] == 1 for o in alone)
    # A slow head request keeps the ranks busy while the four queue up: they then run as one batch.
    head = engine.submit("a dog", SamplingParams(seed=1, width=64, height=64, num_inference_steps=8))
    reqs = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
    head.result(300)
    batched = [r.result(300) for r in reqs]
    assert [o.metrics["batch_size"] for o in batched] == [4] * 4
    for a, b in zip(alone, batched):
        assert np.abs(a.array.astype(np.float64) - b.array).max() <= 1e-5
    # Different seeds and prompts give different images: the comparison above is not vacuous.
    assert np.abs(batched[0].array - batched[1].array).max() > 1e-2


def test_num_images_per_prompt_uses_consecutive_seeds(engine):
    two, = engine.generate("a tree", SamplingParams(seed=20, num_images_per_prompt=2, **SMALL))
    one, = engine.generate("a tree", SamplingParams(seed=21, **SMALL))
    assert len(two.images) == 2
    assert np.abs(two.array[1].astype(np.float64) - one.array[0]).max() <= 1e-5


def test_vae_parallel_on_and_off_give_the_same_image(engine):
    """The module engine decodes with both ranks (the default); vae_parallel=False decodes on rank 0."""
    on, = engine.generate("a lighthouse", SamplingParams(seed=8, **SMALL))
    with Engine("tiny-qwen-image", ulysses_degree=2, vae_parallel=False) as off_engine:
        off, = off_engine.generate("a lighthouse", SamplingParams(seed=8, **SMALL))
    assert on.metrics["vae_parallel"] and not off.metrics["vae_parallel"]
    assert np.abs(on.array.astype(np.float64) - off.array).max() <= 1e-5
    assert on.array.std() > 0.05


def test_concurrent_callers_each_get_their_own_seed(engine, single_device):
    results, errors = {}, []

    def call(seed):
        try:
            results[seed] = engine.generate(f"photo {seed}", SamplingParams(seed=seed, **SMALL))[0]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call, args=(s,)) for s in range(30, 38)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors and sorted(results) == list(range(30, 38))
    assert len({o.request_id for o in results.values()}) == 8
    for seed in (30, 37):
        ref = single_device(f"photo {seed}", seed)
        assert np.abs(results[seed].array[0].astype(np.float64) - ref).max() <= 1e-3


# ------------------------------------------------------------------------------------- failures
def test_request_failing_on_every_rank_fails_alone(engine):
    with pytest.raises(RequestFailed, match="injected fault on rank 0"):
        engine.generate("explode", SamplingParams(seed=0, **SMALL))
    out, = engine.generate("a cat", SamplingParams(seed=0, **SMALL))
    assert out.images and engine.health()["status"] == "ok"


def test_request_failing_on_one_rank_restarts_the_ranks(engine):
    pids = [r["pid"] for r in engine.health()["ranks"]]
    t0 = time.monotonic()
    with pytest.raises(RequestFailed, match="rank 1: RuntimeError: injected fault on rank 1"):
        engine.generate("wobble", SamplingParams(seed=0, **SMALL), timeout=60)
    assert time.monotonic() - t0 < 30  # rank 0 sat in a collective; the driver did not wait on it
    out, = engine.generate("a cat", SamplingParams(seed=0, **SMALL), timeout=900)  # after the restart
    assert out.images
    assert not set(pids) & {r["pid"] for r in engine.health()["ranks"]}
    _assert_gone(pids)


def test_cancel_stops_at_a_step(engine):
    req = engine.submit("a slow cat", SamplingParams(seed=0, width=64, height=64, num_inference_steps=400))
    deadline = time.monotonic() + 120
    while req.steps_done < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert req.status == "in_progress"
    req.cancel()
    with pytest.raises(RequestCancelled):
        req.result(20)
    assert req.steps_done < 400
    queued = engine.submit("never", SamplingParams(seed=0, **SMALL))
    queued.cancel()
    out, = engine.generate("after", SamplingParams(seed=0, **SMALL))
    with pytest.raises(RequestCancelled):
        queued.result(5)
    assert out.images


def test_killed_rank_fails_in_flight_and_later_requests(engine):
    # Last test of the module: it kills the shared engine.
    req = engine.submit("a slow dog", SamplingParams(seed=0, width=64, height=64, num_inference_steps=400))
    deadline = time.monotonic() + 120
    while req.steps_done < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = engine.health()["ranks"][1]["pid"]
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(EngineDeadError, match="rank 1"):
        req.result(10)
    assert time.monotonic() - t0 < 10
    h = engine.health()
    assert h["status"] == "dead" and h["dead_rank"] == 1 and not h["ranks"][1]["alive"]
    with pytest.raises(EngineDeadError):
        engine.generate("later", SamplingParams(seed=0, **SMALL))


# ------------------------------------------------------------------------------------ torchrun
def _torchrun_rank(rank, world, init_method, out_path):
    """What a torchrun-launched script does: every rank builds the Engine; rank 0 drives."""
    host, port = init_method[len("tcp://"):].rsplit(":", 1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR=host,
                      MASTER_PORT=port)
    engine = Engine("tiny-qwen-image", ulysses_degree=2)
    if engine.is_driver:
        with engine:
            out, = engine.generate("a cat on a windowsill", SamplingParams(seed=3, **SMALL))
            assert engine.health()["status"] == "ok"
        np.save(out_path, out.array)
    else:
        with pytest.raises(RuntimeError, match="only rank 0"):
            engine.submit("x")


def test_torchrun_rank0_drives_the_others_serve(single_device, tmp_path):
    from spattn.launch import LocalRanks

    out = tmp_path / "rank0.npy"
    with LocalRanks(_torchrun_rank, 2, args=(str(out),), env={"OMP_WAIT_POLICY": "PASSIVE"}) as ranks:
        ranks.wait(timeout=900)
    ref = single_device("a cat on a windowsill", 3)
    assert np.abs(np.load(out)[0].astype(np.float64) - ref).max() <= 1e-3


# ------------------------------------------------------------------------ CFG parallel, parallel VAE
NEG = dict(negative_prompt="blurry, low quality", true_cfg_scale=4.0)


def test_cfg_engine_runs_both_branches_at_once(single_device, tmp_path):
    """cfg_degree=2 on 2 ranks: a guided request equals `spattn generate --cfg-degree 2` (same flags) and
    the one-device pipeline; a request without guidance still runs and reports half the ranks idle."""
    with Engine("tiny-qwen-image", cfg_degree=2) as eng:
        h = eng.health()
        assert eng.world == 2 and [r["rank"] for r in h["ranks"]] == [0, 1] and all(r["alive"] for r in h["ranks"])
        assert h["cfg_degree"] == 2
        guided, = eng.generate("a cat on a windowsill", SamplingParams(seed=4, **NEG, **SMALL))
        plain, = eng.generate("a cat on a windowsill", SamplingParams(seed=4, **SMALL))
    assert guided.metrics["cfg_parallel"] and guided.metrics["idle_fraction"] == 0.0
    assert not plain.metrics["cfg_parallel"] and plain.metrics["idle_fraction"] == 0.5
    assert np.abs(plain.array[0].astype(np.float64) - single_device("a cat on a windowsill", 4)).max() <= 1e-3

    from spattn.integrations.diffusers.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("tiny-qwen-image")
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt="a cat on a windowsill", generator=torch.Generator("cpu").manual_seed(4), output_type="np",
               **NEG, **SMALL).images[0]
    assert np.abs(guided.array[0].astype(np.float64) - ref).max() <= 1e-3
    assert np.abs(ref - single_device("a cat on a windowsill", 4)).max() > 1e-2  # guidance changed the image

    png = tmp_path / "cfg.png"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "spattn", "generate", "--model", "tiny-qwen-image", "--prompt",
                        "a cat on a windowsill", "--cfg-degree", "2", "--negative-prompt", NEG["negative_prompt"],
                        "--true-cfg-scale", "4", "--width", "64", "--height", "64", "--num-inference-steps", "2",
                        "--seed", "4", "--no-baseline", "--no-warmup", "--output", str(png)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    from PIL import Image

    theirs = np.asarray(Image.open(png)).astype(np.float64) / 255
    assert np.abs(theirs - np.asarray(guided.images[0]).astype(np.float64) / 255).max() <= 1e-5
