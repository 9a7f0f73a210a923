"""spattn.integrations.diffusers.parallelize_vae: tiny random Qwen-Image, Wan and Flux VAEs decode on 2
and 4 gloo ranks, each rank on a band of rows, and must equal the single-process decode (fp32, 1e-5
relative) on every rank, for images and video latents whose height the ranks do not divide. The
largest convolution input a rank sees must be its band's share of one device's.

Every rank builds the same VAE and latent from seeds and decodes the single-process reference itself
(the VAEs are tiny); each rank asserts, so a wrong band on any rank fails the test.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("diffusers")

import spattn  # noqa: E402
from spattn.integrations.diffusers import ConvInputMeter, parallelize_vae, vae_supported  # noqa: E402

from dist_harness import run_on_ranks  # noqa: E402

RTOL = 1e-5   # fp32: only the order of the GroupNorm sums and the attention's merge differ
# Against fp64, the parallel fp32 decode may be at most 2x as far off as the single-device fp32 decode
# (flash-attention's rule), plus a floor: these random VAEs amplify fp32 rounding to a few 1e-6.
FP64_FLOOR = 1e-6


def build_vae(kind: str) -> torch.nn.Module:
    """Tiny VAEs with the real models' structure (spatial factor 8, mid-block attention)."""
    import diffusers

    torch.manual_seed(0)
    if kind in ("qwen", "wan"):
        cls = diffusers.AutoencoderKLQwenImage if kind == "qwen" else diffusers.AutoencoderKLWan
        vae = cls(base_dim=4, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True])
    elif kind == "wan22":   # Wan 2.2: residual up blocks (DupUp3D shortcuts), 2x2 output patches
        vae = diffusers.AutoencoderKLWan(base_dim=4, decoder_base_dim=8, z_dim=4, num_res_blocks=1, is_residual=True,
                                         in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16)
    elif kind == "flux":
        vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1, norm_num_groups=4)
    else:
        raise ValueError(kind)
    return vae.float().eval()


def latent(shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def _decode_case(kind: str, shape, degrees) -> dict:
    """On every rank: single-process decode, then the parallel one; asserts here, returns figures."""
    vae = build_vae(kind)
    z = latent(shape)
    meter = ConvInputMeter(vae.decoder)
    calls = []
    real_attention = spattn.attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real_attention(*args, **kwargs)

    with torch.no_grad():
        ref = vae.decode(z).sample
        single_peak = meter.peak
        ref64 = build_vae(kind).double().decode(z.double()).sample.float()
        u, r, cfg = degrees
        mesh = spattn.init_mesh(ulysses_degree=u, ring_degree=r, cfg_degree=cfg)
        spattn.attention = counting
        try:
            with parallelize_vae(vae, mesh) as handle:
                meter.reset()
                out = vae.decode(z).sample
                band_rows = handle.band.rows
        finally:
            spattn.attention = real_attention
    meter.remove()
    err = rel_err(out, ref)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert err <= RTOL, f"rank {dist.get_rank()}: relative error {err:.2e}"
    assert rel_err(out, ref64) <= 2 * rel_err(ref, ref64) + FP64_FLOOR
    height, p = shape[-2], mesh.world_size
    mine = band_rows[mesh.sp_rank]
    assert sum(band_rows) == height and max(band_rows) - min(band_rows) <= 1
    # The largest conv input is the band's rows of the largest single-device one: exactly rows/height.
    assert meter.peak * height == single_peak * mine, (meter.peak, single_peak, mine, height)
    assert meter.peak <= single_peak / p + single_peak / height   # at most 1/P + one latent row
    # Mid-block attention through spattn: once per decoder call (per latent frame), on this band's share.
    frames = shape[2] if len(shape) == 5 else 1
    assert len(calls) == frames, calls
    assert all(c[1] == -(-shape[-2] * shape[-1] // p) for c in calls), calls
    # No rank keeps a patched layer after remove().
    assert all("forward" not in m.__dict__ for m in vae.modules())
    return {"err": err, "peak": meter.peak, "single_peak": single_peak, "rows": band_rows}


# (kind, latent shape): heights 5 and 7 are not divisible by 2 or 4; video latents have 2-3 frames.
CASES = [
    ("qwen", (1, 4, 1, 5, 6)),     # Qwen-Image: one frame
    ("qwen", (1, 4, 2, 7, 5)),     # Qwen-Image VAE on a video latent (temporal upsampling + cache)
    ("wan", (1, 4, 3, 5, 6)),      # Wan: 3 latent frames -> 9 frames
    ("wan22", (1, 4, 2, 5, 3)),    # Wan 2.2 VAE: 2 latent frames -> 5 frames, 16x spatial
    ("flux", (2, 4, 7, 6)),        # Flux: batch 2, GroupNorm and diffusers Attention
]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind,shape", CASES, ids=[f"{k}-{'x'.join(map(str, s))}" for k, s in CASES])
def test_parallel_decode_equals_one_device(kind, shape, world):
    res = run_on_ranks(world, _decode_case, kind, shape, (world, 1, 1))
    assert res["err"] <= RTOL
    assert res["peak"] < res["single_peak"]


@pytest.mark.parametrize("kind,shape,degrees", [
    ("qwen", (1, 4, 1, 7, 6), (2, 2, 1)),   # hybrid mesh: the VAE builds one group over all 4 SP ranks
    ("wan", (1, 4, 2, 5, 6), (1, 2, 2)),    # CFG mesh: each branch's 2 ranks decode on their own
    ("flux", (1, 4, 5, 7), (2, 1, 2)),
])
def test_parallel_decode_on_hybrid_and_cfg_meshes(kind, shape, degrees):
    res = run_on_ranks(4, _decode_case, kind, shape, degrees)
    assert res["err"] <= RTOL and len(res["rows"]) == degrees[0] * degrees[1]


def _too_short(kind: str, shape) -> str:
    vae = build_vae(kind)
    mesh = spattn.init_mesh(ulysses_degree=dist.get_world_size())
    with torch.no_grad(), parallelize_vae(vae, mesh):
        try:
            vae.decode(latent(shape))
        except ValueError as e:
            return str(e)
    return "no error"


def _twice(kind: str) -> str:
    vae = build_vae(kind)
    mesh = spattn.init_mesh(ulysses_degree=dist.get_world_size())
    with parallelize_vae(vae, mesh):
        try:
            parallelize_vae(vae, mesh)
        except RuntimeError as e:
            return str(e)
    return "no error"


def test_parallelizing_twice_is_refused():
    assert "already patched" in run_on_ranks(2, _twice, "wan")


def test_latent_shorter_than_ranks_is_refused_on_every_rank():
    msg = run_on_ranks(4, _too_short, "flux", (1, 4, 3, 8))
    assert "3 rows cannot be split over 4 ranks" in msg and "--no-vae-parallel" in msg


def test_one_rank_mesh_and_unsupported_vae():
    import diffusers

    vae = build_vae("flux")
    z = latent((1, 4, 3, 5))
    with torch.no_grad():
        ref = vae.decode(z).sample
        with parallelize_vae(vae, spattn.SPMesh()) as handle:   # one rank: nothing to split
            assert not handle.active
            assert torch.equal(vae.decode(z).sample, ref)
    assert vae_supported(vae) and not vae_supported(torch.nn.Conv2d(1, 1, 1)) and not vae_supported(None)
    tiny = diffusers.AutoencoderTiny(encoder_block_out_channels=(4,) * 4, decoder_block_out_channels=(4,) * 4)
    with pytest.raises(TypeError, match="AutoencoderTiny is not supported.*AutoencoderKLQwenImage"):
        parallelize_vae(tiny, spattn.SPMesh())


# ---- spattn generate: parallel decode by default ----------------------------------------------------

def _generate_config(argv):
    import argparse

    from spattn.cli import generate

    p = argparse.ArgumentParser()
    generate.add_arguments(p)
    return generate.validate(p.parse_args(argv))


def test_generate_vae_parallel_flag():
    from spattn.cli.generate import UsageError

    base = ["--model", "tiny-qwen-image", "--width", "32", "--num-inference-steps", "1"]
    assert _generate_config(base + ["--height", "32", "--ulysses-degree", "4"]).vae_parallel   # 4 latent rows
    assert not _generate_config(base + ["--height", "32", "--ulysses-degree", "4", "--no-vae-parallel"]).vae_parallel
    # 2 latent rows on 4 ranks: off by default, an error naming the fix when asked for.
    assert not _generate_config(base + ["--height", "16", "--ulysses-degree", "4"]).vae_parallel
    with pytest.raises(UsageError, match="2 latent rows, fewer than the 4 ranks that decode; use --height 32 or more"):
        _generate_config(base + ["--height", "16", "--ulysses-degree", "4", "--vae-parallel"])


def test_generate_decodes_on_every_rank(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    js = tmp_path / "rows.json"
    res = subprocess.run(
        [sys.executable, "-m", "spattn", "generate", "--model", "tiny-flux", "--ulysses-degree", "2", "--width", "32",
         "--height", "48", "--num-inference-steps", "1", "--no-warmup", "--json", str(js),
         "--output", str(tmp_path / "img.png")],
        cwd=root, env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    base, par = json.loads(js.read_text())
    assert (base["vae_parallel"], par["vae_parallel"]) == (False, True)
    assert par["max_abs_diff"] <= 1e-4   # fp32: the decoded image is the single-device one
    assert "VAE decode: patch-parallel" in res.stdout
