"""ControlNet: models/controlnet.py and generate(controlnet=...) equal Diffusers' ControlNetModel and its
StableDiffusionControlNet(Img2Img|Inpaint)Pipeline on the same random weights (every weight randomised, the zero
convolutions and the control image encoder too, or the control would show in nothing); the A1111 single file equals
the folder; the Canny preprocessor equals OpenCV's; bad input is one line and exit code 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import assert_images_close, max_diff, randomize_norms, with_scheduler
from min_pipeline import generate, load_controlnet, load_pipeline

PROMPTS = ["a red fox in snow", "a house by a lake"]
SIZE = dict(height=40, width=24)  # the tiny VAE halves the size: a 20x12 latent
HINT_WIDTHS = (8, 16)  # the tiny control image encoder: one stride-2 level, the tiny VAE's factor 2


def random_controlnet(unet, seed: int, widths=HINT_WIDTHS, **config):
    """Diffusers' ControlNetModel.from_unet, then every conv and linear layer re-initialised and every norm
    randomised under `seed`: the copied encoder no longer equals the UNet, the zero convs are not zero. The control
    image encoder's convs are scaled up 4x: at PyTorch's default init its output is too small to move the tiny
    model's images (another control image then changes them by about 0.01, test_the_control_image_changes_the_image)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths, **config)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
            m.reset_parameters()
    with torch.no_grad():
        for m in net.controlnet_cond_embedding.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(4.0)
    return randomize_norms(net).eval()


def control_picture(w: int, h: int, seed: int = 0) -> Image.Image:
    """Shapes on a gradient with noise: edges, flat parts and texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = (x * 255 / max(w - 1, 1))[..., None] * np.array([1.0, 0.5, 0.2]) + rng.normal(0, 12, (h, w, 3))
    image = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((w // 5, h // 6, 3 * w // 4, h // 2), fill=(240, 240, 240))
    draw.rectangle((w // 8, 3 * h // 5, w // 2, 9 * h // 10), fill=(20, 30, 200))
    return image


def close(got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=lambda m: f"{m}\n{max_diff(got, want)}")


@pytest.fixture(scope="module")
def nets(tiny_model_dir, tmp_path_factory):
    """Two random ControlNets for the tiny model, saved like lllyasviel/control_v11p_sd15_* (config.json +
    diffusion_pytorch_model.safetensors); returns (Diffusers models, folders)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    refs, folders = [], []
    for seed in (1, 2):
        net = random_controlnet(unet, seed)
        folder = tmp_path_factory.mktemp(f"controlnet{seed}")
        net.save_pretrained(folder, safe_serialization=True)
        refs.append(net)
        folders.append(folder)
    return refs, folders


@pytest.fixture(scope="module")
def ours(tiny_model_dir, nets):
    pipe = load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.float32)
    return pipe, [load_controlnet(str(f), "cpu", "float32") for f in nets[1]]


def reference(tiny_model_dir, controlnet, kind: str = "txt2img"):
    import diffusers

    base = diffusers.StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None,
                                                             requires_safety_checker=False)  # fmt: skip
    cls = {"txt2img": diffusers.StableDiffusionControlNetPipeline,
           "img2img": diffusers.StableDiffusionControlNetImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionControlNetInpaintPipeline}[kind]  # fmt: skip
    ref = cls(**base.components, controlnet=controlnet)
    ref.set_progress_bar_config(disable=True)
    return ref


# ----------------------------------------------------------------------------- the network


def test_controlnet_residuals_and_unet_match_diffusers(tiny_model_dir, nets, ours):
    """The residuals (12 skips' worth for the tiny config, and the mid block's), plain and in guess mode, and the UNet
    that takes them."""
    torch.manual_seed(0)
    x, context = torch.randn(2, 4, 20, 12), torch.randn(2, 77, 32)
    hint = torch.rand(2, 3, 40, 24)
    pipe, [net, _] = ours
    ref = nets[0][0]
    for guess, scale in ((False, 1.0), (False, 0.6), (True, 0.8)):
        with torch.no_grad():
            want_down, want_mid = ref(x, torch.tensor(601.0), context, hint, conditioning_scale=scale,
                                      guess_mode=guess, return_dict=False)  # fmt: skip
            got_down, got_mid = net(x, torch.tensor(601.0), context, hint, scale, guess)
        assert len(got_down) == len(want_down)
        for got, want in zip([*got_down, got_mid], [*want_down, want_mid], strict=True):
            close(got, want, atol=1e-5)
    from diffusers import UNet2DConditionModel

    ref_unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    with torch.no_grad():
        got = pipe.unet(x, torch.tensor(601.0), context, got_down, got_mid)
        want = ref_unet(x, torch.tensor(601.0), context, down_block_additional_residuals=want_down,
                        mid_block_additional_residual=want_mid).sample  # fmt: skip
        plain = pipe.unet(x, torch.tensor(601.0), context)
    close(got, want, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2, f"the residuals changed nothing: {max_diff(got, plain)}"


# ----------------------------------------------------------------------------- generate() vs Diffusers' pipelines


def run_both(tiny_model_dir, ours, refs, k: list[int], kind="txt2img", sampler="euler", steps=4, guidance=7.5,
             scale=1.0, start=0.0, end=1.0, guess=False, strength=None, hints=None):  # fmt: skip
    """generate() and Diffusers' ControlNet pipeline of `kind` with the ControlNets `k` (one: passed alone, as a
    ControlNetModel; several: a list, Diffusers' MultiControlNetModel), on 2 prompts x 2 images."""
    pipe, mine = ours
    one = len(k) == 1
    hints = hints or [control_picture(30, 50, seed=j) for j in k]  # another size: both resize it to 24x40
    init, mask = control_picture(24, 40, seed=7), Image.new("L", (24, 40))
    ImageDraw.Draw(mask).rectangle((5, 3, 17, 25), fill=255)
    images = dict(init_image=init if kind != "txt2img" else None, mask_image=mask if kind == "inpaint" else None)
    got = generate(pipe, PROMPTS, "blurry", scheduler=sampler, steps=steps, guidance_scale=guidance, seed=5,
                   num_images=2, output_type="np", progress=False, **SIZE, **images, strength=strength,
                   controlnet=mine[k[0]] if one else [mine[j] for j in k], control_image=hints[0] if one else hints,
                   control_scale=scale, control_start=start, control_end=end, guess_mode=guess)  # fmt: skip
    ref = with_scheduler(reference(tiny_model_dir, refs[k[0]] if one else [refs[j] for j in k], kind), sampler)
    control = dict(image=hints[0] if one else hints) if kind == "txt2img" else dict(control_image=hints[0] if one
                                                                                    else hints, image=init)  # fmt: skip
    control |= dict(mask_image=mask) if kind == "inpaint" else {}
    control |= dict(strength=strength) if strength is not None else {}
    want = ref(PROMPTS, negative_prompt=["blurry"] * 2, **control, **SIZE, num_inference_steps=steps,
               guidance_scale=guidance, num_images_per_prompt=2, generator=torch.Generator().manual_seed(5),
               controlnet_conditioning_scale=scale, control_guidance_start=start, control_guidance_end=end,
               guess_mode=guess, output_type="np").images  # fmt: skip
    return got, want


@pytest.mark.parametrize(
    "sampler, scale, start, end",
    [("euler", 1.0, 0.0, 1.0), ("heun", 0.7, 0.2, 0.8), ("dpmpp_2m", 1.3, 0.0, 0.6), ("euler_a", 0.5, 0.5, 1.0)],
)
def test_one_controlnet_matches_diffusers(tiny_model_dir, nets, ours, sampler, scale, start, end):
    """Scale, start and end (Heun: counted in UNet calls, as Diffusers' controlnet_keep indexes its timesteps)."""
    got, want = run_both(tiny_model_dir, ours, nets[0], [0], sampler=sampler, scale=scale, start=start, end=end)
    assert_images_close(got, want, atol=1e-4)


def test_two_controlnets_match_diffusers(tiny_model_dir, nets, ours):
    got, want = run_both(tiny_model_dir, ours, nets[0], [0, 1], sampler="heun", scale=[0.8, 1.2], start=[0.0, 0.3],
                         end=[0.7, 1.0])  # fmt: skip
    assert_images_close(got, want, atol=1e-4)


@pytest.mark.parametrize("k", [[0], [1, 0]])
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_guess_mode_matches_diffusers(tiny_model_dir, nets, ours, k, guidance):
    """Guess mode: the ControlNets see the conditional half of CFG only, residuals weighted 0.1 ... 1."""
    got, want = run_both(tiny_model_dir, ours, nets[0], k, guidance=guidance, guess=True, scale=0.9 if len(k) == 1
                         else [0.9, 1.1])  # fmt: skip
    assert_images_close(got, want, atol=1e-4)


def test_without_cfg_matches_diffusers(tiny_model_dir, nets, ours):
    got, want = run_both(tiny_model_dir, ours, nets[0], [1], guidance=1.0, sampler="ddim")
    assert_images_close(got, want, atol=1e-4)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_img2img_matches_diffusers(tiny_model_dir, nets, ours, sampler):
    hints = [control_picture(24, 40, seed=3)]  # Diffusers' img2img takes the control image at its own size
    got, want = run_both(tiny_model_dir, ours, nets[0], [0], "img2img", sampler, steps=5, strength=0.6, end=0.8,
                         hints=hints)  # fmt: skip
    assert_images_close(got, want, atol=1e-4)


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_matches_diffusers(tiny_model_dir, nets, ours, strength):
    hints = [control_picture(24, 40, seed=j) for j in (3, 4)]
    got, want = run_both(tiny_model_dir, ours, nets[0], [0, 1], "inpaint", steps=5, strength=strength, hints=hints)
    assert_images_close(got, want, atol=1e-4)


def test_the_control_image_changes_the_image(ours):
    pipe, [net, _] = ours
    kw = dict(steps=4, seed=1, output_type="np", progress=False, **SIZE)
    plain = generate(pipe, PROMPTS[0], **kw)
    a, b = (generate(pipe, PROMPTS[0], controlnet=net, control_image=control_picture(24, 40, s), **kw) for s in (0, 5))
    assert np.abs(a - plain).max() > 0.05, f"the ControlNet changed the image by {np.abs(a - plain).max()} only"
    assert np.abs(a - b).max() > 5e-3, f"another control image changed the image by {np.abs(a - b).max()} only"
    zero = generate(pipe, PROMPTS[0], controlnet=net, control_image=control_picture(24, 40, 0), control_scale=0.0, **kw)
    np.testing.assert_array_equal(zero, plain)  # scale 0: nothing added, as a ControlNet outside [start, end]
