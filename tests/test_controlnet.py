"""ControlNet: models/controlnet.py and generate(controlnet=...) equal Diffusers' ControlNetModel and its
StableDiffusionControlNet(Img2Img|Inpaint)Pipeline on the same random weights (every weight randomised, the zero
convolutions and the control image encoder too, or the control would show in nothing); the A1111 single file equals
the folder; the Canny preprocessor equals OpenCV's; bad input is one line and exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from test_single_file import count, rename_all, unet_to_ldm

from cli.main import main
from cli.png_info import read_parameters
from conftest import assert_images_close, max_diff, randomize_norms, with_scheduler
from images import canny
from min_pipeline import generate, load_controlnet, load_pipeline
from models.loading import WeightsError
from models.loading import load_controlnet as load_controlnet_file
from settings import UserError

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


def test_bfloat16_controlnet_close_to_diffusers_bfloat16(nets):
    """A ControlNet loaded in bf16 on the CPU runs as load_pipeline's UNet does (channels_last; where oneDNN runs bf16,
    every convolution and linear layer packed: resources.prepack_for_onednn); its residuals against Diffusers'
    ControlNet in bf16: within 2% of each residual's largest magnitude, as the UNet call in tests/test_dtype.py
    (measured on an AMX Xeon: at most 1.1%)."""
    import copy

    import resources

    net = load_controlnet(str(nets[1][0]), "cpu", "bfloat16")
    if resources.onednn_runs_bfloat16():
        kinds = [type(m.__dict__.get("forward")) for m in net.modules()]
        assert kinds.count(resources.PackedConv) == sum(isinstance(m, torch.nn.Conv2d) for m in net.modules())
        assert resources.PackedGEGLU in kinds
    ref = copy.deepcopy(nets[0][0]).to(torch.bfloat16)
    torch.manual_seed(0)
    x, context = torch.randn(2, 4, 20, 12).bfloat16(), torch.randn(2, 77, 32).bfloat16()
    hint = torch.rand(2, 3, 40, 24).bfloat16()
    with torch.inference_mode():
        want_down, want_mid = ref(x, torch.tensor(601.0), context, hint, return_dict=False)
        got_down, got_mid = net(x, torch.tensor(601.0), context, hint, 1.0, False)
    for got, want in zip([*got_down, got_mid], [*want_down, want_mid], strict=True):
        close(got.float(), want.float(), atol=0.02 * want.float().abs().max().item())


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


def test_with_a_lora_matches_diffusers(tiny_model_dir, nets, tmp_path):
    """A LoRA merged into the UNet and text encoder (not the ControlNet, as Diffusers' and A1111's LoRAs)."""
    import diffusers
    from test_lora import fused_reference, kohya, layers, random_lora, write

    from models.lora import apply_lora

    pipe = load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.float32)
    file = write(tmp_path / "x.safetensors", kohya(random_lora(pipe, layers(pipe), seed=5, varied=False)))
    apply_lora(pipe.unet, pipe.text_encoder, file, 0.9)
    hint = control_picture(24, 40, seed=2)
    got = generate(pipe, PROMPTS[0], "blurry", steps=3, seed=7, **SIZE, output_type="np", progress=False,
                   controlnet=load_controlnet(str(nets[1][0]), "cpu", "float32"), control_image=hint)  # fmt: skip
    base = fused_reference(tiny_model_dir, [file], [0.9])
    ref = diffusers.StableDiffusionControlNetPipeline(**base.components, controlnet=nets[0][0])
    ref.set_progress_bar_config(disable=True)
    ref = with_scheduler(ref, "euler")
    want = ref(PROMPTS[0], negative_prompt="blurry", image=hint, **SIZE, num_inference_steps=3,
               generator=torch.Generator().manual_seed(7), output_type="np").images  # fmt: skip
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


def test_the_fast_path_leaves_controlnets_to_the_eager_loop(tiny_model_dir, ours):
    """speed_up()'s graph-ready loop does not run ControlNets: with one, generate() takes the eager loop."""
    from fast_path import speed_up

    _, [net, _] = ours
    pipe = speed_up(load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.float32), compile=False,
                    cuda_graph=True)  # fmt: skip
    kw = dict(steps=3, seed=1, output_type="np", progress=False, controlnet=net, control_image=control_picture(24, 40))
    fast = generate(pipe, PROMPTS[0], **kw, **SIZE)
    assert not pipe.fast_loop.graphs, "the graph loop ran"
    pipe.fast_loop = None
    np.testing.assert_array_equal(fast, generate(pipe, PROMPTS[0], **kw, **SIZE))


def test_prompt_editing_gives_the_controlnet_each_steps_context(ours, monkeypatch):
    """A1111's prompt editing switches the UNet's context at a step: the ControlNet gets the same context as the UNet
    at every call."""
    pipe, [net, _] = ours
    seen = []
    unet_forward, net_steer = type(pipe.unet).forward, type(net).steer  # steer: the loop's ControlNet call
    monkeypatch.setattr(type(pipe.unet), "forward", lambda self, x, t, c, *r: seen.append(("unet", c)) or
                        unet_forward(self, x, t, c, *r))  # fmt: skip
    monkeypatch.setattr(type(net), "steer", lambda self, x, t, c, *a: seen.append(("net", c)) or
                        net_steer(self, x, t, c, *a))  # fmt: skip
    generate(pipe, "a [fox:house:2] in snow", controlnet=net, control_image=control_picture(24, 40), steps=4, **SIZE,
             output_type="latent", progress=False)  # fmt: skip
    pairs = list(zip(seen[::2], seen[1::2], strict=True))
    assert [(a[0], b[0]) for a, b in pairs] == [("net", "unet")] * 4
    assert all(torch.equal(a[1], b[1]) for a, b in pairs)
    assert not torch.equal(pairs[0][0][1], pairs[-1][0][1]), "the prompt did not change"


# ----------------------------------------------------------------------------- A1111's single files


def ldm_controlnet_state(state: dict) -> dict:
    """A Diffusers ControlNet state dict in the LDM names of ControlNet's cldm.py (A1111's files): the UNet's encoder
    as openaimodel numbers it (test_single_file's writer), `input_hint_block` a Sequential whose convs sit at the even
    indices (SiLU between), `zero_convs.i.0` per skip, `middle_block_out.0`."""
    table = unet_to_ldm(state)
    blocks = count(state, "controlnet_cond_embedding.blocks")
    table |= {"controlnet_cond_embedding.conv_in": ("input_hint_block.0", {}),
              "controlnet_cond_embedding.conv_out": (f"input_hint_block.{2 * blocks + 2}", {}),
              "controlnet_mid_block": ("middle_block_out.0", {})}  # fmt: skip
    table |= {f"controlnet_cond_embedding.blocks.{k}": (f"input_hint_block.{2 * k + 2}", {}) for k in range(blocks)}
    table |= {f"controlnet_down_blocks.{i}": (f"zero_convs.{i}.0", {}) for i in range(count(state,
              "controlnet_down_blocks"))}  # fmt: skip
    out = rename_all(state, table)
    assert len(out) == len(state)
    return out


def write_single_file(folder, path, prefix: str = "control_model."):
    state = ldm_controlnet_state(load_file(folder / "diffusion_pytorch_model.safetensors"))
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize("prefix", ["control_model.", ""])
def test_a1111_single_file_equals_the_folder(nets, tmp_path, prefix):
    folder = nets[1][0]
    path = write_single_file(folder, tmp_path / "control_tiny.safetensors", prefix)
    got, want = load_controlnet_file(path, config=folder).state_dict(), load_controlnet_file(folder).state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_single_files_for_other_bases_are_named(nets, tmp_path):
    state = load_file(write_single_file(nets[1][0], tmp_path / "a.safetensors"))
    key = next(k for k in state if k.endswith("attn2.to_k.weight"))
    for width, base in ((1024, "Stable Diffusion 2"), (2048, "Stable Diffusion XL")):
        save_file({**state, key: torch.zeros(state[key].shape[0], width)}, str(tmp_path / "b.safetensors"))
        with pytest.raises(WeightsError, match=f"ControlNet for {base}"):
            load_controlnet_file(tmp_path / "b.safetensors", config=nets[1][0])
    save_file({**state, "control_model.label_emb.0.0.weight": torch.zeros(3)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(WeightsError, match="unexpected key label_emb"):
        load_controlnet_file(tmp_path / "c.safetensors", config=nets[1][0])


@pytest.mark.slow
def test_sd15_controlnet_single_file_matches_diffusers(sd15_model_dir, tmp_path):
    """The true SD 1.5 sizes: a ControlNet made by ControlNetModel.from_unet on the full-size UNet, written as an A1111
    single file and loaded with the built-in SD 1.5 ControlNet config; 256x256, 2 steps, CFG."""
    import diffusers

    unet = diffusers.UNet2DConditionModel.from_pretrained(sd15_model_dir / "unet")
    ref_net = random_controlnet(unet, 3, widths=(16, 32, 96, 256))
    del unet
    folder = tmp_path / "control_sd15"
    ref_net.save_pretrained(folder)
    path = write_single_file(folder, tmp_path / "control_v11p_sd15_test.safetensors")
    # The writer's check: Diffusers reads the file as the folder too (its converter places the hint encoder's conv_out
    # at input_hint_block.14, SD 1.5's index, so this holds at the true sizes only).
    ref_state = ref_net.state_dict()
    read = diffusers.ControlNetModel.from_single_file(str(path), config=str(folder), local_files_only=True)
    assert all(torch.equal(v, ref_state[k]) for k, v in read.state_dict().items())
    del read
    pipe = load_pipeline(str(sd15_model_dir), device="cpu", dtype=torch.float32)
    hint = control_picture(256, 256)
    net = load_controlnet(str(path), "cpu", "float32")
    got = generate(pipe, PROMPTS[0], "blurry", steps=2, height=256, width=256, seed=2, output_type="np",
                   progress=False, controlnet=net, control_image=hint)  # fmt: skip
    ref = with_scheduler(reference(sd15_model_dir, ref_net), "euler")
    want = ref(PROMPTS[0], negative_prompt="blurry", image=hint, height=256, width=256, num_inference_steps=2,
               generator=torch.Generator().manual_seed(2), output_type="np").images  # fmt: skip
    assert float(((want <= 0) | (want >= 1)).mean()) < 0.05  # not a saturated image, where any error would hide
    assert_images_close(got, want, atol=1e-4)


# ----------------------------------------------------------------------------- the command line


def cli(tiny_model_dir, tmp_path, *args: str) -> list[str]:
    return ["--prompt", "a fox", "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32", "--steps",
            "2", "--height", "40", "--width", "24", "--seed", "3", "--output", str(tmp_path / "out.png"), "--quiet",
            *args]  # fmt: skip


def test_cli_runs_two_controlnets_and_records_them(tiny_model_dir, nets, ours, tmp_path):
    """The CLI's image equals generate()'s with the same ControlNets, its Canny map and options; the PNG records each
    ControlNet as A1111's extension does."""
    photo = tmp_path / "photo.png"
    control_picture(30, 50, seed=4).save(photo)
    a, b = (str(f) for f in nets[1])
    assert main(cli(tiny_model_dir, tmp_path, "--controlnet", a, "--control-image", str(photo), "--control-scale",
                    "0.8", "--control-end", "0.5", "--controlnet", b, "--control-image", str(photo),
                    "--control-preprocess", "canny", "--canny-low", "40", "--canny-high", "120")) == 0  # fmt: skip
    image = Image.open(tmp_path / "out.png")
    record = read_parameters(image.text["parameters"])
    assert record["ControlNet 0"] == ("Module: none, Model: controlnet10, Weight: 0.8, Resize Mode: Just Resize, Low "
                                      "Vram: False, Guidance Start: 0, Guidance End: 0.5, Pixel Perfect: False, "
                                      "Control Mode: Balanced")  # fmt: skip
    canny_unit = "Module: canny, Model: controlnet20, Weight: 1, Resize Mode: Just Resize, Low Vram: False, "
    assert record["ControlNet 1"].startswith(canny_unit + "Processor Res: 24, Threshold A: 40, Threshold B: 120")
    pipe, mine = ours
    edges = Image.fromarray(canny(np.asarray(Image.open(photo).resize((24, 40), Image.LANCZOS)), 40, 120))
    want = generate(pipe, "a fox", steps=2, seed=3, **SIZE, controlnet=mine, control_image=[Image.open(photo), edges],
                    control_scale=[0.8, 1.0], control_end=[0.5, 1.0], progress=False)[0]  # fmt: skip
    np.testing.assert_array_equal(np.asarray(image), np.asarray(want))


BAD = [
    (["--control-image", "{photo}"], "--control-image applies to the --controlnet before it"),
    (["--controlnet", "{net}"], "needs a --control-image after it"),
    (["--controlnet", "{net}", "--control-image", "{tmp}/missing.png"], "cannot read control image"),
    (["--controlnet", "{net}", "--control-image", "{tmp}/bad.png"], "cannot read control image"),
    (
        ["--controlnet", "{net}", "--control-image", "{photo}", "--control-start", "0.6", "--control-end", "0.4"],
        "must satisfy 0 <= start < end <= 1",
    ),
    (["--controlnet", "{net}", "--control-image", "{photo}", "--control-scale", "nan"], "must be finite"),
    (["--controlnet", "{net}", "--control-image", "{photo}", "--control-preprocess", "depth"], "is not one of"),
    (["--controlnet", "{net}", "--control-scale", "0.5", "--control-scale", "2"], "given twice"),
    (["--controlnet", "{tmp}/nothing", "--control-image", "{photo}"], "does not exist"),
    (["--guess-mode"], "--guess-mode needs a --controlnet"),
    (["--controlnet", "{sd2}", "--control-image", "{photo}"], "looks like Stable Diffusion 2.x"),
    (["--controlnet", "{sdxl}", "--control-image", "{photo}"], "looks like Stable Diffusion XL"),
    (["--controlnet", "{other}", "--control-image", "{photo}"], "ControlNet 0 does not fit this model"),
]


@pytest.fixture(scope="module")
def other_nets(tiny_model_dir, nets, tmp_path_factory):
    """ControlNet folders that do not fit the tiny model: SD 2.x's and SDXL's configs (refused when read), and one
    whose control image encoder downsamples 4x where the tiny VAE does 2x (refused by generate())."""
    from diffusers import UNet2DConditionModel

    root, net = tmp_path_factory.mktemp("other-controlnets"), nets[1][0]
    for name, edit in (("sd2", {"cross_attention_dim": 1024}), ("sdxl", {"addition_embed_type": "text_time"})):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(json.loads((net / "config.json").read_text()) | edit))
        weights = "diffusion_pytorch_model.safetensors"
        (root / name / weights).symlink_to(net / weights)
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    random_controlnet(unet, 4, widths=(8, 16, 32)).save_pretrained(root / "other")
    return root


@pytest.mark.parametrize("args, message", BAD)
def test_bad_controlnet_input_is_one_line_and_exit_2(tiny_model_dir, nets, other_nets, tmp_path, capsys, args,
                                                     message):  # fmt: skip
    """One line on stderr, exit code 2, no output file, before the UNet runs."""
    photo = tmp_path / "photo.png"
    control_picture(24, 40).save(photo)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    names = dict(photo=photo, net=nets[1][0], tmp=tmp_path, **{k: other_nets / k for k in ("sd2", "sdxl", "other")})
    try:
        code = main(cli(tiny_model_dir, tmp_path, *[a.format(**names) for a in args]))
    except SystemExit as e:  # argparse's errors (cli.main.ArgumentParser: one line too)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not (tmp_path / "out.png").exists()


def test_generate_refuses_bad_controlnet_arguments(nets, ours):
    folders, (pipe, nets) = nets[1], ours
    hint = control_picture(24, 40)
    cases = [(dict(controlnet=nets, control_image=hint), "need one control image each, got 1"),
             (dict(controlnet=nets, control_image=[hint, hint], control_scale=[1.0]), "control_scale has 1 values"),
             (dict(controlnet=nets[0], control_image=hint, control_end=[0.5, 1.0]), "control_end has 2 values"),
             (dict(controlnet=nets[0], control_image=hint, control_start=0.5, control_end=0.5), "0 <= start < end"),
             (dict(control_image=hint), "need a ControlNet"),
             (dict(controlnet=nets[0], control_image="/nonexistent.png"), "cannot read control image")]  # fmt: skip
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            generate(pipe, "a fox", steps=2, **SIZE, progress=False, **kwargs)
    with pytest.raises(UserError, match="load_controlnet"):
        half = load_controlnet(str(folders[0]), "cpu", "bfloat16")
        generate(pipe, "a fox", steps=2, **SIZE, controlnet=half, control_image=hint)


# ----------------------------------------------------------------------------- Canny


def canny_images() -> list[np.ndarray]:
    """The test pictures (RGB and grey), uniform noise, and smooth waves with noise in grey and in three channels."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:192, 0:256]
    waves = (128 + 100 * np.sin(x / 13.0) * np.cos(y / 17.0) + rng.normal(0, 8, x.shape)).clip(0, 255).astype(np.uint8)
    return [np.asarray(control_picture(24, 40)), np.asarray(control_picture(300, 200, 3)),
            np.asarray(control_picture(300, 200, 3).convert("L")), rng.integers(0, 256, (96, 128, 3), dtype=np.uint8),
            waves, np.stack([waves, waves[:, ::-1], np.roll(waves, 7, axis=0)], axis=-1)]  # fmt: skip


@pytest.mark.parametrize("low, high", [(100, 200), (50, 150), (20.5, 80.7), (200, 100)])
def test_canny_equals_opencv(low, high):
    """At least 99.9% of pixels equal to cv2.Canny(image, low, high) (aperture 3, L1), on RGB images as A1111's canny
    module calls it and on grey ones (measured: all pixels equal)."""
    cv2 = pytest.importorskip("cv2")
    for image in canny_images():
        got, want = canny(image, low, high), cv2.Canny(image, low, high)
        assert got.dtype == want.dtype == np.uint8 and got.shape == want.shape
        assert (got == want).mean() >= 0.999, f"{image.shape}: {(got != want).sum()} of {got.size} pixels differ"
        assert 0 < (want > 0).mean() < 0.5 or low > 100  # edges found, not everything
