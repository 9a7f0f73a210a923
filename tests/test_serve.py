"""``spattn serve`` as a user runs it: a subprocess on a free loopback port, the real ``openai`` client and
plain HTTP (httpx). Image server: tiny-qwen-image, Ulysses 2, --max-batch-size 4, --max-queue 16 (64x64,
2 steps); video server: tiny-wan, Ring 2. Checked: health while loading and ready, the OpenAI shapes and
errors, 16 concurrent clients (none lost, each its own seed's image), the queue-full 429, a disconnect
cancelling its request, the request timeout (504, one-rank server), SIGTERM with requests in flight, video
jobs, a rank killed mid-request; a CFG-parallel server (--cfg 2, 2 ranks) answering a negative-prompt request."""
import base64
import io
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
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from spattn.launch import free_port  # noqa: E402
from dist_harness import pid_alive  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"size": "64x64", "num_inference_steps": 2}
START_S = 900  # loading on 2 shared cores, with other tests running


class Server:
    """``spattn serve ARGS`` on a free port; ``stop()`` (SIGTERM, then SIGKILL) always runs."""

    def __init__(self, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-m", "spattn", "serve", *args, "--port", str(self.port),
                                      "--log-level", "warning"], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.first_health = None
        self.rank_pids = []

    def wait_ready(self, timeout: float = START_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read().decode()[-3000:]
            try:
                r = httpx.get(self.url + "/health", timeout=5)
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            if self.first_health is None:
                self.first_health = (r.status_code, r.json())
            if r.status_code == 200:
                self.rank_pids = [x["pid"] for x in r.json()["ranks"]]
                return
            time.sleep(0.5)
        raise TimeoutError(f"spattn serve not ready after {timeout}s")

    def health(self) -> httpx.Response:
        return httpx.get(self.url + "/health", timeout=5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)



def _wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


@pytest.fixture(scope="module")
def servers():
    """The servers start together (their loading overlaps); all are always stopped."""
    image = Server("tiny-qwen-image", "--usp", "2", "--max-batch-size", "4", "--max-queue", "16")
    video = Server("--model", "tiny-wan", "--ring", "2")
    quick = Server("tiny-qwen-image", "--request-timeout-s", "3")  # one rank, a short request timeout
    cfg = Server("tiny-qwen-image", "--cfg", "2")   # the two guidance branches on two ranks
    try:
        for server in (image, video, quick, cfg):
            server.wait_ready()
        yield image, video, quick, cfg
    finally:
        for server in (image, video, quick, cfg):
            server.stop()
        pids = image.rank_pids + video.rank_pids + quick.rank_pids + cfg.rank_pids
        _wait_for(lambda: not any(pid_alive(p) for p in pids), 15, f"rank processes {pids} gone")


@pytest.fixture(scope="module")
def image_server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def video_server(servers):
    return servers[1]


@pytest.fixture(scope="module")
def quick_server(servers):
    return servers[2]


@pytest.fixture(scope="module")
def cfg_server(servers):
    return servers[3]


@pytest.fixture(scope="module")
def reference():
    """The single-device tiny pipeline: the float image the server's PNG must round to."""
    from spattn.integrations.diffusers.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("tiny-qwen-image")
    pipe.set_progress_bar_config(disable=True)

    def run(prompt: str, seed: int, **guidance) -> np.ndarray:
        g = torch.Generator("cpu").manual_seed(seed)
        guidance = guidance or {"true_cfg_scale": 1.0}
        return pipe(prompt=prompt, generator=g, output_type="np", width=64, height=64, num_inference_steps=2,
                    **guidance).images[0]

    return run


def _png(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))).astype(np.float64) / 255


def _post(server, body, timeout=300):
    return httpx.post(server.url + "/v1/images/generations", json=body, timeout=timeout)


# --------------------------------------------------------------------------------------- images
def test_health_loading_then_ready(image_server):
    code, body = image_server.first_health
    assert code == 503 and body["status"] == "loading"
    r = image_server.health()
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert [x["rank"] for x in r.json()["ranks"]] == [0, 1] and all(pid_alive(p) for p in image_server.rank_pids)


def test_openai_client_image_matches_single_device(image_server, reference):
    client = openai.OpenAI(base_url=image_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    r = client.images.generate(model="tiny-qwen-image", prompt="a cat on a windowsill", size="64x64",
                               response_format="b64_json", extra_body={"num_inference_steps": 2, "seed": 5})
    assert len(r.data) == 1 and r.size == "64x64"
    assert r.usage.queue_s >= 0 and r.usage.exec_s > 0
    img = _png(r.data[0].b64_json)
    ref = reference("a cat on a windowsill", 5)
    assert img.shape == (64, 64, 3)
    assert np.abs(img - ref).max() <= 1e-3 + 0.5 / 255 + 1e-9  # the PNG rounds to 1/255
    two = client.images.generate(prompt="a cat on a windowsill", n=2, size="64x64", response_format="b64_json",
                                 extra_body={"num_inference_steps": 2, "seed": 5})
    # The first of n=2 is the seed's image (batch-2 floats differ ~1e-7: at most one rounding step).
    assert len(two.data) == 2 and np.abs(_png(two.data[0].b64_json) - img).max() <= 1 / 255 + 1e-9


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x", "size": "65x64"}, 400, "width"),
    ({"prompt": "x", "size": "big"}, 400, "size"),
    ({"prompt": "x", "response_format": "url"}, 400, "response_format"),
    ({"prompt": "x", "n": 11}, 400, "n"),
    ({"prompt": "x", "num_inference_steps": 0}, 400, "num_inference_steps"),
    ({"prompt": "x", "colour": "red"}, 400, "colour"),
    ({"size": "64x64"}, 400, "prompt"),
    ({"prompt": "x", "model": "other"}, 404, "model"),
])
def test_bad_requests_get_openai_errors(image_server, body, status, param):
    r = _post(image_server, body, timeout=30)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"] and set(err) == {"message", "type", "param", "code"}


def test_openai_client_raises_on_bad_request(image_server):
    client = openai.OpenAI(base_url=image_server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="url"):
        client.images.generate(prompt="x", size="64x64", response_format="url")


def test_models_endpoint(image_server):
    r = httpx.get(image_server.url + "/v1/models", timeout=10).json()
    assert [m["id"] for m in r["data"]] == ["tiny-qwen-image"]


def test_sixteen_concurrent_clients(image_server):
    results, errors = {}, []

    def client(seed):
        try:
            r = _post(image_server, {"prompt": f"photo {seed}", "seed": seed, **SMALL}, timeout=600)
            results[seed] = r
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(s,)) for s in range(100, 116)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(700)
    assert not errors and sorted(results) == list(range(100, 116))
    assert all(r.status_code == 200 for r in results.values()), [r.text for r in results.values()]
    assert len({r.json()["id"] for r in results.values()}) == 16
    image = {seed: _png(r.json()["data"][0]["b64_json"]) for seed, r in results.items()}
    # Each got its own seed's image: the same request alone gives the same PNG.
    for seed in (100, 107, 115):
        alone = _post(image_server, {"prompt": f"photo {seed}", "seed": seed, **SMALL}).json()
        assert np.abs(_png(alone["data"][0]["b64_json"]) - image[seed]).max() <= 1 / 255 + 1e-9
    assert np.abs(image[100] - image[101]).max() > 0.01
    metrics = httpx.get(image_server.url + "/metrics", timeout=10).text
    key = 'spattn_requests_total{endpoint="images",outcome="completed"}'
    completed = [line for line in metrics.splitlines() if line.startswith(key)]
    assert completed and float(completed[0].split()[-1]) >= 16
    assert "spattn_queue_depth" in metrics and "spattn_request_latency_seconds_bucket" in metrics


def _stats(server) -> dict:
    return server.health().json()


def test_client_disconnect_cancels_at_a_step(image_server):
    before = _stats(image_server)["cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        _post(image_server, {"prompt": "slow", "seed": 1, "size": "64x64", "num_inference_steps": 2000}, timeout=4)
    # 2000 steps would take minutes; the cancel lands within a few steps.
    _wait_for(lambda: _stats(image_server)["cancelled"] > before and _stats(image_server)["running"] == 0, 30,
              "the disconnected request cancelled")
    assert _post(image_server, {"prompt": "after", "seed": 1, **SMALL}).status_code == 200


def test_queue_full_gets_429_with_retry_after(image_server):
    slow = {"prompt": "slow", "seed": 1, "size": "64x64", "num_inference_steps": 2000}
    # 1 running + 16 queued; each disconnects after 20 s (they are queued within a second or two)
    threads = [threading.Thread(target=lambda: pytest.raises(httpx.ReadTimeout, _post, image_server, slow, 20))
               for _ in range(17)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    _wait_for(lambda: _stats(image_server)["queued"] == 16, 15, "16 queued requests")
    r = _post(image_server, {"prompt": "one too many", **SMALL}, timeout=30)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["code"] == "queue_full"
    for t in threads:
        t.join(120)
    _wait_for(lambda: _stats(image_server)["queued"] == 0 and _stats(image_server)["running"] == 0, 60,
              "the disconnected requests dropped")


def test_request_timeout_is_504_and_cancels(quick_server):
    t0 = time.monotonic()
    r = _post(quick_server, {"prompt": "slow", "size": "64x64", "num_inference_steps": 2000}, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert 3 <= time.monotonic() - t0 < 30
    _wait_for(lambda: _stats(quick_server)["cancelled"] == 1 and _stats(quick_server)["running"] == 0, 30,
              "the timed-out request cancelled")
    assert _post(quick_server, {"prompt": "quick", "seed": 2, **SMALL}).status_code == 200


def test_sigterm_drains_in_flight_requests(image_server):
    # Last image test: the server exits.
    results = []
    threads = [threading.Thread(target=lambda s=s: results.append(
        _post(image_server, {"prompt": f"drain {s}", "seed": s, "size": "64x64", "num_inference_steps": 6}, 120)))
        for s in range(2)]
    for t in threads:
        t.start()
    # Both requests accepted (one may still be queued) before SIGTERM: a client thread that had not yet
    # connected would be refused by the stopping server, which is not what this test is about.
    _wait_for(lambda: (lambda st: st["running"] > 0 and st["running"] + st["queued"] >= 2)(_stats(image_server)),
              60, "both requests in, one running")
    image_server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(90)
    assert len(results) == 2 and not any(t.is_alive() for t in threads)
    assert all(r.status_code in (200, 503) for r in results) and any(r.status_code == 200 for r in results)
    image_server.proc.wait(60)
    _wait_for(lambda: not any(pid_alive(p) for p in image_server.rank_pids), 15, "ranks gone after SIGTERM")


# ---------------------------------------------------------------------------------------- video
def test_video_job_lifecycle(video_server):
    import imageio.v3 as iio

    r = httpx.post(video_server.url + "/v1/images/generations", json={"prompt": "x", **SMALL}, timeout=30)
    assert r.status_code == 400 and "/v1/videos" in r.json()["error"]["message"]
    job = httpx.post(video_server.url + "/v1/videos", json={
        "prompt": "a cat", "size": "64x48", "num_frames": 5, "fps": 8, "num_inference_steps": 2, "seed": 0},
        timeout=30).json()
    assert job["status"] in ("queued", "in_progress") and job["id"].startswith("video_") and job["error"] is None
    url = f"{video_server.url}/v1/videos/{job['id']}"
    done = _wait_for(lambda: (lambda j: j if j["status"] in ("completed", "failed") else None)(
        httpx.get(url, timeout=10).json()), 300, "the video job finished")
    assert done["status"] == "completed" and done["progress"] == 100, done
    mp4 = httpx.get(url + "/content", timeout=60)
    assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4" and mp4.content[4:8] == b"ftyp"
    frames = iio.imread(mp4.content, extension=".mp4")
    assert frames.shape[:3] == (5, 48, 64)
    bad = httpx.post(video_server.url + "/v1/videos", json={"prompt": "x", "num_frames": 6}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "num_frames"
    assert httpx.delete(url, timeout=10).json()["deleted"] is True
    assert httpx.get(url, timeout=10).status_code == 404


def test_rank_killed_mid_request(video_server):
    job = httpx.post(video_server.url + "/v1/videos", json={
        "prompt": "slow", "size": "64x48", "num_frames": 5, "num_inference_steps": 2000, "seed": 0}, timeout=30).json()
    url = f"{video_server.url}/v1/videos/{job['id']}"
    _wait_for(lambda: httpx.get(url, timeout=10).json()["progress"] > 0, 120, "the job running")
    os.kill(video_server.rank_pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    r = _wait_for(lambda: (lambda h: h if h.status_code == 503 else None)(video_server.health()), 10, "health 503")
    assert r.json()["dead_rank"] == 1 and "rank 1" in r.json()["error"]
    assert time.monotonic() - t0 < 10
    j = _wait_for(lambda: (lambda j: j if j["status"] == "failed" else None)(httpx.get(url, timeout=10).json()), 10,
                  "the job failed")
    assert "rank 1" in j["error"]["message"]
    later = httpx.post(video_server.url + "/v1/videos", json={"prompt": "x", "num_frames": 5}, timeout=30)
    assert later.status_code == 503 and later.json()["error"]["code"] == "engine_dead"


# ------------------------------------------------------------------------------------ CFG parallel
def test_cfg_server_answers_a_guided_openai_request(cfg_server, reference):
    h = cfg_server.health().json()
    assert h["cfg_degree"] == 2 and [r["rank"] for r in h["ranks"]] == [0, 1]
    client = openai.OpenAI(base_url=cfg_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    guidance = {"negative_prompt": "blurry", "true_cfg_scale": 4.0}
    r = client.images.generate(prompt="a red boat", size="64x64", response_format="b64_json",
                               extra_body={"num_inference_steps": 2, "seed": 6, **guidance})
    assert r.usage.idle_fraction == 0.0   # both halves did useful work: one guidance branch each
    ref = reference("a red boat", 6, **guidance)
    assert np.abs(_png(r.data[0].b64_json) - ref).max() <= 1e-3 + 0.5 / 255 + 1e-9
    assert np.abs(ref - reference("a red boat", 6)).max() > 1e-2   # the guidance mattered
