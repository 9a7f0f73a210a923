"""Real-world shapes: any sequence length, any head count and GQA, joint text+image, zigzag causal."""
from __future__ import annotations

import pytest

from sp_cases import Case, check

HYBRIDS = [(2, 1), (1, 2), (4, 1), (2, 2), (1, 4), (8, 1), (4, 2), (2, 4), (1, 8)]
IDS = [f"u{u}r{r}" for u, r in HYBRIDS]


# -- sequence lengths not divisible by the mesh (padding must get exactly zero weight) -------------
@pytest.mark.parametrize("seq", [97, 257, 6889 // 32, 13])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mesh", HYBRIDS, ids=IDS)
def test_any_seq_len(mesh, causal, seq):
    u, r = mesh
    check(Case(u, r, seq=seq, heads=8, head_dim=32, causal=causal))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("mesh", [(2, 2), (1, 4), (4, 1)], ids=["u2r2", "u1r4", "u4r1"])
def test_any_seq_len_low_precision(mesh, dtype):
    u, r = mesh
    check(Case(u, r, seq=97, heads=4, head_dim=40, causal=True, dtype=dtype))


@pytest.mark.parametrize("seq,mesh,causal", [(1025, (2, 2), True), (1025, (1, 8), False), (6889, (4, 2), False)],
                         ids=["1025-u2r2-causal", "1025-u1r8", "6889-u4r2"])
def test_real_lengths(seq, mesh, causal):
    # Qwen-Image at 1328x1328 has 83x83 = 6889 image tokens: divisible by nothing useful.
    u, r = mesh
    check(Case(u, r, seq=seq, heads=3 if seq == 6889 else 4, kv_heads=1 if seq == 6889 else None,
               head_dim=16, causal=causal))


# -- head counts not divisible by the Ulysses degree, GQA and MQA ---------------------------------
@pytest.mark.parametrize("heads,kv_heads", [(3, 3), (5, 5), (24, 8), (24, 1), (8, 1), (8, 2), (6, 3), (5, 1)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mesh", [(2, 1), (4, 1), (8, 1), (2, 2), (4, 2), (2, 4), (1, 4)],
                         ids=["u2r1", "u4r1", "u8r1", "u2r2", "u4r2", "u2r4", "u1r4"])
def test_heads_and_gqa(mesh, causal, heads, kv_heads):
    u, r = mesh
    check(Case(u, r, seq=8 * u * r, heads=heads, kv_heads=kv_heads, head_dim=16, causal=causal))


def test_heads_fewer_than_ranks():
    # 3 query heads, 1 KV head on 8 Ulysses ranks: five ranks get no head at all.
    check(Case(8, 1, seq=40, heads=3, kv_heads=1, head_dim=16, causal=True))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_gqa_low_precision(dtype):
    check(Case(4, 2, seq=64, heads=24, kv_heads=8, head_dim=32, causal=True, dtype=dtype))


# -- joint attention (MMDiT): text tokens attend jointly with the sharded image tokens --------------
@pytest.mark.parametrize("text", [1, 7, 77])
@pytest.mark.parametrize("strategy", ["front", "rear"])
@pytest.mark.parametrize("mesh", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (2, 4), (1, 8), (8, 1)],
                         ids=["u1r1", "u2r1", "u1r2", "u2r2", "u4r2", "u2r4", "u1r8", "u8r1"])
def test_joint(mesh, strategy, text):
    u, r = mesh
    check(Case(u, r, seq=12 * u * r, heads=8, head_dim=32, text=text, joint_strategy=strategy))


@pytest.mark.parametrize("mesh", [(2, 2), (4, 2), (8, 1), (1, 4)], ids=["u2r2", "u4r2", "u8r1", "u1r4"])
def test_joint_with_padding_and_gqa(mesh):
    u, r = mesh
    # Qwen-Image-like: odd image length, heads not divisible by the Ulysses degree, GQA.
    check(Case(u, r, seq=83, heads=6, kv_heads=3, head_dim=24, text=7))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_joint_low_precision(dtype):
    check(Case(2, 2, seq=48, heads=4, head_dim=32, text=7, dtype=dtype))


# -- zigzag (load-balanced causal) ------------------------------------------------------------------
@pytest.mark.parametrize("seq_mult", [16, None])
@pytest.mark.parametrize("mesh", HYBRIDS, ids=IDS)
def test_zigzag(mesh, seq_mult):
    u, r = mesh
    seq = seq_mult * u * r if seq_mult else 97
    check(Case(u, r, seq=seq, heads=8, kv_heads=2, head_dim=32, causal=True, layout="zigzag"))


@pytest.mark.parametrize("mesh", [(1, 4), (2, 2)], ids=["u1r4", "u2r2"])
def test_zigzag_noncausal_and_bf16(mesh):
    u, r = mesh
    check(Case(u, r, seq=64, heads=4, head_dim=32, causal=False, layout="zigzag"))
    check(Case(u, r, seq=64, heads=4, head_dim=32, causal=True, layout="zigzag", dtype="bf16"))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("mesh", [(2, 4), (8, 1), (1, 8)], ids=["u2r4", "u8r1", "u1r8"])
def test_fewer_tokens_than_ranks(mesh, layout):
    # Most ranks hold nothing but padding: they must still take part in every collective.
    u, r = mesh
    for seq, causal in ((1, True), (3, False), (3, True)):
        check(Case(u, r, seq=seq, heads=8, kv_heads=2, head_dim=16, causal=causal, layout=layout))
