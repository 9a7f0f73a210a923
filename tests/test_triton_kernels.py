"""Triton flash attention (fwd with LSE, bwd), fused merge and their custom ops, against fp64 references
and torch's SDPA.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 must be set
before the kernel modules are imported; conftest.py does it too). Half-precision bounds: the kernel's
error vs an fp64 reference may be at most twice torch's own error (SDPA in that dtype) plus a small floor.
"""
import math
import os

import torch

if not torch.cuda.is_available():  # harmless if conftest.py already did it; must precede the kernel imports
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

triton = pytest.importorskip("triton")

from spattn.kernels import flash_attn as fa  # noqa: E402
from spattn.kernels import merge as mg  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():  # pragma: no cover
    pytest.skip("needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

BF16_SKIP = pytest.mark.skipif(INTERPRET, reason="bf16 tl.dot returns garbage under the Triton interpreter "
                                                 "(triton issue 11584); bf16 is checked on a GPU")
# (dtype, atol, rtol): floor added to 2x torch's own error vs fp64.
DTYPES = [
    pytest.param((torch.float32, 1e-5, 1e-5), id="fp32"),
    pytest.param((torch.float16, 3e-4, 0.0), id="fp16"),
    pytest.param((torch.bfloat16, 2e-3, 0.0), id="bf16", marks=BF16_SKIP),
]
LSE_TOL = 1e-4  # LSE comes from fp32 accumulation of exact products for every input dtype

# (B, Sq, Sk, Hq, Hkv, D, q_offset, k_offset)
FWD_CASES = [
    pytest.param((1, 1, 1, 2, 2, 16, 0, 0), id="len1-d16"),
    pytest.param((2, 17, 17, 2, 2, 40, 0, 0), id="len17-d40"),
    pytest.param((1, 97, 97, 4, 1, 64, 0, 0), id="len97-mqa-d64"),
    pytest.param((1, 130, 130, 8, 2, 80, 0, 0), id="len130-gqa4-d80"),
    pytest.param((1, 64, 100, 8, 2, 96, 0, 0), id="sq64-sk100-gqa4-d96"),
    pytest.param((1, 33, 70, 2, 2, 128, 0, 0), id="sq33-sk70-d128"),
    pytest.param((1, 32, 64, 2, 1, 64, 64, 0), id="qoff64-visible"),
    pytest.param((1, 32, 64, 2, 1, 64, 0, 64), id="koff64-masked"),
    pytest.param((1, 48, 40, 2, 2, 64, 16, 40), id="offsets-partial"),
    pytest.param((1, 20, 20, 1, 1, 256, 0, 0), id="d256"),
]
BWD_CASES = [c for c in FWD_CASES if c.id in ("len1-d16", "len17-d40", "len97-mqa-d64", "sq64-sk100-gqa4-d96",
                                              "sq33-sk70-d128", "koff64-masked", "offsets-partial", "d256")]


def _rand(*shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype=dtype, device=DEVICE)


def _qkv(case, dtype, seed=0):
    b, sq, sk, hq, hkv, d, _, _ = case
    return (_rand(b, sq, hq, d, dtype=dtype, seed=seed), _rand(b, sk, hkv, d, dtype=dtype, seed=seed + 1),
            _rand(b, sk, hkv, d, dtype=dtype, seed=seed + 2))


def _ref64(q, k, v, *args):
    """fp64 forward reference (out in fp64, not cast back to the input dtype)."""
    return fa.flash_attn_fwd_ref(q.double(), k.double(), v.double(), *args, compute_dtype=torch.float64)


def _mask(sq, sk, q_offset, k_offset):
    """Boolean (Sq, Sk): key j visible to query i iff k_offset + j <= q_offset + i."""
    i = torch.arange(sq, device=DEVICE)[:, None] + q_offset
    return torch.arange(sk, device=DEVICE)[None, :] + k_offset <= i


def _sdpa(q, k, v, causal, scale, q_offset, k_offset):
    """torch's SDPA on (B, H, S, D) transposes with explicit GQA repeat and global-position mask."""
    group = q.shape[2] // k.shape[2]
    qt = q.transpose(1, 2)
    kt = k.repeat_interleave(group, dim=2).transpose(1, 2)
    vt = v.repeat_interleave(group, dim=2).transpose(1, 2)
    mask = _mask(q.shape[1], k.shape[1], q_offset, k_offset) if causal else None
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale).transpose(1, 2)


def _err(a, ref):
    return (a.double() - ref.double()).nan_to_num(0.0).abs()


def _assert_within(actual, ref64, torch_out, atol, rtol, what):
    """|actual - ref| <= 2 * max|torch - ref| + atol + rtol * |ref| elementwise, and no NaN."""
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    bound = 2 * _err(torch_out, ref64).max() + atol + rtol * ref64.double().abs()
    excess = (_err(actual, ref64) - bound).max().item()
    assert excess <= 0, f"{what}: max error {_err(actual, ref64).max().item():.3e} exceeds bound by {excess:.3e}"


def _assert_lse(lse, ref_lse):
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "-inf rows differ"
    fin = torch.isfinite(ref_lse)
    assert torch.isfinite(lse[fin]).all()
    torch.testing.assert_close(lse[fin], ref_lse[fin].float(), atol=LSE_TOL, rtol=LSE_TOL)


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", FWD_CASES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype_tol", DTYPES)
def test_forward_matches_reference_and_sdpa(case, causal, dtype_tol):
    dtype, atol, rtol = dtype_tol
    *_, q_off, k_off = case
    q, k, v = _qkv(case, dtype)
    scale = q.shape[-1] ** -0.5
    out, lse = fa.flash_attn_fwd(q, k, v, causal, scale, q_off, k_off)
    ref_out, ref_lse = _ref64(q, k, v, causal, scale, q_off, k_off)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    # The plain-torch ref itself agrees with SDPA in fp64 (rows that see no key: SDPA gives NaN, we give 0).
    sdpa64 = _sdpa(q.double(), k.double(), v.double(), causal, scale, q_off, k_off).nan_to_num(0.0)
    torch.testing.assert_close(ref_out.double(), sdpa64, atol=1e-10, rtol=1e-10)
    torch_out = _sdpa(q, k, v, causal, scale, q_off, k_off).nan_to_num(0.0)
    _assert_within(out, ref_out, torch_out, atol, rtol, "out")
    _assert_lse(lse, ref_lse)
    dead = torch.isneginf(ref_lse).transpose(1, 2)  # (B, Sq, Hq)
    assert (out[dead] == 0).all(), "rows that see no key must be exactly 0"


def test_forward_fully_masked_block_is_zero_and_neginf():
    q, k, v = _qkv((1, 32, 64, 2, 1, 64, 0, 64), torch.float32)
    out, lse = fa.flash_attn_fwd(q, k, v, True, None, q_offset=0, k_offset=64)
    assert torch.isneginf(lse).all() and (out == 0).all()


def test_forward_strided_inputs():
    b, s, h, d = 2, 45, 4, 40
    # q: a (B, H, S, D) tensor viewed as (B, S, H, D); k/v: slices of a packed qkv with a stride-2 last dim.
    q = _rand(b, h, s, d, dtype=torch.float32).transpose(1, 2)
    kv = _rand(b, s, 2, 2, 2 * d, dtype=torch.float32, seed=3)
    k, v = kv[:, :, 0, :, ::2], kv[:, :, 1, :, ::2]
    assert not q.is_contiguous() and k.stride(-1) == 2
    out, lse = fa.flash_attn_fwd(q, k, v, True, None)
    ref_out, ref_lse = _ref64(q, k, v, True, None)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-5)
    _assert_lse(lse, ref_lse)


def test_forward_empty_key_block():
    q = _rand(1, 5, 2, 16, dtype=torch.float32)
    k = _rand(1, 0, 2, 16, dtype=torch.float32)
    out, lse = fa.flash_attn_fwd(q, k, k.clone(), False)
    assert (out == 0).all() and torch.isneginf(lse).all()


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
def _true_grads(q, k, v, dout, causal, scale, q_off, k_off, dtype):
    """fp64 autograd through the reference, and torch's own grads (autograd through SDPA in ``dtype``)."""
    def grads(fn, cast):
        xs = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        o = fn(*xs)
        o.backward(dout.to(cast))
        return [x.grad.nan_to_num(0.0) for x in xs]

    ref = grads(lambda a, b, c: fa.flash_attn_fwd_ref(a, b, c, causal, scale, q_off, k_off,
                                                      compute_dtype=torch.float64)[0], torch.float64)
    mine = grads(lambda a, b, c: _sdpa(a, b, c, causal, scale, q_off, k_off), dtype)
    return ref, mine


@pytest.mark.parametrize("case", BWD_CASES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype_tol", DTYPES)
def test_backward_matches_reference(case, causal, dtype_tol):
    dtype, atol, rtol = dtype_tol
    *_, q_off, k_off = case
    q, k, v = _qkv(case, dtype)
    scale = q.shape[-1] ** -0.5
    out, lse = fa.flash_attn_fwd(q, k, v, causal, scale, q_off, k_off)
    dout = _rand(*out.shape, dtype=dtype, seed=7)
    dq, dk, dv = fa.flash_attn_bwd(dout, q, k, v, out, lse, causal, scale, q_off, k_off)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert dq.dtype == dk.dtype == dv.dtype == dtype
    ref, torch_g = _true_grads(q, k, v, dout, causal, scale, q_off, k_off, dtype)
    # The ref backward (from the given out/lse, as a ring calls it) equals autograd in fp64.
    ref_bwd = fa.flash_attn_bwd_ref(dout, q, k, v, out, lse, causal, scale, q_off, k_off, torch.float64)
    if dtype == torch.float32:
        for a, r in zip(ref_bwd, ref):
            torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)
    # Gradients scale with sqrt(seq) and |v|: floor relative to the reference's magnitude.
    for name, g, r, t in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, torch_g):
        _assert_within(g, r, t, atol * max(1.0, r.abs().max().item()), rtol, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("d", [16, 40, 256])
def test_backward_preprocess_delta(dtype, d):
    out = _rand(2, 4, 37, d, dtype=dtype).transpose(1, 2)  # strided
    dout = _rand(2, 37, 4, d, dtype=torch.float32, seed=1)  # dout may differ in dtype from out
    delta = fa.flash_attn_bwd_preprocess(out, dout)
    assert delta.shape == (2, 4, 37) and delta.dtype == torch.float32 and delta.is_contiguous()
    torch.testing.assert_close(delta, fa.flash_attn_bwd_preprocess_ref(out, dout), atol=1e-4, rtol=1e-5)


def test_backward_rejects_mismatched_shapes():
    q, k, v = _qkv((1, 8, 8, 2, 1, 16, 0, 0), torch.float32)
    out, lse = fa.flash_attn_fwd(q, k, v)
    with pytest.raises(ValueError, match="lse"):
        fa.flash_attn_bwd(out, q, k, v, out, lse.transpose(1, 2))
    with pytest.raises(ValueError, match="accumulator dk"):
        fa.flash_attn_bwd(out, q, k, v, out, lse, dk=torch.zeros_like(q))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_accumulates_into_prefilled_fp32_buffers(causal):
    case = (1, 40, 56, 4, 2, 40, 8, 0)
    q, k, v = _qkv(case, torch.float16)
    out, lse = fa.flash_attn_fwd(q, k, v, causal, None, 8, 0)
    dout = _rand(*out.shape, dtype=torch.float16, seed=5)
    fresh = fa.flash_attn_bwd(dout, q, k, v, out, lse, causal, None, 8, 0)
    # Strided fp32 accumulators (every other row of a bigger buffer), pre-filled.
    bufs = [_rand(t.shape[0], 2 * t.shape[1], *t.shape[2:], dtype=torch.float32, seed=11 + i)[:, ::2]
            for i, t in enumerate((q, k, v))]
    before = [b.clone() for b in bufs]
    res = fa.flash_attn_bwd(dout, q, k, v, out, lse, causal, None, 8, 0, dq=bufs[0], dk=bufs[1], dv=bufs[2])
    for r, b, b0, g in zip(res, bufs, before, fresh):
        assert r is b and r.dtype == torch.float32
        torch.testing.assert_close(b, b0 + g.float(), atol=2e-3, rtol=1e-3)
    # A lone dk accumulator: dv is returned fresh (as zeros + grads), dq as a new tensor.
    dk_acc = torch.ones(k.shape, dtype=torch.float32, device=DEVICE)
    dq2, dk2, dv2 = fa.flash_attn_bwd(dout, q, k, v, out, lse, causal, None, 8, 0, dk=dk_acc)
    assert dk2 is dk_acc
    torch.testing.assert_close(dk2, 1 + fresh[1].float(), atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(dv2.float(), fresh[2].float(), atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(dq2.float(), fresh[0].float(), atol=0, rtol=0)


def test_ring_blocks_with_offsets_merge_and_accumulate_to_full_attention():
    """Keys split over 3 'ranks': per-block fwd with k_offset, fused merge, per-block bwd from the final
    (out, lse) into fp32 accumulators == one full causal attention."""
    b, s, hq, hkv, d = 1, 60, 4, 2, 32
    q, k, v = _qkv((b, s, s, hq, hkv, d, 0, 0), torch.float32, seed=21)
    dout = _rand(b, s, hq, d, dtype=torch.float32, seed=9)
    bounds = [(0, 16), (16, 45), (45, 60)]
    out = torch.zeros(b, s, hq, d, dtype=torch.float32, device=DEVICE)
    lse = torch.full((b, hq, s), -math.inf, dtype=torch.float32, device=DEVICE)
    for lo, hi in bounds:
        o, l = fa.flash_attn_fwd(q, k[:, lo:hi], v[:, lo:hi], True, None, 0, lo)
        mg.merge_(out, lse, o, l)
    full_out, full_lse = fa.flash_attn_fwd(q, k, v, True)
    torch.testing.assert_close(out, full_out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse, atol=2e-6, rtol=1e-5)
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for lo, hi in bounds:
        fa.flash_attn_bwd(dout, q, k[:, lo:hi], v[:, lo:hi], out, lse, True, None, 0, lo,
                          dq=dq, dk=dk[:, lo:hi], dv=dv[:, lo:hi])
    full = fa.flash_attn_bwd(dout, q, k, v, full_out, full_lse, True)
    for a, f in zip((dq, dk, dv), full):
        torch.testing.assert_close(a, f, atol=2e-5, rtol=1e-5)


def test_backward_strided_inputs_and_dout():
    b, s, h, d = 1, 37, 2, 80
    q = _rand(b, h, s, d, dtype=torch.float32).transpose(1, 2)
    kv = _rand(b, s, 2, h, 2 * d, dtype=torch.float32, seed=3)
    k, v = kv[:, :, 0, :, ::2], kv[:, :, 1, :, ::2]
    out, lse = fa.flash_attn_fwd(q, k, v, True)
    dout = _rand(b, h, s, d, dtype=torch.float32, seed=4).transpose(1, 2)
    got = fa.flash_attn_bwd(dout, q, k, v, out, lse, True)
    ref = fa.flash_attn_bwd_ref(dout, q, k, v, out, lse, True, compute_dtype=torch.float64)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# merge
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("blk_dtype", [torch.float32, torch.float16], ids=["blk_fp32", "blk_fp16"])
@pytest.mark.parametrize("d", [16, 40, 128])
def test_merge_matches_reference_with_neginf_rows(blk_dtype, d):
    b, s, h = 2, 37, 3
    out = _rand(b, h, s, d, dtype=torch.float32).transpose(1, 2)  # strided running output
    lse = _rand(b, h, s, dtype=torch.float32, seed=1) * 3
    blk_out = _rand(b, s, h, d, dtype=blk_dtype, seed=2)
    blk_lse = _rand(b, h, s, dtype=torch.float32, seed=3) * 3
    lse[0, 0, :6] = -math.inf        # running side has seen nothing (its out rows are 0)
    out[0, :6, 0] = 0.0
    blk_lse[0, 0, 3:9] = -math.inf   # block side sees nothing on rows 3..8 (rows 3..5: both sides)
    blk_out[0, 3:9, 0] = 0.0
    ref_out, ref_lse = mg.merge_ref(out, lse, blk_out, blk_lse)
    got_out, got_lse = mg.merge_(out, lse, blk_out, blk_lse)
    assert got_out is out and got_lse is lse
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-6, rtol=1e-6)
    assert torch.isneginf(lse[0, 0, 3:6]).all() and (out[0, 3:6, 0] == 0).all()
    assert torch.isfinite(lse[0, 0, 6:9]).all() and torch.isfinite(lse[0, 0, :3]).all()


def test_merge_ref_matches_spattn_ops_reference():
    ops = pytest.importorskip("spattn.ops")
    out, lse = _rand(1, 9, 2, 24, dtype=torch.float32), _rand(1, 2, 9, dtype=torch.float32, seed=1)
    bo, bl = _rand(1, 9, 2, 24, dtype=torch.float32, seed=2), _rand(1, 2, 9, dtype=torch.float32, seed=3)
    bl[0, 1] = -math.inf
    for a, r in zip(mg.merge_ref(out, lse, bo, bl), ops.merge_ref(out, lse, bo, bl)):
        torch.testing.assert_close(a, r, atol=0, rtol=0)


def test_merge_garbage_in_dead_running_output_does_not_leak():
    out = torch.full((1, 4, 1, 16), 1e30, device=DEVICE)  # uninitialised-looking running output
    lse = torch.full((1, 1, 4), -math.inf, device=DEVICE)
    blk = _rand(1, 4, 1, 16, dtype=torch.float32)
    blk_lse = torch.zeros(1, 1, 4, device=DEVICE)
    mg.merge_(out, lse, blk, blk_lse)
    torch.testing.assert_close(out, blk)
    assert (lse == 0).all()


# ----------------------------------------------------------------------------------------------
# custom ops, fake tensors, backend contract
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tb():
    return pytest.importorskip("spattn.backends.triton_backend")


def test_custom_ops_fake_tensor_shapes(tb):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 33, 8, 40, dtype=torch.float16, device=DEVICE)
        k = torch.empty(2, 50, 2, 40, dtype=torch.float16, device=DEVICE)
        out, lse = torch.ops.spattn.flash_fwd(q, k, k, True, 0.1, 0, 0)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert lse.shape == (2, 8, 33) and lse.dtype == torch.float32
        dq, dk, dv = torch.ops.spattn.flash_bwd(out, q, k, k, out, lse, True, 0.1, 0, 0)
        assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, k.shape)
        acc = torch.empty(q.shape, dtype=torch.float32, device=DEVICE)
        kacc = torch.empty(k.shape, dtype=torch.float32, device=DEVICE)
        res = torch.ops.spattn.flash_bwd_acc_(out, q, k, k, out, lse, acc, kacc, kacc.clone(), True, 0.1, 0, 0)
        assert res is None
        assert torch.ops.spattn.merge_(acc, lse, out, lse) is None


def test_custom_ops_opcheck(tb):
    q, k, v = _qkv((1, 9, 12, 2, 1, 16, 0, 0), torch.float32)
    torch.library.opcheck(torch.ops.spattn.flash_fwd.default, (q, k, v, True, 0.25, 3, 0))
    out, lse = torch.ops.spattn.flash_fwd(q, k, v, True, 0.25, 3, 0)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.spattn.flash_bwd.default, (dout, q, k, v, out, lse, True, 0.25, 3, 0))
    accs = (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
    torch.library.opcheck(torch.ops.spattn.flash_bwd_acc_.default,
                          (dout, q, k, v, out, lse, *accs, True, 0.25, 3, 0))
    torch.library.opcheck(torch.ops.spattn.merge_.default, (out.clone(), lse.clone(), out, lse))


def test_custom_ops_trace_under_torch_compile(tb):
    """fullgraph compile (aot_eager: no C++ toolchain needed) through the fake impls and the mutating merge."""
    q, k, v = _qkv((1, 9, 12, 2, 1, 16, 0, 0), torch.float32)

    def step(q, k, v, acc_out, acc_lse):
        out, lse = torch.ops.spattn.flash_fwd(q, k, v, True, 0.25, 3, 0)
        torch.ops.spattn.merge_(acc_out, acc_lse, out, lse)
        dq, dk, dv = torch.ops.spattn.flash_bwd(out, q, k, v, out, lse, True, 0.25, 3, 0)
        return acc_out * 2, dq, dk, dv

    def fresh():
        return (torch.zeros(1, 9, 2, 16, device=DEVICE), torch.full((1, 2, 9), -math.inf, device=DEVICE))

    acc_c, acc_e = fresh(), fresh()
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v, *acc_c)
    want = step(q, k, v, *acc_e)
    for g, w in zip(got + acc_c, want + acc_e):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_triton_backend_contract(tb):
    be = tb.TritonBackend()
    assert be.name == "triton" and be.available(torch.device(DEVICE))
    q, k, v = _qkv((1, 30, 30, 4, 2, 32, 0, 0), torch.float32)
    out, lse = be.forward(q, k, v, True, 0.2)
    ref_out, ref_lse = _ref64(q, k, v, True, 0.2)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-5)
    _assert_lse(lse, ref_lse)
    dout = torch.randn_like(out)
    fresh = be.backward(dout, q, k, v, out, lse, True, 0.2)
    accs = [torch.ones(t.shape, dtype=torch.float32, device=DEVICE) for t in (q, k, v)]
    res = be.backward(dout, q, k, v, out, lse, True, 0.2, *accs)
    for r, a, g in zip(res, accs, fresh):
        assert r is a
        torch.testing.assert_close(r, 1 + g, atol=1e-5, rtol=1e-5)
    # Offsets (extension beyond the contract): keys after every query -> nothing visible, zero grads.
    out2, lse2 = be.forward(q, k, v, True, 0.2, q_offset=0, k_offset=64)
    assert torch.isneginf(lse2).all() and (out2 == 0).all()
    grads = be.backward(dout, q, k, v, out2, lse2, True, 0.2, q_offset=0, k_offset=64)
    assert all((g == 0).all() for g in grads)


def test_triton_merge_registered_with_ops(tb):
    ops = pytest.importorskip("spattn.ops")
    out, lse = _rand(1, 7, 2, 16, dtype=torch.float32), _rand(1, 2, 7, dtype=torch.float32, seed=1)
    bo, bl = _rand(1, 7, 2, 16, dtype=torch.float32, seed=2), _rand(1, 2, 7, dtype=torch.float32, seed=3)
    ref = ops.merge_ref(out, lse, bo, bl)
    got = ops.merge_(out.clone(), lse.clone(), bo, bl, impl="triton")
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-6)


def test_attention_with_lse_autograd_through_triton_backend(tb):
    ops = pytest.importorskip("spattn.ops")
    q, k, v = (t.requires_grad_() for t in _qkv((1, 21, 21, 2, 1, 16, 0, 0), torch.float32))
    out, lse = ops.attention_with_lse(q, k, v, causal=True, backend="triton")
    out.square().sum().backward()
    xs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = fa.flash_attn_fwd_ref(*xs, True, compute_dtype=torch.float64)
    ref_out.square().sum().backward()
    torch.testing.assert_close(out.double(), ref_out.detach(), atol=2e-5, rtol=1e-5)
    _assert_lse(lse, ref_lse)
    for t, x in zip((q, k, v), xs):
        torch.testing.assert_close(t.grad.double(), x.grad, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# packed documents: per-token document ids (q_doc, k_doc)
# ----------------------------------------------------------------------------------------------
def _ids(lengths):
    """int32 document ids of consecutive documents with the given lengths."""
    return torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths)).to(DEVICE)


def _random_lengths(total, seed):
    """Random document lengths summing to ``total``, with several one-token documents."""
    g = torch.Generator().manual_seed(seed)
    out = []
    while sum(out) < total:
        n = 1 if torch.rand(1, generator=g).item() < 0.35 else int(torch.randint(2, 40, (1,), generator=g))
        out.append(min(n, total - sum(out)))
    return out


# (B, Hq, Hkv, D, global document lengths, (q_lo, q_hi), (k_lo, k_hi)): queries and keys are the global
# positions [q_lo, q_hi) and [k_lo, k_hi) (offsets = their starts), as a ring hands blocks over.
DOC_CASES = [
    pytest.param((1, 4, 2, 16, [1, 40, 1, 28], (0, 70), (0, 70)), id="one-token-docs-gqa2"),
    pytest.param((2, 2, 2, 40, _random_lengths(100, 0), (0, 100), (0, 100)), id="random-docs-b2-d40"),
    pytest.param((1, 4, 1, 32, [1] * 5 + [60], (0, 65), (0, 65)), id="mqa-leading-singletons"),
    pytest.param((1, 4, 2, 16, _random_lengths(100, 1), (40, 100), (0, 70)), id="offsets-random-docs"),
    pytest.param((1, 2, 2, 16, [33, 31, 1, 35], (0, 100), (0, 100)), id="one-doc-per-tile-ish"),
    pytest.param((1, 2, 2, 16, [1, 1], (1, 2), (0, 2)), id="len1-query"),
]


def _doc_setup(case, dtype):
    b, hq, hkv, d, lengths, (q0, q1), (k0, k1) = case
    ids = _ids(lengths)
    q, k, v = _qkv((b, q1 - q0, k1 - k0, hq, hkv, d, q0, k0), dtype)
    return q, k, v, ids[q0:q1], ids[k0:k1], q0, k0


def _doc_visible(q_doc, k_doc, causal, q_off, k_off):
    """bool (Sq, Sk): same document (and the causal rule on global positions)."""
    m = q_doc[:, None] == k_doc[None, :]
    return m & _mask(len(q_doc), len(k_doc), q_off, k_off) if causal else m


def _sdpa_docs(q, k, v, vis, scale):
    """SDPA with the document mask; rows that see no key get an all-visible row (then zeroed by the
    caller) so SDPA produces no NaN that would poison its gradients."""
    dead = ~vis.any(1)
    group = q.shape[2] // k.shape[2]
    qt, kt, vt = q.transpose(1, 2), *(t.repeat_interleave(group, dim=2).transpose(1, 2) for t in (k, v))
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=vis | dead[:, None], scale=scale).transpose(1, 2)
    return o * (~dead).to(o.dtype)[None, :, None, None]


@pytest.mark.parametrize("case", DOC_CASES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype_tol", DTYPES[:2])
def test_docs_forward_backward_match_reference_and_sdpa(case, causal, dtype_tol):
    dtype, atol, rtol = dtype_tol
    q, k, v, qd, kd, q_off, k_off = _doc_setup(case, dtype)
    scale = q.shape[-1] ** -0.5
    vis = _doc_visible(qd, kd, causal, q_off, k_off)
    dead = ~vis.any(1)
    out, lse = fa.flash_attn_fwd(q, k, v, causal, scale, q_off, k_off, q_doc=qd, k_doc=kd)
    ref_out, ref_lse = fa.flash_attn_fwd_ref(q.double(), k.double(), v.double(), causal, scale, q_off, k_off,
                                             compute_dtype=torch.float64, q_doc=qd, k_doc=kd)
    # The reference is SDPA with the block-diagonal document mask (fp64).
    sdpa64 = _sdpa_docs(q.double(), k.double(), v.double(), vis, scale)
    torch.testing.assert_close(ref_out, sdpa64, atol=1e-10, rtol=1e-10)
    _assert_within(out, ref_out, _sdpa_docs(q, k, v, vis, scale), atol, rtol, "out")
    _assert_lse(lse, ref_lse)
    assert torch.equal(torch.isneginf(lse[0, 0]), dead), "exactly the rows that see no key have lse -inf"
    assert (out[:, dead] == 0).all()

    dout = _rand(*out.shape, dtype=dtype, seed=7)
    dq, dk, dv = fa.flash_attn_bwd(dout, q, k, v, out, lse, causal, scale, q_off, k_off, q_doc=qd, k_doc=kd)

    def grads(fn, cast):
        xs = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        fn(*xs).backward(dout.to(cast))
        return [x.grad for x in xs]

    ref = grads(lambda a, b, c: fa.flash_attn_fwd_ref(a, b, c, causal, scale, q_off, k_off, torch.float64,
                                                      q_doc=qd, k_doc=kd)[0], torch.float64)
    torch_g = grads(lambda a, b, c: _sdpa_docs(a, b, c, vis, scale), dtype)
    ref_bwd = fa.flash_attn_bwd_ref(dout, q, k, v, out, lse, causal, scale, q_off, k_off, torch.float64,
                                    q_doc=qd, k_doc=kd)
    if dtype == torch.float32:
        for a, r in zip(ref_bwd, ref):
            torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)
    for name, g, r, t in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, torch_g):
        _assert_within(g, r, t, atol * max(1.0, r.abs().max().item()), rtol, name)
    assert (dq[:, dead] == 0).all()
    unseen = ~vis.any(0)  # keys no query sees: zero gradients
    assert (dk[:, unseen] == 0).all() and (dv[:, unseen] == 0).all()


def test_docs_skip_whole_tiles_without_loading_them():
    """Key tile 1 (document 1, which no query belongs to) holds NaN K/V: a kernel that loaded it would
    produce NaN (0 * NaN in the dots), so finite results show the tile was skipped, in all three kernels."""
    bm = fa.INTERPRET_CONFIG.block_m
    assert bm == fa.INTERPRET_CONFIG.block_n
    q, k, v = _qkv((1, 2 * bm, 3 * bm, 2, 1, 16, 0, 0), torch.float32)
    qd, kd = _ids([bm, 0, bm]), _ids([bm, bm, bm])
    k[:, bm:2 * bm] = float("nan")
    v[:, bm:2 * bm] = float("nan")
    out, lse = fa.flash_attn_fwd(q, k, v, False, None, q_doc=qd, k_doc=kd)
    keep = torch.cat([torch.arange(bm), torch.arange(2 * bm, 3 * bm)])
    ref_out, ref_lse = fa.flash_attn_fwd_ref(q.double(), k[:, keep].double(), v[:, keep].double(),
                                             compute_dtype=torch.float64, q_doc=qd, k_doc=kd[keep])
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-5)
    _assert_lse(lse, ref_lse)
    dout = _rand(*out.shape, dtype=torch.float32, seed=7)
    dq, dk, dv = fa.flash_attn_bwd(dout, q, k, v, out, lse, False, None, q_doc=qd, k_doc=kd)
    rq, rk, rv = fa.flash_attn_bwd_ref(dout, q, k[:, keep], v[:, keep], out, lse, q_doc=qd, k_doc=kd[keep])
    torch.testing.assert_close(dq, rq, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dk[:, keep], rk, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dv[:, keep], rv, atol=1e-4, rtol=1e-4)
    assert (dk[:, bm:2 * bm] == 0).all() and (dv[:, bm:2 * bm] == 0).all()


def test_docs_reject_bad_ids():
    q, k, v = _qkv((1, 8, 10, 2, 2, 16, 0, 0), torch.float32)
    with pytest.raises(ValueError, match="q_doc and k_doc must both be given"):
        fa.flash_attn_fwd(q, k, v, q_doc=_ids([8]))
    with pytest.raises(ValueError, match=r"k_doc is .*want \(10,\)"):
        fa.flash_attn_fwd(q, k, v, q_doc=_ids([8]), k_doc=_ids([8]))


def test_triton_backend_takes_docs(tb):
    be = tb.TritonBackend()
    assert be.supports_docs
    q, k, v = _qkv((1, 30, 30, 4, 2, 16, 0, 0), torch.float32)
    d = _ids([1, 12, 17])
    out, lse = be.forward(q, k, v, True, 0.2, q_doc=d, k_doc=d)
    ref_out, ref_lse = fa.flash_attn_fwd_ref(q, k, v, True, 0.2, q_doc=d, k_doc=d, compute_dtype=torch.float64)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-5)
    _assert_lse(lse, ref_lse)
    dout = torch.randn_like(out)
    fresh = be.backward(dout, q, k, v, out, lse, True, 0.2, q_doc=d, k_doc=d)
    accs = [torch.ones(t.shape, dtype=torch.float32, device=DEVICE) for t in (q, k, v)]
    res = be.backward(dout, q, k, v, out, lse, True, 0.2, *accs, q_doc=d, k_doc=d)
    want = fa.flash_attn_bwd_ref(dout, q, k, v, out, lse, True, 0.2, q_doc=d, k_doc=d)
    for f, r, w in zip(fresh, res, want):
        torch.testing.assert_close(f, w, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(r, 1 + w, atol=1e-4, rtol=1e-4)
    torch.library.opcheck(torch.ops.spattn.flash_fwd.default, (q, k, v, True, 0.25, 0, 0, None, d, d))
    torch.library.opcheck(torch.ops.spattn.flash_bwd.default, (dout, q, k, v, out, lse, True, 0.25, 0, 0, None, d, d))


# ----------------------------------------------------------------------------------------------
# sliding windows: window=(left, right) over global positions (flash-attn's convention, -1 = unbounded)
# ----------------------------------------------------------------------------------------------
def _win_visible(sq, sk, causal, window, q_off, k_off):
    """bool (Sq, Sk), written out independently of the kernels' reference: qpos - kpos in [-right, left]."""
    dist = (torch.arange(sq, device=DEVICE)[:, None] + q_off) - (torch.arange(sk, device=DEVICE)[None, :] + k_off)
    vis = torch.ones(sq, sk, dtype=torch.bool, device=DEVICE)
    if causal:
        vis &= dist >= 0
    if window[0] >= 0:
        vis &= dist <= window[0]
    if window[1] >= 0:
        vis &= dist >= -window[1]
    return vis


# (B, Sq, Sk, Hq, Hkv, D, q_offset, k_offset, window): tiles of 32 under the interpreter, so these cut
# tiles at both window edges, skip whole tiles on either side, and leave rows that see no key.
WINDOW_CASES = [
    pytest.param((1, 70, 70, 2, 1, 16, 0, 0, (5, -1)), id="left5-mqa"),
    pytest.param((1, 70, 70, 2, 2, 16, 0, 0, (-1, 7)), id="right7"),
    pytest.param((2, 45, 100, 4, 2, 40, 30, 0, (17, 3)), id="l17-r3-qoff30-gqa2-d40"),
    pytest.param((1, 64, 64, 2, 2, 16, 0, 64, (40, 40)), id="l40-r40-koff64"),
    pytest.param((1, 50, 47, 2, 1, 16, 100, 20, (0, 0)), id="diagonal-only-offsets"),
    pytest.param((1, 33, 90, 2, 2, 16, 0, 40, (2, 100)), id="l2-r100"),
]


@pytest.mark.parametrize("case", WINDOW_CASES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype_tol", DTYPES[:2])
def test_window_forward_backward_match_reference_and_sdpa(case, causal, dtype_tol):
    dtype, atol, rtol = dtype_tol
    *shape, q_off, k_off, window = case
    q, k, v = _qkv((*shape, q_off, k_off), dtype)
    scale = q.shape[-1] ** -0.5
    vis = _win_visible(q.shape[1], k.shape[1], causal, window, q_off, k_off)
    dead = ~vis.any(1)
    out, lse = fa.flash_attn_fwd(q, k, v, causal, scale, q_off, k_off, window=window)
    ref_out, ref_lse = fa.flash_attn_fwd_ref(q.double(), k.double(), v.double(), causal, scale, q_off, k_off,
                                             compute_dtype=torch.float64, window=window)
    # The reference is SDPA with the window mask written out (fp64); the doc helper zeroes dead rows.
    torch.testing.assert_close(ref_out, _sdpa_docs(q.double(), k.double(), v.double(), vis, scale),
                               atol=1e-10, rtol=1e-10)
    _assert_within(out, ref_out, _sdpa_docs(q, k, v, vis, scale), atol, rtol, "out")
    _assert_lse(lse, ref_lse)
    assert torch.equal(torch.isneginf(lse[0, 0]), dead), "exactly the rows that see no key have lse -inf"
    assert (out[:, dead] == 0).all()

    dout = _rand(*out.shape, dtype=dtype, seed=7)
    dq, dk, dv = fa.flash_attn_bwd(dout, q, k, v, out, lse, causal, scale, q_off, k_off, window=window)

    def grads(fn, cast):
        xs = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        fn(*xs).backward(dout.to(cast))
        return [x.grad for x in xs]

    ref = grads(lambda a, b, c: fa.flash_attn_fwd_ref(a, b, c, causal, scale, q_off, k_off, torch.float64,
                                                      window=window)[0], torch.float64)
    torch_g = grads(lambda a, b, c: _sdpa_docs(a, b, c, vis, scale), dtype)
    if dtype == torch.float32:
        ref_bwd = fa.flash_attn_bwd_ref(dout, q, k, v, out, lse, causal, scale, q_off, k_off, torch.float64,
                                        window=window)
        for a, r in zip(ref_bwd, ref):
            torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)
    for name, g, r, t in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, torch_g):
        _assert_within(g, r, t, atol * max(1.0, r.abs().max().item()), rtol, name)
    assert (dq[:, dead] == 0).all()
    unseen = ~vis.any(0)
    assert (dk[:, unseen] == 0).all() and (dv[:, unseen] == 0).all()


def test_window_with_docs_and_k_lens():
    """Window, packed documents and per-batch key lengths together, forward and backward vs the fp64 ref."""
    q, k, v = _qkv((2, 60, 80, 2, 1, 16, 0, 0), torch.float32)
    qd, kd = _ids([25, 5, 50])[20:80], _ids([25, 5, 50])
    kl = torch.tensor([80, 41], dtype=torch.int32, device=DEVICE)
    kw = dict(q_doc=qd, k_doc=kd, k_lens=kl, window=(9, 2))
    out, lse = fa.flash_attn_fwd(q, k, v, True, None, 20, 0, **kw)
    ref_out, ref_lse = fa.flash_attn_fwd_ref(q.double(), k.double(), v.double(), True, None, 20, 0,
                                             compute_dtype=torch.float64, **kw)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-5)
    _assert_lse(lse, ref_lse)
    dout = _rand(*out.shape, dtype=torch.float32, seed=7)
    got = fa.flash_attn_bwd(dout, q, k, v, out, lse, True, None, 20, 0, **kw)
    want = fa.flash_attn_bwd_ref(dout, q, k, v, out, lse, True, None, 20, 0, torch.float64, **kw)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)


def test_window_skips_whole_tiles_without_loading_them():
    """NaN in every tile outside the window: a kernel that loaded one would produce NaN (0 * NaN in the
    dots), so finite, exact results show the tile was skipped. Keys: tiles left and right of the
    queries' window (forward, dQ); queries: tiles no key's window reaches (dK/dV)."""
    bm = fa.INTERPRET_CONFIG.block_m
    assert bm == fa.INTERPRET_CONFIG.block_n
    # Queries at global [2bm, 3bm) see keys [2bm - 3, 3bm + 3): key tiles 0 and 4 are outside.
    q, k, v = _qkv((1, bm, 5 * bm, 2, 1, 16, 2 * bm, 0), torch.float32)
    for t in (k, v):
        t[:, :bm] = float("nan")
        t[:, 4 * bm:] = float("nan")
    keep = slice(bm, 4 * bm)
    out, lse = fa.flash_attn_fwd(q, k, v, False, None, 2 * bm, 0, window=(3, 3))
    ref_out, ref_lse = fa.flash_attn_fwd_ref(q.double(), k[:, keep].double(), v[:, keep].double(), False, None,
                                             2 * bm, bm, compute_dtype=torch.float64, window=(3, 3))
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-5)
    _assert_lse(lse, ref_lse)
    dout = _rand(*out.shape, dtype=torch.float32, seed=7)
    dq, dk, dv = fa.flash_attn_bwd(dout, q, k, v, out, lse, False, None, 2 * bm, 0, window=(3, 3))
    rq, rk, rv = fa.flash_attn_bwd_ref(dout, q, k[:, keep], v[:, keep], out, lse, False, None, 2 * bm, bm,
                                       window=(3, 3))
    torch.testing.assert_close(dq, rq, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dk[:, keep], rk, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dv[:, keep], rv, atol=1e-4, rtol=1e-4)
    assert (dk[:, :bm] == 0).all() and (dk[:, 4 * bm:] == 0).all() and (dv[:, :bm] == 0).all()

    # Keys at global [bm, 2bm), queries [0, 3bm), diagonal only: query tiles 0 and 2 see nothing.
    q, k, v = _qkv((1, 3 * bm, bm, 2, 1, 16, 0, bm), torch.float32)
    q[:, :bm] = float("nan")
    q[:, 2 * bm:] = float("nan")
    out, lse = fa.flash_attn_fwd(q, k, v, False, None, 0, bm, window=(0, 0))
    assert torch.isneginf(lse[:, :, :bm]).all() and torch.isneginf(lse[:, :, 2 * bm:]).all()
    assert (out[:, :bm] == 0).all() and (out[:, 2 * bm:] == 0).all()
    mid = slice(bm, 2 * bm)
    torch.testing.assert_close(out[:, mid], v.repeat_interleave(2, dim=2), atol=1e-6, rtol=1e-6)
    dout = _rand(*out.shape, dtype=torch.float32, seed=7)
    dout[:, :bm] = float("nan")
    dout[:, 2 * bm:] = float("nan")
    dq, dk, dv = fa.flash_attn_bwd(dout, q, k, v, out, lse, False, None, 0, bm, window=(0, 0))
    rq, rk, rv = fa.flash_attn_bwd_ref(dout[:, mid], q[:, mid], k, v, out[:, mid], lse[:, :, mid], False, None,
                                       bm, bm, window=(0, 0))
    torch.testing.assert_close(dk, rk, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dv, rv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dq[:, mid], rq, atol=1e-5, rtol=1e-5)
    assert (dq[:, :bm] == 0).all() and (dq[:, 2 * bm:] == 0).all()


def test_window_none_and_unbounded_are_the_same_kernel_call():
    q, k, v = _qkv((1, 40, 40, 2, 2, 16, 0, 0), torch.float32)
    a = fa.flash_attn_fwd(q, k, v, True, None)
    b = fa.flash_attn_fwd(q, k, v, True, None, window=(-1, -1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match=r"window must be a pair of ints"):
        fa.flash_attn_fwd(q, k, v, window=(2.0, 1))


def test_triton_backend_takes_window(tb):
    be = tb.TritonBackend()
    assert be.supports_window
    q, k, v = _qkv((1, 30, 30, 4, 2, 16, 0, 0), torch.float32)
    win = dict(window=(4, 1), q_offset=10, k_offset=3)
    out, lse = be.forward(q, k, v, True, 0.2, **win)
    ref_out, ref_lse = fa.flash_attn_fwd_ref(q.double(), k.double(), v.double(), True, 0.2, 10, 3,
                                             compute_dtype=torch.float64, window=(4, 1))
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-5)
    _assert_lse(lse, ref_lse)
    dout = torch.randn_like(out)
    fresh = be.backward(dout, q, k, v, out, lse, True, 0.2, **win)
    accs = [torch.ones(t.shape, dtype=torch.float32, device=DEVICE) for t in (q, k, v)]
    res = be.backward(dout, q, k, v, out, lse, True, 0.2, *accs, **win)
    want = fa.flash_attn_bwd_ref(dout, q, k, v, out, lse, True, 0.2, 10, 3, window=(4, 1))
    for f, r, w in zip(fresh, res, want):
        torch.testing.assert_close(f, w, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(r, 1 + w, atol=1e-4, rtol=1e-4)
    torch.library.opcheck(torch.ops.spattn.flash_fwd.default, (q, k, v, True, 0.25, 10, 3, None, None, None, 4, 1))
    torch.library.opcheck(torch.ops.spattn.flash_bwd.default,
                          (dout, q, k, v, out, lse, True, 0.25, 10, 3, None, None, None, 4, 1))
