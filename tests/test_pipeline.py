"""End to end: generate() equals Diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline on the same
saved folders, seed and settings (fp32, CPU, output_type="np"). `run_both` (conftest) calls both with one set of
settings, so each test states only its case."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DIFFUSERS_SCHEDULERS, assert_images_close, run_both, with_scheduler
from min_pipeline import decode, generate, load_pipeline

PROMPTS = ["a red fox in snow", "an astronaut riding a horse, 8k"]


def reference_pipeline(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def clip_skip_embeds(ref, prompts: list[str], clip_skip: int) -> torch.Tensor:
    """Reference embeddings with clip skip: hidden_states[-(k + 1)] then the final LayerNorm (Diffusers' rule,
    computed directly because Diffusers 0.42's clip_skip path does not run with Transformers 5)."""
    ids = ref.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = ref.text_encoder(ids, output_hidden_states=True)
        return ref.text_encoder.final_layer_norm(out.hidden_states[-(clip_skip + 1)])


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.float32), reference_pipeline(tiny_model_dir)


# Non-square; the tiny VAE down-samples by 2, so 40x24 pixels is a 20x12 latent (not a multiple of 8).
SIZE = dict(height=40, width=24, steps=5)


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
@pytest.mark.parametrize("guidance", [1.0, 7.5])
@pytest.mark.parametrize("sampler", list(DIFFUSERS_SCHEDULERS))
def test_txt2img_matches_diffusers(tiny, sampler, guidance, negative):
    got, want = run_both(*tiny, PROMPTS, negative, scheduler=sampler, guidance_scale=guidance, seed=3, num_images=2,
                         **SIZE)  # fmt: skip
    assert_images_close(got, want, atol=1e-4)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_txt2img_karras_matches_diffusers(tiny, sampler):
    got, want = run_both(*tiny, PROMPTS[0], scheduler=sampler, karras=True, seed=1, **SIZE)
    assert_images_close(got, want, atol=1e-4)


def test_ddim_eta_matches_diffusers(tiny):
    got, want = run_both(*tiny, PROMPTS[0], scheduler="ddim", eta=0.7, seed=5, **SIZE)
    assert_images_close(got, want, atol=1e-4)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_matches_diffusers(tiny, clip_skip):
    """Clip skip on the prompt AND the negative prompt (A1111's behaviour; Diffusers' pipeline applies it to the
    positive prompt only, so the reference gets explicit embeddings computed with clip skip on both)."""
    ref = tiny[1]
    embeds = clip_skip_embeds(ref, PROMPTS, clip_skip), clip_skip_embeds(ref, ["ugly"] * 2, clip_skip)
    got, want = run_both(*tiny, PROMPTS, "ugly", reference_embeds=embeds, seed=2, clip_skip=clip_skip, **SIZE)
    assert_images_close(got, want, atol=1e-4)


def test_pil_output_is_rounded_like_diffusers(tiny):
    ours, ref = tiny
    with_scheduler(ref, "euler")
    got = generate(ours, PROMPTS[0], steps=2, height=40, width=24, progress=False)
    want = ref(
        PROMPTS[0], num_inference_steps=2, height=40, width=24, generator=torch.Generator().manual_seed(0)
    ).images
    assert len(got) == 1 and got[0].size == (24, 40) and got[0].mode == "RGB"
    diff = np.abs(np.asarray(got[0], dtype=int) - np.asarray(want[0], dtype=int))
    assert diff.max() <= 1, f"max abs pixel diff {diff.max()}"  # 1e-4 in [0, 1] may flip a rounding


def init_image(w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("strength", [0.5, 0.75])
@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_img2img_matches_diffusers(tiny, sampler, strength):
    image = init_image(45, 37)  # odd sizes: cut down to 44x36, a multiple of the tiny VAE's factor 2
    got, want = run_both(*tiny, PROMPTS[0], "blurry", init_image=image, scheduler=sampler, steps=8, strength=strength,
                         seed=4, num_images=2)  # fmt: skip
    assert got.shape == (2, 36, 44, 3)
    assert_images_close(got, want, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_sd15_txt2img_matches_diffusers(sd15_model_dir, sampler):
    """The true SD 1.5 configs (random weights): 256x256, 4 steps, CFG 7.5. atol 1e-4 on [0, 1] pixels, as for the
    tiny model (measured: bit-identical on an x86 CPU, since both run the same kernels in the same order)."""
    ours = load_pipeline(str(sd15_model_dir), device="cpu", dtype=torch.float32)
    got, want = run_both(ours, reference_pipeline(sd15_model_dir), PROMPTS[0], "blurry", scheduler=sampler, steps=4,
                         height=256, width=256)  # fmt: skip
    assert float(((want <= 0) | (want >= 1)).mean()) < 0.05  # not a saturated image, where any error would hide
    assert_images_close(got, want, atol=1e-4)


def test_half_precision_vae_overflow_is_redone_in_float32(tiny_model_dir):
    """fp16 VAE decodes can overflow to inf (black images). The driver detects that, says so, and decodes again in
    float32: the result equals a float32 decode of the same latents."""
    pipe = load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.float16)
    with torch.no_grad():
        # Activations beyond fp16's 65504 that the next GroupNorm would bring back to scale in float32.
        pipe.vae.post_quant_conv.weight.mul_(1e4)
    latents = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(0)).half()
    with torch.no_grad():
        assert not torch.isfinite(pipe.vae.decode(latents / pipe.vae.config.scaling_factor)).all()
        with pytest.warns(UserWarning, match="decoding again in float32"):
            got = decode(pipe, latents).numpy()
    assert pipe.vae_dtype == pipe.vae.post_quant_conv.weight.dtype == torch.float32
    with torch.no_grad():
        want = pipe.vae.decode(latents.float() / pipe.vae.config.scaling_factor)
    want = (want / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.isfinite(got).all()
    assert_images_close(got, want, atol=1e-6)
    # The float32 VAE stays, and later calls (txt2img and img2img) feed it float32 inputs.
    images = generate(pipe, "x", steps=1, height=40, width=24, output_type="np", progress=False)
    images2 = generate(pipe, "x", steps=2, init_image=Image.new("RGB", (24, 40)), output_type="np", progress=False)
    assert np.isfinite(images).all() and np.isfinite(images2).all()


def test_bfloat16_runs_close_to_float32(tiny, tiny_model_dir):
    """bfloat16 (fast on CPUs with AVX-512 BF16) keeps ~3 significant digits: a loose check that nothing is
    silently computed in the wrong dtype or skipped."""
    ours, _ = tiny
    pipe = load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.bfloat16)
    assert pipe.unet.conv_in.weight.dtype == torch.bfloat16
    kwargs = dict(seed=3, output_type="np", progress=False, **SIZE)
    got, want = generate(pipe, PROMPTS[0], **kwargs), generate(ours, PROMPTS[0], **kwargs)
    assert got.dtype == np.float32
    assert_images_close(got, want, atol=0.1)


@pytest.mark.parametrize("capability, warns", [("AVX2", True), ("AVX512", False)])
def test_bfloat16_on_a_cpu_without_avx512_warns(tiny_model_dir, monkeypatch, recwarn, capability, warns):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.bfloat16)
    messages = [str(w.message) for w in recwarn]
    assert any("bfloat16 on a CPU without AVX-512 is very slow" in m for m in messages) == warns, messages
