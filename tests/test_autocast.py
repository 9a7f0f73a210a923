"""Mixed precision (issue 16 item 4): under ``torch.autocast`` spattn behaves like SDPA does: q/k/v (and
joint tensors) in fp32/fp16/bf16 are cast to the autocast dtype, the output is in it, fp64 is left alone,
and gradients reach the fp32 leaves in fp32.

Numbers: ours may be at most ~2x further from the truth than torch's own autocast result (plus a small
floor), the truth being fp32 (or fp64) math on the same inputs: spattn on 2 gloo ranks vs SDPA on the
full sequence, a tiny Qwen-Image transformer parallelized vs the plain one, and a tiny HF LLM with
attn_implementation="spattn" vs "sdpa", all under ``torch.autocast("cpu", dtype=torch.bfloat16)``.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import spattn
from dist_harness import run_on_ranks
from sp_cases import get_mesh

BF16 = torch.bfloat16


def _autocast(dtype=BF16):
    return torch.autocast("cpu", dtype=dtype)


def _err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _sdpa(q, k, v, causal, joint=None):
    """SDPA over the full sequence in (B, S, H, D), joint text tokens in front; -> (out, joint_out)."""
    t = 0
    if joint is not None:
        t = joint[0].shape[1]
        q, k, v = (torch.cat([j, x], 1) for j, x in zip(joint, (q, k, v)))
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=causal).transpose(1, 2)
    return o[:, t:], o[:, :t]


def body_attention(u: int, r: int, causal: bool, joint: bool, layout: str, dtype: torch.dtype = BF16) -> dict:
    """Errors of spattn under autocast (bf16) and of SDPA under autocast, both vs fp64 math on the
    fp32 inputs; dtypes of outputs and gradients."""
    mesh = get_mesh(u, r)
    g = torch.Generator().manual_seed(0)
    B, S, H, D, T = 2, 37, 4, 16, 5
    full = [torch.randn(B, S, H, D, generator=g) for _ in range(3)]
    jt = [torch.randn(B, T, H, D, generator=g) for _ in range(3)] if joint else None
    w = torch.randn(B, S, H, D, generator=g)
    jw = torch.randn(B, T, H, D, generator=g)

    def loss(o, jo):
        return (o.float() * w).sum() + ((jo.float() * jw).sum() if jo is not None else 0)

    # torch: SDPA on the full sequence under autocast (what the model without spattn computes)
    xs = [t.clone().requires_grad_() for t in full]
    js = [t.clone().requires_grad_() for t in jt] if joint else None
    with _autocast(dtype):
        ref_o, ref_jo = _sdpa(*xs, causal, js)
    loss(ref_o, ref_jo if joint else None).backward()
    # truth: fp64 math on the same fp32 inputs
    xs64 = [t.double().requires_grad_() for t in full]
    js64 = [t.double().requires_grad_() for t in jt] if joint else None
    o64, jo64 = _sdpa(*xs64, causal, js64)
    loss(o64, jo64 if joint else None).backward()

    # spattn: this rank's shards, fp32 leaves, under autocast
    shards = [spattn.shard(t, mesh, seq_len=S, layout=layout).requires_grad_() for t in full]
    jl = [t.clone().requires_grad_() for t in jt] if joint else None
    kw = dict(joint_q=jl[0], joint_k=jl[1], joint_v=jl[2]) if joint else {}
    with _autocast(dtype):
        res = spattn.attention(*shards, mesh, causal=causal, seq_len=S, layout=layout, **kw)
    o, jo = res if joint else (res, None)
    dtypes = {"out": str(o.dtype), "joint_out": str(jo.dtype) if joint else str(dtype)}
    o_full = spattn.gather(o, mesh, seq_len=S, layout=layout)
    loss(o_full, jo).backward()
    grads = [spattn.gather(s.grad, mesh, seq_len=S, layout=layout) for s in shards]
    dtypes["grad"] = str(shards[0].grad.dtype)
    err = {"out": (_err(o_full, o64), _err(ref_o, o64))}
    if joint:
        err["joint_out"] = (_err(jo, jo64), _err(ref_jo, jo64))
    for name, mine, theirs, truth in zip("qkv", grads, xs, xs64):
        err["d" + name] = (_err(mine, truth.grad), _err(theirs.grad, truth.grad))
    if joint:
        for name, mine, theirs, truth in zip("qkv", jl, js, js64):
            err["dj" + name] = (_err(mine.grad, truth.grad), _err(theirs.grad, truth.grad))
    # fp64 inputs: autocast leaves them alone, for SDPA and for spattn
    with _autocast(dtype):
        o64_sp = spattn.attention(*(s.detach().double() for s in shards), mesh, causal=causal, seq_len=S,
                                  layout=layout)
    dtypes["fp64"] = str(o64_sp.dtype)
    return {"err": err, "dtypes": dtypes}


FLOOR = 2e-3  # a few bf16 roundings of the output scale


def _check_errors(res):
    for name, (mine, torch_own) in res["err"].items():
        assert mine <= 2 * torch_own + FLOOR, (name, mine, torch_own)


@pytest.mark.parametrize("u,r,causal,joint,layout", [
    (2, 1, False, True, "contiguous"), (1, 2, True, False, "zigzag"), (1, 2, False, True, "contiguous")],
    ids=["ulysses-joint", "ring-causal-zigzag", "ring-joint"])
def test_attention_under_autocast_matches_sdpa(u, r, causal, joint, layout):
    res = run_on_ranks(2, body_attention, u, r, causal, joint, layout, timeout=300)
    assert res["dtypes"] == {"out": "torch.bfloat16", "joint_out": "torch.bfloat16", "grad": "torch.float32",
                             "fp64": "torch.float64"}, res["dtypes"]
    _check_errors(res)


def test_attention_under_fp16_autocast():
    """fp16 autocast (the CUDA path's usual dtype; the front reads the autocast dtype of q's device
    type, so this CPU run takes the same code): fp16 out, SDPA-like errors."""
    res = run_on_ranks(2, body_attention, 1, 2, False, True, "contiguous", torch.float16, timeout=300)
    assert res["dtypes"] == {"out": "torch.float16", "joint_out": "torch.float16", "grad": "torch.float32",
                             "fp64": "torch.float64"}, res["dtypes"]
    _check_errors(res)


# ---- tiny models ---------------------------------------------------------------------------------------

def body_qwen_image(u: int, r: int) -> dict:
    """Qwen-Image (text mask, batch 2) parallelized under autocast vs the plain model under autocast."""
    pytest.importorskip("diffusers")
    from test_integration_diffusers import build, inputs

    from spattn.integrations import diffusers as spd

    mesh = get_mesh(u, r)
    model = build("qwen")
    kw = inputs("qwen", variant=1)
    weight = torch.randn(model(**kw)[0].shape, generator=torch.Generator().manual_seed(2))

    def run(ac: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=BF16, enabled=ac):
            out = model(**kw)[0]
        (out.float() * weight).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fp32, g32 = run(False)
    plain, gplain = run(True)
    handle = spd.parallelize(model, mesh)
    sp, gsp = run(True)
    handle.all_reduce_grads()
    gsp = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    handle.remove()
    return {"dtypes": (str(plain.dtype), str(sp.dtype)),
            "out": (_err(sp, fp32), _err(plain, fp32)),
            "grad": max((_err(gsp[n], g32[n]), _err(gplain[n], g32[n])) for n in g32)}


def test_qwen_image_under_autocast_matches_plain_model():
    res = run_on_ranks(2, body_qwen_image, 2, 1, timeout=600)
    assert res["dtypes"][0] == res["dtypes"][1], res
    mine, torch_own = res["out"]
    assert mine <= 2 * torch_own + FLOOR, res
    mine, torch_own = res["grad"]
    assert mine <= 2 * torch_own + 1e-2, res


def body_hf(u: int, r: int, family: str) -> dict:
    """A tiny HF LLM: attn_implementation="spattn" under autocast vs "sdpa" under autocast, logits and
    gradients, each vs the fp32 sdpa model."""
    pytest.importorskip("transformers")
    from test_integration_transformers import tiny_config
    from transformers import AutoModelForCausalLM

    from spattn.integrations.transformers import reduce_gradients, register, shard_inputs

    mesh = get_mesh(u, r)
    register(mesh)
    cfg = tiny_config(family)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    sp = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="spattn", dtype=torch.float32)
    sp.load_state_dict(ref.state_dict())
    S = 37
    ids = torch.randint(0, cfg.vocab_size, (2, S))

    def run(model, ac, inputs):
        model.zero_grad()
        with torch.autocast("cpu", dtype=BF16, enabled=ac):
            out = model(**inputs)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    full = dict(input_ids=ids, labels=ids, use_cache=False)
    l32, g32 = run(ref, False, full)
    lplain, gplain = run(ref, True, full)
    inputs = shard_inputs(ids, mesh, labels=ids)
    sp.zero_grad()
    with _autocast():
        out = sp(**inputs)
    out.loss.backward()
    reduce_gradients(sp, mesh)
    lsp = spattn.gather(out.logits.detach(), mesh, seq_len=S, layout="zigzag")
    gsp = {n: p.grad for n, p in sp.named_parameters()}
    return {"dtypes": (str(lplain.dtype), str(lsp.dtype)),
            "logits": (_err(lsp, l32), _err(lplain, l32)),
            "grad": max((_err(gsp[n], g32[n]), _err(gplain[n], g32[n])) for n in g32)}


@pytest.mark.parametrize("u,r", [(2, 1), (1, 2)], ids=["ulysses", "ring"])
def test_hf_llm_under_autocast_matches_sdpa(u, r):
    res = run_on_ranks(2, body_hf, u, r, "qwen2", timeout=600)
    assert res["dtypes"][0] == res["dtypes"][1], res
    mine, torch_own = res["logits"]
    assert mine <= 2 * torch_own + FLOOR, res
    mine, torch_own = res["grad"]
    assert mine <= 2 * torch_own + 1e-2, res
