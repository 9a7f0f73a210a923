"""Sequence-parallel attention (Ulysses, Ring, hybrid) vs full-sequence references on gloo ranks.

Tolerance: the one rule of spattn.testing (flash-attention's: at most 2x the error of torch's own SDPA
in the same dtype against fp64, plus a rounding floor; fp32 must match to ~1e-5).
"""
from __future__ import annotations


import pytest

from dist_harness import run_on_ranks
from sp_cases import Case, check, cpp_available, engines_identical, triton_available

MESHES = [(1, 1), (2, 1), (1, 2), (4, 1), (2, 2), (1, 4), (8, 1), (4, 2), (2, 4), (1, 8)]
MESH_IDS = [f"u{u}r{r}" for u, r in MESHES]


# -- every factorization of world sizes 1, 2, 4, 8; causal and not; three dtypes -----------------
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mesh", MESHES, ids=MESH_IDS)
def test_modes(mesh, causal, dtype):
    u, r = mesh
    check(Case(u, r, seq=16 * u * r, heads=8, head_dim=32, causal=causal, dtype=dtype))


# -- odd head dims and batch sizes ------------------------------------------------------------------
@pytest.mark.parametrize("head_dim,batch", [(40, 1), (80, 2), (96, 3), (64, 2)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mesh", [(2, 1), (1, 2), (2, 2), (4, 2)], ids=["u2r1", "u1r2", "u2r2", "u4r2"])
def test_head_dims_and_batches(mesh, causal, head_dim, batch):
    u, r = mesh
    check(Case(u, r, seq=24 * u * r, heads=8, head_dim=head_dim, batch=batch, causal=causal))


@pytest.mark.parametrize("mesh", [(2, 2), (1, 4)], ids=["u2r2", "u1r4"])
def test_longer_sequence(mesh):
    u, r = mesh
    check(Case(u, r, seq=512, heads=4, head_dim=64, causal=True))


@pytest.mark.parametrize("mesh", [(1, 2), (2, 2), (1, 4)], ids=["u1r2", "u2r2", "u1r4"])
@pytest.mark.parametrize("engine", ["python", "cpp"])
def test_ring_engines(mesh, engine):
    if engine == "cpp" and not cpp_available():
        pytest.skip("spattn._C not built (C++ ring engine): pip install --no-build-isolation -e .")
    u, r = mesh
    for causal in (False, True):
        check(Case(u, r, seq=32 * u * r, heads=4, head_dim=32, causal=causal, engine=engine))


@pytest.mark.parametrize("mesh", [(1, 2), (2, 2), (1, 4)], ids=["u1r2", "u2r2", "u1r4"])
def test_ring_engines_bit_identical(mesh):
    if not cpp_available():
        pytest.skip("spattn._C not built (C++ ring engine): pip install --no-build-isolation -e .")
    u, r = mesh
    assert run_on_ranks(u * r, engines_identical, Case(u, r, seq=30 * u * r, heads=4, kv_heads=2, head_dim=24,
                                                        causal=True, layout="zigzag", dtype="bf16"))


# -- the Ulysses pipeline over head chunks gives the same results for any chunk count ---------------
@pytest.mark.parametrize("chunks", [1, 3, 4])
@pytest.mark.parametrize("mesh", [(2, 1), (2, 2), (4, 1)], ids=["u2r1", "u2r2", "u4r1"])
def test_ulysses_pipeline_chunks(mesh, chunks):
    u, r = mesh
    check(Case(u, r, seq=16 * u * r, heads=8, head_dim=32, causal=True, chunks=chunks))
    check(Case(u, r, seq=50, heads=12, kv_heads=4, head_dim=16, text=5, chunks=chunks))


# -- the same suite on the Triton kernels (interpreter on CPU; reduced shapes, it is slow) ----------
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("mesh", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (1, 4)],
                         ids=["u1r1", "u2r1", "u1r2", "u2r2", "u4r1", "u1r4"])
def test_triton_backend(mesh, dtype):
    if not triton_available():
        pytest.skip("triton backend unavailable: install triton (CPU runs need TRITON_INTERPRET=1)")
    import torch

    if dtype == "bf16" and not torch.cuda.is_available():
        pytest.skip("bf16 tl.dot is unsupported by the Triton interpreter (triton issue 11584); needs a GPU")
    u, r = mesh
    for causal in (False, True):
        check(Case(u, r, seq=8 * u * r, heads=4, head_dim=16, causal=causal, dtype=dtype, backend="triton"))


@pytest.mark.parametrize("mesh", [(2, 2), (1, 4)], ids=["u2r2", "u1r4"])
def test_triton_backend_shapes(mesh):
    if not triton_available():
        pytest.skip("triton backend unavailable: install triton (CPU runs need TRITON_INTERPRET=1)")
    u, r = mesh
    kw = dict(head_dim=24, backend="triton")
    check(Case(u, r, seq=29, heads=6, kv_heads=3, causal=True, layout="zigzag", **kw))
    check(Case(u, r, seq=21, heads=6, kv_heads=2, text=5, **kw))
