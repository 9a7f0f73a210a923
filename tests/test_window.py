"""Sliding-window attention (issue 16 item 1): window=(left, right), flash-attn's convention (-1 =
unbounded), over global positions q_offset + i / k_offset + j.

Backend level (torch, reference; the Triton kernels have their own cases in test_triton_kernels.py):
forward and backward against fp64 autograd through the reference, and the reference against SDPA with
the window mask written out independently; with causal, offsets, GQA, key lengths, rows that see no key.
"""
import pytest
import torch
import torch.nn.functional as F

from spattn.backends import get_backend
from spattn.backends.reference import attention_ref, key_mask_from_lens
from spattn.backends import torch_backend as tb

CPU = torch.device("cpu")


def _visible(sq, sk, causal, window, q_off, k_off):
    """bool (Sq, Sk) written out from the definition: qpos - kpos in [-right, left] (and >= 0 if causal)."""
    d = (q_off + torch.arange(sq)[:, None]) - (k_off + torch.arange(sk)[None, :])
    return (d >= 0 if causal else d == d) & (d <= window[0] if window[0] >= 0 else d == d) & \
        (-d <= window[1] if window[1] >= 0 else d == d)


def _sdpa(q, k, v, vis, key_mask, scale):
    """SDPA with the (Sq, Sk) mask and optional (B, Sk) key mask; dead rows zeroed (SDPA would give NaN)."""
    m = vis[None, None] if key_mask is None else vis[None, None] & key_mask[:, None, None, :]
    dead = ~m.any(-1, keepdim=True)
    g = q.shape[2] // k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.repeat_interleave(g, 2).transpose(1, 2), v.repeat_interleave(g, 2).transpose(1, 2)
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=m | dead, scale=scale)
    return (o * (~dead)).transpose(1, 2)


def _qkv(b, sq, sk, hq, hkv, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g).to(dtype) for s in ((b, sq, hq, d), (b, sk, hkv, d), (b, sk, hkv, d)))


# (Sq, Sk, q_offset, k_offset): a square block, blocks from different ranks (before, after, overlapping)
BLOCKS = [(70, 70, 0, 0), (33, 90, 40, 0), (64, 64, 0, 64), (150, 147, 100, 20), (40, 60, 0, 30)]
WINDOWS = [(-1, -1), (0, 0), (5, -1), (-1, 7), (17, 3), (3, 100), (1000, 2)]


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: "sq%d-sk%d-qo%d-ko%d" % b)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lens", [False, True], ids=["", "klens"])
def test_backend_window_forward_backward_match_fp64(backend, block, causal, lens):
    sq, sk, qo, ko = block
    be = get_backend(backend, CPU)
    assert be.supports_window
    q, k, v = _qkv(2, sq, sk, 4, 2, 16)
    k_lens = torch.tensor([sk // 2, sk], dtype=torch.int32) if lens else None
    km = None if k_lens is None else key_mask_from_lens(k_lens, sk)
    scale = 0.25
    for window in WINDOWS:
        pos = dict(window=window, q_offset=qo, k_offset=ko)
        xs = [t.double().requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = attention_ref(*xs, causal, scale, key_mask=km, **pos)
        vis = _visible(sq, sk, causal, window, qo, ko)
        torch.testing.assert_close(ref_out, _sdpa(*(x.detach() for x in xs), vis, km, scale), atol=1e-10, rtol=0)
        out, lse = be.forward(q, k, v, causal, scale, k_lens=k_lens, **pos)
        dead = torch.isneginf(ref_lse)
        assert torch.equal(torch.isneginf(lse), dead), f"{window}: rows that see no key must have lse -inf"
        assert (out.transpose(1, 2)[dead] == 0).all()
        torch.testing.assert_close(out.double(), ref_out.detach(), atol=2e-6, rtol=0, msg=f"out {window}")
        torch.testing.assert_close(lse[~dead], ref_lse[~dead].float(), atol=2e-6, rtol=0)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        ref_out.backward(dout.double())
        grads = be.backward(dout, q, k, v, out, lse, causal, scale, k_lens=k_lens, **pos)
        accs = [torch.ones(t.shape, dtype=torch.float32) for t in (q, k, v)]
        res = be.backward(dout, q, k, v, out, lse, causal, scale, *accs, k_lens=k_lens, **pos)
        for name, g, r, x in zip("qkv", grads, res, xs):
            assert g.dtype == torch.float32 and torch.isfinite(g).all()
            torch.testing.assert_close(g.double(), x.grad, atol=1e-5, rtol=0, msg=f"d{name} {window}")
            assert r is accs["qkv".index(name)]
            torch.testing.assert_close(r.double(), 1 + x.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)], ids=["fp16", "bf16"])
def test_torch_backend_window_half_precision(dtype, atol):
    """Half inputs: within 2x torch's own error (SDPA in that dtype with the mask) of fp64, plus a floor."""
    be = get_backend("torch", CPU)
    q, k, v = _qkv(1, 96, 96, 4, 1, 32, dtype)
    vis = _visible(96, 96, True, (20, 0), 0, 0)
    out, lse = be.forward(q, k, v, True, 32 ** -0.5, window=(20, 0))
    ref = _sdpa(q.double(), k.double(), v.double(), vis, None, 32 ** -0.5)
    own = _sdpa(q, k, v, vis, None, 32 ** -0.5)
    assert out.dtype == dtype
    assert (out.double() - ref).abs().max() <= 2 * (own.double() - ref).abs().max() + atol


def test_window_unbounded_is_the_plain_path_bit_for_bit():
    be = get_backend("torch", CPU)
    q, k, v = _qkv(1, 50, 50, 2, 2, 16)
    for causal in (False, True):
        a = be.forward(q, k, v, causal, 0.3)
        b = be.forward(q, k, v, causal, 0.3, window=(-1, -1), q_offset=7, k_offset=7)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_torch_backend_chunks_cover_the_window_and_little_else():
    """The torch backend's windowed plan computes every visible pair and, for a narrow window, a key
    span per row of about chunk + window (not the whole block)."""
    for sq, sk, causal, window, shift in [(1000, 1000, True, (31, 0), 0), (300, 500, False, (7, 90), 150),
                                          (64, 64, True, (-1, -1), 10), (100, 100, False, (5, 5), -300)]:
        vis = _visible(sq, sk, causal, window, shift, 0)
        covered = torch.zeros(sq, sk, dtype=torch.bool)
        area = 0
        for q0, q1, k0, k1, masked in tb._chunks(sq, sk, causal, window, shift):
            assert not covered[q0:q1].any(), "query chunks are disjoint"
            covered[q0:q1, k0:k1] = True
            area += (q1 - q0) * (k1 - k0)
            if not masked:
                assert vis[q0:q1, k0:k1].all()
        assert (covered | ~vis).all(), "every visible pair is computed"
        if window == (31, 0):
            assert area <= sq * (2 * tb._MIN_CHUNK + 32)


def test_torch_backend_window_never_touches_keys_outside_it():
    """NaN keys/values outside every query's window stay out of the results (skipped, not masked)."""
    be = get_backend("torch", CPU)
    q, k, v = _qkv(1, 64, 256, 2, 2, 16)
    k[:, :100] = float("nan")
    v[:, 200:] = float("nan")
    out, lse = be.forward(q, k, v, False, 0.25, window=(8, 8), q_offset=120, k_offset=0)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    grads = be.backward(torch.ones_like(out), q, k, v, out, lse, False, 0.25, window=(8, 8), q_offset=120)
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[1][:, :100] == 0).all() and (grads[2][:, 200:] == 0).all()


# ----------------------------------------------------------------------------------------------
# Hugging Face models: each layer's window, as the model's own mask builds it
# ----------------------------------------------------------------------------------------------
def _tiny(cls_name, layers=4, **kw):
    transformers = pytest.importorskip("transformers")
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    return getattr(transformers, cls_name)(**{**base, **kw})


MOE = dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=16)
# (config class, kwargs, expected window per layer, module causal); sliding_window 5 -> (4, 0)
HF_CASES = {
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=5, max_window_layers=2),
              [(-1, -1), (-1, -1), (4, 0), (4, 0)]),
    "qwen2-off": ("Qwen2Config", dict(use_sliding_window=False, sliding_window=5), [(-1, -1)] * 4),
    "qwen2_moe": ("Qwen2MoeConfig", dict(use_sliding_window=True, sliding_window=5, max_window_layers=3, **MOE),
                  [(4, 0), (-1, -1), (4, 0), (-1, -1)]),
    "qwen2_moe-off": ("Qwen2MoeConfig", dict(use_sliding_window=False, sliding_window=5, **MOE), [(-1, -1)] * 4),
    "qwen3": ("Qwen3Config", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
              [(-1, -1), (4, 0), (4, 0), (4, 0)]),
    "mistral": ("MistralConfig", dict(sliding_window=5), [(4, 0)] * 4),
    "mistral-off": ("MistralConfig", dict(sliding_window=None), [(-1, -1)] * 4),
    "phimoe": ("PhimoeConfig", dict(sliding_window=5, num_local_experts=2, num_experts_per_tok=1), [(4, 0)] * 4),
    "phi3": ("Phi3Config", dict(sliding_window=5, pad_token_id=0), [(4, 0)] * 4),
    "gemma2": ("Gemma2Config", dict(sliding_window=5), [(4, 0), (-1, -1), (4, 0), (-1, -1)]),
    "gemma3": ("Gemma3TextConfig", dict(sliding_window=5, layers=7), [(4, 0)] * 5 + [(-1, -1), (4, 0)]),
    "gemma3-bidirectional": ("Gemma3TextConfig", dict(sliding_window=8, use_bidirectional_attention=True, layers=7),
                             [(4, 4)] * 5 + [(-1, -1), (4, 4)]),  # window 8 -> 8 // 2 + 1 = 5, |q - kv| < 5
    "gpt_oss": ("GptOssConfig", dict(sliding_window=5, num_local_experts=2, num_experts_per_tok=1),
                [(4, 0), (-1, -1), (4, 0), (-1, -1)]),
    "llama": ("LlamaConfig", dict(), [(-1, -1)] * 4),
}


def _hf_config(name):
    cls, kw, want = HF_CASES[name]
    kw = dict(kw)
    return _tiny(cls, kw.pop("layers", 4), **kw), want


@pytest.mark.parametrize("name", list(HF_CASES))
def test_hf_layer_window_per_model_family(name):
    from spattn.integrations.hf_window import hf_layer_window

    cfg, want = _hf_config(name)
    causal = not getattr(cfg, "use_bidirectional_attention", False)
    assert [hf_layer_window(cfg, i, causal=causal) for i in range(cfg.num_hidden_layers)] == want


@pytest.mark.parametrize("name", ["qwen2", "qwen2_moe", "mistral", "phimoe", "gemma3", "gemma3-bidirectional",
                                  "gpt_oss"])
def test_hf_layer_window_is_the_mask_the_model_builds(name):
    """Run the tiny model with an attention function that records the (materialized, eager) mask each
    layer receives: it is exactly the window hf_layer_window gives for that layer, position by position."""
    transformers = pytest.importorskip("transformers")
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    from spattn.backends.reference import visible
    from spattn.integrations.hf_window import hf_layer_window

    seen = {}

    def record(module, q, k, v, attention_mask, **kw):
        seen[module.layer_idx] = (attention_mask[0, 0] == 0, module.is_causal)
        return sdpa_attention_forward(module, q, k, v, attention_mask, **kw)

    AttentionInterface.register("spattn_test_record", record)
    AttentionMaskInterface.register("spattn_test_record", eager_mask)
    cfg, _ = _hf_config(name)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="spattn_test_record").eval()
    s = 19
    with torch.no_grad():
        model(input_ids=torch.randint(0, 64, (1, s)))
    assert sorted(seen) == list(range(cfg.num_hidden_layers))
    for i, (mask, causal) in seen.items():
        window = hf_layer_window(cfg, i, causal=causal)
        want = visible(s, s, causal, window)
        want = torch.ones(s, s, dtype=torch.bool) if want is None else want
        assert torch.equal(mask, want), f"layer {i}: window {window}"


def test_hf_layer_window_refuses_what_it_cannot_express():
    from spattn.integrations.hf_window import WindowNotSupported, hf_layer_window

    cfg, _ = _hf_config("qwen2")
    with pytest.raises(WindowNotSupported, match=r"passed sliding_window=9 but the model's mask for it is sliding_window=5"):
        hf_layer_window(cfg, 2, sliding_window=9)
    with pytest.raises(WindowNotSupported, match="model's mask for it is full attention"):
        hf_layer_window(cfg, 0, sliding_window=5)
    with pytest.raises(WindowNotSupported, match="has no layer_idx"):
        hf_layer_window(cfg, None)
    # Qwen2-MoE sets sliding_window = 0 without use_sliding_window: sliding layers would hide every key.
    moe = _tiny("Qwen2MoeConfig", use_sliding_window=False, sliding_window=5,
                layer_types=["sliding_attention", "full_attention"] * 2, **MOE)
    with pytest.raises(WindowNotSupported, match="sliding_window=0.*hides every key"):
        hf_layer_window(moe, 0)
    assert hf_layer_window(moe, 1) == (-1, -1)
    llama4 = _tiny("Llama4TextConfig", attention_chunk_size=8, num_local_experts=2, intermediate_size_mlp=32)
    kinds = set(llama4.layer_types)
    if "chunked_attention" in kinds:
        i = llama4.layer_types.index("chunked_attention")
        with pytest.raises(WindowNotSupported, match="layer type 'chunked_attention'"):
            hf_layer_window(llama4, i)
    causal_lm_bidirectional = _tiny("MistralConfig", sliding_window=5)
    causal_lm_bidirectional.is_causal = False
    with pytest.raises(WindowNotSupported, match="config.is_causal=False"):
        hf_layer_window(causal_lm_bidirectional, 0)
