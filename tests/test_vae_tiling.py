"""Tiled VAE encode/decode against Diffusers' AutoencoderKL after `enable_tiling()` (fp32, CPU, whole tensors).

Tolerances: the tiny VAE at atol 1e-4 absolute; the SD 1.5 topology at 1e-4 * max|reference| (random weights make
the output scale arbitrary), as in test_vae.py.

The tiny VAE (tests/conftest.py TINY_VAE) has sample_size=32 and one halving: tiles of 32 pixels / 16 latents that
advance by 24 / 12, so a few dozen pixels already span several tiles, including the smaller edge tiles.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import max_diff, official_config, randomize_norms, save_component
from models.loading import load_component
from models.vae import blend

diffusers = pytest.importorskip("diffusers")

ATOL = 1e-4


def check(ours: torch.Tensor, ref: torch.Tensor, what: str, atol: float = ATOL) -> None:
    print(f"{what}: {max_diff(ours, ref)}")
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    torch.testing.assert_close(ours, ref, atol=atol, rtol=0, msg=lambda m: f"{what}: {max_diff(ours, ref)}\n{m}")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    ours = load_component(tiny_model_dir, "vae")
    ref = diffusers.AutoencoderKL.from_pretrained(tiny_model_dir / "vae").eval()
    ref.enable_tiling()
    assert ours.config.sample_size == ref.tile_sample_min_size == 32  # read from vae/config.json, not defaulted
    return ours, ref


def image(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def latent(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(seed))


def test_blend_is_a_linear_cross_fade():
    """The spec: line k of the overlap is (1 - k/n) * a's k-th of its last n lines + (k/n) * b's k-th; b's rest kept."""
    a, b = torch.randn(1, 2, 5, 7), torch.randn(1, 2, 6, 7)
    got = blend(a, b, 4, dim=2)
    for k in range(4):
        torch.testing.assert_close(got[:, :, k], a[:, :, 1 + k] * (1 - k / 4) + b[:, :, k] * (k / 4))
    assert torch.equal(got[:, :, 4:], b[:, :, 4:])
    torch.testing.assert_close(blend(a.mT, b.mT, 4, dim=3), got.mT)  # columns the same way
    assert torch.equal(blend(a[:, :, :2], b, 4, dim=2)[:, :, 2:], b[:, :, 2:])  # never wider than the shorter tile


@pytest.mark.parametrize("size", [(1, 20, 36), (2, 30, 17), (1, 16, 40)])  # 2x3, 3x2 (batch 2), 2x4 tiles
def test_tiled_decode_matches_diffusers(tiny, size):
    ours, ref = tiny
    z = latent(*size)
    with torch.no_grad():
        got, want = ours.decode(z, tiled=True), ref.decode(z).sample
        check(got, want, f"tiled decode {size}")
        untiled = ours.decode(z)
    assert (got - untiled).abs().max() > 1e-3  # it really tiled: tiles see only their own latents


@pytest.mark.parametrize("size", [(1, 40, 72), (2, 60, 33), (1, 35, 50)])  # odd sizes: the asymmetric pad per tile
def test_tiled_encode_matches_diffusers(tiny, size):
    ours, ref = tiny
    x = image(*size)
    with torch.no_grad():
        mean, logvar = ours.encode(x, tiled=True)
        dist = ref.encode(x).latent_dist
        untiled = ours.encode(x)[0]
    check(mean, dist.mean, f"tiled mean {size}")
    check(logvar, dist.logvar, f"tiled logvar {size}")
    assert (mean - untiled).abs().max() > 1e-3


@pytest.mark.parametrize("side", [(32, 32), (32, 20), (12, 32)])
def test_no_tiling_up_to_one_tile(tiny, side):
    """Diffusers tiles only when a side exceeds the tile: up to it, tiled=True is the untiled path, exactly."""
    ours, ref = tiny
    x, z = image(1, *side), latent(1, side[0] // 2, side[1] // 2)
    assert not ours.needs_tiling(*side) and ours.needs_tiling(33, side[1]) and ours.needs_tiling(side[0], 33)
    with torch.no_grad():
        assert torch.equal(ours.decode(z, tiled=True), ours.decode(z))
        assert all(map(torch.equal, ours.encode(x, tiled=True), ours.encode(x)))
        check(ours.decode(z, tiled=True), ref.decode(z).sample, f"one-tile decode {side}", 1e-5)
        check(ours.encode(x, tiled=True)[0], ref.encode(x).latent_dist.mean, f"one-tile mean {side}", 1e-5)


def test_sd15_vae_tiled_matches_diffusers(tmp_path):
    """The true SD 1.5 VAE config with random weights, but sample_size=64 so that a CPU can run several tiles (the
    512-pixel tiles of SD 1.5 are the same code with other numbers): 2x3 tiles of 64 pixels / 8 latents."""
    torch.manual_seed(0)
    config = official_config("vae", sample_size=64)
    ref = randomize_norms(diffusers.AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")}))
    save_component(tmp_path / "vae", config, "config.json", "diffusion_pytorch_model.safetensors", ref.state_dict())
    ours, ref = load_component(tmp_path, "vae"), ref.eval()
    ref.enable_tiling()
    z, x = latent(1, 10, 14), image(1, 80, 112)
    with torch.no_grad():
        want = ref.decode(z).sample
        check(ours.decode(z, tiled=True), want, "SD 1.5 tiled decode", 1e-4 * want.abs().max().item())
        mean, logvar = ours.encode(x, tiled=True)
        dist = ref.encode(x).latent_dist
    check(mean, dist.mean, "SD 1.5 tiled mean", 1e-4 * dist.mean.abs().max().item())
    check(logvar, dist.logvar, "SD 1.5 tiled logvar", 1e-4 * dist.logvar.abs().max().item())


def test_sample_size_defaults_to_sd15_and_is_checked():
    from models.vae import VAEConfig

    assert VAEConfig().sample_size == 512  # SD 1.5's vae/config.json
    for bad in (100, 16, "512", 512.0):  # not a multiple of 8; a latent tile under 4; not an integer
        with pytest.raises(ValueError, match="sample_size"):
            VAEConfig(sample_size=bad)


def test_generate_with_vae_tiling_matches_diffusers_enable_tiling(tiny_model_dir, monkeypatch):
    """generate(vae_tiling=True) equals the Diffusers pipeline after vae.enable_tiling() (the tiny VAE's 32-pixel
    tiles: 72x40 spans several); a VAE pass that would not fit in free memory is tiled by itself, with a warning."""
    from diffusers import StableDiffusionPipeline

    from conftest import assert_images_close, with_scheduler
    from min_pipeline import generate, load_pipeline

    ours = load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.float32)
    ref = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    with_scheduler(ref, "euler").vae.enable_tiling()
    kwargs = dict(steps=2, height=72, width=40, guidance_scale=1.0, output_type="np", progress=False)
    got = generate(ours, "a fox", vae_tiling=True, **kwargs)
    want = ref("a fox", num_inference_steps=2, height=72, width=40, guidance_scale=1.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert_images_close(got, want, atol=1e-4)
    assert not np.array_equal(got, generate(ours, "a fox", **kwargs))  # tiling really happened
    monkeypatch.setattr("resources.available_bytes", lambda device: 2_200_000)  # fits the UNet, not the VAE
    with pytest.warns(UserWarning, match="decoding in tiles"):
        assert np.array_equal(generate(ours, "a fox", **kwargs), got)
