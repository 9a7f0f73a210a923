"""``spattn serve``: an OpenAI-compatible HTTP server over a sequence-parallel ``spattn.Engine``.

    spattn serve tiny-qwen-image --port 8091 --usp 2            # Ulysses 2
    spattn serve tiny-qwen-image --port 8091 --ring 2           # Ring 2
    spattn serve tiny-qwen-image --port 8091 --usp 2 --ring 2   # hybrid, 4 ranks
    spattn serve tiny-qwen-image --port 8091 --cfg 2 --usp 2    # CFG parallel x Ulysses 2, 4 ranks

Every rank decodes a band of each image (exact patch-parallel VAE) unless ``--no-vae-parallel``.

Ranks are spawned here (or, under torchrun, rank 0 serves HTTP and the others serve rank 0's
requests). SIGTERM / Ctrl-C: stop accepting, let in-flight requests finish (up to
``--graceful-timeout-s``), fail the rest, stop every rank.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from spattn.engine.engine import BACKENDS, DTYPES

from .argtypes import positive_float, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument
    g("model_pos", nargs="?", metavar="MODEL", default=None,
      help="the model, as `spattn generate --model` takes it (tiny-qwen-image, tiny-flux, tiny-wan, a diffusers "
           "directory or a cached hub id)")
    g("--model", default=None, help="the model (instead of the positional MODEL)")
    g("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    g("--port", type=positive_int, default=8091, help="port (default 8091)")
    g("--ulysses-degree", "--usp", dest="ulysses_degree", type=positive_int, default=None,
      help="ranks splitting attention heads (default 1; under torchrun, the launched world when no degree is given)")
    g("--ring-degree", "--ring", dest="ring_degree", type=positive_int, default=None,
      help="ranks passing K/V around a ring (default 1); ranks = cfg x ulysses x ring")
    g("--cfg", "--cfg-degree", "--cfg-parallel", dest="cfg_degree", type=positive_int, default=1,
      help="2: run the conditional and unconditional guidance branches of a request with negative_prompt "
           "(Qwen-Image) or guidance_scale (Wan) at the same time on two halves of the ranks (default 1)")
    g("--vae-parallel", action=argparse.BooleanOptionalAction, default=True,
      help="decode each image with every rank, each on a band of rows (exact; default on); "
           "--no-vae-parallel decodes on rank 0 alone")
    g("--max-batch-size", type=positive_int, default=1,
      help="queued requests with the same size/steps/guidance run as one pipeline call (default 1)")
    g("--max-queue", type=positive_int, default=64, help="waiting requests beyond this get 429 (default 64)")
    g("--request-timeout-s", type=positive_float, default=600.0,
      help="a request not answered within this gets 504 and is cancelled (default 600)")
    g("--graceful-timeout-s", type=positive_float, default=30.0,
      help="on SIGTERM, how long in-flight requests may finish (default 30)")
    g("--backend", choices=BACKENDS, default="auto", help="spattn attention backend (default auto)")
    g("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    g("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def run(args: argparse.Namespace) -> int:
    def fail(message: str) -> int:
        if os.environ.get("RANK", "0") == "0":
            print(f"spattn serve: error: {message}", file=sys.stderr)
        return 2

    if args.model_pos and args.model and args.model_pos != args.model:
        return fail(f"two models given ({args.model_pos!r} and --model {args.model!r}); give one")
    model = args.model_pos or args.model
    if not model:
        return fail("no model; e.g. spattn serve tiny-qwen-image --usp 2")
    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client", "diffusers", "transformers")
               if importlib.util.find_spec(m) is None]
    if missing:
        return fail(f"{', '.join(missing)} not installed; pip install -e \".[serve,diffusers]\"")
    from spattn.engine import Engine
    from spattn.engine.engine import _launched
    from spattn.engine.pipelines import resolve_model

    launched = _launched()
    c = args.cfg_degree
    if c > 2:
        return fail(f"--cfg {c}: classifier-free guidance has two branches; use --cfg 2 and give the other ranks "
                    f"to --usp / --ring")
    if args.ulysses_degree is None and args.ring_degree is None:
        args.ulysses_degree = max(1, launched[1] // c) if launched else 1
    u, r = args.ulysses_degree or 1, args.ring_degree or 1

    def make() -> Engine:
        return Engine(model, ulysses_degree=u, ring_degree=r, cfg_degree=c, backend=args.backend, dtype=args.dtype,
                      vae_parallel=args.vae_parallel, max_batch_size=args.max_batch_size, max_queue=args.max_queue)

    try:  # bad flags fail here, before any rank starts
        resolve_model(model)
        if launched is not None and launched[1] != c * u * r:
            raise ValueError(f"--cfg {c} x --usp {u} x --ring {r} = {c * u * r} ranks, but the launcher started "
                             f"{launched[1]}")
    except ValueError as e:
        return fail(str(e))
    if launched is not None and launched[0] != 0:
        make()  # serves rank 0's requests until it closes the engine
        return 0

    import uvicorn

    from spattn.engine.http import create_app

    app = create_app(make, model_name=model, request_timeout_s=args.request_timeout_s)
    mesh = f"cfg {c} x ulysses {u} x ring {r}" if c > 1 else f"ulysses {u} x ring {r}"
    vae = "parallel VAE" if args.vae_parallel else "VAE on rank 0"
    print(f"spattn serve: {model} on http://{args.host}:{args.port} ({mesh}, {vae}); "
          f"GET /health is 200 once the ranks are loaded", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=int(max(1, args.graceful_timeout_s)))
    return 0
