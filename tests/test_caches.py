"""diffusers caches on a parallelized transformer: first-block cache decides skip/compute on the
mesh-wide statistic (every rank the same decision, outputs equal to the single-process cached run,
step by step), whether enabled before or after ``parallelize``; the other caches are refused at
``parallelize`` / ``enable_cache`` time naming the cache, and ``remove()`` gives diffusers' own hook back.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("diffusers")

import spattn  # noqa: E402
from spattn.integrations import diffusers as spd  # noqa: E402

from dist_harness import run_on_ranks  # noqa: E402
from sp_cases import get_mesh  # noqa: E402
from test_integration_diffusers import build, inputs  # noqa: E402

# Per denoising step, the latents are the first step's plus a move on part of the image tokens only
# (the first 18 of 35 tokens; Wan: every frame but the first), sized (per model) so that the
# mesh-wide statistic and a single shard's fall on opposite sides of the threshold: a per-shard
# decision splits the ranks, the mesh-wide one agrees with one process. Reference decisions:
# compute (first), skip, compute, skip (almost no change), compute (back to the start).
THRESHOLD = 0.05
MOVES = {"qwen": (0.0, 0.07, 0.12, 0.12, 0.0), "flux": (0.0, 0.07, 0.12, 0.12, 0.0),
         "wan": (0.0, 0.15, 0.2, 0.2, 0.0)}
WANT = [True, False, True, False, True]


def step_inputs(name: str, kw: dict, i: int) -> dict:
    kw = dict(kw)
    x = kw["hidden_states"]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(50)) * MOVES[name][i]
    if i == 3:
        noise = noise + torch.randn(x.shape, generator=torch.Generator().manual_seed(51)) * 1e-4
    if name == "wan":
        noise[:, :, :1] = 0       # (batch, channels, frames, h, w): the first frame stays
    else:
        noise[:, 18:] = 0
    kw["hidden_states"] = x + noise
    return kw


def run_cached(model, name: str):
    """Outputs and compute/skip decisions of the FBC-cached model over the steps."""
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

    head = next(m._diffusers_hook.hooks[_FBC_LEADER_BLOCK_HOOK] for m in model.modules()
                if _FBC_LEADER_BLOCK_HOOK in getattr(getattr(m, "_diffusers_hook", None), "hooks", {}))
    kw = inputs(name)
    outs, decisions = [], []
    with torch.no_grad(), model.cache_context("cond"):
        for i in range(len(WANT)):
            outs.append(model(**step_inputs(name, kw, i))[0])
            decisions.append(head.state_manager.get_state().should_compute)
    return outs, decisions


def body_fbc(name: str, u: int, r: int, before: bool) -> dict:
    from diffusers.hooks import FirstBlockCacheConfig

    mesh = get_mesh(u, r)
    ref = build(name)
    model = copy.deepcopy(ref)
    ref.enable_cache(FirstBlockCacheConfig(threshold=THRESHOLD))
    want, want_dec = run_cached(ref, name)
    if before:
        model.enable_cache(FirstBlockCacheConfig(threshold=THRESHOLD))
    handle = spd.parallelize(model, mesh)
    if not before:
        model.enable_cache(FirstBlockCacheConfig(threshold=THRESHOLD))
    got, got_dec = run_cached(model, name)
    handle.remove()
    model.disable_cache()
    err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, want))
    t = torch.tensor([err, float(got_dec != want_dec)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return {"err": float(t[0]), "decisions_differ": float(t[1]), "want": want_dec}


@pytest.mark.parametrize("u,r", [(2, 1), (1, 2)], ids=["u2r1", "u1r2"])
@pytest.mark.parametrize("name", ["qwen", "flux", "wan"])
def test_first_block_cache_equals_single_process(name, u, r):
    res = run_on_ranks(u * r, body_fbc, name, u, r, name != "flux")
    assert res["want"] == WANT, res   # the steps exercise both branches in the reference
    assert res["decisions_differ"] == 0, res
    assert res["err"] <= 1e-5, res


def test_first_block_cache_after_parallelize_4_ranks():
    res = run_on_ranks(4, body_fbc, "qwen", 2, 2, False)
    assert res["decisions_differ"] == 0 and res["err"] <= 1e-5, res


def _cache_configs():
    import diffusers.hooks as h

    out = []
    if hasattr(h, "PyramidAttentionBroadcastConfig"):
        out.append(h.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                     current_timestep_callback=lambda: 500))
    if hasattr(h, "FasterCacheConfig"):
        out.append(h.FasterCacheConfig(spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 500))
    if hasattr(h, "TaylorSeerCacheConfig"):
        out.append(h.TaylorSeerCacheConfig())
    return out


@pytest.mark.parametrize("config", _cache_configs(), ids=lambda c: type(c).__name__)
def test_other_caches_refused_naming_the_cache(config):
    name = type(config).__name__
    model, mesh = build("flux"), spattn.SPMesh()
    handle = spd.parallelize(model, mesh)
    with pytest.raises(ValueError, match=name):
        model.enable_cache(config)          # after parallelize: refused before any hook is applied
    assert not model.is_cache_enabled
    handle.remove()
    model.enable_cache(config)
    with pytest.raises(ValueError, match=name):
        spd.parallelize(model, mesh)        # before parallelize: refused, nothing changed
    assert all(not isinstance(m.processor, spd._Processor) for m in model.modules() if hasattr(m, "processor"))


def test_remove_restores_diffusers_cache():
    """After remove(), enable_cache is the model's own method again and the FBC hook decides by itself."""
    from diffusers.hooks import FirstBlockCacheConfig

    model = build("flux")
    handle = spd.parallelize(model, spattn.SPMesh())
    model.enable_cache(FirstBlockCacheConfig(threshold=THRESHOLD))
    handle.remove()
    assert "enable_cache" not in model.__dict__
    assert all("_should_compute_remaining_blocks" not in h.__dict__ for _, _, h in spd.transformer._hooks_of(model))
