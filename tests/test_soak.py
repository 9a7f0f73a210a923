"""Soak: many forward+backward calls in one process per rank must not grow memory, open file
descriptors or threads, and must not reallocate ring buffers.

CI runs a few hundred calls per mode; ``SPATTN_SOAK_CALLS=5000 pytest tests/test_soak.py`` by hand.
"""
from __future__ import annotations

import gc
import os
import threading

import pytest
import torch

import spattn
from dist_harness import run_on_ranks
from sp_cases import get_mesh

CALLS = int(os.environ.get("SPATTN_SOAK_CALLS", "300"))
WARMUP = 30
RSS_MARGIN_MB = 24.0  # allocator noise at these sizes is a few MB; a per-call leak of 100 kB fails


def _snapshot():
    import psutil

    gc.collect()
    p = psutil.Process()
    return dict(rss_mb=p.memory_info().rss / 2**20, fds=len(os.listdir("/proc/self/fd")),
                threads=p.num_threads(), py_threads=threading.active_count())


def soak_body(u: int, r: int, calls: int, text: int) -> dict:
    mesh = get_mesh(u, r)
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, 12, 4, 16, generator=g) for _ in range(4))
    t = [torch.randn(1, text, 4, 16, generator=g).requires_grad_() for _ in range(3)] if text else []
    jkw = dict(joint_q=t[0], joint_k=t[1], joint_v=t[2]) if text else {}
    causal = not text

    def step():
        ql, kl, vl = (x.clone().requires_grad_() for x in (q, k, v))
        # ring_impl="p2p": the K/V ring whose buffers are cached (auto may pick the all-gather ring).
        res = spattn.attention(ql, kl, vl, mesh, causal=causal, layout="zigzag" if causal else "contiguous",
                               ring_impl="p2p", **jkw)
        out = res[0] if text else res
        ((out * dout).sum() + (res[1].sum() if text else 0)).backward()

    for _ in range(WARMUP):
        step()
    before, allocs = _snapshot(), mesh.comm_cache.allocations
    mid = None
    for i in range(calls):
        step()
        if i == calls // 2:
            mid = _snapshot()
    after = _snapshot()
    return dict(before=before, mid=mid, after=after, new_allocs=mesh.comm_cache.allocations - allocs,
                cached=mesh.comm_cache.allocations)


@pytest.mark.parametrize("u,r,text", [(2, 2, 0), (1, 4, 0), (4, 1, 0), (2, 2, 5)],
                         ids=["hybrid", "ring", "ulysses", "hybrid-joint"])
def test_soak_no_growth(u, r, text):
    pytest.importorskip("psutil")
    res = run_on_ranks(4, soak_body, u, r, CALLS, text, timeout=600)
    b, m, a = res["before"], res["mid"], res["after"]
    growth = a["rss_mb"] - b["rss_mb"]
    print(f"soak {u}x{r} text={text}: {CALLS} calls, RSS {b['rss_mb']:.1f} -> {m['rss_mb']:.1f} -> "
          f"{a['rss_mb']:.1f} MB, fds {b['fds']} -> {a['fds']}, threads {b['threads']} -> {a['threads']}")
    assert growth < RSS_MARGIN_MB, f"RSS grew {growth:.1f} MB over {CALLS} calls: {res}"
    assert a["fds"] <= b["fds"], f"open file descriptors grew: {res}"
    assert a["threads"] <= b["threads"] and a["py_threads"] <= b["py_threads"], f"threads grew: {res}"
    assert res["new_allocs"] == 0, f"ring exchanges were reallocated during the loop: {res}"
    if r > 1:
        assert res["cached"] >= 1, "the ring ran without the mesh's buffer cache"
