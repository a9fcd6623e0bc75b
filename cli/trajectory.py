"""Watching the sampler from the command line: the trajectory file (the x0 prediction after every step, as a GIF or a
contact sheet) and the preview file rewritten during a long run, both from generate()'s per-call callback."""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from cli.outputs import replace_file
from min_pipeline import Pipeline, StepInfo, decode
from models.loading import load_vae

# A1111's "Approx cheap" live preview: a linear map from the 4 SD 1.x latent channels (rows) to R, G, B (columns),
# fitted by Keturn on SD 1.4 latents ("Decoding latents to RGB without upscaling", Hugging Face forum, 2022).
LATENT_RGB = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))


@functools.cache
def preview_vae(source: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """--preview-vae's decoder (TAESD: models/taesd.py), loaded once per run."""
    return load_vae(source, dtype, device)


def preview(
    pipe: Pipeline, latent: torch.Tensor, decoder: str = "cheap", taesd: torch.nn.Module | None = None
) -> Image.Image:
    """One latent (1, 4, H, W) as a picture: through the real VAE, through TAESD (`taesd`: nearly the VAE's picture
    at an eighth of its cost), or for free with the linear map above (the result blown up to the image size)."""
    if decoder in ("vae", "taesd"):
        if decoder == "vae":
            pixels = decode(pipe, latent)[0]
        else:  # TAESD reads the UNet's latents as they are (its scaling factor is 1)
            z = latent.to(next(taesd.parameters()).dtype) / taesd.config.scaling_factor
            pixels = (taesd.decode(z)[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu()  # (H, W, 3) in [0, 1]
        return Image.fromarray((pixels.numpy() * 255).round().astype(np.uint8))
    rgb = torch.einsum("chw,cr->hwr", latent[0].float().cpu(), torch.tensor(LATENT_RGB))  # (H, W, 3), about [-1, 1]
    image = Image.fromarray(((rgb + 1) / 2 * 255).clamp(0, 255).round().byte().numpy())
    f = pipe.vae.downsample_factor
    return image.resize((image.width * f, image.height * f), Image.NEAREST)


class Watcher:
    """generate()'s callback for the CLI: collects the trajectory frames (the first image's x0 prediction, labelled
    with step and sigma; with `noisy`, the noisy latent beside it) when `trajectory`, and rewrites `preview_path`
    every `preview_every` UNet calls."""

    def __init__(self, pipe: Pipeline, trajectory: bool = False, decoder: str = "cheap", noisy: bool = False,
                 preview_path: Path | None = None, preview_every: int = 1, taesd: str | None = None):  # fmt: skip
        self.pipe, self.trajectory, self.decoder, self.noisy = pipe, trajectory, decoder, noisy
        # --preview-vae: TAESD draws the previews (and the trajectory with decoder "taesd")
        self.taesd = preview_vae(taesd, pipe.dtype, pipe.device) if taesd else None
        self.preview_path, self.preview_every, self.frames, self.previews = preview_path, preview_every, [], 0

    def __call__(self, info: StepInfo) -> None:
        if self.trajectory:
            frame = preview(self.pipe, info.x0[:1], self.decoder, self.taesd)
            if self.noisy:  # the latent itself, scaled to unit variance like x_t
                noisy = preview(self.pipe, info.latents[:1] / info.latents[:1].float().std())
                frame = side_by_side(noisy, frame)
            ImageDraw.Draw(frame).text((2, 2), f"{info.i + 1}/{info.calls} sigma {info.sigma:.3g}", fill="white")
            self.frames.append(frame)
        if self.preview_path and ((info.i + 1) % self.preview_every == 0 or info.i + 1 == info.calls):
            picture = preview(self.pipe, info.x0[:1], "taesd" if self.taesd else "cheap", self.taesd)
            replace_file(self.preview_path, picture, format="PNG")
            self.previews += 1

    def write_trajectory(self, path: Path) -> None:
        if not self.frames:  # generate() returned without sampling (an all-black mask: nothing to repaint)
            warnings.warn(f"no step ran, so there is no trajectory; {path} not written", stacklevel=2)
            return
        size = self.frames[-1].size  # the hires fix's second pass draws larger frames: all at the final size
        self.frames = [f if f.size == size else f.resize(size, Image.NEAREST) for f in self.frames]
        if path.suffix.lower() == ".gif":
            first, *rest = self.frames
            replace_file(path, first, format="GIF", save_all=True, append_images=rest, duration=250, loop=0)
            return
        columns = math.ceil(len(self.frames) ** 0.5)  # a contact sheet, row by row
        w, h = self.frames[0].size
        sheet = Image.new("RGB", (w * columns, h * math.ceil(len(self.frames) / columns)))
        for k, frame in enumerate(self.frames):
            sheet.paste(frame, (w * (k % columns), h * (k // columns)))
        replace_file(path, sheet, format="PNG")


def side_by_side(a: Image.Image, b: Image.Image) -> Image.Image:
    out = Image.new("RGB", (a.width + b.width, max(a.height, b.height)))
    out.paste(a, (0, 0))
    out.paste(b, (a.width, 0))
    return out
