"""Byte counters of spattn.comm: what each rank sends per collective kind equals the closed form
of the algorithm (the numbers bench/bench_sp.py prints next to the theoretical minimum)."""
from __future__ import annotations

import pytest
import torch

import spattn
from dist_harness import run_on_ranks
from sp_cases import get_mesh
from spattn import _ext
from spattn.comm import collectives as comm


def counted_step(u: int, r: int, heads: int, kv_heads: int, seq: int, dim: int, engine: str, text: int = 0):
    """Forward, then backward, of one attention call; the bytes this rank sent in each."""
    mesh = get_mesh(u, r)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, seq, heads, dim, generator=g)
    k, v = (torch.randn(1, seq, kv_heads, dim, generator=g) for _ in range(2))
    ql, kl, vl = (spattn.shard(t, mesh).requires_grad_() for t in (q, k, v))
    joint = {}
    if text:
        jq = torch.randn(1, text, heads, dim, generator=g).requires_grad_()
        jk, jv = (torch.randn(1, text, kv_heads, dim, generator=g).requires_grad_() for _ in range(2))
        joint = dict(joint_q=jq, joint_k=jk, joint_v=jv)
    with comm.count_comm() as fwd:
        res = spattn.attention(ql, kl, vl, mesh, ring_engine=engine, **joint)
    loss = sum(t.float().square().sum() for t in (res if text else (res,)))
    with comm.count_comm() as bwd:
        loss.backward()
    return fwd.bytes, bwd.bytes


@pytest.mark.parametrize("engine", ["python", "cpp"])
def test_ring_p2p_bytes(engine):
    if engine == "cpp" and not _ext.available():
        pytest.skip("spattn._C is not built here")
    seq, h, d, r = 32, 4, 8, 2
    fwd, bwd = run_on_ranks(2, counted_step, 1, r, h, h, seq, d, engine)
    blk = (seq // r) * h * d * 4  # one fp32 K (or V) block
    assert fwd == {"ring_p2p": (r - 1) * 2 * blk, "all_to_all": 0, "all_gather": 0, "all_reduce": 0, "reduce_scatter": 0}
    # Backward: K/V travel r-1 steps again; the fp32 (dK, dV) accumulators make a full lap (r sends).
    assert bwd["ring_p2p"] == (r - 1) * 2 * blk + r * 2 * blk
    assert bwd["all_to_all"] == 0


def test_ulysses_all_to_all_bytes_gqa():
    seq, h, hkv, d, u = 32, 4, 2, 8, 2
    fwd, bwd = run_on_ranks(2, counted_step, u, 1, h, hkv, seq, d, "python")
    local = seq // u
    # (U-1)/U of q, k, v goes out, and of out on the way back; backward mirrors it (dout in; dq, dk, dv back).
    per_head = local * d * 4 * (u - 1) // u
    want = (2 * h + 2 * hkv) * per_head
    assert fwd == {"ring_p2p": 0, "all_to_all": want, "all_gather": 0, "all_reduce": 0, "reduce_scatter": 0}
    assert bwd == {"ring_p2p": 0, "all_to_all": want, "all_gather": 0, "all_reduce": 0, "reduce_scatter": 0}


def test_joint_tokens_count_all_gather_and_all_reduce():
    seq, h, d, r, text = 32, 4, 8, 2, 6
    fwd, bwd = run_on_ranks(2, counted_step, 1, r, h, h, seq, d, "python", text)
    # The text partials (out fp32 + lse) are all-gathered over the ring: (r-1) pieces sent.
    assert fwd["all_gather"] == (r - 1) * (text * h * d * 4 + h * text * 4)
    # The replicated joint q/k/v gradients are all-reduced once (2 (n-1)/n of them, ring algorithm).
    assert bwd["all_reduce"] == 2 * (r - 1) * (3 * text * h * d * 4) // r


def test_counting_is_off_outside_the_block():
    assert not comm._COUNTERS
    comm.count_bytes("ring_p2p", 123)  # nothing active: a no-op
    with comm.count_comm() as outer:
        with comm.count_comm() as inner:
            comm.count_bytes("all_to_all", 10)
        comm.count_bytes("all_to_all", 5)
    assert inner.bytes["all_to_all"] == 10 and outer.bytes["all_to_all"] == 15 and outer.calls["all_to_all"] == 2
    assert outer.total == 15 and not comm._COUNTERS
