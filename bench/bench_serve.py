"""``spattn serve`` under load: N concurrent clients x M requests each, loopback only, per --max-batch-size.

    python bench/bench_serve.py [--model tiny-qwen-image] [--usp 2] [--ring 1] [--clients 8] [--requests 4]
        [--batch-sizes 1,4] [--size 64x64] [--steps 4]

For each batch size a server is started (a subprocess on a free 127.0.0.1 port), warmed with one request,
then ``--clients`` threads each send ``--requests`` requests back to back (distinct seeds; the total is
bounded: clients x requests). Reported per batch size: requests/s over the whole run, p50/p99 latency
(client side, request sent -> PNG received), failures. Rows are appended to bench/out/bench_serve.csv; the
plot (bench/out/bench_serve.png) shows throughput and latency per batch size.
On CPU the ranks share the machine's cores with the server and the clients, so the figures show what
batching buys in overhead per request (fewer text-encoder/VAE calls and per-step collectives), not GPU
throughput.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Dict, List

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
OUT_DIR = os.path.join(ROOT, "bench", "out")
sys.path.insert(0, ROOT)

from spattn.launch import free_port  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results import write_csv  # noqa: E402  (bench/results.py)


def _percentile(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


def start_server(args, batch: int) -> tuple:
    """(Popen, base url) once /health is 200."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "spattn", "serve", args.model, "--port", str(port), "--usp", str(args.usp),
           "--ring", str(args.ring), "--max-batch-size", str(batch), "--max-queue", str(args.clients * 2),
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise TimeoutError(f"server not ready after {args.start_timeout_s}s")


def stop_server(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def load(url: str, args) -> Dict:
    """Run clients x requests; returns the row's measurements."""
    import httpx

    body = {"prompt": "a cat sitting on a windowsill", "size": args.size, "num_inference_steps": args.steps}
    latencies: List[float] = []
    failures: List[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(timeout=args.request_timeout_s) as http:
            for i in range(args.requests):
                t0 = time.perf_counter()
                try:
                    r = http.post(url + "/v1/images/generations", json={**body, "seed": c * 1000 + i})
                    ok = r.status_code == 200
                    why = f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    ok, why = False, type(e).__name__
                with lock:
                    (latencies.append(time.perf_counter() - t0) if ok else failures.append(why))

    httpx.post(url + "/v1/images/generations", json={**body, "seed": 0}, timeout=args.request_timeout_s)  # warm-up
    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"requests": len(latencies), "failures": len(failures), "wall_s": round(wall, 3),
            "requests_per_s": round(len(latencies) / wall, 3),
            "p50_s": round(statistics.median(latencies), 3) if latencies else None,
            "p99_s": round(_percentile(latencies, 99), 3) if latencies else None}


def plot(rows: List[Dict], path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e \".[bench]\")")
        return
    labels = [str(r["max_batch_size"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.bar(labels, [r["requests_per_s"] for r in rows], color="tab:blue")
    a.set_xlabel("--max-batch-size")
    a.set_ylabel("requests / s")
    x = range(len(rows))
    b.bar([i - 0.2 for i in x], [r["p50_s"] or 0 for r in rows], width=0.4, label="p50")
    b.bar([i + 0.2 for i in x], [r["p99_s"] or 0 for r in rows], width=0.4, label="p99")
    b.set_xticks(list(x), labels)
    b.set_xlabel("--max-batch-size")
    b.set_ylabel("latency (s)")
    b.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-qwen-image")
    p.add_argument("--usp", type=int, default=2)
    p.add_argument("--ring", type=int, default=1)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--size", default="64x64")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--start-timeout-s", type=float, default=900)
    p.add_argument("--request-timeout-s", type=float, default=600)
    p.add_argument("--csv", default=os.path.join(OUT_DIR, "bench_serve.csv"))
    p.add_argument("--png", default=os.path.join(OUT_DIR, "bench_serve.png"), help="plot path ('' for none)")
    args = p.parse_args()
    if args.clients < 1 or args.requests < 1 or args.clients * args.requests > 10_000:
        p.error("--clients and --requests: at least 1 each, at most 10000 requests in all")
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        proc, url = start_server(args, batch)
        try:
            m = load(url, args)
        finally:
            stop_server(proc)
        row = {"model": args.model, "ulysses_degree": args.usp, "ring_degree": args.ring, "max_batch_size": batch,
               "clients": args.clients, "requests_per_client": args.requests, "size": args.size,
               "steps": args.steps, "cores": os.cpu_count(), **m}
        rows.append(row)
        print(f"max_batch_size {batch}: {m['requests']} ok / {m['failures']} failed in {m['wall_s']}s = "
              f"{m['requests_per_s']} req/s, p50 {m['p50_s']}s, p99 {m['p99_s']}s", flush=True)
    print("| --max-batch-size | requests/s | p50 | p99 | failures |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['max_batch_size']} | {r['requests_per_s']:.2f} | {r['p50_s']}s | {r['p99_s']}s "
              f"| {r['failures']} |")
    write_csv(rows, args.csv)
    print(f"csv: {args.csv}")
    if args.png:
        plot(rows, args.png, f"spattn serve {args.model}, ulysses {args.usp} x ring {args.ring}, {args.size}, "
                             f"{args.steps} steps, {args.clients} clients x {args.requests} requests, "
                             f"{os.cpu_count()} CPU cores")
        print(f"plot: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
