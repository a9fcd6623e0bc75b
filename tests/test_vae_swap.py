"""A VAE of one's own (load_pipeline(vae=...), --vae) and TAESD (models/taesd.py), against Diffusers given the same
VAE: `StableDiffusionPipeline.from_pretrained(folder, vae=AutoencoderKL/AutoencoderTiny.from_pretrained(...))`. The
second VAE has other random weights than the model's (another seed), so that a VAE silently not swapped shows; the
LDM single file is written here by test_single_file's independent writer, and TAESD's original files
(madebyollin's `taesd_encoder` / `taesd_decoder`, a bare nn.Sequential each) by the layer order of his taesd.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cli.png_info import parameters_text, read_parameters
from conftest import TINY_VAE, assert_images_close, max_diff, official_config, randomize_norms, save_component
from min_pipeline import decode, encode_image, generate, load_pipeline
from models.configs import WeightsError
from models.loading import load_safetensors, load_vae
from models.taesd import TinyAutoencoder, TinyDecoder
from settings import Settings

TINY_TAESD = dict(
    encoder_block_out_channels=[16, 16],
    decoder_block_out_channels=[16, 16],
    num_encoder_blocks=[1, 2],
    num_decoder_blocks=[2, 1],
)  # fmt: skip  2 levels: the tiny model's 2x latents


def save_diffusers(folder, model, config: dict):
    cfg = {"_class_name": type(model).__name__, "_diffusers_version": "0.42.1", **config}
    save_component(folder, cfg, "config.json", "diffusion_pytorch_model.safetensors", model.state_dict())
    return folder


@pytest.fixture(scope="module")
def second_vae(tmp_path_factory):
    """A Diffusers AutoencoderKL folder of the tiny model's shape, other random weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(11)
    config = official_config("vae", **TINY_VAE)
    model = randomize_norms(AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")}))
    return save_diffusers(tmp_path_factory.mktemp("vae") / "my-vae", model, config)


@pytest.fixture(scope="module")
def tiny_taesd(tmp_path_factory):
    from diffusers import AutoencoderTiny

    torch.manual_seed(12)
    return save_diffusers(tmp_path_factory.mktemp("taesd") / "tiny-taesd", AutoencoderTiny(**TINY_TAESD), TINY_TAESD)


@pytest.fixture(scope="module")
def full_taesd(tmp_path_factory):
    """madebyollin/taesd's shape (Diffusers' AutoencoderTiny defaults) with random weights, as a Diffusers folder and
    as his two original files."""
    from diffusers import AutoencoderTiny
    from safetensors.torch import save_file

    torch.manual_seed(13)
    model = AutoencoderTiny()
    folder = save_diffusers(tmp_path_factory.mktemp("taesd") / "taesd", model, {"scaling_factor": 1.0})
    state = model.state_dict()
    # taesd.py's Encoder is Diffusers' encoder.layers in order; its Decoder has a parameter-free Clamp() first
    encoder = {k.removeprefix("encoder.layers."): v for k, v in state.items() if k.startswith("encoder.")}
    decoder = {}
    for k, v in state.items():
        if k.startswith("decoder.layers."):
            index, _, rest = k.removeprefix("decoder.layers.").partition(".")
            decoder[f"{int(index) + 1}.{rest}"] = v
    save_file({k: v.contiguous() for k, v in encoder.items()}, str(folder.parent / "taesd_encoder.safetensors"))
    save_file({k: v.contiguous() for k, v in decoder.items()}, str(folder.parent / "taesd_decoder.safetensors"))
    return folder


def reference_with_vae(model_dir, vae_module):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(model_dir, vae=vae_module, safety_checker=None,
                                                  requires_safety_checker=False)  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    return ref


def images(pipe, **kw):
    return generate(pipe, "a red fox", "blurry", steps=3, height=24, width=16, seed=4, output_type="np",
                    progress=False, **kw)  # fmt: skip


def reference_images(ref, **kw):
    from conftest import with_scheduler

    with_scheduler(ref, "euler")
    return ref("a red fox", negative_prompt="blurry", num_inference_steps=3, height=24, width=16, output_type="np",
               generator=torch.Generator().manual_seed(4), **kw).images  # fmt: skip


def ldm_vae_file(folder, path, prefix: str):
    from test_single_file import rename_all, vae_to_ldm, write

    state = load_safetensors(folder / "diffusion_pytorch_model.safetensors")
    return write({prefix + k: v for k, v in rename_all(state, vae_to_ldm(state)).items()}, path)


@pytest.mark.parametrize("form", ["folder", "ldm-file", "ldm-file-prefixed"])
def test_a_second_vae_gives_diffusers_images_with_that_vae(tiny_model_dir, second_vae, tmp_path, form):
    from diffusers import AutoencoderKL

    vae = second_vae
    if form != "folder":
        prefix = "first_stage_model." if form == "ldm-file-prefixed" else ""
        vae = ldm_vae_file(second_vae, tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors", prefix)
    got = images(load_pipeline(str(tiny_model_dir), device="cpu", vae=str(vae)))
    want = reference_images(reference_with_vae(tiny_model_dir, AutoencoderKL.from_pretrained(second_vae)))
    assert_images_close(got, want, atol=1e-4)
    own = images(load_pipeline(str(tiny_model_dir), device="cpu"))
    assert abs(got - own).max() > 0.05, "the image did not change: the VAE was not swapped"


def test_a_second_vae_encodes_too_img2img(tiny_model_dir, second_vae):
    """Image-to-image goes through the swapped encoder (and its posterior draw), as Diffusers' img2img pipeline."""
    from diffusers import AutoencoderKL, StableDiffusionImg2ImgPipeline

    init = Image.fromarray((np.random.default_rng(0).random((24, 16, 3)) * 255).astype(np.uint8))
    got = images(load_pipeline(str(tiny_model_dir), device="cpu", vae=str(second_vae)), init_image=init)
    ref = StableDiffusionImg2ImgPipeline(
        **reference_with_vae(tiny_model_dir, AutoencoderKL.from_pretrained(second_vae)).components
    )
    ref.set_progress_bar_config(disable=True)
    want = reference_images(ref, image=init, strength=0.8)
    assert_images_close(got, want, atol=1e-4)


# ----------------------------------------------------------------------------- TAESD


def test_taesd_generate_equals_diffusers_with_autoencoder_tiny(tiny_model_dir, tiny_taesd):
    from diffusers import AutoencoderTiny

    pipe = load_pipeline(str(tiny_model_dir), device="cpu", vae=str(tiny_taesd))
    assert isinstance(pipe.vae, TinyAutoencoder) and pipe.vae.downsample_factor == 2
    got = images(pipe)
    want = reference_images(reference_with_vae(tiny_model_dir, AutoencoderTiny.from_pretrained(tiny_taesd)))
    assert_images_close(got, want, atol=1e-4)


def test_taesd_hires_fix_with_an_image_upscaler_encodes_without_a_random_draw(tiny_model_dir, tiny_taesd):
    """The hires fix's lanczos path encodes with TAESD: no posterior, so the generator is not advanced by the
    encoder, as Diffusers' img2img pipeline with AutoencoderTiny (retrieve_latents reads `latents`)."""
    from diffusers import AutoencoderTiny
    from test_hires import reference_hires

    pipe = load_pipeline(str(tiny_model_dir), device="cpu", vae=str(tiny_taesd))
    got = images(pipe, hires_scale=2.0, hires_upscaler="lanczos", hires_steps=2, hires_denoise=0.5)
    ref = reference_with_vae(tiny_model_dir, AutoencoderTiny.from_pretrained(tiny_taesd))
    want = reference_hires(ref, "a red fox", "blurry", steps=3, height=24, width=16, scale=2.0, upscaler="lanczos",
                           hires_steps=2, denoise=0.5, seed=4, scheduler="euler")  # fmt: skip
    assert_images_close(got, want, atol=1e-4)


@pytest.mark.parametrize("form", ["folder", "original-files", "decoder-only"])
def test_full_size_taesd_decodes_and_encodes_as_autoencoder_tiny(full_taesd, tmp_path, form):
    """madebyollin/taesd's shape: decode 4x8x8 latents and encode a 64x64 picture, whole tensors at 1e-4."""
    from diffusers import AutoencoderTiny

    source = full_taesd
    if form == "original-files":
        source = full_taesd.parent / "taesd_decoder.safetensors"
    elif form == "decoder-only":
        (tmp_path / "taesd_decoder.safetensors").symlink_to(full_taesd.parent / "taesd_decoder.safetensors")
        source = tmp_path / "taesd_decoder.safetensors"
    ours = load_vae(source, torch.float32, "cpu")
    ref = AutoencoderTiny.from_pretrained(full_taesd).eval()
    g = torch.Generator().manual_seed(0)
    z, image = torch.randn(2, 4, 8, 8, generator=g) * 2, torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        pairs = [(ours.decode(z), ref.decode(z).sample)]
        if form != "decoder-only":
            pairs.append((ours.encode(image)[0], ref.encode(image).latents))
    for got, want in pairs:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=lambda m, g=got, w=want: f"{m}\n{max_diff(g, w)}")
    if form == "decoder-only":
        assert type(ours) is TinyDecoder
        with pytest.raises(ValueError, match="taesd_encoder"):
            ours.encode(image)


def test_taesd_encoder_file_alone_is_refused(full_taesd, tmp_path):
    (tmp_path / "taesd_encoder.safetensors").symlink_to(full_taesd.parent / "taesd_encoder.safetensors")
    with pytest.raises(WeightsError, match="taesd_decoder"):
        load_vae(tmp_path / "taesd_encoder.safetensors")


def test_a_vae_of_another_latent_width_is_refused(tiny_model_dir, tmp_path):
    from diffusers import AutoencoderTiny

    folder = save_diffusers(tmp_path / "taesd16", AutoencoderTiny(**TINY_TAESD, latent_channels=16),
                            {**TINY_TAESD, "latent_channels": 16})  # fmt: skip
    with pytest.raises(WeightsError, match="latent channels"):
        load_pipeline(str(tiny_model_dir), device="cpu", vae=str(folder))
    with pytest.raises(WeightsError, match="does not exist"):
        load_pipeline(str(tiny_model_dir), device="cpu", vae=str(tmp_path / "missing.safetensors"))


def test_decode_and_encode_seams_take_taesd(tiny_model_dir, tiny_taesd):
    pipe = load_pipeline(str(tiny_model_dir), device="cpu", vae=str(tiny_taesd))
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    with torch.inference_mode():
        z = encode_image(pipe, torch.zeros(1, 3, 8, 8), g)
        assert torch.equal(g.get_state(), state)  # no posterior draw
        assert decode(pipe, z).shape == (1, 8, 8, 3)


def test_png_records_the_vae_by_name(tmp_path):
    s = Settings().ready(False, False)
    file = tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors"
    file.write_bytes(b"")
    repo = "stabilityai/sd-vae-ft-mse"
    for vae, name in [(str(file), "vae-ft-mse-840000-ema-pruned"), (repo, repo), (str(tmp_path), tmp_path.name)]:
        text = parameters_text(s, "a fox", "", (512, 512), "sd15", vae=vae)
        assert "Model: sd15, VAE: " in text and read_parameters(text)["VAE"] == name
        assert str(tmp_path) not in text  # never a path
    assert "VAE" not in parameters_text(s, "a fox", "", (512, 512), "sd15")


# ----------------------------------------------------------------------------- the command line, previews


def cli_args(model_dir, out, *extra):
    return ["--model", str(model_dir), "--device", "cpu", "--dtype", "float32", "--steps", "3", "--seed", "4",
            "--height", "24", "--width", "16", "--quiet", "--prompt", "a red fox", "--negative-prompt", "blurry",
            "--output", str(out), *extra]  # fmt: skip


def test_cli_vae_is_used_and_recorded_by_name(tiny_model_dir, second_vae, tmp_path):
    from cli.main import main

    file = ldm_vae_file(second_vae, tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors", "")
    out = tmp_path / "fox.png"
    assert main(cli_args(tiny_model_dir, out, "--vae", str(file))) == 0
    image = Image.open(out)
    assert read_parameters(image.text["parameters"])["VAE"] == "vae-ft-mse-840000-ema-pruned"
    [want] = generate(load_pipeline(str(tiny_model_dir), device="cpu", vae=str(file)), "a red fox", "blurry",
                      steps=3, height=24, width=16, seed=4, progress=False)  # fmt: skip
    assert np.array_equal(np.asarray(image), np.asarray(want))
    assert main(cli_args(tiny_model_dir, out, "--vae", str(tmp_path / "nope.safetensors"))) == 2


def test_taesd_preview_equals_autoencoder_tiny_decode(tiny_model_dir, tiny_taesd):
    from diffusers import AutoencoderTiny

    from cli.trajectory import preview

    pipe = load_pipeline(str(tiny_model_dir), device="cpu")
    z = torch.randn(1, 4, 12, 8, generator=torch.Generator().manual_seed(3)) * 2
    with torch.inference_mode():
        got = preview(pipe, z, "taesd", load_vae(tiny_taesd, torch.float32, "cpu"))
    ref = AutoencoderTiny.from_pretrained(tiny_taesd).eval()
    from diffusers.image_processor import VaeImageProcessor

    with torch.no_grad():
        [want] = VaeImageProcessor(vae_scale_factor=2).postprocess(ref.decode(z).sample, "pil")
    assert got.size == want.size == (16, 24)
    assert np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max() <= 1  # 8-bit rounding at most


def test_cli_trajectory_and_previews_through_taesd(tiny_model_dir, tiny_taesd, tmp_path):
    from cli.main import main

    out, trajectory = tmp_path / "fox.png", tmp_path / "run.png"
    watch = ["--trajectory", str(trajectory), "--trajectory-decoder", "taesd", "--preview-vae", str(tiny_taesd),
             "--preview-every", "1", "--keep-preview"]  # fmt: skip
    assert main(cli_args(tiny_model_dir, out, *watch)) == 0
    assert Image.open(tmp_path / "fox.preview.png").size == (16, 24)  # TAESD's picture: the image's size
    assert Image.open(trajectory).size[0] >= 16
    assert (
        main(
            cli_args(
                tiny_model_dir,
                tmp_path / "b.png",
                "--trajectory",
                str(tmp_path / "t.gif"),
                "--trajectory-decoder",
                "taesd",
            )
        )
        == 2
    )  # fmt: skip  no --preview-vae
