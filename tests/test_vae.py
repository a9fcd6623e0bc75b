"""The VAE against Diffusers' AutoencoderKL loaded from the same files (fp32, CPU, whole tensors).

Tolerances: the tiny config at atol 1e-5 absolute; the SD 1.5 config at atol 1e-4 * max|reference| (random
weights make the output scale arbitrary, and 512-channel convs sum enough terms for fp32 reordering to show).
"""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import max_diff
from models.loading import load_component
from models.vae import AttnBlock, AutoencoderKL, VAEConfig, sample_latent

diffusers = pytest.importorskip("diffusers")


def check(ours: torch.Tensor, ref: torch.Tensor, atol: float, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    torch.testing.assert_close(ours, ref, atol=atol, rtol=0, msg=lambda m: f"{what}: {max_diff(ours, ref)}\n{m}")


def relative_atol(ref: torch.Tensor, rel: float = 1e-4) -> float:
    return rel * ref.abs().max().item()


def load_pair(folder):
    ours = load_component(folder, "vae")
    ref = diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval()
    return ours, ref


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_pair(tiny_model_dir)


@pytest.fixture(scope="module")
def sd15(sd15_model_dir):
    return load_pair(sd15_model_dir)


def image(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # [-1, 1], like the pipeline


def latent(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(seed))


def standard_normal_like(mean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """eps as Diffusers' `latent_dist.sample(generator)` draws it (and the pipeline's scheduler.draw_noise): shape and
    dtype of the mean, on the generator's device (then moved)."""
    return torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)


def test_attention_is_single_head_softmax_qkt_v():
    """The spec: x + W_o softmax(q k^T / sqrt(C)) v over the H*W positions of the group-normed input."""
    torch.manual_seed(0)
    attn = AttnBlock(16, groups=4).eval()
    x = torch.randn(2, 16, 3, 5)
    t = attn.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
    q, k, v = attn.to_q(t), attn.to_k(t), attn.to_v(t)
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(16), dim=-1)
    expected = x + attn.to_out[0](weights @ v).transpose(1, 2).reshape(x.shape)
    with torch.no_grad():
        check(attn(x), expected, 1e-5, "attention")


def test_downsample_factor_is_pixels_per_latent_side(tiny):
    ours, _ = tiny
    assert ours.downsample_factor == 2  # two levels: one halving
    assert ours.config.scaling_factor == 0.18215  # the key is absent from the file: our default, as in Diffusers
    with torch.device("meta"):
        assert AutoencoderKL(VAEConfig()).downsample_factor == 8


@pytest.mark.parametrize("size", [(1, 8, 8), (2, 6, 10), (1, 7, 5)])
def test_tiny_decode_matches_diffusers(tiny, size):
    ours, ref = tiny
    z = latent(*size)
    with torch.no_grad():
        check(ours.decode(z), ref.decode(z).sample, 1e-5, f"decode {size}")


@pytest.mark.parametrize("size", [(1, 16, 16), (2, 12, 20), (1, 17, 23)])  # odd sizes exercise the asymmetric pad
def test_tiny_encode_and_sample_match_diffusers(tiny, size):
    ours, ref = tiny
    x = image(*size)
    with torch.no_grad():
        mean, logvar = ours.encode(x)
        dist = ref.encode(x).latent_dist
        check(mean, dist.mean, 1e-5, f"mean {size}")
        check(logvar, dist.logvar, 1e-5, f"logvar {size}")
        z = sample_latent(mean, logvar, standard_normal_like(mean, torch.Generator().manual_seed(42)))
        check(z, dist.sample(torch.Generator().manual_seed(42)), 1e-5, f"sample {size}")
        assert torch.equal(dist.mode(), dist.mean)  # the mode is the mean: use `mean` for a deterministic latent


def test_logvar_is_clamped_like_diffusers(tiny):
    """Push the log-variance far out of range (via quant_conv's bias, on copies): both clamp to [-30, 20]."""
    ours, ref = (copy.deepcopy(m) for m in tiny)
    shift = torch.tensor([1e3, -1e3, 1e3, -1e3])  # channels 4..7 of quant_conv's output are the log-variance
    with torch.no_grad():
        for m in (ours, ref):
            m.quant_conv.bias[4:] += shift
        _, logvar = ours.encode(image(1, 16, 16))
        expected = ref.encode(image(1, 16, 16)).latent_dist.logvar
    assert logvar.max() == 20 and logvar.min() == -30
    check(logvar, expected, 0, "clamped logvar")


def test_legacy_attention_names_load(tiny_model_dir, tmp_path):
    """A file with the pre-0.14 names query/key/value/proj_attn (Linear [C, C], as the 2022 hub file had) loads
    with our loader and decodes/encodes exactly like the modern file, and like Diffusers on the legacy file."""
    legacy = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    shutil.copytree(tiny_model_dir / "vae", tmp_path / "vae")
    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    modern = load_file(path)
    state = {}
    for k, v in modern.items():
        for new, old in legacy.items():
            k = k.replace(new, old)
        state[k] = v
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in state and len(state) == len(modern)
    save_file(state, str(path), metadata={"format": "pt"})

    ours, ref = load_pair(tmp_path)
    # Diffusers 0.42 still renames these on load (ModelMixin._fix_state_dict_keys_on_load): check it really took
    # the file's weights rather than keeping its random init.
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(v, modern[k], atol=0, rtol=0, msg=f"Diffusers did not load {k}")
    z, x = latent(1, 8, 6), image(1, 16, 12)
    with torch.no_grad():
        check(ours.decode(z), ref.decode(z).sample, 1e-5, "legacy decode")
        check(ours.encode(x)[0], ref.encode(x).latent_dist.mean, 1e-5, "legacy encode")


@pytest.mark.slow
def test_sd15_decode_matches_diffusers(sd15):
    ours, ref = sd15
    for size in [(1, 32, 32), (1, 16, 24)]:  # 256x256 and a non-square 128x192 image
        z = latent(*size)
        with torch.no_grad():
            expected = ref.decode(z).sample
            check(ours.decode(z), expected, relative_atol(expected), f"SD 1.5 decode {size}")


@pytest.mark.slow
def test_sd15_encode_matches_diffusers(sd15):
    ours, ref = sd15
    x = image(1, 256, 256)  # odd and non-square sizes are covered by the tiny tests
    with torch.no_grad():
        mean, logvar = ours.encode(x)
        dist = ref.encode(x).latent_dist
    check(mean, dist.mean, relative_atol(dist.mean), "SD 1.5 mean")
    check(logvar, dist.logvar, relative_atol(dist.logvar), "SD 1.5 logvar")
    z = sample_latent(mean, logvar, standard_normal_like(mean, torch.Generator().manual_seed(1)))
    expected = dist.sample(torch.Generator().manual_seed(1))
    check(z, expected, relative_atol(expected), "SD 1.5 sample")
