"""spattn.integrations.diffusers: tiny random-weight Qwen-Image, Flux and Wan transformers run
sequence-parallel on gloo ranks and must equal the single-process model (forward and parameter
gradients), in every Ulysses x Ring factorization of 2 and 4 ranks, with token counts the mesh does
not divide. ``remove()`` must give back a model equal to a never-parallelized copy.

Every rank builds the same model and inputs from a seed and computes the single-process reference
itself (the models are tiny), so nothing but the errors travels back.
"""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("diffusers")

import spattn  # noqa: E402
from spattn.integrations import diffusers as spd  # noqa: E402

from dist_harness import run_on_ranks  # noqa: E402
from sp_cases import get_mesh  # noqa: E402

FACTORIZATIONS = [(2, 1), (1, 2), (4, 1), (1, 4), (2, 2)]
MODELS = ["qwen", "flux", "wan"]


# ---- tiny models and their inputs (same on every rank: fixed seeds) ----------------------------------

def build(name: str, seed: int = 0, variant: int = 0) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(seed)
    if name == "qwen":
        m = diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=24, axes_dims_rope=(4, 6, 6),
            zero_cond_t=variant == 2)   # edit models: per-token modulate_index, condition image tokens
    elif name == "flux":
        m = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))
    elif name == "wan":
        m = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32)
    else:
        raise ValueError(name)
    return m.float().eval()


def inputs(name: str, seed: int = 1, variant: int = 0) -> dict:
    """Batch 2, odd image token counts (35 = 5x7 for the image models, 45 = 3x3x5 for Wan)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g)

    h, w = 5, 7
    if name == "qwen":
        text = 6
        mask = torch.ones(2, text, dtype=torch.bool)
        mask[1, 4:] = False   # variant 1: the second prompt is 4 tokens long, padded to 6
        shapes = [(1, h, w)] + ([(1, 3, 3)] if variant == 2 else [])   # variant 2: + a condition image
        return dict(hidden_states=rnd(2, sum(a * b * c for a, b, c in shapes), 16),
                    encoder_hidden_states=rnd(2, text, 24), encoder_hidden_states_mask=mask if variant == 1 else None,
                    timestep=torch.tensor([0.3, 0.7]), img_shapes=[shapes] * 2, return_dict=False)
    if name == "flux":
        ids = torch.zeros(h, w, 3)
        ids[..., 1] = torch.arange(h)[:, None]
        ids[..., 2] = torch.arange(w)[None, :]
        kw = dict(hidden_states=rnd(2, h * w, 16), encoder_hidden_states=rnd(2, 5, 24),
                  pooled_projections=rnd(2, 16), timestep=torch.tensor([0.3, 0.7]),
                  img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(5, 3), guidance=torch.tensor([3.5, 3.5]),
                  return_dict=False)
        if variant == 1:   # ControlNet residuals: full-length image tokens, split with the image
            kw.update(controlnet_block_samples=[rnd(2, h * w, 64)],
                      controlnet_single_block_samples=[rnd(2, h * w, 64), rnd(2, h * w, 64)])
        return kw
    if name == "wan":
        frames, hh, ww = 3, 6, 10          # -> 3 x 3 x 5 = 45 tokens after (1, 2, 2) patches
        t = torch.tensor([300.0, 700.0])
        if variant == 1:                   # Wan 2.2-style per-token timesteps (batch, tokens)
            t = torch.linspace(100, 900, 45).repeat(2, 1)
        return dict(hidden_states=rnd(2, 4, frames, hh, ww), timestep=t,
                    encoder_hidden_states=rnd(2, 7, 24), return_dict=False)
    raise ValueError(name)


def _fwd_bwd(model, kw, weight):
    model.zero_grad(set_to_none=True)
    out = model(**kw)[0]
    (out * weight).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---- bodies run on every rank ---------------------------------------------------------------------------

def body_equal(name: str, u: int, r: int, variant: int = 0, checkpointing: bool = False) -> dict:
    mesh = get_mesh(u, r)
    model = build(name, variant=variant)
    if checkpointing:  # blocks are re-run in backward: their split hooks must shard the same way again
        model.enable_gradient_checkpointing()
    kw = inputs(name, variant=variant)
    weight = torch.randn(model(**kw)[0].shape, generator=torch.Generator().manual_seed(2))
    ref_out, ref_grads = _fwd_bwd(model, kw, weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    procs = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}

    handle = spd.parallelize(model, mesh)
    out, grads = _fwd_bwd(model, kw, weight)
    shards = {n: g.clone() for n, g in grads.items()}
    handle.all_reduce_grads()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        out_nograd = model(**kw)[0]
    handle.remove()

    scale = ref_out.abs().max().item()
    err = {"out": (out - ref_out).abs().max().item() / scale,
           "out_nograd": (out_nograd - ref_out).abs().max().item() / scale,
           "grad": max((grads[n] - g).abs().max().item() / max(g.abs().max().item(), 1e-12)
                       for n, g in ref_grads.items()),
           "missing_grads": float(set(grads) != set(ref_grads)),
           # each rank really held only part of the work: some gradient shard differs from the total
           "sharded": float(any(not torch.equal(shards[n], grads[n]) for n in shards))}
    # remove(): same weights, same processors, same outputs as before (bit for bit)
    with torch.no_grad():
        after = model(**kw)[0]
    err["remove_out"] = (after - ref_out).abs().max().item()
    err["remove_weights"] = float(any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items()))
    err["remove_procs"] = float(any(m.processor is not procs[n] for n, m in model.named_modules()
                                    if hasattr(m, "processor")))
    # the worst value over all ranks (every rank must hold the full, equal output)
    t = torch.tensor([err[k] for k in sorted(err)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(sorted(err), t.tolist()))


def body_pipeline_kwargs(u: int, r: int) -> float:
    """A never-parallelized copy and a parallelized model called the way pipelines call them
    (keyword arguments, attention_kwargs, return_dict=True) agree; positional calls work too."""
    mesh = get_mesh(u, r)
    ref = build("flux")
    model = copy.deepcopy(ref)
    kw = inputs("flux")
    kw.pop("return_dict")
    with torch.no_grad():
        want = ref(**kw, joint_attention_kwargs={}).sample
        with spd.parallelize(model, mesh):
            got = model(**kw, joint_attention_kwargs={}, return_dict=True).sample
            pos = model(kw["hidden_states"], kw["encoder_hidden_states"], kw["pooled_projections"],
                        kw["timestep"], kw["img_ids"], kw["txt_ids"], kw["guidance"])[0]
    return max((got - want).abs().max().item(), (pos - want).abs().max().item()) / want.abs().max().item()


# ---- tests ----------------------------------------------------------------------------------------------

TOL_OUT = 1e-5    # max abs error / output scale (fp32)
TOL_GRAD = 1e-4   # per parameter: max abs error / that gradient's scale


def _check(err: dict) -> None:
    assert err["out"] <= TOL_OUT, err
    assert err["out_nograd"] <= TOL_OUT, err
    assert err["grad"] <= TOL_GRAD, err
    assert err["missing_grads"] == 0 and err["sharded"] == 1, err
    assert err["remove_out"] == 0 and err["remove_weights"] == 0 and err["remove_procs"] == 0, err


@pytest.mark.parametrize("u,r", FACTORIZATIONS, ids=[f"u{u}r{r}" for u, r in FACTORIZATIONS])
@pytest.mark.parametrize("name", MODELS)
def test_equals_single_process(name, u, r):
    _check(run_on_ranks(u * r, body_equal, name, u, r))


@pytest.mark.parametrize("u,r", [(2, 1), (1, 2), (2, 2)], ids=["u2r1", "u1r2", "u2r2"])
def test_wan_per_token_timestep(u, r):
    _check(run_on_ranks(u * r, body_equal, "wan", u, r, 1))


@pytest.mark.parametrize("u,r", [(2, 1), (1, 2)], ids=["u2r1", "u1r2"])
def test_qwen_zero_cond_t(u, r):
    """Qwen-Image edit models: a condition image's tokens follow the target's; modulate_index
    (batch, tokens) chooses their modulation and is split with them."""
    _check(run_on_ranks(u * r, body_equal, "qwen", u, r, 2))


@pytest.mark.parametrize("u,r", [(2, 1), (1, 2)], ids=["u2r1", "u1r2"])
def test_flux_controlnet_residuals(u, r):
    _check(run_on_ranks(u * r, body_equal, "flux", u, r, 1))


@pytest.mark.parametrize("name,variant", [("qwen", 0), ("wan", 1)])
def test_gradient_checkpointing(name, variant):
    _check(run_on_ranks(4, body_equal, name, 2, 2, variant, True))


@pytest.mark.parametrize("u,r", FACTORIZATIONS, ids=[f"u{u}r{r}" for u, r in FACTORIZATIONS])
def test_qwen_text_mask(u, r):
    _check(run_on_ranks(u * r, body_equal, "qwen", u, r, 1))


def test_text_mask_converted_once_per_call(monkeypatch):
    """A non-bool text mask is converted to bool once per call, not in every layer: every layer hands
    spattn.attention the same bool tensor (whose host summary spattn caches), with the same numbers."""
    state = spd._State(mesh=spattn.SPMesh(), backend="torch", seq_len=5)
    proc = spd._Processor(state)
    torch.manual_seed(0)
    q, k, v, tq, tk, tv = (torch.randn(2, n, 4, 8) for n in (5, 5, 5, 6, 6, 6))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 1, 0]], dtype=torch.float32)
    seen = []
    attention = spattn.attention

    def spy(*args, joint_mask=None, **kw):
        seen.append(joint_mask)
        return attention(*args, joint_mask=joint_mask, **kw)

    monkeypatch.setattr(spattn, "attention", spy)
    outs = [proc.attend(q, k, v, (tq, tk, tv), mask) for _ in range(3)]  # three "layers"
    assert all(m is seen[0] for m in seen) and seen[0].dtype == torch.bool
    assert torch.equal(seen[0], mask.bool())
    ref = attention(q, k, v, state.mesh, seq_len=5, joint_q=tq, joint_k=tk, joint_v=tv, joint_mask=mask.bool())
    assert all(torch.equal(a, b) for o in outs for a, b in zip(o, ref))
    mask[1, 5] = 1.0  # an in-place change is seen (version counter)
    proc.attend(q, k, v, (tq, tk, tv), mask)
    assert seen[-1] is not seen[0] and torch.equal(seen[-1], mask.bool())
    proc.attend(q, k, v, (tq, tk, tv), mask.clone())  # another mask tensor: converted anew
    assert seen[-1] is not seen[-2] and torch.equal(seen[-1], mask.bool())


def body_compiled(u: int, r: int, called_before: bool) -> list:
    """parallelize(torch.compile(model)) parallelizes the model inside; the compiled model (called
    before or not) retraces and equals the eager single-process model; after remove() too."""
    mesh = get_mesh(u, r)
    ref = build("flux")
    kw = inputs("flux")
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(ref), backend="aot_eager")
    with torch.no_grad():
        want = ref(**kw)[0]
        if called_before:
            compiled(**kw)
        handle = spd.parallelize(compiled, mesh)
        got = compiled(**kw)[0]
        handle.remove()
        after = compiled(**kw)[0]
    scale = want.abs().max().item()
    return [(got - want).abs().max().item() / scale, (after - want).abs().max().item() / scale,
            float(handle.model is compiled._orig_mod)]


@pytest.mark.parametrize("called_before", [False, True], ids=["fresh", "called"])
def test_parallelize_compiled_model(called_before):
    err_sp, err_after, unwrapped = run_on_ranks(2, body_compiled, 2, 1, called_before, timeout=600)
    assert err_sp <= TOL_OUT and err_after <= TOL_OUT and unwrapped == 1.0


def test_pipeline_style_calls():
    assert run_on_ranks(2, body_pipeline_kwargs, 1, 2) <= TOL_OUT


def test_unsupported_model_lists_supported():
    from diffusers import UNet2DModel

    with pytest.raises(TypeError, match="FluxTransformer2DModel, QwenImageTransformer2DModel, WanTransformer3DModel"):
        spd.parallelize(UNet2DModel(block_out_channels=(8,), down_block_types=("DownBlock2D",),
                                    up_block_types=("UpBlock2D",), norm_num_groups=4), spattn.SPMesh())


def test_refuses_twice_and_nonstandard_processors():
    model, mesh = build("flux"), spattn.SPMesh()
    handle = spd.parallelize(model, mesh)
    with pytest.raises(ValueError, match="already parallelized"):
        spd.parallelize(model, mesh)
    handle.remove()
    handle.remove()  # idempotent
    model.fuse_qkv_projections()
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        spd.parallelize(model, mesh)
    assert all(not isinstance(m.processor, spd._Processor) for m in model.modules() if hasattr(m, "processor"))


def test_import_spattn_does_not_import_diffusers():
    code = "import spattn, sys; assert 'diffusers' not in sys.modules, 'spattn imported diffusers'"
    subprocess.run([sys.executable, "-c", code], check=True)
