"""The OpenAI-compatible HTTP app over an ``Engine`` (FastAPI): images, video jobs, health, models, metrics.

    app = create_app(lambda: Engine("tiny-qwen-image", ulysses_degree=2), model_name="tiny-qwen-image")

The engine is built in the background at start-up, so ``/health`` answers 503 ("loading") at once
and 200 when the ranks are ready. Errors use OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}``: 400 bad field, 404 unknown model/job, 429 (+ ``Retry-After``) queue full, 500 the request
raised on a rank, 503 engine loading or dead, 504 past ``request_timeout_s``. A client that
disconnects cancels its request at the next denoising step.
"""
from __future__ import annotations

import asyncio
import base64
import io
import math
import os
import re
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from typing import Any, Callable, Dict, Optional

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from .engine import Engine, Request
from .params import (EngineBusyError, EngineDeadError, RequestCancelled, RequestFailed, SamplingParams)

IMAGE_FIELDS = {"prompt", "model", "n", "size", "response_format", "negative_prompt", "num_inference_steps",
                "guidance_scale", "true_cfg_scale", "seed", "user"}
VIDEO_FIELDS = {"prompt", "model", "size", "num_frames", "fps", "num_inference_steps", "seed", "negative_prompt",
                "guidance_scale"}
MAX_JOBS = 256   # finished video jobs kept for download (oldest dropped first)
POLL_S = 0.02


class HTTPError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type_, param, code, headers


def _error(e: HTTPError) -> JSONResponse:
    return JSONResponse({"error": {"message": str(e), "type": e.type, "param": e.param, "code": e.code}},
                        status_code=e.status, headers=e.headers)


def _bad_field(e: ValueError) -> HTTPError:
    """The engine's ValueErrors start with the field name ("width: ...")."""
    m = re.match(r"([a-z_]+):", str(e))
    return HTTPError(400, str(e), param=m.group(1) if m else None, code="invalid_value")


def _parse_size(size: Any) -> tuple:
    m = re.fullmatch(r"(\d+)x(\d+)", size) if isinstance(size, str) else None
    if not m:
        raise HTTPError(400, f"size: expected \"WIDTHxHEIGHT\" (e.g. \"512x512\"), got {size!r}", param="size",
                        code="invalid_value")
    return int(m.group(1)), int(m.group(2))


class _Metrics:
    def __init__(self, state: "_State"):
        self.registry = CollectorRegistry()
        self.requests = Counter("spattn_requests", "Requests by outcome", ["endpoint", "outcome"],
                                registry=self.registry)
        self.latency = Histogram("spattn_request_latency_seconds", "Submitted -> answered, completed requests",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, math.inf))
        stat = lambda key: (lambda: state.engine.stats()[key] if state.engine is not None else 0)  # noqa: E731
        Gauge("spattn_queue_depth", "Requests waiting", registry=self.registry).set_function(stat("queued"))
        Gauge("spattn_running_requests", "Requests on the ranks now",
              registry=self.registry).set_function(stat("running"))
        Gauge("spattn_engine_ready", "1 when the engine serves", registry=self.registry).set_function(
            lambda: 1.0 if state.engine is not None and state.engine.health()["status"] == "ok" else 0.0)


class _State:
    def __init__(self):
        self.engine: Optional[Engine] = None
        self.error: Optional[str] = None
        self.jobs: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()
        self.lock = threading.Lock()


def create_app(engine: Callable[[], Engine], *, model_name: str, request_timeout_s: float = 600.0) -> FastAPI:
    """The app; ``engine`` is called once at start-up (in a thread) to build the ``Engine``."""
    state = _State()
    metrics = _Metrics(state)

    def build():
        try:
            state.engine = engine()
        except BaseException as e:  # noqa: BLE001 - reported by /health, the server keeps answering
            state.error = f"{type(e).__name__}: {e}"

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=build, name="spattn-engine-loader", daemon=True)
        loader.start()
        try:
            yield
        finally:
            await asyncio.to_thread(loader.join, 0 if state.engine is None else None)
            if state.engine is not None:
                await asyncio.to_thread(state.engine.close)

    app = FastAPI(title="spattn serve", lifespan=lifespan)
    app.state.spattn = state

    @app.exception_handler(HTTPError)
    async def on_http_error(request, exc: HTTPError):
        return _error(exc)

    def ready_engine() -> Engine:
        eng = state.engine
        if eng is None:
            if state.error:
                raise HTTPError(503, f"engine failed to start: {state.error}", "server_error", code="engine_dead")
            raise HTTPError(503, "engine loading; retry when GET /health is 200", "server_error",
                            code="engine_loading", headers={"Retry-After": "5"})
        h = eng.health()
        if h["status"] == "dead":
            raise HTTPError(503, f"engine dead: {h.get('error')}", "server_error", code="engine_dead")
        if h["status"] != "ok" and h["status"] != "restarting":
            raise HTTPError(503, f"engine {h['status']}", "server_error", code="engine_unavailable")
        return eng

    async def json_body(request: HTTPRequest, allowed: set) -> Dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise HTTPError(400, "body: expected a JSON object", code="invalid_json") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "body: expected a JSON object", code="invalid_json")
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise HTTPError(400, f"{unknown[0]}: unknown field; known fields: {', '.join(sorted(allowed))}",
                            param=unknown[0], code="unknown_field")
        if not isinstance(body.get("prompt"), str) or not body["prompt"]:
            raise HTTPError(400, "prompt: required, a non-empty string", param="prompt", code="missing_field")
        if body.get("model") not in (None, model_name):
            raise HTTPError(404, f"model: {body['model']!r} is not served here; this server serves {model_name!r}",
                            param="model", code="model_not_found")
        return body

    def submit(eng: Engine, prompt: str, fields: Dict[str, Any], endpoint: str) -> Request:
        try:
            params = SamplingParams.from_dict({k: v for k, v in fields.items() if v is not None})
            return eng.submit(prompt, params)
        except EngineBusyError as e:
            metrics.requests.labels(endpoint, "rejected").inc()
            raise HTTPError(429, str(e), "rate_limit_error", code="queue_full",
                            headers={"Retry-After": str(int(math.ceil(e.retry_after_s)))}) from None
        except EngineDeadError as e:
            raise HTTPError(503, f"engine dead: {e}", "server_error", code="engine_dead") from None
        except (ValueError, TypeError) as e:
            metrics.requests.labels(endpoint, "bad_request").inc()
            raise _bad_field(ValueError(str(e))) from None

    def outcome_error(req: Request, endpoint: str) -> Optional[HTTPError]:
        try:
            req.result(0)
            return None
        except RequestFailed as e:
            metrics.requests.labels(endpoint, "failed").inc()
            return HTTPError(500, f"generation failed: {e}", "server_error", code="generation_failed")
        except RequestCancelled as e:
            metrics.requests.labels(endpoint, "cancelled").inc()
            return HTTPError(499, str(e), "server_error", code="cancelled")
        except EngineDeadError as e:
            metrics.requests.labels(endpoint, "failed").inc()
            return HTTPError(503, f"engine dead: {e}", "server_error", code="engine_dead")

    # ------------------------------------------------------------------------------------ images
    @app.post("/v1/images/generations")
    async def images(request: HTTPRequest):
        endpoint = "images"
        body = await json_body(request, IMAGE_FIELDS)
        eng = ready_engine()
        if eng.info.is_video:
            raise HTTPError(400, f"{model_name} is a video model; use POST /v1/videos", code="wrong_endpoint")
        fmt = body.get("response_format") or "b64_json"
        if fmt != "b64_json":
            raise HTTPError(400, f"response_format: {fmt!r} is not supported; spattn serve returns images inline, "
                                 f"use \"b64_json\"", param="response_format", code="invalid_value")
        n = body.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 10:
            raise HTTPError(400, f"n: expected an integer from 1 to 10, got {n!r}", param="n", code="invalid_value")
        fields = {k: body.get(k) for k in ("negative_prompt", "num_inference_steps", "guidance_scale",
                                           "true_cfg_scale", "seed")}
        if body.get("size") is not None:
            fields["width"], fields["height"] = _parse_size(body["size"])
        fields["num_images_per_prompt"] = n
        req = submit(eng, body["prompt"], fields, endpoint)
        deadline = time.monotonic() + request_timeout_s
        while not req.done():
            if await request.is_disconnected():
                req.cancel()  # stops at the next denoising step
                metrics.requests.labels(endpoint, "disconnected").inc()
                return Response(status_code=499)
            if time.monotonic() > deadline:
                req.cancel()
                metrics.requests.labels(endpoint, "timeout").inc()
                raise HTTPError(504, f"request {req.request_id} not finished within {request_timeout_s:g}s "
                                     f"(--request-timeout-s); cancelled", "server_error", code="timeout")
            await asyncio.sleep(POLL_S)
        err = outcome_error(req, endpoint)
        if err is not None:
            raise err
        out = req.result(0)

        def encode() -> list:
            data = []
            for img in out.images:
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                data.append({"b64_json": base64.b64encode(buf.getvalue()).decode("ascii")})
            return data

        data = await asyncio.to_thread(encode)
        metrics.requests.labels(endpoint, "completed").inc()
        metrics.latency.labels(endpoint).observe(time.monotonic() - req.submitted)
        w, h = out.images[0].size
        return {"created": int(time.time()), "data": data, "size": f"{w}x{h}", "id": req.request_id,
                "seed": out.seed, "usage": {"queue_s": round(out.metrics["queue_s"], 6),
                                            "exec_s": round(out.metrics["exec_s"], 6),
                                            "idle_fraction": out.metrics.get("idle_fraction", 0.0)}}

    # ------------------------------------------------------------------------------------ videos
    def job_view(job: Dict[str, Any]) -> Dict[str, Any]:
        req: Request = job["request"]
        status = req.status
        if status == "cancelled":
            status = "failed"
        error = None
        if req.done() and req.status != "completed":
            try:
                req.result(0)
            except Exception as e:  # noqa: BLE001 - its message is the job's error
                error = {"message": str(e), "code": type(e).__name__}
        p = req.resolved
        return {"id": job["id"], "object": "video", "model": model_name, "status": status,
                "progress": int(round(100 * req.progress)), "created_at": job["created_at"],
                "size": f"{p['width']}x{p['height']}", "num_frames": p["num_frames"], "fps": p["fps"],
                "seed": p["seed"], "error": error}

    def get_job(video_id: str) -> Dict[str, Any]:
        with state.lock:
            job = state.jobs.get(video_id)
        if job is None:
            raise HTTPError(404, f"video {video_id!r} not found", param="video_id", code="not_found")
        return job

    @app.post("/v1/videos")
    async def create_video(request: HTTPRequest):
        endpoint = "videos"
        body = await json_body(request, VIDEO_FIELDS)
        eng = ready_engine()
        if not eng.info.is_video:
            raise HTTPError(400, f"{model_name} makes images; /v1/videos needs a video model (e.g. tiny-wan)",
                            code="wrong_endpoint")
        fields = {k: body.get(k) for k in ("num_frames", "fps", "num_inference_steps", "seed", "negative_prompt",
                                           "guidance_scale")}
        if body.get("size") is not None:
            fields["width"], fields["height"] = _parse_size(body["size"])
        req = submit(eng, body["prompt"], fields, endpoint)
        job = {"id": f"video_{uuid.uuid4().hex}", "request": req, "created_at": int(time.time()), "mp4": None}
        with state.lock:
            state.jobs[job["id"]] = job
            while len(state.jobs) > MAX_JOBS:
                _, old = state.jobs.popitem(last=False)
                old["request"].cancel()
        return job_view(job)

    @app.get("/v1/videos/{video_id}")
    async def video_status(video_id: str):
        return job_view(get_job(video_id))

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(video_id: str):
        job = get_job(video_id)
        req: Request = job["request"]
        if req.status != "completed":
            raise HTTPError(409, f"video {video_id} is {req.status}; download it when status is completed",
                            param="video_id", code="not_ready")
        if job["mp4"] is None:
            out = req.result(0)

            def encode() -> bytes:
                from diffusers.utils import export_to_video

                fd, path = tempfile.mkstemp(suffix=".mp4")
                os.close(fd)
                try:
                    export_to_video(list(out.array), path, fps=out.fps)
                    with open(path, "rb") as f:
                        return f.read()
                finally:
                    os.unlink(path)

            job["mp4"] = await asyncio.to_thread(encode)
            metrics.requests.labels("videos", "completed").inc()
            metrics.latency.labels("videos").observe(time.monotonic() - req.submitted)
        return Response(job["mp4"], media_type="video/mp4")

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str):
        job = get_job(video_id)
        job["request"].cancel()
        with state.lock:
            state.jobs.pop(video_id, None)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    # ----------------------------------------------------------------------------- health etc.
    @app.get("/health")
    async def health():
        if state.engine is None:
            body = {"status": "failed" if state.error else "loading", "ranks": [], "error": state.error}
            return JSONResponse(body, status_code=503)
        h = state.engine.health()
        return JSONResponse(h, status_code=200 if h["status"] == "ok" else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "spattn"}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
