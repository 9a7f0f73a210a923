"""CFG parallel (spattn.integrations.diffusers.parallelize_pipeline) on gloo ranks: tiny random
Qwen-Image / Flux pipelines (real diffusers classes) with negative prompts, against the unmodified
pipeline on one process: every transformer output the pipeline sees <= 1e-5 relative, the decoded
image <= 1e-3, and each rank runs the transformer once per denoising step (twice without spattn).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import spattn  # noqa: E402

from dist_harness import run_on_ranks  # noqa: E402

STEPS = 3
# Batch 2, prompts and negative prompts of different lengths: padded text, masks (Qwen-Image).
PROMPTS = ["a cat", "a red house on the lake with a large tree in the morning sun"]
NEGATIVE = ["blurry photo of a small dog in the city at night", "ugly"]


def _tiny_wan():
    """A tiny random WanPipeline (guidance_scale CFG): 2 blocks, 4 heads of 16, a UMT5 encoder, a Wan VAE."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from spattn.integrations.diffusers.tiny import _t5_tokenizer

    tokenizer = _t5_tokenizer()
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16,
                                        in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                        num_layers=2, rope_max_seq_len=32)
    torch.manual_seed(1)
    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    torch.manual_seed(2)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=16, num_layers=2,
                                               num_heads=2, relative_attention_num_buckets=8, pad_token_id=0,
                                               eos_token_id=1, decoder_start_token_id=0)).eval()
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def _pipe(model: str):
    from diffusers.utils import logging as dlog

    from spattn.integrations.diffusers.tiny import build_tiny_pipeline

    dlog.set_verbosity_error()   # "true_cfg_scale ignored" notes for the no-CFG calls
    if model == "tiny-wan-cfg":
        return _tiny_wan()
    return build_tiny_pipeline(model, dtype=torch.float32)


def _generate(pipe, cfg: bool, model: str):
    """(transformer outputs the pipeline received, decoded image) of one generation."""
    outs = []

    def keep(mod, args, output):   # references, not copies: CFG buffers are filled after they return
        outs.append(output[0] if isinstance(output, tuple) else output.sample)

    h = pipe.transformer.register_forward_hook(keep)
    kw = dict(negative_prompt=NEGATIVE, true_cfg_scale=4.0) if cfg else dict(true_cfg_scale=1.0)
    if model == "tiny-flux":
        kw["max_sequence_length"] = 24
    if model == "tiny-wan-cfg":   # Wan's CFG is guidance_scale > 1 (negative prompt "" by default)
        kw = dict(negative_prompt=NEGATIVE, guidance_scale=5.0 if cfg else 1.0, num_frames=5, max_sequence_length=16)
    try:
        out = pipe(prompt=PROMPTS, width=80, height=48, num_inference_steps=STEPS, output_type="np",
                   generator=torch.Generator("cpu").manual_seed(0), **kw)
        image = out.frames if model == "tiny-wan-cfg" else out.images
    finally:
        h.remove()
    return [o.clone() for o in outs], torch.from_numpy(image)


_REFS = {}


def _reference(model: str, cfg: bool):
    if (model, cfg) not in _REFS:
        torch.manual_seed(0)
        _REFS[model, cfg] = _generate(_pipe(model), cfg, model)
    return _REFS[model, cfg]


def _body(model: str, u: int, r: int, cfg: bool, ref_outs, ref_image) -> dict:
    from spattn.integrations.diffusers import parallelize_pipeline

    mesh = spattn.init_mesh(ulysses_degree=u, ring_degree=r, cfg_degree=2)
    pipe = _pipe(model)
    cls = type(pipe)
    passes = [0]
    counter = pipe.transformer.proj_out.register_forward_hook(lambda *a: passes.__setitem__(0, passes[0] + 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with parallelize_pipeline(pipe, mesh) as handle:
            outs, image = _generate(pipe, cfg, model)
            run = handle.last_run
    counter.remove()
    rel = max(float((o - ref).abs().max() / ref.abs().max()) for o, ref in zip(outs, ref_outs, strict=True))
    img = float((image - ref_image).abs().max())
    idle_warned = any("idle" in str(w.message) for w in caught)
    restored = type(pipe) is cls and "spattn_cfg" not in getattr(pipe.transformer, "_diffusers_hook").hooks
    stats = torch.tensor([rel, img, passes[0], -passes[0], len(outs), -len(outs), run.executions,
                          run.idle_fraction, float(idle_warned), -float(idle_warned), float(restored)],
                         dtype=torch.float64)
    lo_restored = stats[10].clone()
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo_restored, op=dist.ReduceOp.MIN)
    return {"rel": stats[0].item(), "img": stats[1].item(), "passes_max": stats[2].item(),
            "passes_min": -stats[3].item(), "calls_max": stats[4].item(), "calls_min": -stats[5].item(),
            "executions_max": stats[6].item(), "idle_fraction": stats[7].item(),
            "idle_warned_any": bool(stats[8]), "idle_warned_all": not bool(stats[9] == 0),
            "restored_all": bool(lo_restored)}


@pytest.mark.parametrize("model,u,r", [
    ("tiny-qwen-image", 1, 1),     # CFG 2 on 2 ranks
    ("tiny-qwen-image", 2, 1),     # CFG 2 x Ulysses 2 on 4 ranks
    ("tiny-qwen-image", 1, 2),     # CFG 2 x Ring 2 on 4 ranks
    ("tiny-flux", 1, 1),
    ("tiny-wan-cfg", 1, 2),        # Wan (video, guidance_scale): CFG 2 x Ring 2 on 4 ranks
])
def test_cfg_parallel_equals_one_device(model, u, r):
    ref_outs, ref_image = _reference(model, cfg=True)
    assert len(ref_outs) == 2 * STEPS                      # the unmodified pipeline: cond + uncond per step
    res = run_on_ranks(2 * u * r, _body, model, u, r, True, ref_outs, ref_image)
    assert res["rel"] <= 1e-5, res
    assert res["img"] <= 1e-3, res
    # The pipeline still made two calls per step on every rank, but every rank ran the model once per step.
    assert res["calls_min"] == res["calls_max"] == 2 * STEPS, res
    assert res["passes_min"] == res["passes_max"] == STEPS, res
    assert res["executions_max"] == STEPS and res["idle_fraction"] == 0.0 and not res["idle_warned_any"], res
    assert res["restored_all"], res


def test_request_without_cfg_on_cfg_mesh_is_correct_and_says_half_idle():
    ref_outs, ref_image = _reference("tiny-qwen-image", cfg=False)
    assert len(ref_outs) == STEPS
    res = run_on_ranks(2, _body, "tiny-qwen-image", 1, 1, False, ref_outs, ref_image)
    assert res["rel"] <= 1e-5 and res["img"] <= 1e-3, res
    assert res["passes_min"] == res["passes_max"] == STEPS, res     # both halves ran every call
    assert res["idle_fraction"] == 0.5 and res["idle_warned_all"], res


def _bad_degree() -> str:
    from spattn.integrations.diffusers import parallelize_pipeline

    mesh = spattn.init_mesh(cfg_degree=4)
    try:
        parallelize_pipeline(_pipe("tiny-qwen-image"), mesh)
    except ValueError as e:
        return str(e)
    return "no error"


def test_cfg_degree_above_two_is_a_clear_error():
    assert "use cfg_degree=2" in run_on_ranks(4, _bad_degree)


def test_cfg_degree_one_is_plain_sequence_parallel():
    """Without CFG halves parallelize_pipeline is parallelize() on the transformer: one process, exact."""
    from spattn.integrations.diffusers import parallelize_pipeline

    ref_outs, ref_image = _reference("tiny-qwen-image", cfg=True)
    pipe = _pipe("tiny-qwen-image")
    with parallelize_pipeline(pipe, spattn.init_mesh()) as handle:
        outs, image = _generate(pipe, True, "tiny-qwen-image")
        assert len(handle.sp_handles) == 1
    assert len(outs) == 2 * STEPS
    assert max(float((o - r).abs().max() / r.abs().max()) for o, r in zip(outs, ref_outs)) <= 1e-5
    assert float((image - ref_image).abs().max()) <= 1e-3


# ---- spattn generate: the guidance flags and CFG parallel rows ----------------------------------------

def _generate_config(argv):
    import argparse

    from spattn.cli import generate

    p = argparse.ArgumentParser()
    generate.add_arguments(p)
    return generate.validate(p.parse_args(argv))


@pytest.mark.parametrize("argv,needle", [
    (["--true-cfg-scale", "4"], "needs --negative-prompt"),
    (["--negative-prompt", "blurry", "--true-cfg-scale", "1"], "> 1"),
    (["--cfg-degree", "3", "--negative-prompt", "blurry"], "use --cfg-degree 2"),
    (["--guidance-scale", "3.5"], "not guidance-distilled"),
])
def test_generate_guidance_flag_errors(argv, needle):
    from spattn.cli.generate import UsageError

    with pytest.raises(UsageError, match=needle):
        _generate_config(argv)


def test_generate_guidance_defaults():
    c = _generate_config(["--cfg-parallel", "2", "--negative-prompt", "blurry"])
    # CFG halves take the ranks first: Ulysses 1 unless asked; true CFG scale 4 with a negative prompt.
    assert (c.cfg_degree, c.ulysses_degree, c.ring_degree, c.world, c.true_cfg_scale) == (2, 1, 1, 2, 4.0)
    c = _generate_config(["--cfg-degree", "2", "--ulysses-degree", "2", "--negative-prompt", "x", "--true-cfg-scale", "5"])
    assert (c.world, c.true_cfg_scale) == (4, 5.0)
    assert _generate_config([]).world == 2 and _generate_config([]).cfg_degree == 1   # the old default


def _run_generate(tmp_path, *argv):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "spattn", "generate", "--width", "32", "--height", "48",
                           "--num-inference-steps", "2", "--no-warmup", "--output", str(tmp_path / "img.png"),
                           "--json", str(out), *argv], cwd=root, env=dict(os.environ, PYTHONPATH=str(root)),
                          capture_output=True, text=True, timeout=int(os.environ.get("SPATTN_TEST_TIMEOUT", 300)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_generate_cfg_parallel_row(tmp_path):
    rows, stdout = _run_generate(tmp_path, "--cfg-degree", "2", "--negative-prompt", "blurry",
                                 "--true-cfg-scale", "4", "--baseline")
    base, par = rows
    assert base["cfg_degree"] == 1 and base["ranks"] == 1 and base["negative_prompt"] == "blurry"
    assert (par["configuration"], par["cfg_degree"], par["ranks"]) == ("CFG-Parallel", 2, 2)
    assert par["max_abs_diff"] <= 1e-3 and par["idle_fraction"] == 0.0
    assert "| CFG degree |" in stdout and "| CFG-Parallel | 2 | 1 | 1 |" in stdout


def test_generate_without_guidance_on_cfg_mesh_says_half_idle(tmp_path):
    rows, stdout = _run_generate(tmp_path, "--cfg-degree", "2", "--no-baseline")
    (par,) = rows
    assert par["cfg_degree"] == 2 and par["idle_fraction"] == 0.5
    assert "50% of the ranks were idle" in stdout
