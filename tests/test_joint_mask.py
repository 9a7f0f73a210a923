"""joint_mask: text padding masks (Qwen-Image's encoder_hidden_states_mask) in every mode.

Each case runs spattn.attention with a per-batch text mask on gloo ranks and compares out, LSE,
joint_out and all six gradients with the fp64 reference and SDPA over the joint sequence with the
key mask (batch, 1, 1, text + seq) (sp_cases.run_case; tolerances of test_sp.check). Masked text
rows are compared too (they are queries like any other); masked keys' djk/djv must be exactly 0.
"""
from __future__ import annotations

import pytest

from dist_harness import run_on_ranks
from sp_cases import Case, check, expect_error, triton_available

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


@pytest.mark.parametrize("batch", [1, 2])
def test_all_prompts_padded(batch):
    # Every prompt shorter than text_len: the joint K/V are cut to the longest prompt (batch 1: no mask left).
    check(Case(1, 2, seq=13, heads=4, head_dim=16, batch=batch, text=9, mask="short"))
    check(Case(2, 1, seq=13, heads=4, head_dim=16, batch=batch, text=9, mask="short", joint_strategy="rear"))


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


# -- the Triton kernels' per-batch key lengths, against their *_ref (fp64) and SDPA -------------------
# (B, Sq, Sk, Hq, Hkv, D, k_lens, causal): a full, a short and an empty key set; a length inside a
# tile and one on a tile edge (interpreter tiles are 32); causal with lengths too.
KLEN_CASES = [
    pytest.param((3, 37, 70, 4, 2, 16, (70, 5, 0), False), id="full-short-empty-gqa"),
    pytest.param((2, 33, 64, 2, 1, 24, (40, 32), False), id="mid-tile-and-edge-mqa"),
    pytest.param((2, 40, 40, 2, 2, 16, (17, 33), True), id="causal"),
]


def _sdpa_by_length(q, k, v, dout, lens, causal):
    """SDPA in the inputs' dtype on each batch element's first lens[b] keys: out and (dq, dk, dv)."""
    import torch
    import torch.nn.functional as F

    ts = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    outs = []
    for b, n in enumerate(lens):
        qb, kb, vb = (t[b:b + 1].transpose(1, 2) for t in ts)
        if n == 0:
            outs.append(torch.zeros_like(ts[0][b:b + 1]))
            continue
        o = F.scaled_dot_product_attention(qb, kb[:, :, :n], vb[:, :, :n], is_causal=causal,
                                           enable_gqa=True).transpose(1, 2)
        outs.append(o)
    out = torch.cat(outs)
    (out * dout).sum().backward()
    return out.detach(), tuple(t.grad if t.grad is not None else torch.zeros_like(t) for t in ts)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("case", KLEN_CASES)
def test_kernel_key_lengths(case, dtype):
    import torch

    try:
        from spattn.kernels import flash_attn as fa
    except ImportError:
        pytest.skip("triton not installed")
    if not torch.cuda.is_available() and not triton_available():
        pytest.skip("triton kernels need a GPU or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    floor = 1e-5 if dtype == "fp32" else 3e-4
    B, Sq, Sk, Hq, Hkv, D, lens, causal = case
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(B, s, h, D, generator=g).to(dev, dt)
                     for s, h in ((Sq, Hq), (Sk, Hkv), (Sk, Hkv), (Sq, Hq)))
    kl = torch.tensor(lens, dtype=torch.int32, device=dev)
    out, lse = fa.flash_attn_fwd(q, k, v, causal, k_lens=kl)
    r64 = [t.double() for t in (dout, q, k, v)]
    ref_out, ref_lse = fa.flash_attn_fwd_ref(*r64[1:], causal, compute_dtype=torch.float64, k_lens=kl)
    grads = fa.flash_attn_bwd(dout, q, k, v, out, lse, causal, k_lens=kl)
    ref_grads = fa.flash_attn_bwd_ref(r64[0], *r64[1:], ref_out, ref_lse, causal, compute_dtype=torch.float64,
                                      k_lens=kl)
    base_out, base_grads = _sdpa_by_length(q, k, v, dout, lens, causal)
    for name, got, ref, base in zip(("out", "dq", "dk", "dv"), (out,) + grads, (ref_out,) + ref_grads,
                                    (base_out,) + base_grads):
        err = (got.double() - ref).abs().max().item()
        tol = 2 * (base.double() - ref).abs().max().item() + floor * max(1.0, ref.abs().max().item())
        assert err <= tol, f"{name}: err {err:.3g} > tol {tol:.3g}"
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))  # batch element with no key: -inf
    fin = torch.isfinite(ref_lse)
    assert (lse.double() - ref_lse)[fin].abs().max().item() <= 1e-4
    dead = torch.arange(Sk, device=dev)[None, :] >= kl[:, None].long()
    assert (grads[1][dead] == 0).all() and (grads[2][dead] == 0).all(), "keys past k_lens got gradient"
    assert (out[torch.tensor(lens) == 0] == 0).all()
    # Ring accumulators: the same gradients are added in place, nothing added past k_lens.
    acc = [torch.ones_like(t, dtype=torch.float32) for t in (q, k, v)]
    fa.flash_attn_bwd(dout, q, k, v, out, lse, causal, dq=acc[0], dk=acc[1], dv=acc[2], k_lens=kl)
    for a, gr in zip(acc, grads):
        assert torch.allclose(a - 1, gr.float(), atol=floor * 10, rtol=1e-3)
    assert (acc[1][dead] == 1).all() and (acc[2][dead] == 1).all()


def test_compact_joint():
    """Masks become (keys, lengths) that keep exactly the real keys, in order; right-padded masks
    without a copy, and no lengths at all where every batch element keeps the same keys."""
    import sys

    import torch

    mod = sys.modules["spattn.attention"]  # the module (spattn.attention is the function)
    jk, jv = torch.randn(3, 6, 2, 4), torch.randn(3, 6, 2, 4)
    masks = {"all": torch.ones(3, 6, dtype=torch.bool),
             "prefix_equal": torch.arange(6)[None, :].expand(3, 6) < 4,
             "prefix": torch.arange(6)[None, :] < torch.tensor([[5], [2], [0]]),
             "holes": torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 1], [0] * 6], dtype=torch.bool)}
    for name, m in masks.items():
        k2, v2, lens = mod._compact_joint(m, jk, jv)
        n = lens.tolist() if lens is not None else [k2.shape[1]] * 3
        assert k2.shape[1] == max(1, int(m.sum(1).max())), name  # cut to the longest prompt
        for b in range(3):
            assert torch.equal(k2[b, :n[b]], jk[b][m[b]]) and torch.equal(v2[b, :n[b]], jv[b][m[b]]), name
        if name != "holes":
            assert k2.data_ptr() == jk.data_ptr(), f"{name}: a right-padded mask must not copy the keys"
        assert (lens is None) == (name in ("all", "prefix_equal")), name


def test_mask_summary_cached_per_version():
    import sys

    import torch

    mod = sys.modules["spattn.attention"]
    m = torch.ones(2, 5, dtype=torch.bool)
    assert mod._mask_summary(m) == (True, 5, 5)
    m[0, 3:] = False  # in place: the version counter moves, the summary is recomputed
    assert mod._mask_summary(m) == (True, 5, 3)
    m[1, 1] = False
    assert mod._mask_summary(m) == (False, 4, 3)
    with torch.inference_mode():  # no version counter there: still right, just not cached
        mi = torch.arange(5)[None, :] < torch.tensor([[5], [2]])
    assert mod._mask_summary(mi) == (True, 5, 2)
