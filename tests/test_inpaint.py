"""Inpainting: generate(init_image=..., mask_image=...) equals Diffusers' StableDiffusionInpaintPipeline on the same
weights, seed and settings, with a 9-channel inpainting UNet (tiny and true SD 1.5 configs) and with an ordinary
4-channel model (Diffusers' per-step blend); the single-file inpainting checkpoint; bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from test_single_file import ldm_state, write

from cli.main import main
from conftest import (
    SD15_CONFIGS,
    TINY_TEXT_ENCODER,
    TINY_UNET,
    TINY_VAE,
    assert_images_close,
    build_model_folder,
    official_config,
    randomize_norms,
    save_component,
    with_scheduler,
)
from min_pipeline import generate, load_pipeline

PROMPT = "a red fox in snow"


def photo(w: int, h: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


def mask(w: int, h: int, box=(5, 3, 23, 17)) -> Image.Image:
    """White = repaint; an RGB mask whose edges fall between latent pixels (odd coordinates)."""
    m = Image.new("RGB", (w, h))
    ImageDraw.Draw(m).rectangle(box, fill="white")
    return m


def reference(folder):
    from diffusers import StableDiffusionInpaintPipeline

    ref = StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.fixture(scope="module")
def inpaint_dir(tmp_path_factory):
    """The tiny family with a 9-channel UNet (latents + mask + masked-image latents), as sd-v1-5-inpainting."""
    return build_model_folder(tmp_path_factory.mktemp("tiny-inpaint"), TINY_TEXT_ENCODER,
                              {**TINY_UNET, "in_channels": 9}, TINY_VAE)  # fmt: skip


@pytest.fixture(scope="module", params=["9-channel", "4-channel"])
def pipes(request, inpaint_dir, tiny_model_dir):
    folder = inpaint_dir if request.param == "9-channel" else tiny_model_dir
    return load_pipeline(str(folder), device="cpu", dtype=torch.float32), reference(folder)


def run_both(ours, ref, image, mask_image, sampler="euler", strength=1.0, steps=6, blur=0, **kwargs):
    got = generate(ours, PROMPT, "blurry", scheduler=sampler, steps=steps, init_image=image, mask_image=mask_image,
                   strength=strength, mask_blur=blur, seed=4, num_images=2, output_type="np", progress=False,
                   **kwargs)  # fmt: skip
    with_scheduler(ref, sampler)
    w, h = (s - s % ours.vae.downsample_factor for s in image.size)  # Diffusers sizes to the UNet's default
    want = ref(PROMPT, negative_prompt="blurry", image=image, height=h, width=w, strength=strength,
               num_inference_steps=steps, num_images_per_prompt=2,
               mask_image=ref.mask_processor.blur(mask_image, blur) if blur else mask_image,
               generator=torch.Generator().manual_seed(4), output_type="np").images  # fmt: skip
    return got, want


@pytest.mark.parametrize("strength", [1.0, 0.75])
@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_inpainting_matches_diffusers(pipes, sampler, strength):
    image = photo(45, 37)  # non-square, cut to 44x36 (the tiny VAE's factor is 2)
    got, want = run_both(*pipes, image, mask(45, 37), sampler, strength)
    assert got.shape == (2, 36, 44, 3)
    assert_images_close(got, want, atol=1e-4)


def test_mask_blur_and_a_mask_of_another_size_match_diffusers(pipes):
    got, want = run_both(*pipes, photo(40, 24), mask(60, 36, box=(9, 4, 41, 27)), "dpmpp_2m", 0.9, blur=3)
    assert_images_close(got, want, atol=1e-4)


def test_keep_pixels_pastes_the_original_outside_the_mask(pipes):
    ours, _ = pipes
    image, m = photo(40, 24), mask(40, 24)
    kwargs = dict(init_image=image, mask_image=m, steps=3, output_type="np", progress=False)
    plain, kept = generate(ours, PROMPT, **kwargs), generate(ours, PROMPT, mask_keep_pixels=True, **kwargs)
    outside = np.asarray(m.convert("L")) < 128
    original = np.asarray(image, dtype=np.float32)[outside] / 255
    np.testing.assert_allclose(kept[0][outside], original, atol=1e-6, rtol=0)  # 2x-1 and back: round-off only
    assert np.array_equal(kept[0][~outside], plain[0][~outside])


@pytest.mark.slow
def test_sd15_inpainting_unet_matches_diffusers(sd15_model_dir, tmp_path):
    """The true SD 1.5 inpainting configs (random weights): a 9-channel UNet beside SD 1.5's text encoder and VAE."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path / "sd15-inpaint"
    shutil.copytree(sd15_model_dir, folder, ignore=shutil.ignore_patterns("diffusion_pytorch_model.safetensors"))
    shutil.copy(sd15_model_dir / "vae" / "diffusion_pytorch_model.safetensors", folder / "vae")
    torch.manual_seed(1)
    cfg = official_config("unet", in_channels=9)
    unet = randomize_norms(UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")}))
    save_component(folder / "unet", cfg, "config.json", "diffusion_pytorch_model.safetensors", unet.state_dict())
    del unet
    assert (SD15_CONFIGS / "unet" / "config.json").is_file()
    ours = load_pipeline(str(folder), device="cpu", dtype=torch.float32)
    got, want = run_both(ours, reference(folder), photo(256, 256), mask(256, 256, box=(37, 61, 181, 201)), steps=2)
    assert float(((want <= 0) | (want >= 1)).mean()) < 0.05  # not saturated, where any error would hide
    assert_images_close(got, want, atol=1e-4)


def test_single_file_inpainting_checkpoint_equals_the_folder(inpaint_dir, tiny_model_dir, tmp_path):
    """sd-v1-5-inpainting.safetensors in the LDM layout: its 9 input channels are told by the conv_in tensor alone,
    so it loads with the base model's configs (here the 4-channel tiny folder's)."""
    path = tmp_path / "inpainting.safetensors"
    write(ldm_state(inpaint_dir), path)
    from_file = load_pipeline(str(path), device="cpu", dtype=torch.float32, config=str(tiny_model_dir))
    assert from_file.unet.config.in_channels == 9
    folder = load_pipeline(str(inpaint_dir), device="cpu", dtype=torch.float32)
    kwargs = dict(init_image=photo(40, 24), mask_image=mask(40, 24), steps=2, output_type="np", progress=False)
    assert np.array_equal(generate(from_file, PROMPT, **kwargs), generate(folder, PROMPT, **kwargs))


def test_cli_inpaints_and_records_the_mask_blur(inpaint_dir, tmp_path):
    from cli.png_info import read_parameters

    photo(40, 24).save(tmp_path / "photo.png")
    mask(40, 24).save(tmp_path / "mask.png")
    args = ["--model", str(inpaint_dir), "--device", "cpu", "--quiet", "--prompt", "x", "--steps", "2"]
    args += [
        "--init-image",
        str(tmp_path / "photo.png"),
        "--mask-image",
        str(tmp_path / "mask.png"),
        "--mask-blur",
        "2",
    ]
    assert main([*args, "--output", str(tmp_path / "out.png")]) == 0
    params = read_parameters(Image.open(tmp_path / "out.png").text["parameters"])
    assert params["Denoising strength"] == "1.0" and params["Mask blur"] == "2"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mask-image", "{tmp}/mask.png"], "a mask needs an init image"),
        (["--init-image", "{tmp}/photo.png", "--mask-image", "{tmp}/nope.png"], "cannot read mask image"),
        (["--init-image", "{tmp}/photo.png"], "this is an inpainting model (9 UNet input channels)"),
    ],
)
def test_bad_inpainting_input_is_one_line(inpaint_dir, tmp_path, capsys, extra, message):
    photo(40, 24).save(tmp_path / "photo.png")
    mask(40, 24).save(tmp_path / "mask.png")
    args = [
        "--model",
        str(inpaint_dir),
        "--device",
        "cpu",
        "--prompt",
        "x",
        "--steps",
        "2",
        "--output",
        str(tmp_path / "o.png"),
    ]
    assert main(args + [a.format(tmp=tmp_path) for a in extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("min_pipeline.py: error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "o.png").exists()


def test_an_all_black_mask_warns_and_returns_the_image(inpaint_dir):
    pipe = load_pipeline(str(inpaint_dir), device="cpu", dtype=torch.float32)
    image = photo(40, 24)
    with pytest.warns(UserWarning, match="the mask is all black: nothing to repaint"):
        got = generate(
            pipe, "x", init_image=image, mask_image=Image.new("L", (40, 24)), output_type="np", progress=False
        )
    np.testing.assert_allclose(got[0], np.asarray(image, dtype=np.float32) / 255, atol=1e-6, rtol=0)
