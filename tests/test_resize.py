"""An init image at a given --height/--width (issue 24 item 4), resized as A1111's img2img resize modes do: each mode
against a reference built here from A1111's description with plain PIL/numpy operations (size and pixels), the mask
resized the same way, and the issue's CLI case: a 512x512 init image with --height 64 --width 64 runs at 64x64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cli.main import main
from images import image_to_tensor, resize_image, target_size
from min_pipeline import generate, load_pipeline
from settings import Settings, UserError

LANCZOS = Image.LANCZOS


def photo(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def reference(image: Image.Image, mode: str, width: int, height: int) -> np.ndarray:
    """A1111's three modes from their description: "Just resize" stretches; "Crop and resize" scales the image to
    cover the box (the matched side equal to the box's, the other rounded down), centres it and cuts off what
    overflows; "Resize and fill" scales it to fit, centres it, and fills each empty band with the nearest edge of the
    scaled image stretched across it (PIL's Lanczos of a zero-size box at that edge)."""
    iw, ih = image.size
    if mode == "just-resize":
        return np.asarray(image.resize((width, height), LANCZOS))
    if mode == "crop-and-resize":
        match_width = width * ih > height * iw  # the box is relatively wider: the widths match, top and bottom go
        sw, sh = (width, ih * width // iw) if match_width else (iw * height // ih, height)
        big = np.asarray(image.resize((sw, sh), LANCZOS))
        top, left = sh // 2 - height // 2, sw // 2 - width // 2
        return big[top : top + height, left : left + width]
    bands_vertical = width * ih < height * iw  # the image is relatively wider: bands above and below
    sw, sh = (width, ih * width // iw) if bands_vertical else (iw * height // ih, height)
    small = image.resize((sw, sh), LANCZOS)
    out = np.zeros((height, width, *np.asarray(small).shape[2:]), dtype=np.uint8)
    top, left = height // 2 - sh // 2, width // 2 - sw // 2
    out[top : top + sh, left : left + sw] = np.asarray(small)
    if bands_vertical and top > 0:
        out[:top] = np.asarray(small.resize((width, top), LANCZOS, box=(0, 0, width, 0)))
        bottom = height - (top + sh)
        out[top + sh :] = np.asarray(small.resize((width, top), LANCZOS, box=(0, sh, width, sh)))[:bottom]
    elif not bands_vertical and left > 0:
        out[:, :left] = np.asarray(small.resize((left, height), LANCZOS, box=(0, 0, 0, height)))
        right = width - (left + sw)
        out[:, left + sw :] = np.asarray(small.resize((left, height), LANCZOS, box=(sw, 0, sw, height)))[:, :right]
    return out


SHAPES = [(40, 24, 16, 32), (24, 40, 32, 16), (30, 30, 16, 24), (37, 21, 24, 24), (64, 64, 32, 32), (8, 40, 24, 16)]


@pytest.mark.parametrize("mode", ["just-resize", "crop-and-resize", "resize-and-fill"])
@pytest.mark.parametrize(("iw", "ih", "width", "height"), SHAPES)
def test_resize_modes_equal_the_reference(mode, iw, ih, width, height):
    for image in (photo(iw, ih), photo(iw, ih, seed=1, mode="L")):  # the init image and a mask
        got = resize_image(image, mode, width, height)
        assert got.size == (width, height) and got.mode == image.mode
        want = reference(image, mode, width, height)
        diff = np.abs(np.asarray(got).astype(int) - want.astype(int))
        assert diff.max() == 0, f"{mode} {image.mode} {iw}x{ih} -> {width}x{height}: max diff {diff.max()}"


def test_what_the_modes_do_on_known_content():
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (32, 1))  # 64 wide, 32 tall, growing to the right
    crop = np.asarray(resize_image(Image.fromarray(ramp), "crop-and-resize", 32, 32))
    assert np.array_equal(crop, ramp[:, 16:48])  # it covers 32x32 unscaled: the centre 32 columns
    tall = Image.fromarray(ramp.T.copy())  # 32 wide, 64 tall, growing downwards: fits 64x32 as 16x32
    fill = np.asarray(resize_image(tall, "resize-and-fill", 64, 32)).astype(int)
    assert np.array_equal(fill[:, 24:40], np.asarray(tall.resize((16, 32), LANCZOS)))  # centred
    assert np.abs(fill[:, :24] - fill[:, 24:25]).max() <= 1 and np.abs(fill[:, 40:] - fill[:, 39:40]).max() <= 1


def test_size_rules():
    assert target_size((513, 300), None, None, 8) == (512, 296)  # none given: the image's, rounded down as today
    assert target_size((512, 256), None, 64, 8) == (128, 64)  # one given: the other keeps the aspect ratio
    assert target_size((512, 256), 64, 48, 8) == (64, 48)
    with pytest.raises(UserError, match="between 8 and 4096"):
        target_size((4000, 8), None, 64, 8)
    assert Settings().ready(img2img=False, inpaint=False).height == 512  # txt2img: 512 by default
    assert Settings().ready(img2img=True, inpaint=False).height is None  # img2img: the image's
    with pytest.raises(UserError, match="unknown resize mode"):
        Settings(resize_mode="stretch").ready(img2img=True, inpaint=False)
    x = image_to_tensor(photo(40, 24), 8, 16, None, "crop-and-resize")
    assert x.shape == (1, 3, 8, 16)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("mode", ["crop-and-resize", "resize-and-fill"])
def test_generate_resizes_the_init_image_and_the_mask(tiny, mode):
    """generate() with a size and an init image + mask equals generate() given the images already resized by the
    reference (no size: their own), for img2img and inpainting."""
    image = photo(40, 24, seed=2)
    mask = Image.fromarray(((np.arange(40) > 18) * 255).astype(np.uint8)[None].repeat(24, 0))  # right half
    kw = dict(steps=2, seed=3, progress=False, output_type="np")
    sized = Image.fromarray(reference(image, mode, 16, 32))
    got = generate(tiny, "a fox", init_image=image, height=32, width=16, resize_mode=mode, **kw)
    want = generate(tiny, "a fox", init_image=sized, **kw)
    assert got.shape == (1, 32, 16, 3) and np.array_equal(got, want)
    sized_mask = Image.fromarray(reference(mask, mode, 16, 32))
    got = generate(tiny, "a fox", init_image=image, mask_image=mask, height=32, width=16, resize_mode=mode, **kw)
    want = generate(tiny, "a fox", init_image=sized, mask_image=sized_mask, **kw)
    assert np.array_equal(got, want)


def test_cli_init_image_at_the_given_size(tiny, tiny_model_dir, tmp_path):
    """The issue's case: a 512x512 init image with --height 64 --width 64 runs at 64x64 (it ran at 512), the init
    image resized by A1111's default, just-resize; without a size the image's own size, as before."""
    init = tmp_path / "init.png"
    photo(512, 512, seed=4).save(init)
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32", "--quiet", "--prompt", "a fox"]
    args += ["--init-image", str(init), "--steps", "2", "--seed", "5"]
    assert main([*args, "--height", "64", "--width", "64", "--output", str(tmp_path / "a.png")]) == 0
    got = np.asarray(Image.open(tmp_path / "a.png"))
    want = generate(tiny, "a fox", init_image=photo(512, 512, seed=4).resize((64, 64), LANCZOS), steps=2, seed=5,
                    progress=False)[0]  # fmt: skip
    assert got.shape == (64, 64, 3) and np.array_equal(got, np.asarray(want))
    assert main([*args, "--height", "32", "--output", str(tmp_path / "b.png")]) == 0  # one side: the aspect kept
    assert Image.open(tmp_path / "b.png").size == (32, 32)
