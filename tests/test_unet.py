"""The UNet, diffed against Diffusers' UNet2DConditionModel loaded from the same safetensors files.

Both sides run fp32 on the CPU. Tolerances: tiny configs atol 1e-5; the true SD 1.5 config (random weights)
atol 1e-4 * max|reference|, i.e. agreement to four digits of the output scale, room for another summation order
over 860 M parameters. Measured (torch 2.15, this CPU): every case, bf16 included, agrees bit for bit.
"""

from __future__ import annotations

import math
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import SD15_CONFIGS, TINY_UNET, max_diff, official_config, randomize_norms, save_component
from models.loading import WeightsError, load_component, load_safetensors, read_config
from models.unet import Attention, UNet, UNetConfig

pytest.importorskip("diffusers")  # the reference (test-only dependency)


def reference_unet(folder, dtype=torch.float32):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype).eval()


def assert_same(ours: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol, msg=lambda m: f"{m}\n{max_diff(ours, ref)}")


def run_both(ours, ref, batch: int, h: int, w: int, timestep, context_dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, h, w, generator=g)
    context = torch.randn(batch, 77, context_dim, generator=g)
    with torch.inference_mode():
        eps = ours(latents, timestep, context)
        eps_ref = ref(latents, timestep, encoder_hidden_states=context).sample
    assert eps.shape == (batch, 4, h, w)
    return eps, eps_ref


# ----------------------------------------------------------------------------- tiny config


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_component(tiny_model_dir, "unet"), reference_unet(tiny_model_dir)


# The tiny UNet has 2 downsamplers, so sizes that are not multiples of 4 exercise the odd-size up-sampling path.
TINY_CASES = {
    "1x16x16-int": (1, 16, 16, 999),
    "2x8x12-float": (2, 8, 12, 978.6),  # Euler with linspace spacing feeds fractional timesteps
    "1x9x9-0dim": (1, 9, 9, torch.tensor(500)),
    "2x10x6-per-sample": (2, 10, 6, torch.tensor([20.39, 981.0])),
    "2x17x17-0dim-float": (2, 17, 17, torch.tensor(0.0)),
}


@pytest.mark.parametrize("case", TINY_CASES.values(), ids=TINY_CASES.keys())
def test_tiny_unet_matches_diffusers(tiny, case):
    batch, h, w, timestep = case
    eps, eps_ref = run_both(*tiny, batch, h, w, timestep, context_dim=32)
    assert_same(eps, eps_ref, atol=1e-5)


VARIANTS = {  # config values SD 1.5 does not use but the config (and our code) allows
    "downsample_padding=0": dict(downsample_padding=0),
    "sin_cos+freq_shift=1": dict(flip_sin_to_cos=False, freq_shift=1),
    "layers_per_block=1": dict(layers_per_block=1),
}


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_tiny_unet_variants_match_diffusers(tmp_path, overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = official_config("unet", **TINY_UNET, **overrides)
    model = randomize_norms(UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")}))
    save_component(tmp_path / "unet", config, "config.json", "diffusion_pytorch_model.safetensors", model.state_dict())
    eps, eps_ref = run_both(
        load_component(tmp_path, "unet"), model.eval(), 2, 9, 10, torch.tensor(978.6), context_dim=32
    )
    assert_same(eps, eps_ref, atol=1e-5)


def test_tiny_unet_in_bfloat16_matches_diffusers_in_bfloat16(tiny_model_dir):
    """Half precision: the sinusoid is made in float32 and cast to the model dtype, as Diffusers does."""
    ours, ref = (
        load_component(tiny_model_dir, "unet", dtype=torch.bfloat16),
        reference_unet(tiny_model_dir, torch.bfloat16),
    )
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=g).bfloat16()
    context = torch.randn(2, 77, 32, generator=g).bfloat16()
    with torch.inference_mode():
        eps = ours(latents, torch.tensor(978.6), context)
        eps_ref = ref(latents, torch.tensor(978.6), encoder_hidden_states=context).sample
    assert eps.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa; a 2% tolerance of the output scale separates rounding from a real mismatch.
    assert_same(eps.float(), eps_ref.float(), atol=2e-2 * eps_ref.float().abs().max().item())


def test_forward_is_one_graph_that_does_not_recompile_per_timestep(tiny):
    """No host syncs, no Python branching on tensor values: torch.compile(fullgraph=True) captures the whole forward
    once (odd latent size included) and reuses it for every timestep tensor, as a sampling loop needs."""
    from torch._dynamo.testing import CompileCounter

    ours, _ = tiny
    counter = CompileCounter()  # a backend that counts captured graphs and runs them eagerly
    compiled = torch.compile(ours, fullgraph=True, backend=counter)
    latents, context = torch.randn(2, 4, 9, 9), torch.randn(2, 77, 32)
    with torch.inference_mode():
        for t in (torch.tensor(999.0), torch.tensor(978.6), torch.tensor(20.39)):
            assert_same(compiled(latents, t, context), ours(latents, t, context), atol=0.0)
    assert counter.frame_count == 1


# ----------------------------------------------------------------------------- true SD 1.5 config


@pytest.fixture(scope="module")
def sd15(sd15_model_dir):
    return load_component(sd15_model_dir, "unet"), reference_unet(sd15_model_dir)


SD15_CASES = {
    "2x32x32-per-sample": (2, 32, 32, torch.tensor([999.0, 1.0])),
    "1x17x17-float": (1, 17, 17, 978.61),  # 136x136 pixels: not a multiple of 8
}


@pytest.mark.slow
@pytest.mark.parametrize("case", SD15_CASES.values(), ids=SD15_CASES.keys())
def test_sd15_unet_matches_diffusers(sd15, case):
    batch, h, w, timestep = case
    eps, eps_ref = run_both(*sd15, batch, h, w, timestep, context_dim=768)
    assert_same(eps, eps_ref, atol=1e-4 * eps_ref.abs().max().item())


def test_config_defaults_are_the_official_sd15_config():
    assert read_config(UNetConfig, SD15_CONFIGS / "unet" / "config.json") == UNetConfig()


# ----------------------------------------------------------------------------- attention spec


def attention_spec(attn: Attention, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(hd)) V per head (Vaswani et al. 2017, arXiv:1706.03762, eq. 1), written out."""
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    b, n, d = q.shape
    hd = d // attn.heads
    q, k, v = (t.reshape(b, -1, attn.heads, hd).transpose(1, 2) for t in (q, k, v))  # (B, L, D) -> (B, nh, L, hd)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)  # (B, nh, L, L_context)
    out = (weights @ v).transpose(1, 2).reshape(b, n, d)  # (B, nh, L, hd) -> (B, L, D)
    return attn.to_out[0](out)


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_sdpa_attention_is_softmax_qk_v(kind):
    """SD 1.5's first level: D 320 in 8 heads of 40; cross-attention over 77 text tokens of width 768."""
    torch.manual_seed(0)
    attn = Attention(320, heads=8, context_dim=None if kind == "self" else 768).eval()
    x = torch.randn(2, 64, 320)
    context = x if kind == "self" else torch.randn(2, 77, 768)
    with torch.no_grad():
        out = attn(x) if kind == "self" else attn(x, context)
        assert_same(out, attention_spec(attn, x, context), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- loading


def test_loading_runs_no_random_init(tiny_model_dir, monkeypatch):
    """Modules are built on the meta device (their init is a no-op there) and the file's tensors are assigned."""

    def only_on_meta(init):
        def guarded(tensor, *args, **kwargs):
            assert tensor.is_meta, f"torch.nn.init.{init.__name__} ran on a real {tuple(tensor.shape)} tensor"
            return init(tensor, *args, **kwargs)

        return guarded

    for name in dir(torch.nn.init):
        if name.endswith("_") and not name.startswith("_"):
            monkeypatch.setattr(torch.nn.init, name, only_on_meta(getattr(torch.nn.init, name)))
    with pytest.raises(AssertionError, match="ran on a real"):  # the guard works: a plain build initialises
        UNet(read_config(UNetConfig, tiny_model_dir / "unet" / "config.json"))

    model = load_component(tiny_model_dir, "unet")
    file = load_safetensors(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    state = model.state_dict()
    assert state.keys() == file.keys()
    for k, v in state.items():
        assert not v.is_meta and v.dtype == torch.float32 and torch.equal(v, file[k]), k


KEY = "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0.weight"


@pytest.mark.parametrize("problem", ["missing", "unexpected", "wrong shape"])
def test_bad_weights_file_is_a_weights_error_naming_the_key(tiny_model_dir, tmp_path, problem):
    state = dict(load_safetensors(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    key = KEY
    if problem == "missing":
        del state[KEY]
    elif problem == "unexpected":
        key = KEY.replace("attn2", "attn3")
        state[key] = state[KEY].clone()
    else:
        state[KEY] = state[KEY][:, :-1]
    (tmp_path / "unet").mkdir()
    shutil.copy(tiny_model_dir / "unet" / "config.json", tmp_path / "unet")
    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=re.escape(key)):
        load_component(tmp_path, "unet")
