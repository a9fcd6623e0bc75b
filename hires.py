"""The hires fix's arithmetic and upscalers, as A1111's web UI does them (modules/processing.py
`StableDiffusionProcessingTxt2Img`, modules/upscaler.py, modules/sd_samplers_common.py): the size of the second pass,
its step counts, and the upscalers between the passes. min_pipeline.hires_fix runs the pass itself.

A first image is generated at the given size, upscaled (as latents, or as pixels through the VAE), then noised part
of the way back (the denoising strength) and denoised again at the larger size: image-to-image on its own upscale,
which adds the detail a plain resize cannot. Pure functions of tensors and images; no model here.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

# A1111's `shared.latent_upscale_modes`: the latents themselves interpolated (F.interpolate, align_corners=False).
LATENT_MODES = {  # ours: (torch mode, antialias)
    "latent": ("bilinear", False),
    "latent-antialiased": ("bilinear", True),
    "latent-bicubic": ("bicubic", False),
    "latent-bicubic-antialiased": ("bicubic", True),
    "latent-nearest": ("nearest", False),
    "latent-nearest-exact": ("nearest-exact", False),
}
# A1111's UpscalerLanczos and UpscalerNearest: the decoded image resized with PIL.
IMAGE_FILTERS = {"lanczos": Image.LANCZOS, "nearest": Image.NEAREST}
# The names A1111 shows and writes in the PNG ("Hires upscaler: Latent"); the CLI takes these too.
A1111_NAMES = {
    "latent": "Latent",
    "latent-antialiased": "Latent (antialiased)",
    "latent-bicubic": "Latent (bicubic)",
    "latent-bicubic-antialiased": "Latent (bicubic antialiased)",
    "latent-nearest": "Latent (nearest)",
    "latent-nearest-exact": "Latent (nearest-exact)",
    "lanczos": "Lanczos",
    "nearest": "Nearest",
}
MAX_SCALE = 8.0
DENOISE_CAP = 0.999  # A1111 divides by min(denoise, 0.999), so that denoise 1 still leaves the last sigma to skip


def upscaler_name(name: str) -> str | None:
    """Our name of an upscaler given by ours ("latent-bicubic") or A1111's ("Latent (bicubic)"); None if unknown."""
    if name in A1111_NAMES:
        return name
    return next((ours for ours, theirs in A1111_NAMES.items() if theirs.lower() == name.strip().lower()), None)


def target_size(height: int, width: int, scale: float, factor: int) -> tuple[int, int]:
    """The second pass's size in pixels (H, W): A1111's hr_upscale_to = int(size * scale), then whole latents (its
    latent upscalers interpolate to hr_upscale_to // 8; an image is encoded at a multiple of 8 too)."""
    return int(height * scale) // factor * factor, int(width * scale) // factor * factor


def img2img_steps(steps: int, hires_steps: int, denoise: float) -> tuple[int, int]:
    """(schedule length, steps that run) of the second pass: A1111's setup_img2img_steps when given steps, as the
    hires pass always is. `hires_steps` (0: the first pass's `steps`) run, the last ones of a schedule of
    int(hires_steps / min(denoise, 0.999)) steps, so that they start at about the noise level `denoise`."""
    run = hires_steps or steps
    return int(run / min(denoise, DENOISE_CAP)), run


def upscale_latents(x: Tensor, size: tuple[int, int], upscaler: str) -> Tensor:
    """Latents (B, C, h, w) -> (B, C, H, W) interpolated as A1111's latent upscaler `upscaler` does."""
    mode, antialias = LATENT_MODES[upscaler]
    return F.interpolate(x, size=size, mode=mode, antialias=antialias)


def resize_as_a1111(image: Image.Image, size: tuple[int, int], upscaler: str) -> Image.Image:
    """An image resized to `size` (W, H) as A1111's images.resize_image(0, ..., upscaler_name) does with the PIL
    upscalers: the upscaler's own resize by max(W / w, H / h), then Lanczos to its whole multiple of 8 and to (W, H)
    where those differ."""
    (w, h), resample = size, IMAGE_FILTERS[upscaler]
    scale = max(w / image.width, h / image.height)
    if scale > 1.0:  # Upscaler.upscale: one resize by the scale, then to the multiple of 8 below it
        dest = (int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8))
        image = image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)
        image = image.resize(dest, resample=Image.LANCZOS) if image.size != dest else image
    return image.resize((w, h), resample=Image.LANCZOS) if image.size != (w, h) else image


def upscale_images(pixels: Tensor, scale: float, factor: int, upscaler: str) -> Tensor:
    """Decoded float32 (B, H, W, 3) pixels in [0, 1] -> (B, 3, H', W') in [-1, 1], H', W' = target_size(): each as
    the 8-bit picture generate() would return (rounded, as Diffusers' numpy_to_pil; A1111 truncates, under one level
    darker), resized to int(size * scale) as A1111 does (resize_as_a1111), then with Lanczos to whole latents where
    that is not (as Diffusers' VaeImageProcessor prepares an init image), ready for the VAE encoder."""
    out = []
    for image in (pixels.numpy() * 255).round().astype(np.uint8):
        image = Image.fromarray(image)
        w, h = int(image.width * scale), int(image.height * scale)
        image = resize_as_a1111(image, (w, h), upscaler)
        if w % factor or h % factor:
            image = image.resize((w // factor * factor, h // factor * factor), resample=Image.LANCZOS)
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return 2.0 * torch.stack(out) - 1.0
