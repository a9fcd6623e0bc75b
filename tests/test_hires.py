"""The hires fix (min_pipeline.hires_fix, hires.py) against Diffusers composed the same way by hand: the
StableDiffusionPipeline's latents (output_type="latent"), upscaled (F.interpolate, or decoded, resized with PIL and
given as a picture), then StableDiffusionImg2ImgPipeline (which takes 4-channel latents as `image=`) with the
strength that runs exactly the hires steps, one torch.Generator carried through both calls. A1111's arithmetic
(setup_img2img_steps, hr_upscale_to) is written out here once more, and its PNG fields read back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import hires
from cli.png_info import parameters_text, read_parameters
from conftest import assert_images_close, with_scheduler
from min_pipeline import generate, load_controlnet, load_pipeline
from models.lora import apply_lora
from settings import Settings, UserError


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.float32), reference(tiny_model_dir)


def reference(folder):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


def reference_hires(ref, prompt, negative_prompt="", *, steps, height, width, scale, upscaler, hires_steps, denoise,
                    seed, scheduler, guidance=7.5, embeds=None, swap_at=None, tiling=False, control=None,
                    controlled_second_pass=True):  # fmt: skip
    """Diffusers, both passes by hand. `embeds` = (prompt, negative, prompt after the switch) replaces the text, the
    prompt switched after step `swap_at` of each pass by callback_on_step_end (prompt editing). `control` = dict(
    controlnet=..., image=..., and the ControlNet pipelines' keyword arguments): both passes by
    StableDiffusionControlNet(Img2Img)Pipeline, each preparing the control image at its own size (height, width given)
    (`controlled_second_pass=False`: the second pass without them, to show that they act there)."""
    from diffusers import (
        StableDiffusionControlNetImg2ImgPipeline,
        StableDiffusionControlNetPipeline,
        StableDiffusionImg2ImgPipeline,
    )

    with_scheduler(ref, scheduler)
    ref.vae.enable_tiling() if tiling else ref.vae.disable_tiling()
    generator = torch.Generator().manual_seed(seed)
    text = dict(prompt=prompt, negative_prompt=negative_prompt)
    extra = {}
    if embeds is not None:
        cond, uncond, after = embeds
        text = dict(prompt_embeds=cond, negative_prompt_embeds=uncond)

        def swap(pipe, i, t, kwargs):
            return {"prompt_embeds": torch.cat([uncond, after])} if i == swap_at else {}

        extra = dict(callback_on_step_end=swap, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    common = dict(guidance_scale=guidance, generator=generator, **text, **extra)
    first, controlled = ref, {}
    if control is not None:
        net, hint = control["controlnet"], control["image"]
        controlled = {k: v for k, v in control.items() if k not in ("controlnet", "image")}
        first = StableDiffusionControlNetPipeline(**ref.components, controlnet=net)
        first.set_progress_bar_config(disable=True)
    hint1 = dict(image=hint) if control is not None else {}
    latents = first(**common, **hint1, **controlled, num_inference_steps=steps, height=height, width=width,
                    output_type="latent").images  # fmt: skip
    f = ref.vae_scale_factor
    big = (int(height * scale) // f * f, int(width * scale) // f * f)  # A1111: int(size * scale), whole latents
    if upscaler == "latent":
        image = F.interpolate(latents, size=(big[0] // f, big[1] // f), mode="bilinear", antialias=False)
    else:  # decoded to 8-bit pictures as the pipeline's PIL output, resized with PIL
        with torch.no_grad():
            pixels = ref.vae.decode(latents / ref.vae.config.scaling_factor).sample
        filters = {"lanczos": Image.LANCZOS, "nearest": Image.NEAREST}
        image = [p.resize(big[::-1], filters[upscaler]) for p in ref.image_processor.postprocess(pixels, "pil")]
    run = hires_steps or steps  # A1111's setup_img2img_steps(p, steps): total steps, of which the last `run` run
    total = int(run / min(denoise, 0.999))
    strength = run / total
    assert int(total * strength) == run  # Diffusers' img2img then skips total - run steps
    img2img, hint2 = StableDiffusionImg2ImgPipeline(**ref.components), {}
    if control is not None and controlled_second_pass:  # takes the 4-channel latents as `image=` too (prepare_latents)
        img2img = StableDiffusionControlNetImg2ImgPipeline(**ref.components, controlnet=net)
        hint2 = dict(control_image=hint, height=big[0], width=big[1], **controlled)  # resized to the second pass's size
    img2img.set_progress_bar_config(disable=True)
    return img2img(**common, **hint2, image=image, strength=strength, num_inference_steps=total,
                   output_type="np").images  # fmt: skip


CASES = {  # upscaler, scheduler, hires steps, denoise: one latent and one image upscaler, two step settings
    "latent-euler-same-steps": ("latent", "euler", 0, 0.7),
    "lanczos-euler_a-3-steps": ("lanczos", "euler_a", 3, 0.5),  # ancestral: both passes draw from the generator
    "latent-dpmpp-3-steps": ("latent", "dpmpp_2m", 3, 0.6),
    "nearest-ddim-same-steps": ("nearest", "ddim", 0, 0.75),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hires_fix_equals_diffusers_txt2img_upscale_img2img(tiny, case):
    ours, ref = tiny
    upscaler, scheduler, hires_steps, denoise = CASES[case]
    settings = dict(steps=4, height=24, width=16, seed=3, scheduler=scheduler)
    hr = dict(hires_scale=2.0, hires_upscaler=upscaler, hires_steps=hires_steps, hires_denoise=denoise)
    got = generate(ours, "a red fox", "blurry", output_type="np", progress=False, **settings, **hr)
    want = reference_hires(ref, "a red fox", "blurry", steps=4, height=24, width=16, scale=2.0, upscaler=upscaler,
                           hires_steps=hires_steps, denoise=denoise, seed=3, scheduler=scheduler)  # fmt: skip
    assert got.shape == (1, 48, 32, 3)
    assert_images_close(got, want, atol=1e-4)
    plain = generate(
        ours, "a red fox", "blurry", output_type="np", progress=False, **(settings | dict(height=48, width=32))
    )
    assert abs(got - plain).max() > 0.05  # not the plain generation at the larger size


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_hires_fix_with_vae_tiling_equals_diffusers_enable_tiling(tiny, upscaler):
    """The tiny VAE's tiles are 32 pixels: the first pass (24x16) decodes whole, the second (48x32) in tiles, as
    Diffusers' enable_tiling() does at each size."""
    ours, ref = tiny
    got = generate(ours, "a red fox", steps=3, height=24, width=16, seed=6, hires_scale=2.0, hires_upscaler=upscaler,
                   vae_tiling=True, output_type="np", progress=False)  # fmt: skip
    want = reference_hires(ref, "a red fox", steps=3, height=24, width=16, scale=2.0, upscaler=upscaler, hires_steps=0,
                           denoise=0.7, seed=6, scheduler="euler", tiling=True)  # fmt: skip
    ref.vae.disable_tiling()
    assert_images_close(got, want, atol=1e-4)
    untiled = generate(ours, "a red fox", steps=3, height=24, width=16, seed=6, hires_scale=2.0,
                       hires_upscaler=upscaler, output_type="np", progress=False)  # fmt: skip
    assert abs(got - untiled).max() > 1e-3  # the tiles did happen


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix_batch_and_a1111_upscaler_name(tiny, upscaler):
    """Two images of one prompt through both passes as one batch (the image upscaler's encoder draws once for the
    batch, as Diffusers' img2img); A1111's name of the upscaler is accepted."""
    from diffusers import StableDiffusionImg2ImgPipeline

    ours, ref = tiny
    got = generate(ours, "a red fox", steps=3, height=16, width=16, seed=5, num_images=2, hires_scale=1.5,
                   hires_upscaler=upscaler, output_type="np", progress=False)  # fmt: skip
    with_scheduler(ref, "euler")
    g = torch.Generator().manual_seed(5)
    latents = ref("a red fox", num_inference_steps=3, height=16, width=16, num_images_per_prompt=2, generator=g,
                  output_type="latent").images  # fmt: skip
    if upscaler == "Latent":
        image = F.interpolate(latents, size=(12, 12), mode="bilinear", antialias=False)  # int(16 * 1.5) / 2
    else:
        with torch.no_grad():
            pixels = ref.vae.decode(latents / ref.vae.config.scaling_factor).sample
        image = [p.resize((24, 24), Image.LANCZOS) for p in ref.image_processor.postprocess(pixels, "pil")]
    img2img = StableDiffusionImg2ImgPipeline(**ref.components)
    img2img.set_progress_bar_config(disable=True)
    # int(3 / 0.7) = 4 steps, of which the last 3 run
    want = img2img(["a red fox"] * 2, image=image, strength=3 / 4, num_inference_steps=4, generator=g,
                   output_type="np").images  # fmt: skip
    assert_images_close(got, want, atol=1e-4)


def test_prompt_editing_switches_at_the_second_passs_own_steps(tiny):
    """[a red fox:an owl:1]: the fox for steps 0-1, the owl from step 2, in the first pass (4 steps) and again in the
    second (3 steps, counted from 0 as A1111 does), where Diffusers' callback swaps prompt_embeds after its step 1."""
    from test_prompts import reference_conditioning

    ours, ref = tiny
    got = generate(ours, "[a red fox:an owl:1]", steps=4, height=24, width=16, seed=2, hires_scale=2.0,
                   hires_steps=3, hires_denoise=0.5, output_type="np", progress=False)  # fmt: skip
    embeds = [reference_conditioning(ref, t) for t in ("a red fox", "", "an owl")]
    want = reference_hires(ref, None, None, steps=4, height=24, width=16, scale=2.0, upscaler="latent", hires_steps=3,
                           denoise=0.5, seed=2, scheduler="euler", embeds=embeds, swap_at=1)  # fmt: skip
    assert_images_close(got, want, atol=1e-4)


def test_hires_fix_with_a_lora_on_both_sides(tiny_model_dir, tmp_path):
    from test_lora import fused_reference, kohya, layers, random_lora, write

    pipe = load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.float32)
    file = write(tmp_path / "x.safetensors", kohya(random_lora(pipe, layers(pipe), seed=5, varied=False)))
    apply_lora(pipe.unet, pipe.text_encoder, file, 0.9)
    ref = fused_reference(tiny_model_dir, [file], [0.9])
    ref.set_progress_bar_config(disable=True)
    got = generate(pipe, "a red fox", steps=3, height=16, width=24, seed=4, hires_scale=2.0, hires_upscaler="lanczos",
                   output_type="np", progress=False)  # fmt: skip
    want = reference_hires(ref, "a red fox", steps=3, height=16, width=24, scale=2.0, upscaler="lanczos",
                           hires_steps=0, denoise=0.7, seed=4, scheduler="euler")  # fmt: skip
    assert_images_close(got, want, atol=1e-4)


@pytest.fixture(scope="module")
def controlnets(tiny_model_dir, tmp_path_factory):
    """Two random ControlNets for the tiny model (test_controlnet.random_controlnet), as Diffusers models, ours, and
    their folders."""
    from diffusers import UNet2DConditionModel
    from test_controlnet import random_controlnet

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    refs, folders = [random_controlnet(unet, seed) for seed in (1, 2)], []
    for k, net in enumerate(refs):
        folders.append(tmp_path_factory.mktemp(f"hires_controlnet{k}"))
        net.save_pretrained(folders[-1], safe_serialization=True)
    return refs, [load_controlnet(str(f), "cpu", "float32") for f in folders], folders


CONTROL_CASES = {  # upscaler, scheduler, hires steps, denoise, ControlNets, scale, start, end, guess mode
    "latent-euler-one": ("latent", "euler", 3, 0.6, [0], 0.8, 0.0, 0.7, False),
    "lanczos-euler_a-one": ("lanczos", "euler_a", 0, 0.7, [0], 1.2, 0.3, 1.0, False),
    "latent-heun-two-guess": ("latent", "heun", 2, 0.5, [1, 0], [0.9, 1.1], [0.0, 0.2], [0.8, 1.0], True),
}


@pytest.mark.parametrize("case", list(CONTROL_CASES))
def test_hires_fix_with_controlnets_equals_diffusers_controlnet_pipelines(tiny, controlnets, case):
    """ControlNets in both passes, as A1111's ControlNet extension: the control image (another size and shape)
    prepared at each pass's size, the same scales, guess mode and start/end counted over each pass's UNet calls
    (Heun: 2 per step but the last). Diffusers: StableDiffusionControlNetPipeline's latents, upscaled, then
    StableDiffusionControlNetImg2ImgPipeline with height/width of the second pass."""
    from test_controlnet import control_picture

    (ours, ref), (refs, mine, _) = tiny, controlnets
    upscaler, scheduler, hires_steps, denoise, k, scale, start, end, guess = CONTROL_CASES[case]
    hints = [control_picture(20, 36, seed=j) for j in k]
    one = len(k) == 1
    net, hint = (refs[k[0]], hints[0]) if one else ([refs[j] for j in k], hints)
    got = generate(ours, "a red fox", "blurry", steps=4, height=24, width=16, seed=3, scheduler=scheduler,
                   hires_scale=2.0, hires_upscaler=upscaler, hires_steps=hires_steps, hires_denoise=denoise,
                   controlnet=mine[k[0]] if one else [mine[j] for j in k], control_image=hint, control_scale=scale,
                   control_start=start, control_end=end, guess_mode=guess, output_type="np",
                   progress=False)  # fmt: skip
    control = dict(controlnet=net, image=hint, controlnet_conditioning_scale=scale, control_guidance_start=start,
                   control_guidance_end=end, guess_mode=guess)  # fmt: skip
    args = dict(steps=4, height=24, width=16, scale=2.0, upscaler=upscaler, hires_steps=hires_steps, denoise=denoise,
                seed=3, scheduler=scheduler, control=control)  # fmt: skip
    want = reference_hires(ref, "a red fox", "blurry", **args)
    assert got.shape == (1, 48, 32, 3)
    assert_images_close(got, want, atol=1e-4)
    if case == "latent-euler-one":  # the ControlNet does act in the second pass
        uncontrolled = reference_hires(ref, "a red fox", "blurry", **args, controlled_second_pass=False)
        assert abs(got - uncontrolled).max() > 1e-2, abs(got - uncontrolled).max()


def test_cli_hires_fix_with_a_controlnet_records_both(tiny_model_dir, controlnets, tmp_path):
    from test_controlnet import control_picture

    from cli.main import main

    photo, out = tmp_path / "photo.png", tmp_path / "fox.png"
    control_picture(20, 36, seed=4).save(photo)
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32", "--steps", "2", "--seed", "1",
            "--height", "24", "--width", "16", "--quiet", "--prompt", "a fox", "--output", str(out), "--hires-scale",
            "2", "--hires-steps", "2", "--controlnet", str(controlnets[2][0]), "--control-image", str(photo),
            "--control-end", "0.5"]  # fmt: skip
    assert main(args) == 0
    image = Image.open(out)
    params = read_parameters(image.text["parameters"])
    assert image.size == (32, 48) and params["Size"] == "16x24"
    assert [params[k] for k in ("Hires upscale", "Hires steps", "Hires upscaler")] == ["2", "2", "Latent"]
    assert params["ControlNet 0"].startswith("Module: none, Model: hires_controlnet0")
    assert "Guidance End: 0.5" in params["ControlNet 0"]


# ----------------------------------------------------------------------------- A1111's arithmetic, names and PNG


@pytest.mark.parametrize(
    ("steps", "hires_steps", "denoise", "total", "run"),
    [(30, 0, 0.7, 42, 30), (20, 10, 0.7, 14, 10), (20, 10, 1.0, 10, 10), (20, 7, 0.33, 21, 7), (5, 0, 0.999, 5, 5)],
)
def test_second_pass_steps_are_a1111s_setup_img2img_steps(steps, hires_steps, denoise, total, run):
    assert hires.img2img_steps(steps, hires_steps, denoise) == (total, run)


def test_target_size_is_a1111s_rounded_down_to_whole_latents():
    assert hires.target_size(512, 768, 2.0, 8) == (1024, 1536)
    assert hires.target_size(512, 512, 1.7, 8) == (864, 864)  # int(870.4) = 870 -> 108 latents
    assert hires.target_size(504, 512, 1.25, 8) == (624, 640)


def test_image_upscaler_resizes_as_a1111():
    """A1111's Upscaler.upscale: the filter's own resize to int(w * scale), then Lanczos to the multiple of 8 below
    it, then resize_image's Lanczos to the target."""
    image = Image.fromarray((torch.rand(40, 56, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    got = hires.resize_as_a1111(image, (int(56 * 1.3), int(40 * 1.3)), "nearest")
    want = image.resize((72, 52), Image.NEAREST).resize((72, 48), Image.LANCZOS).resize((72, 52), Image.LANCZOS)
    assert got.size == (72, 52) and got.tobytes() == want.tobytes()


def test_a1111_upscaler_names_are_accepted_and_bad_settings_refused():
    assert Settings(hires_scale=2, hires_upscaler="Latent (bicubic antialiased)").ready(False, False).hires_upscaler \
        == "latent-bicubic-antialiased"  # fmt: skip
    assert Settings(hires_scale=2, hires_upscaler="lanczos").ready(False, False).hires_upscaler == "lanczos"
    bad = [
        dict(hires_scale=2, hires_upscaler="ESRGAN_4x"),
        dict(hires_scale=0.5),
        dict(hires_scale=float("nan")),
        dict(hires_scale=2, hires_denoise=0),
        dict(hires_scale=2, hires_denoise=1.5),
        dict(hires_scale=2, hires_steps=-1),
        dict(hires_scale=2, steps=500, hires_denoise=0.1),  # a 5000-step schedule
        dict(hires_scale=8, height=1024),  # 8192 pixels
        dict(hires_scale=1.01, height=64, width=64),  # int(64.64) = 64: nothing to upscale
    ]
    for settings in bad:
        with pytest.raises(UserError):
            Settings(**settings).ready(False, False)
    with pytest.raises(UserError, match="init-image"):
        Settings(hires_scale=2).ready(True, False)


def test_png_records_the_hires_fields_as_a1111():
    s = Settings(steps=20, hires_scale=2.0, hires_steps=10, hires_denoise=0.7, seed=1).ready(False, False)
    text = parameters_text(s, "a fox", "", (1024, 1024), "sd15")
    assert "Size: 512x512," in text  # A1111 records the first pass's size
    assert text.endswith("Denoising strength: 0.7, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent")
    fields = read_parameters(text)
    assert (fields["Hires upscale"], fields["Hires upscaler"], fields["Denoising strength"]) == ("2", "Latent", "0.7")
    s = Settings(hires_scale=1.5, hires_upscaler="latent-bicubic-antialiased").ready(False, False)
    text = parameters_text(s, "a fox", "", (768, 768), "sd15")
    assert "Hires steps" not in text
    assert text.endswith("Hires upscale: 1.5, Hires upscaler: Latent (bicubic antialiased)")
    assert "Hires" not in parameters_text(Settings().ready(False, False), "a fox", "", (512, 512), "sd15")


def test_cli_hires_fix_writes_the_larger_image_and_a1111s_fields(tiny_model_dir, tmp_path):
    from cli.main import main

    out = tmp_path / "fox.png"
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32", "--steps", "3", "--seed", "1",
            "--height", "16", "--width", "24", "--quiet", "--prompt", "a fox", "--output", str(out)]  # fmt: skip
    hr = ["--hires-scale", "2", "--hires-upscaler", "Latent (bicubic)", "--hires-steps", "2", "--hires-denoise", "0.6"]
    assert main([*args, *hr]) == 0
    image = Image.open(out)
    params = read_parameters(image.text["parameters"])
    assert image.size == (48, 32) and params["Size"] == "24x16"
    assert [params[k] for k in ("Hires upscale", "Hires steps", "Hires upscaler", "Denoising strength")] == [
        "2", "2", "Latent (bicubic)", "0.6"]  # fmt: skip
    pipe = load_pipeline(str(tiny_model_dir), device="cpu")
    [want] = generate(pipe, "a fox", steps=3, seed=1, height=16, width=24, hires_scale=2, hires_steps=2,
                      hires_denoise=0.6, hires_upscaler="latent-bicubic", progress=False)  # fmt: skip
    assert np.array_equal(np.asarray(image), np.asarray(want))
    assert main([*args, "--hires-scale", "2", "--hires-upscaler", "4x-UltraSharp"]) == 2  # refused before loading


def test_sd15_hires_fix_equals_diffusers(sd15_model_dir):
    """The true SD 1.5 sizes (random weights): 128x128 -> 256x256 through the VAE (lanczos: decode, resize, encode),
    2 + 1 steps; 1e-4 on [0, 1] pixels as the other full-size parity tests."""
    ours = load_pipeline(str(sd15_model_dir), device="cpu", dtype=torch.float32)
    got = generate(ours, "a red fox", steps=2, height=128, width=128, seed=1, hires_scale=2.0, hires_upscaler="lanczos",
                   hires_steps=1, hires_denoise=0.5, output_type="np", progress=False)  # fmt: skip
    del ours
    want = reference_hires(reference(sd15_model_dir), "a red fox", steps=2, height=128, width=128, scale=2.0,
                           upscaler="lanczos", hires_steps=1, denoise=0.5, seed=1, scheduler="euler")  # fmt: skip
    assert_images_close(got, want, atol=1e-4)
