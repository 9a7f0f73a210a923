"""joint_mask: text padding masks (Qwen-Image's encoder_hidden_states_mask) in every mode.

Each case runs spattn.attention with a per-batch text mask on gloo ranks and compares out, LSE,
joint_out and all six gradients with the fp64 reference and SDPA over the joint sequence with the
key mask (batch, 1, 1, text + seq) (sp_cases.run_case; tolerances of test_sp.check). Masked text
rows are compared too (they are queries like any other); masked keys' djk/djv must be exactly 0.
"""
from __future__ import annotations

import pytest

from dist_harness import run_on_ranks
from sp_cases import Case, expect_error
from test_sp import check, triton_available

MESHES = [(2, 1), (1, 2), (4, 1), (1, 4), (2, 2)]
IDS = [f"u{u}r{r}" for u, r in MESHES]


# -- right-padded masks (the fast path: per-batch key lengths), batch 2 with 7 and 3 of 7 tokens ------
@pytest.mark.parametrize("strategy", ["front", "rear"])
@pytest.mark.parametrize("mesh", MESHES, ids=IDS)
def test_padded_text(mesh, strategy):
    u, r = mesh
    # seq 13: odd, padded shards on every mesh; GQA (4 query heads, 2 kv heads).
    check(Case(u, r, seq=13, heads=4, kv_heads=2, head_dim=16, batch=2, text=7, mask="pad",
               joint_strategy=strategy))


# -- general masks: holes in the middle, a masked first token, and a batch element with no text -----
@pytest.mark.parametrize("mask", ["hole", "empty"])
@pytest.mark.parametrize("mesh", MESHES, ids=IDS)
def test_general_masks(mesh, mask):
    u, r = mesh
    check(Case(u, r, seq=97, heads=4, head_dim=16, batch=2, text=7, mask=mask, joint_strategy="rear"))


def test_uneven_heads_pipeline():
    # 6 query / 3 kv heads on 4 Ulysses ranks: uneven head ranges, a non-uniform kv head map
    # (HeadMapBackend) and 3 pipeline chunks, all passing the key lengths through.
    check(Case(4, 1, seq=21, heads=6, kv_heads=3, head_dim=16, batch=3, text=9, mask="pad", chunks=3))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_low_precision(dtype):
    check(Case(2, 2, seq=97, heads=4, head_dim=32, batch=2, text=7, mask="pad", dtype=dtype))


def test_reference_backend():
    check(Case(2, 2, seq=13, heads=4, kv_heads=2, head_dim=16, batch=2, text=7, mask="hole",
               backend="reference"))


@pytest.mark.parametrize("mesh", [(2, 1), (1, 2), (2, 2)], ids=["u2r1", "u1r2", "u2r2"])
def test_triton_backend(mesh):
    if not triton_available():
        pytest.skip("triton backend unavailable: install triton (CPU runs need TRITON_INTERPRET=1)")
    u, r = mesh
    for mask, dtype in (("pad", "fp32"), ("hole", "fp16")):
        check(Case(u, r, seq=21, heads=4, kv_heads=2, head_dim=16, batch=2, text=7, mask=mask, dtype=dtype,
                   backend="triton"))


@pytest.mark.parametrize("kind,msg", [("mask_no_joint", "pass joint_q, joint_k and joint_v"),
                                      ("mask_dtype", "joint_mask.bool()"),
                                      ("mask_shape", "(batch, text_len) = (1, 3)")])
def test_bad_mask(kind, msg):
    err = run_on_ranks(2, expect_error, 1, 2, kind)
    assert msg in err, err
