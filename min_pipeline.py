"""minsd: Stable Diffusion 1.5 text-to-image and image-to-image in plain PyTorch.

    uv run min_pipeline.py --prompt "a red fox in snow"

Latent diffusion (Rombach et al. 2022, arXiv:2112.10752): the prompt is tokenized and encoded by CLIP into a
(77, 768) context; a UNet trained to predict the noise eps in a 4-channel latent image at 1/8 of the pixel size
is run by a sampler (scheduler.py) from pure noise down to a clean latent, steered by classifier-free guidance;
the VAE decoder turns the latent into pixels. Every step below equals what Diffusers'
StableDiffusionPipeline / StableDiffusionImg2ImgPipeline does for the same weights, seed and settings, with two
deliberate exceptions: clip skip also applies to the negative prompt (as in A1111; Diffusers skips layers for the
positive prompt only), and the tokenizer cleans text as OpenAI's CLIP does (ftfy, HTML entities), so curly quotes,
`&amp;` or ligatures tokenize as CLIP was trained, where Transformers' tokenizer differs.

The file reads top to bottom: loading, then the algorithm in its order (prompts -> context, the starting latent, the
sampling loop, decoding) and generate(), which runs it. Prompt encoding lives in prompts.py, the settings in
settings.py, init images and inpainting in images.py, the command line in cli/, the fast path in fast_path.py, memory
and cost checks in resources.py.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import hires
import scheduler as sampling
from controls import Controls, load_controlnet  # noqa: F401 - load_controlnet: part of this module's API
from images import Inpainting, image_to_tensor
from models.clip import CLIPTextModel
from models.controlnet import ControlNet
from models.loading import DEFAULT_MODEL, WeightsError, load_model, load_vae
from models.taesd import TinyAutoencoder
from models.unet import UNet
from models.vae import AutoencoderKL, sample_latent
from prompts import conditioning
from resources import (
    DTYPES,
    check_cost,
    choose_tiling,
    pick_device,
    prepack_for_onednn,
    release_pages,
    resolve_dtype,
    trim_heap,
)
from settings import NonFiniteError, Settings, check_inputs
from tokenizer import CLIPTokenizer

__all__ = ["DTYPES", "generate", "load_controlnet", "load_pipeline"]  # and the algorithm's steps below


@dataclass
class Pipeline:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet
    vae: AutoencoderKL | TinyAutoencoder  # the model's VAE, or the one given to load_pipeline
    scheduler_config: sampling.SchedulerConfig
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype  # the pipeline's dtype, or float32 once a float16 decode has overflowed (see decode)
    fast_loop: Callable | None = None  # the sampling loop as fast_path.speed_up() replaces it; None: sample() below

    @property
    def inpainting(self) -> bool:
        """A 9-channel inpainting UNet: it sees the latents, the mask and the masked image's latents."""
        return self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1


def load_pipeline(model: str = DEFAULT_MODEL, device: str | torch.device | None = None,
                  dtype: str | torch.dtype | None = None, config: str | None = None,
                  vae: str | None = None) -> Pipeline:  # fmt: skip
    """Load tokenizer, text encoder, UNet, VAE and the scheduler config from a Diffusers-layout folder, a hub repo
    id, or an original single-file checkpoint (`.safetensors`; SD 1.5 configs built in, or those of the
    Diffusers-layout folder `config`). `dtype` is a torch dtype or its name ("float16"); None or "auto" picks
    resources.auto_dtype's: float16 on CUDA, bfloat16 on a CPU with AMX, float32 elsewhere. bfloat16 on an AVX2-only
    CPU (about 100x slower than fp32: bench/README.md) and float16 on a CPU (about 27x) get a warning.
    `vae`: another VAE in place of the model's (models.loading.load_vae: a Diffusers AutoencoderKL or TAESD folder or
    hub repo, an LDM VAE file, TAESD's original files).
    """
    dev = pick_device(str(device) if device is not None else None)
    dtype = resolve_dtype(dtype, dev)
    m = load_model(model, dtype, dev, config)
    if vae is not None:  # a VAE of its own (a fine-tuned one, or TAESD): it must speak the UNet's latents
        m = m._replace(vae=load_vae(vae, dtype, dev, m.vae.config))
        if m.vae.config.latent_channels != m.unet.config.out_channels:
            raise WeightsError(f"the VAE {vae} has {m.vae.config.latent_channels} latent channels, the UNet "
                               f"{m.unet.config.out_channels}: it belongs to another kind of model")  # fmt: skip
    if dev.type == "cpu" and dtype == torch.bfloat16:  # oneDNN's AMX convolutions want NHWC: UNet -26%, decode -50%
        m.unet.to(memory_format=torch.channels_last), m.vae.to(memory_format=torch.channels_last)  # (bench/README.md)
        prepack_for_onednn(m.unet)  # conv and linear weights packed once, bias and GEGLU fused: UNet 0.7-0.85x
    return Pipeline(m.tokenizer, m.text_encoder, m.unet, m.vae, m.scheduler_config, dev, dtype, vae_dtype=dtype)


# ----------------------------------------------------------------------------- 1. prompts -> context
# prompts.py: tokenize, CLIP-encode (models/clip.py) and, for A1111's syntax, weight and schedule the prompts, giving
# the UNet's context for every step (prompts.conditioning).


# ----------------------------------------------------------------------------- 2. the starting latent


def encode_image(pipe: Pipeline, image: torch.Tensor, generator: torch.Generator, tiled: bool = False) -> torch.Tensor:
    """An image in [-1, 1] (1, 3, H, W) -> a latent drawn from the VAE encoder's posterior (one random draw),
    times the scaling factor, in the pipeline's dtype: what the UNet works on."""
    mean, logvar = pipe.vae.encode(image.to(pipe.device, pipe.vae_dtype), tiled=tiled)
    z = mean  # TAESD's encoder gives the latent itself: no posterior, so no random draw
    if logvar is not None:
        z = sample_latent(mean, logvar, sampling.draw_noise(mean.shape, mean.dtype, pipe.device, generator))
    z = (pipe.vae.config.scaling_factor * z).to(pipe.dtype)
    check_finite(z, "VAE encoder")
    return z


# ----------------------------------------------------------------------------- 3. the sampling loop


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Ho & Salimans 2022 (arXiv:2207.12598) Eq. 6, (1 + w) eps_c - w eps_u, written with s = 1 + w as Diffusers
    does: eps_u + s * (eps_c - eps_u). s = 1 is the conditional model alone."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


@dataclass(frozen=True)
class StepInfo:
    """What generate()'s `callback` gets after each UNet call: at the points Diffusers' callback_on_step_end is
    called, once per timestep, so Heun's two calls per step come as two records."""

    i: int  # the UNet call, 0 .. calls - 1
    calls: int  # UNet calls of the run (steps; 2 * steps - 1 for Heun, DPM2; steps + 1 for PNDM; fewer for img2img)
    t: float  # the timestep fed to the UNet
    sigma: float  # the noise level of that call's input, sqrt((1 - abar) / abar) for every sampler
    latents: torch.Tensor  # x after the call's update, in the variable the sampler moves
    x0: torch.Tensor  # the sampler's prediction of the clean latent at this call (scheduler.predict_x0)


def sample(pipe: Pipeline, schedule: sampling.Schedule, x: torch.Tensor, contexts: list[tuple[int, torch.Tensor]],
           guidance: float | None, generator: torch.Generator, eta: float = 0.0, inpaint: Inpainting | None = None,
           callback: Callable[[StepInfo], None] | None = None, progress: bool = True,
           controls: Controls | None = None) -> torch.Tensor:  # fmt: skip
    """The denoising loop, one UNet call at a time: scale the input, the UNet on the CFG batch (the unconditional
    half first), guidance, one sampler step. Features join at four points: the context of the call's step (prompt
    editing), the ControlNets' residuals for the call, inpainting's extra UNet input and its reset after the step,
    and the callback."""
    state, timesteps = None, schedule.timesteps.to(pipe.device)  # once, not a host-to-device copy per step
    for i, t in enumerate(tqdm(timesteps, desc="denoising", disable=not progress)):
        context = next(c for end, c in contexts if schedule.step_of(i) <= end)
        x_in = sampling.scale_model_input(schedule, i, x)
        x_in = torch.cat([x_in, x_in]) if guidance else x_in
        residuals = controls.residuals(i, len(timesteps), x_in, t, context) if controls else (None, None)
        eps = pipe.unet(inpaint.unet_input(x_in) if inpaint else x_in, t, context, *residuals)
        if guidance:
            eps = classifier_free_guidance(*eps.chunk(2), guidance)
        x_in, (x, state) = x, sampling.step(schedule, i, x, eps, state, generator=generator, eta=eta)
        x = inpaint.after_step(schedule, i, x) if inpaint else x
        if callback is not None:
            x0 = sampling.predict_x0(schedule, i, x_in, eps)
            callback(StepInfo(i, len(timesteps), float(schedule.timesteps[i]), float(schedule.sigmas[i]), x, x0))
    return x


# ----------------------------------------------------------------------------- 4. latent -> pixels


def decode(pipe: Pipeline, x: torch.Tensor, tiled: bool = False) -> torch.Tensor:
    """VAE decode -> float32 (N, H, W, 3) in [0, 1]. fp16 decodes can overflow to inf/NaN (black images) on the
    SD 1.5 VAE (bfloat16 is checked the same way): if that happens, say so, decode in float32, and keep decoding in
    float32 from then on."""
    scale = pipe.vae.config.scaling_factor  # LDM trained the UNet on latents * scale (about unit variance)
    pixels = pipe.vae.decode((x / scale).to(pipe.vae_dtype), tiled=tiled)
    if pixels.dtype != torch.float32 and not torch.isfinite(pixels).all():
        warnings.warn(f"the {str(pixels.dtype)[6:]} VAE decode overflowed; decoding again in float32", stacklevel=2)
        pipe.vae_dtype = torch.float32  # the next images would overflow too
        pixels = pipe.vae.float().decode(x.float() / scale, tiled=tiled)
    check_finite(pixels, "VAE decoder")
    return (pixels.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def to_output(images: torch.Tensor, output_type: str) -> list[Image.Image] | np.ndarray | torch.Tensor:
    """float32 (N, H, W, 3) pixels in [0, 1] as generate() returns them."""
    if output_type == "pt":
        return images.permute(0, 3, 1, 2).contiguous()
    if output_type == "np":
        return images.numpy()
    return [Image.fromarray(img) for img in (images.numpy() * 255).round().astype(np.uint8)]


def check_finite(x: torch.Tensor, stage: str) -> None:
    """One host sync per stage: a NaN/inf would otherwise become a black or noise image written with exit 0."""
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"the {stage} produced NaN or inf values (broken weights or an overflow); nothing written")


# ------------------------------------------------------------------------- 5. hires fix: upscale, then image-to-image


def hires_fix(pipe: Pipeline, x: torch.Tensor, s: Settings, contexts: list[tuple[int, torch.Tensor]],
              guidance: float | None, generator: torch.Generator, tiled: bool, callback: Callable | None = None,
              progress: bool = True, controls_at: Callable | None = None) -> tuple[torch.Tensor, bool]:  # fmt: skip
    """A1111's hires fix (processing.py, sample_hr_pass): the first pass's latents x upscaled by s.hires_scale, as
    latents or as pixels (decode, PIL resize, encode: hires.py), then an image-to-image pass at the larger size with
    fresh noise from the same generator: noised to the level where the last `run` steps of a `total`-step schedule
    start (hires.img2img_steps), and those steps run. `controls_at(size=(H, W))`: the ControlNets, their control
    images prepared again at the larger size, with the same scales, guess mode and start/end (fractions of this pass's
    UNet calls), as A1111's ControlNet extension. Returns the latents and whether the VAE tiles at that size."""
    factor = pipe.vae.downsample_factor
    height, width = hires.target_size(x.shape[2] * factor, x.shape[3] * factor, s.hires_scale, factor)
    big_tiled = choose_tiling(pipe, s.vae_tiling, (height, width))  # the larger size may need the VAE in tiles
    total, run = hires.img2img_steps(s.steps, s.hires_steps, s.hires_denoise)
    strength = min(1.0, (run + 0.5) / total)  # make_schedule keeps int(total * strength) = run steps, round-off or not
    schedule = sampling.make_schedule(s.scheduler, total, pipe.scheduler_config, s.karras, strength=strength)
    schedule = replace(schedule, first_step=0)  # prompt editing counts the second pass's steps from 0, as A1111
    if s.hires_upscaler in hires.LATENT_MODES:
        x = hires.upscale_latents(x, (height // factor, width // factor), s.hires_upscaler)
    else:  # the image upscalers work on pixels: decode, resize, encode (one posterior draw for the batch)
        pixels = torch.cat([decode(pipe, x[i : i + 1], tiled) for i in range(len(x))])
        big = hires.upscale_images(pixels, s.hires_scale, factor, s.hires_upscaler)  # (B, 3, H, W) in [-1, 1]
        x = encode_image(pipe, big, generator, big_tiled)
    x = sampling.add_noise(schedule, x, sampling.draw_noise(x.shape, pipe.dtype, pipe.device, generator))
    controls = controls_at(size=(height, width)) if controls_at else None
    x = sample(pipe, schedule, x, contexts, guidance, generator, s.eta, None, callback, progress, controls)
    return x, big_tiled


# ----------------------------------------------------------------------------- generate


@torch.inference_mode()
def generate(pipe: Pipeline, prompt: str | list[str], negative_prompt: str | list[str] = "", *,
             init_image: Image.Image | str | Path | None = None, mask_image: Image.Image | str | Path | None = None,
             prompt_syntax: str = "a1111", output_type: str = "pil", progress: bool = True,
             callback: Callable[[StepInfo], None] | None = None, controlnet: ControlNet | list | None = None,
             control_image: Image.Image | str | Path | list | None = None, control_scale: float | list[float] = 1.0,
             control_start: float | list[float] = 0.0, control_end: float | list[float] = 1.0,
             guess_mode: bool = False, **settings):  # fmt: skip
    """`num_images` images per prompt, as PIL images; output_type "np": float32 (N, H, W, 3) in [0, 1], "pt": (N, 3, H,
    W), "latent": the final latents, as Diffusers. `settings`: the fields of settings.Settings (steps, seed, ...).
    `init_image`: image-to-image, noised to `strength`; its size, or a height/width given, to which it is resized by
    `resize_mode` (as the mask); with `mask_image`, inpainting. `callback` gets a StepInfo after every UNet call.
    seed=-1 draws a random seed (and warns with it). `controlnet`
    (load_controlnet; or a list) steers the UNet by `control_image` (one each), weighted by `control_scale`, acting
    from the fraction `control_start` to `control_end` of the UNet calls (a number, or one each); `guess_mode`:
    ControlNets on the conditional half of CFG only, residuals weighted 0.1 to 1 (Diffusers' meanings)."""
    # 0. Inputs and settings, checked against this model.
    prompts, negatives = check_inputs(prompt, negative_prompt, init_image, mask_image, output_type, prompt_syntax)
    s = model_settings(pipe, settings, init_image is not None, mask_image is not None)
    channels, factor, inpainting_unet = pipe.vae.config.latent_channels, pipe.vae.downsample_factor, pipe.inpainting
    resize = s.resize_mode if (s.width, s.height) != (None, None) else None  # a size given an init image: resize it
    init = image_to_tensor(init_image, factor, s.width, s.height, s.resize_mode) if init_image is not None else None
    height, width = (init.shape[2], init.shape[3]) if init is not None else (s.height, s.width)  # an image sets it
    inpaint = None if mask_image is None else Inpainting.read(mask_image, init, s.mask_blur, s.mask_keep_pixels, resize)
    n, h, w = len(prompts) * s.num_images, height // factor, width // factor
    if inpaint and not inpaint.pixel_mask.any():
        warnings.warn("the mask is all black: nothing to repaint; returning the image as it is", stacklevel=3)
        return to_output(((init + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).repeat(n, 1, 1, 1), output_type)
    schedule = sampling.make_schedule(s.scheduler, s.steps, pipe.scheduler_config, schedule=s.schedule,
                                      strength=s.strength if init is not None else 1.0)  # fmt: skip
    guidance = s.guidance_scale if s.guidance_scale > 1.0 else None  # at s <= 1 no unconditional pass, as Diffusers
    tiled = choose_tiling(pipe, s.vae_tiling, (height, width))
    check_cost(pipe, n * (2 if guidance else 1), (height, width), len(schedule.timesteps), tiled)
    if s.hires_scale > 1:  # the second pass's size and steps too, before any work (its VAE tiles where it must)
        big = hires.target_size(height, width, s.hires_scale, factor)
        check_cost(pipe, n * (2 if guidance else 1), big, s.hires_steps or s.steps, pipe.vae.needs_tiling(*big))
    dev, generator = pipe.device, torch.Generator().manual_seed(s.seed)  # on the CPU: the same noise on any device
    controls_at = partial(Controls.read, pipe, controlnet, control_image, control_scale, control_start, control_end,
                          guess_mode, n=n, cfg=guidance is not None)  # fmt: skip
    controls = controls_at(size=(height, width))  # checked; hires_fix prepares them again at its size

    # 1. Text -> context for each step: (2B, L, D), the unconditional half first, each prompt's rows repeated
    # num_images times (p0, p0, p1, p1, ...), so that one UNet call serves both halves of CFG.
    contexts = conditioning(pipe, prompts, negatives, s, guidance is not None, prompt_syntax)
    for _, context in contexts:
        check_finite(context, "text encoder")
    if dev.type == "cpu":
        release_pages(pipe.text_encoder)  # its memory-mapped weights out of RSS until the next run needs them

    # 2. The starting latent: pure noise, or the init image's latent noised to `strength` (the schedule's start).
    # The random draws come in Diffusers' order: image latent, noise, masked-image latent.
    pure_noise = init is None or (inpaint is not None and s.strength == 1.0)
    known = None  # an ordinary model keeps the original's latents; an inpainting UNet at strength 1 needs none
    if init is not None and not (pure_noise and inpainting_unet):
        known = encode_image(pipe, init, generator, tiled).expand(n, -1, -1, -1)
    noise = sampling.draw_noise((n, channels, h, w), pipe.dtype, dev, generator)
    x = noise * schedule.init_noise_sigma if pure_noise else sampling.add_noise(schedule, known, noise)
    if inpaint and inpainting_unet:
        masked = encode_image(pipe, inpaint.masked_image(), generator, tiled).expand(n, -1, -1, -1)
        inpaint = inpaint.at_latents(x, None, noise, masked, cfg=guidance is not None)
    elif inpaint:  # Diffusers encodes the masked image here too, unused by a 4-channel UNet: keep its random draw
        sampling.draw_noise((1, channels, h, w), pipe.vae_dtype, dev, generator)
        inpaint = inpaint.at_latents(x, known, noise, None, cfg=guidance is not None)

    # 3. The sampling loop (the fast path's captured loop where speed_up() installed one and no feature joins it:
    # prompt editing, inpainting, ControlNets, callbacks and the samplers with histories take the eager loop).
    fast = pipe.fast_loop is not None and not sampling.SAMPLERS[schedule.sampler].eager_only
    if fast and len(contexts) == 1 and not inpaint and callback is None and not controls:
        x = pipe.fast_loop(pipe, schedule, x, contexts[0][1], guidance, s.eta, generator, progress)
    else:
        x = sample(pipe, schedule, x, contexts, guidance, generator, s.eta, inpaint, callback, progress, controls)
    check_finite(x, "denoising loop (UNet and sampler)")

    # 5. The hires fix, between the loop and the decode (section 5): upscale, then image-to-image at the larger size.
    if s.hires_scale > 1:
        if len(contexts) > 1:  # prompt editing switches at the second pass's own steps (A1111's hires conds)
            hires_s = replace(s, steps=s.hires_steps or s.steps)
            contexts = conditioning(pipe, prompts, negatives, hires_s, guidance is not None, prompt_syntax)
        x, tiled = hires_fix(pipe, x, s, contexts, guidance, generator, tiled, callback, progress, controls_at)
        check_finite(x, "hires fix's second pass")
    if output_type == "latent":
        return x

    # 4. Latent -> pixels, one image at a time: the VAE's activations at full size are the largest of the run.
    if dev.type == "cpu":  # the UNet's weights out of RSS, its freed activations and packed weights back to the OS
        release_pages(pipe.unet)
        for control in controls.controls if controls else ():
            release_pages(control.net)
        trim_heap()
    images = torch.cat([decode(pipe, x[i : i + 1], tiled) for i in range(n)])
    if dev.type == "cpu":
        trim_heap()  # the decode's too: its buffers, from the heap (tune_malloc), would fragment the next run's
    return to_output(inpaint.paste_back(images) if inpaint else images, output_type)


def model_settings(pipe: Pipeline, settings: dict, img2img: bool, inpaint: bool) -> Settings:
    """generate()'s keyword settings, ready for this model (Settings.ready: checked, defaults, a random seed)."""
    s = Settings(**settings).ready(img2img, inpaint, pipe.inpainting, pipe.vae.downsample_factor,
                                   pipe.text_encoder.config.num_hidden_layers)  # fmt: skip
    if settings.get("seed") == -1:
        warnings.warn(f"seed -1: using the random seed {s.seed}", stacklevel=4)
    return s


def main() -> int:
    from cli.main import main as command_line  # the command line is a client of generate(), in cli/

    return command_line()


if __name__ == "__main__":
    raise SystemExit(main())
