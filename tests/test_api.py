"""Mesh, shard/gather, input validation, ops (attention_with_lse, merge) and the ring plan."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import spattn
from dist_harness import run_on_ranks
from sp_cases import expect_error, mesh_info, mismatched_shards, shard_gather_roundtrip, subgroup_mesh
from spattn.ops import merge_ref
from spattn.parallel.blocks import BlockPlan


# -- mesh ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("u,r", [(4, 2), (2, 4), (8, 1), (1, 8)])
def test_mesh_positions(u, r):
    infos = run_on_ranks(8, mesh_info, u, r)
    for rank, (ud, rd, w, sp, ur, rr) in enumerate(infos):
        assert (ud, rd, w) == (u, r, 8)
        assert (ur, rr) == (rank % u, rank // u), "Ulysses groups must be contiguous ranks, ring strided"
        assert sp == rank, "with the default group, sp_rank is the global rank"


def test_mesh_over_subgroup():
    err, sp = run_on_ranks(8, subgroup_mesh, 2, 2)
    assert err < 1e-5 and sp == 0


def test_mesh_of_one_without_distributed():
    m = spattn.SPMesh()
    assert (m.ulysses_degree, m.ring_degree, m.world_size, m.sp_rank) == (1, 1, 1, 0)
    q = torch.randn(2, 17, 3, 8)
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, q, q)), is_causal=True).transpose(1, 2)
    torch.testing.assert_close(spattn.attention(q, q, q, m, causal=True), ref, atol=1e-6, rtol=1e-5)


# -- shard / gather -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seq", [16, 13, 3])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world,u", [(2, 2), (4, 2), (8, 4)])
def test_shard_gather_roundtrip(world, u, layout, seq):
    assert run_on_ranks(world, shard_gather_roundtrip, u, world // u, seq, layout)


# -- bad input: clear errors, raised before any collective ----------------------------------------------
ERRORS = {
    "degrees": "must equal the group size",
    "rank3": "must be 4-D",
    "shape": "must agree in batch",
    "kv_mismatch": "k and v shapes differ",
    "dtype": "dtypes differ",
    "gqa": "multiple of k/v heads",
    "device": "gloo but q is on meta",
    "seq_len": "does not fit seq_len",
    "qk_len": "same sequence",
    "layout": "layout must be one of",
    "joint_causal": "causal=True with joint",
    "joint_partial": "pass all of joint_q",
    "backend": "unknown backend",
}


@pytest.mark.parametrize("kind", sorted(ERRORS))
def test_errors(kind):
    msg = run_on_ranks(4, expect_error, 2, 2, kind)
    assert ERRORS[kind] in msg, msg


@pytest.mark.parametrize("u,r", [(2, 2), (4, 1), (1, 4)])
def test_mismatch_between_ranks_is_an_error_not_a_hang(u, r):
    msg = run_on_ranks(4, mismatched_shards, u, r, timeout=60)
    assert "different arguments" in msg, msg


def test_unknown_layout_in_shard():
    with pytest.raises(ValueError, match="layout must be one of"):
        spattn.shard(torch.zeros(1, 4), spattn.SPMesh(), layout="striped")


# -- ops ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_attention_with_lse(backend, causal, hkv):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 33, 4, 40, generator=g, dtype=torch.float64).float().requires_grad_()
    k = torch.randn(2, 33, hkv, 40, generator=g).requires_grad_()
    v = torch.randn(2, 33, hkv, 40, generator=g).requires_grad_()
    out, lse = spattn.ops.attention_with_lse(q, k, v, causal=causal, backend=backend)
    qq, kk, vv = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", qq, kk.repeat_interleave(4 // hkv, 2)) / math.sqrt(40)
    if causal:
        s = s.masked_fill(~torch.ones(33, 33, dtype=torch.bool).tril(), float("-inf"))
    ref_lse = s.logsumexp(-1)
    ref = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), vv.repeat_interleave(4 // hkv, 2))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 33)
    dout = torch.randn_like(out)
    (out * dout).sum().backward()
    (ref * dout.double()).sum().backward()
    for a, b in ((q, qq), (k, kk), (v, vv)):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=2e-5, rtol=1e-5)


def test_attention_with_lse_empty_keys():
    q = torch.randn(1, 5, 2, 8)
    out, lse = spattn.ops.attention_with_lse(q, q[:, :0], q[:, :0])
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("blk_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_matches_joint_softmax(blk_dtype):
    # Splitting keys in two and merging must equal attention over all keys.
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 9, 3, 16, generator=g) for _ in range(3))
    full, full_lse = spattn.ops.attention_with_lse(q, k, v)
    a, la = spattn.ops.attention_with_lse(q, k[:, :4], v[:, :4])
    b, lb = spattn.ops.attention_with_lse(q, k[:, 4:], v[:, 4:])
    out, lse = spattn.ops.merge(a, la, b.to(blk_dtype), lb)
    tol = 1e-6 if blk_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, full, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, full_lse, atol=1e-6, rtol=1e-6)


def test_merge_inf_rows():
    out = torch.randn(1, 3, 2, 4)
    lse = torch.tensor([[[0.5, float("-inf"), float("-inf")], [1.0, float("-inf"), 2.0]]])
    blk = torch.randn(1, 3, 2, 4)
    blk_lse = torch.tensor([[[float("-inf"), 0.3, float("-inf")], [float("-inf"), float("-inf"), 2.0]]])
    out[:, 1, 0] = 0
    out[:, 1, 1] = 0
    out[:, 2, 0] = 0
    for impl in ("torch", "auto"):
        o, l = out.clone(), lse.clone()
        spattn.ops.merge_(o, l, blk, blk_lse, impl=impl)
        assert not torch.isnan(o).any() and not torch.isnan(l).any()
        torch.testing.assert_close(o[:, 0, 0], out[:, 0, 0])      # block side -inf: unchanged
        torch.testing.assert_close(o[:, 1, 0], blk[:, 1, 0])      # running side -inf: block wins
        assert (o[:, 2, 0] == 0).all() and torch.isneginf(l[0, 0, 2])  # both -inf: stays empty
        torch.testing.assert_close(o[:, 2, 1], (out[:, 2, 1] + blk[:, 2, 1]) / 2)
        torch.testing.assert_close(l[0, 1, 2], torch.tensor(2.0 + math.log(2)))
        ro, rl = merge_ref(out, lse, blk, blk_lse)
        torch.testing.assert_close(o, ro)
        torch.testing.assert_close(l, rl)


# -- ring plan: masked steps are skipped, zigzag balances causal work ----------------------------------
def _setup(R, rank, layout, seq_len=None, causal=True):
    L = 8
    starts = tuple((r * L,) if layout == "contiguous" else (r * L, (2 * R - 1 - r) * L) for r in range(R))
    n = L * R * (1 if layout == "contiguous" else 2)
    return BlockPlan(R, rank, L, starts, seq_len or n, causal)


def _work(calls):
    return sum((q1 - q0) * (k1 - k0) / (2 if c else 1) for q0, q1, k0, k1, c in calls)


@pytest.mark.parametrize("R", [2, 4, 8])
def test_zigzag_balances_causal_work(R):
    for step in range(R):
        works = {_work(_setup(R, i, "zigzag").calls((i - step) % R)) for i in range(R)}
        calls = [len(_setup(R, i, "zigzag").calls((i - step) % R)) for i in range(R)]
        assert len(works) == 1, f"step {step}: unequal causal work {works}"
        assert max(calls) == 1, "every zigzag step is a single backend call"


@pytest.mark.parametrize("R", [2, 4])
def test_masked_steps_are_skipped(R):
    for i in range(R):
        for src in range(R):
            calls = _setup(R, i, "contiguous").calls(src)
            assert (calls == []) == (src > i)
            assert all(c[4] == (src == i) for c in calls)


def test_padding_trims_keys_noncausal():
    st = _setup(2, 0, "contiguous", seq_len=13, causal=False)
    assert st.calls(1) == [(0, 8, 0, 5, False)]          # rank 1 holds 5 real keys of 8
    assert st.pad_rows() == [] and _setup(2, 1, "contiguous", seq_len=13).pad_rows() == [(5, 8)]


def test_pipeline_plans_never_send_kv_twice():
    from spattn.parallel.heads import head_plan, pipeline_plans

    for hq, hkv, u, target in [(8, 8, 2, 2), (24, 8, 4, 4), (8, 1, 2, 4), (24, 8, 16, 2), (6, 3, 2, 3), (3, 1, 8, 2)]:
        plan = head_plan(hq, hkv, u)
        chunks = pipeline_plans(plan, target)
        for t in range(u):
            qs = [c.q_ranges[t] for c in chunks]
            assert qs[0][0] == plan.q_ranges[t][0] and qs[-1][1] == plan.q_ranges[t][1]
            assert all(a[1] == b[0] for a, b in zip(qs, qs[1:])), "chunks must tile the rank's heads"
            kv = sum(c.kv_ranges[t][1] - c.kv_ranges[t][0] for c in chunks)
            assert kv == plan.kv_ranges[t][1] - plan.kv_ranges[t][0]
    assert len(pipeline_plans(head_plan(8, 8, 2), 2)) == 2
    assert len(pipeline_plans(head_plan(8, 1, 2), 4)) == 1  # MQA: splitting would resend the KV head
