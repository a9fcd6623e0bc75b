"""Input images -> tensors, as Diffusers' VaeImageProcessor prepares them: init images and inpainting masks.

Files are opened lazily and their size checked before their pixels are decoded, so a huge or decompression-bomb
file is refused, not allocated. `Inpainting` is inpainting's one seam into generate()'s sampling loop.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch import Tensor

import scheduler as sampling
from settings import MAX_SIZE, RESIZE_MODES, UserError


def open_image(image: Image.Image | str | Path, what: str = "init image") -> Image.Image:
    """A PIL image, or an image file read lazily: its size is checked before its pixels are decoded (a huge or
    decompression-bomb file is refused, not allocated). 8 bits per channel, in the image's own mode."""
    if isinstance(image, Image.Image):
        check_image_size(image, what)
        return to_8bit(image)
    if not Path(image).is_file():  # a FIFO would block open(), a device be read without end
        raise UserError(f"cannot read {what} {image}: not a file")
    try:
        with Image.open(image) as file:
            check_image_size(file, what)
            return to_8bit(ImageOps.exif_transpose(file))  # upright as shown, as Diffusers' load_image and A1111
    except UserError:
        raise
    except (OSError, ValueError, SyntaxError, struct.error, Image.DecompressionBombError) as e:  # broken EXIF too
        raise UserError(f"cannot read {what} {image}: {e}") from None


def check_image_size(image: Image.Image, what: str) -> None:
    if max(image.size) > MAX_SIZE:
        w, h = image.size
        raise UserError(f"{what} is {w}x{h}: larger than {MAX_SIZE} pixels per side; downscale it first")


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale (modes I;16, I) scaled from 0..65535 and float images (mode F) from 0..1 (or 0..255 if
    their values exceed 1) to 8-bit L, instead of being clipped at 255; other modes as they are."""
    if image.mode.startswith("I") or image.mode == "F":
        a = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I") else (1.0 if a.size == 0 or a.max() <= 1.0 else 255.0)
        image = Image.fromarray((a / top * 255.0).clip(0, 255).round().astype(np.uint8), mode="L")
    return image


def resize_image(image: Image.Image, mode: str, width: int, height: int) -> Image.Image:
    """An image at width x height as A1111's img2img resize modes make it (modules/images.py resize_image, without
    an upscaler), always with Lanczos resampling:
    - just-resize: stretched to the size (A1111's default, "Just resize");
    - crop-and-resize: scaled to cover the size, its aspect ratio kept, centred, the overflow cut off;
    - resize-and-fill: scaled to fit inside the size, centred; the empty bands (top and bottom, or left and right)
      are the image's edge row (column) stretched across them, as A1111 does by resizing a zero-height (zero-width)
      box at the edge.
    The scaled side follows A1111's integer arithmetic (rounded down), so the crop and the bands match its pixels."""
    if mode not in RESIZE_MODES:
        raise UserError(f"unknown resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    if mode == "just-resize":
        return image.resize((width, height), resample=Image.LANCZOS)
    iw, ih = image.size
    cover = mode == "crop-and-resize"
    # Match the widths when the box is relatively wider (cover) or narrower (fit) than the image, else the heights.
    match_width = width / height > iw / ih if cover else width / height < iw / ih
    w, h = (width, max(1, ih * width // iw)) if match_width else (max(1, iw * height // ih), height)
    scaled = image.resize((w, h), resample=Image.LANCZOS)
    out = Image.new(image.mode, (width, height))
    out.paste(scaled, (width // 2 - w // 2, height // 2 - h // 2))  # centred; a negative offset crops
    if not cover and match_width and (band := height // 2 - h // 2) > 0:  # bands above and below
        out.paste(scaled.resize((width, band), Image.LANCZOS, box=(0, 0, width, 0)), (0, 0))
        out.paste(scaled.resize((width, band), Image.LANCZOS, box=(0, h, width, h)), (0, band + h))
    elif not cover and not match_width and (band := width // 2 - w // 2) > 0:  # bands left and right
        out.paste(scaled.resize((band, height), Image.LANCZOS, box=(0, 0, 0, height)), (0, 0))
        out.paste(scaled.resize((band, height), Image.LANCZOS, box=(w, 0, w, height)), (band + w, 0))
    return out


def target_size(size: tuple[int, int], width: int | None, height: int | None, multiple: int) -> tuple[int, int]:
    """The (W, H) an init image of `size` is generated at: both given, as given; one given, the other from the
    image's aspect ratio; none, the image's own; each cut down to a multiple of the VAE factor (Diffusers')."""
    iw, ih = size
    w = width if width is not None else iw if height is None else iw * height // ih
    h = height if height is not None else ih if width is None else ih * width // iw
    w, h = w - w % multiple, h - h % multiple
    if not (multiple <= w <= MAX_SIZE and multiple <= h <= MAX_SIZE):
        raise UserError(f"the init image ({iw}x{ih}) at this size would be {w}x{h}: each side must be between "
                        f"{multiple} and {MAX_SIZE} pixels; give --width and --height")  # fmt: skip
    return w, h


def image_to_tensor(image: Image.Image | str | Path, multiple: int, width: int | None = None,
                    height: int | None = None, resize_mode: str = "just-resize") -> Tensor:  # fmt: skip
    """An init image -> (1, 3, H, W) in [-1, 1]. Without a size its own, cut down to a multiple of the VAE factor
    (Lanczos resize), as Diffusers' VaeImageProcessor does; with one (target_size), resized to it by `resize_mode`
    (resize_image)."""
    image = open_image(image).convert("RGB")
    if min(image.size) < multiple:
        raise UserError(f"init image is {image.size[0]}x{image.size[1]}: smaller than {multiple} pixels")
    w, h = target_size(image.size, width, height, multiple)
    if (w, h) != image.size:  # without a size given, just-resize to the multiple is Diffusers' resize
        image = resize_image(image, resize_mode if (width, height) != (None, None) else "just-resize", w, h)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return 2.0 * x - 1.0


def mask_to_tensor(mask: Image.Image | str | Path, size: tuple[int, int], blur: int,
                   resize_mode: str | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """An inpainting mask (white = repaint, black = keep; any mode) at the image's size `size` = (W, H), as
    Diffusers' mask processor makes it: optional Gaussian blur (`VaeImageProcessor.blur`), Lanczos resize in the
    mask's own mode, then greyscale, then binarised at 0.5. With a `resize_mode` (the init image was resized to a
    given size) the mask is first resized as the image was (resize_image), then blurred at that size. Returns the
    binary (1, 1, H, W) mask and the soft one (blurred, not binarised) that --mask-keep-pixels blends with."""
    mask = open_image(mask, "mask image")
    if resize_mode is not None:
        mask = resize_image(mask, resize_mode, *size)
    if blur:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    mask = mask.resize(size, resample=Image.LANCZOS).convert("L")
    soft = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    return (soft >= 0.5).float(), soft


@dataclass(frozen=True)
class Inpainting:
    """Inpainting as Diffusers' StableDiffusionInpaintPipeline does it, joining the loop at three points: a 9-channel
    inpainting UNet also sees the mask and the masked image's latents (`unet_input`); with an ordinary model, after
    every step the kept part is reset to the original noised to the next call's level (`after_step`); at the end the
    original pixels may be pasted back through the mask's soft edge (`paste_back`)."""

    image: Tensor  # (1, 3, H, W) the init image in [-1, 1]
    pixel_mask: Tensor  # (1, 1, H, W) 1 = repaint, 0 = keep
    soft_mask: Tensor  # (1, 1, H, W) the blurred mask before binarising
    keep_pixels: bool
    mask: Tensor | None = None  # (N, 1, h, w) the mask at latent size (nearest), set by at_latents
    extra: Tensor | None = None  # 9-channel UNet: mask and masked-image latents, its 5 extra input channels
    known: Tensor | None = None  # ordinary model: the original's latents, x_0 of the part to keep
    noise: Tensor | None = None  # the starting noise, with which `known` is re-noised

    @classmethod
    def read(cls, mask_image, image: Tensor, blur: int, keep_pixels: bool, resize_mode: str | None = None):
        pixel_mask, soft_mask = mask_to_tensor(mask_image, (image.shape[3], image.shape[2]), blur, resize_mode)
        return cls(image, pixel_mask, soft_mask, keep_pixels)

    def masked_image(self) -> Tensor:
        return self.image * (self.pixel_mask < 0.5)  # the part to repaint grey (0)

    def at_latents(self, x: Tensor, known: Tensor | None, noise: Tensor, masked: Tensor | None, cfg: bool):
        """Ready for a loop over latents like x: with `masked` (the masked image's latents) for an inpainting UNet,
        else with the original's latents `known` and the starting `noise` that re-noises them."""
        mask = torch.nn.functional.interpolate(self.pixel_mask, size=x.shape[2:]).to(x.device, x.dtype)
        mask = mask.expand(len(x), -1, -1, -1)
        extra = None if masked is None else torch.cat([mask, masked], dim=1)
        extra = torch.cat([extra, extra]) if cfg and extra is not None else extra
        return replace(self, mask=mask, extra=extra, known=known, noise=noise)

    def unet_input(self, x_in: Tensor) -> Tensor:
        return x_in if self.extra is None else torch.cat([x_in, self.extra], dim=1)

    def after_step(self, schedule: sampling.Schedule, i: int, x: Tensor) -> Tensor:
        if self.extra is not None:  # the inpainting UNet repaints only the mask by itself
            return x
        last = i + 1 == len(schedule.timesteps)  # keep the unmasked part: the original at the next call's level
        known = self.known if last else sampling.add_noise(schedule, self.known, self.noise, i + 1)
        return (1 - self.mask) * known + self.mask * x

    def paste_back(self, images: Tensor) -> Tensor:
        """Decoded (N, H, W, 3) pixels in [0, 1] with the original's outside the mask, blended through its soft edge."""
        if not self.keep_pixels:
            return images
        alpha = self.soft_mask.permute(0, 2, 3, 1)
        return alpha * images + (1 - alpha) * ((self.image + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)


# ----------------------------------------------------------------------------- Canny edges (a ControlNet preprocessor)

TAN_22_5 = 13573  # tan(22.5 degrees) * 2**15: OpenCV's integer test of which of 4 directions a gradient points in
SHIFT = 15


def canny(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Canny edges (Canny 1986, IEEE TPAMI 8(6)) as OpenCV's cv2.Canny(image, low, high) finds them (aperture 3, L1
    gradient), for what control_v11p_sd15_canny was trained on: an (H, W) or (H, W, C) uint8 image -> (H, W) uint8,
    255 on edges. A1111's canny module runs it on the RGB image; with several channels each pixel takes the gradient
    of the channel where |dx| + |dy| is largest (the first on a tie).
    1. 3x3 Sobel gradients, edges replicated; magnitude |dx| + |dy|.
    2. Non-maximum suppression: a pixel stays if its magnitude exceeds both neighbours across the edge, the gradient's
       direction rounded to 0, 45, 90 or 135 degrees (horizontal and vertical ties go to the pixel before).
    3. Double threshold and hysteresis: of the pixels left above `low`, those 8-connected to one above `high`."""
    a = image.astype(np.int32)
    a = a[..., None] if a.ndim == 2 else a
    p = np.pad(a, ((1, 1), (1, 1), (0, 0)), mode="edge")
    dx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    dy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    mag = np.abs(dx) + np.abs(dy)
    k = mag.argmax(axis=-1)[..., None]  # the channel with the largest gradient
    dx, dy, mag = (np.take_along_axis(v, k, axis=-1)[..., 0] for v in (dx, dy, mag))

    m = np.pad(mag, 1)  # neighbours outside the image have magnitude 0
    left, right, up, down = m[1:-1, :-2], m[1:-1, 2:], m[:-2, 1:-1], m[2:, 1:-1]
    x, y = np.abs(dx).astype(np.int64), np.abs(dy).astype(np.int64) << SHIFT
    tg22x = x * TAN_22_5
    tg67x = tg22x + (x << (SHIFT + 1))  # tan(67.5) = tan(22.5) + 2
    rising = (dx ^ dy) >= 0  # the diagonal the gradient runs along: up-left to down-right, or up-right to down-left
    diagonal_1 = (mag > m[:-2, :-2]) & (mag > m[2:, 2:])
    diagonal_2 = (mag > m[:-2, 2:]) & (mag > m[2:, :-2])
    peak = np.where(rising, diagonal_1, diagonal_2)
    peak = np.where(y > tg67x, (mag > up) & (mag >= down), peak)  # within 22.5 degrees of vertical
    peak = np.where(y < tg22x, (mag > left) & (mag >= right), peak)  # within 22.5 degrees of horizontal
    low, high = sorted((low, high))
    candidate = peak & (mag > math.floor(low))
    return (hysteresis(candidate, candidate & (mag > math.floor(high))) * 255).astype(np.uint8)


def hysteresis(candidate: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """The candidate pixels 8-connected to a strong one: a flood fill from every strong pixel."""
    h, w = candidate.shape
    cand, edge = np.pad(candidate, 1).ravel(), np.pad(strong, 1).ravel()
    steps = [di * (w + 2) + dj for di in (-1, 0, 1) for dj in (-1, 0, 1) if di or dj]
    stack = np.flatnonzero(edge).tolist()
    while stack:
        k = stack.pop()
        for step in steps:
            n = k + step
            if cand[n] and not edge[n]:
                edge[n] = True
                stack.append(n)
    return edge.reshape(h + 2, w + 2)[1:-1, 1:-1]
