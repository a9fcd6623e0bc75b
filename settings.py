"""How to sample: the settings of one generation, each with its default and its `--help` text, checked in one place.

`Settings` is the single source of both generate()'s keyword arguments and the command line's options (cli/main.py
builds one option per field). `Settings.ready()` is the one validation: the CLI calls it before loading a model
(against SD 1.5's shapes, so a typo costs nothing), generate() against the loaded model's.
"""

from __future__ import annotations

import math
import numbers
import operator
import secrets
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
from PIL import Image

import hires
import scheduler as sampling
from models.clip import CLIPTextConfig
from tokenizer.prompt_syntax import LORA_TAG

# SD 1.5 was trained on 1000 timesteps; "leading" spacing with steps_offset 1 would ask for t = 1000 at 1000 steps.
MAX_STEPS = 999
MAX_SIZE = 4096  # pixels per side
MAX_IMAGES = 64
MAX_SEED = 2**32 - 1  # seeds are taken modulo 2**32 by the generator: larger ones would repeat images
# SD 1.5's shapes, for checking settings before a model is loaded (generate() checks against the loaded model).
SD15_VAE_FACTOR = 8  # pixels per latent: the VAE halves the size at 3 of its 4 levels
SD15_CLIP_LAYERS = CLIPTextConfig.num_hidden_layers
DEFAULT_SIZE = 512  # pixels per side without an init image (SD 1.5's training size)
# How an init image meets a --height/--width of another shape: A1111's img2img resize modes (images.resize_image).
RESIZE_MODES = ("just-resize", "crop-and-resize", "resize-and-fill")


class UserError(ValueError):
    """Bad input from the user: reported as one line and exit code 2, never as a traceback."""


class NonFiniteError(RuntimeError):
    """A stage produced NaN or inf (broken weights, an fp16 overflow): nothing is written, exit code 1."""


def setting(default: object, help: str, cli_type: type | None = None):
    """A Settings field: its default, and its `--help` text (the CLI builds one option per field)."""
    return field(default=default, metadata={"help": help, "type": cli_type or type(default)})


def as_type(name: str, value: object, kind: type) -> object:
    """`value` as an int, float, bool or str, or a TypeError naming the argument. Integers go through
    operator.index, so numpy integers pass and 64.0, "10" or True do not."""
    try:
        if isinstance(value, bool | np.bool_):
            if kind is bool:
                return bool(value)
        elif kind is int:
            return operator.index(value)
        elif kind is float and isinstance(value, numbers.Real):
            return float(value)
        elif kind is str and isinstance(value, str):
            return value
    except TypeError:
        pass
    raise TypeError(f"{name} must be {kind.__name__}, got {type(value).__name__} {value!r:.40}")


@dataclass(frozen=True)
class Settings:
    """How to sample: the keyword arguments of generate() and the options of the CLI, with one default each."""

    scheduler: str = setting("euler", f"sampler: one of {', '.join(sampling.SAMPLERS)}, or A1111's name with its "
                             "schedule type ('DPM++ 2M Karras', 'Euler a')")  # fmt: skip
    karras: bool = setting(False, "use the Karras et al. 2022 noise levels (rho 7): --schedule karras")
    schedule: str = setting("default", f"schedule type (A1111's): {', '.join(sampling.SCHEDULES)}; default: the "
                            "sampler's own (Diffusers'); which sampler takes which: README")  # fmt: skip
    steps: int = setting(30, "number of denoising steps")
    guidance_scale: float = setting(7.5, "classifier-free guidance scale; <= 1 disables")
    height: int | None = setting(None, f"image height in pixels (multiple of 8); default {DEFAULT_SIZE}, or the init "
                                 "image's (given, the init image is resized to it: --resize-mode)", int)  # fmt: skip
    width: int | None = setting(None, f"image width in pixels (multiple of 8); default {DEFAULT_SIZE}, or the init "
                                "image's (given, the init image is resized to it: --resize-mode)", int)  # fmt: skip
    seed: int = setting(0, "random seed, 0 to 2**32-1, or -1 for a random one; generate()'s default 0 keeps scripts "
                        "reproducible (the CLI's default is -1)")  # fmt: skip
    num_images: int = setting(1, "images to generate for each prompt")
    clip_skip: int | None = setting(None, "use the CLIP layer this many before the last, Diffusers' numbering (1 = "
                                    "A1111's clip skip 2; the CLI's --clip-skip takes A1111's)", int)  # fmt: skip
    strength: float | None = setting(None, "image-to-image: how much of the init image to redraw (default 0.8; "
                                     "1 when inpainting, as Diffusers)", float)  # fmt: skip
    eta: float = setting(0.0, "DDIM eta (0: deterministic; ddim only)")
    mask_blur: int = setting(0, "inpainting: Gaussian blur radius of the mask in pixels (A1111's mask blur)")
    mask_keep_pixels: bool = setting(False, "inpainting: paste the original pixels back outside the mask")
    vae_tiling: bool = setting(False, "VAE in overlapping tiles (Diffusers' enable_tiling): large images in bounded "
                               "memory; switched on by itself when an untiled pass would not fit")  # fmt: skip
    resize_mode: str = setting("just-resize", "an init image of another size than --height/--width, as A1111: "
                               "just-resize (stretch), crop-and-resize (cover, cut the overflow at the centre), "
                               "resize-and-fill (fit, stretch the edges into the empty bands)")  # fmt: skip
    hires_scale: float = setting(1.0, "hires fix (A1111's): generate at height x width, upscale by this factor, then "
                                 "redraw at the larger size (image-to-image); 1 = no second pass")  # fmt: skip
    hires_upscaler: str = setting("latent", "hires fix upscaler: latent (bilinear), latent-antialiased, "
                                  "latent-bicubic, latent-bicubic-antialiased, latent-nearest, latent-nearest-exact, "
                                  "lanczos, nearest (or A1111's names: 'Latent (bicubic)', 'Lanczos'...)")  # fmt: skip
    hires_steps: int = setting(0, "hires fix: steps of the second pass (0: as many as --steps)")
    hires_denoise: float = setting(0.7, "hires fix: denoising strength of the second pass, in (0, 1]")

    def __post_init__(self):  # types first, so that check() compares numbers (numpy integers become ints)
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None or f.default is not None:
                object.__setattr__(self, f.name, as_type(f.name, value, f.metadata["type"]))

    def ready(self, img2img: bool, inpaint: bool, inpainting_unet: bool = False, factor: int = SD15_VAE_FACTOR,
              clip_layers: int = SD15_CLIP_LAYERS) -> Settings:  # fmt: skip
        """The settings a run uses: every one checked (each failure a one-line UserError), the strength's default
        filled in (Diffusers': 0.8 for image-to-image, 1 for inpainting), the size's (DEFAULT_SIZE; an init image's
        own is generate()'s to read) and seed -1 replaced by a random seed. `factor` (pixels per latent) and
        `clip_layers` are the model's; the defaults are SD 1.5's."""
        if inpaint and not img2img:
            raise UserError("a mask needs an init image: --mask-image marks the part of --init-image to repaint")
        if inpainting_unet and not inpaint:
            raise UserError(
                "this is an inpainting model (9 UNet input channels): give it --init-image and --mask-image"
            )
        s = self if self.strength is not None else replace(self, strength=1.0 if inpaint else 0.8)
        if not img2img:  # an init image gives the size not given (generate, images.target_size)
            s = replace(s, **{k: DEFAULT_SIZE for k in ("height", "width") if getattr(s, k) is None})
        if (upscaler := hires.upscaler_name(s.hires_upscaler)) is None:
            raise UserError(
                f"unknown hires upscaler {s.hires_upscaler!r}; choose one of {', '.join(hires.A1111_NAMES)}"
            )
        s = replace(s, hires_upscaler=upscaler)  # A1111's name ("Latent (bicubic)") -> ours
        s = s.with_sampler_names()
        s.check(img2img, factor, clip_layers)
        # a random seed leaves room for seed + i of every image (the CLI gives image i of a batch its own seed)
        return s if s.seed != -1 else replace(s, seed=secrets.randbelow(MAX_SEED + 2 - s.num_images))

    def with_sampler_names(self) -> Settings:
        """The scheduler as our name and the schedule it runs: A1111's names resolved ("DPM++ 2M Karras" is dpmpp_2m
        with schedule karras), --karras as schedule karras (and karras set exactly when the schedule is karras). Two
        different schedules asked for at once are a UserError. Registered samplers count as they are at this call."""
        try:
            scheduler, implied = sampling.find_sampler(self.scheduler)
        except ValueError as e:
            raise UserError(str(e)) from None
        schedule = sampling.find_schedule(self.schedule) or self.schedule  # A1111's labels too ("Karras")
        asked = {implied, "karras" if self.karras else None, schedule if schedule != "default" else None}
        asked.discard(None)
        if len(asked) > 1:
            raise UserError(f"--scheduler {self.scheduler!r}, --schedule {self.schedule} and --karras ask for "
                            f"different schedules ({', '.join(sorted(asked))}); give one")  # fmt: skip
        schedule = asked.pop() if asked else "default"
        return replace(self, scheduler=scheduler, schedule=schedule, karras=schedule == "karras")

    def check(self, img2img: bool, factor: int, clip_layers: int) -> None:
        sampler = sampling.SAMPLERS.get(self.scheduler)
        if sampler is None:
            raise UserError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(sampling.SAMPLERS)}")
        if not 1 <= self.steps <= MAX_STEPS:
            raise UserError(f"steps must be between 1 and {MAX_STEPS}, got {self.steps}")
        if problem := sampling.schedule_problem(self.scheduler, "karras" if self.karras else self.schedule, self.steps):
            raise UserError(problem)
        for name in ("guidance_scale", "strength", "eta"):
            if getattr(self, name) is not None and not math.isfinite(getattr(self, name)):
                raise UserError(f"{name.replace('_', ' ')} must be a finite number, got {getattr(self, name)}")
        if self.guidance_scale < 0:
            raise UserError(f"guidance scale must be >= 0 (1 disables guidance), got {self.guidance_scale}")
        for name, size in (("height", self.height), ("width", self.width)):
            if size is not None and (size % factor or not factor <= size <= MAX_SIZE):
                raise UserError(f"{name} must be a multiple of {factor} between {factor} and {MAX_SIZE}, got {size}")
        if self.resize_mode not in RESIZE_MODES:
            raise UserError(f"unknown resize mode {self.resize_mode!r}; choose one of {', '.join(RESIZE_MODES)}")
        if not -1 <= self.seed <= MAX_SEED:
            raise UserError(f"seed must be between 0 and {MAX_SEED} (or -1 for a random one), got {self.seed}")
        if not 1 <= self.num_images <= MAX_IMAGES:
            raise UserError(f"num_images must be between 1 and {MAX_IMAGES}, got {self.num_images}")
        if not 0 < self.strength <= 1:
            raise UserError(f"strength must be in (0, 1], got {self.strength}")
        if self.mask_blur < 0:
            raise UserError(f"mask blur must be >= 0 pixels, got {self.mask_blur}")
        if self.mask_blur > MAX_SIZE:  # wider than any image: PIL would overflow
            raise UserError(f"mask blur must be at most {MAX_SIZE} pixels, got {self.mask_blur}")
        if img2img and int(self.steps * self.strength) < 1:
            raise UserError(
                f"steps x strength = {self.steps * self.strength:g} < 1 leaves no step to run; raise either"
            )
        if self.clip_skip is not None and not 0 <= self.clip_skip < clip_layers:
            raise UserError(
                f"clip skip must be between 0 and {clip_layers - 1} for this text encoder, got {self.clip_skip}"
            )
        self.check_hires(img2img, factor)
        if not 0 <= self.eta <= 1:
            raise UserError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise), got {self.eta}")
        if self.eta and not sampler.eta:
            uses = [name for name, s in sampling.SAMPLERS.items() if s.eta]
            raise UserError(f"eta is used by {', '.join(uses)} only, not {self.scheduler}; leave it at 0")

    def check_hires(self, img2img: bool, factor: int) -> None:
        """The hires fix's settings; with hires_scale 1 (no second pass) the others are not used."""
        if not math.isfinite(self.hires_scale) or not 1 <= self.hires_scale <= hires.MAX_SCALE:
            raise UserError(
                f"hires scale must be between 1 (no hires fix) and {hires.MAX_SCALE:g}, got {self.hires_scale}"
            )
        if self.hires_scale == 1:
            return
        if img2img:
            raise UserError("the hires fix is a second pass after text-to-image; with --init-image, leave "
                            "--hires-scale at 1 (give a larger --init-image instead)")  # fmt: skip
        if not math.isfinite(self.hires_denoise) or not 0 < self.hires_denoise <= 1:
            raise UserError(f"hires denoise must be in (0, 1], got {self.hires_denoise}")
        if not 0 <= self.hires_steps <= MAX_STEPS:
            raise UserError(f"hires steps must be between 0 (as --steps) and {MAX_STEPS}, got {self.hires_steps}")
        total, run = hires.img2img_steps(self.steps, self.hires_steps, self.hires_denoise)
        if total > MAX_STEPS:
            raise UserError(f"the hires pass's schedule would have {total} steps ({run} / denoise "
                            f"{self.hires_denoise:g}), over {MAX_STEPS}; raise --hires-denoise or lower the "
                            "steps")  # fmt: skip
        height, width = hires.target_size(self.height, self.width, self.hires_scale, factor)
        if max(height, width) > MAX_SIZE:
            raise UserError(f"the hires fix would make {width}x{height}, larger than {MAX_SIZE} pixels a side; lower "
                            "--hires-scale")  # fmt: skip
        if (height, width) == (self.height, self.width):
            raise UserError(f"hires scale {self.hires_scale:g} leaves {self.width}x{self.height} as it is; raise it")


# ----------------------------------------------------------------------------- generate()'s other arguments

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_inputs(prompt: object, negative_prompt: object, init_image: object, mask_image: object, output_type: str,
                 prompt_syntax: str) -> tuple[list[str], list[str]]:  # fmt: skip
    """generate()'s arguments other than the settings, checked; returns the prompts and one negative prompt each, as
    lists of strings. <lora:...> tags are the CLI's to apply."""
    for name, image in (("init_image", init_image), ("mask_image", mask_image)):
        if image is not None and not isinstance(image, Image.Image | str | Path):
            raise TypeError(f"{name} must be a PIL image or a file path, got {type(image).__name__}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    if prompt_syntax not in ("a1111", "plain"):
        raise ValueError(f"prompt_syntax must be 'a1111' or 'plain', got {prompt_syntax!r}")
    out = []
    for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not items or not all(isinstance(p, str) for p in items):
            raise TypeError(f"{name} must be a string or a non-empty list of strings, got {value!r:.60}")
        out.append(list(items))
    prompts, negatives = out[0], out[1] * len(out[0]) if isinstance(negative_prompt, str) else out[1]
    if len(negatives) != len(prompts):
        raise UserError(f"got {len(prompts)} prompts and {len(negatives)} negative prompts; give one, or one each")
    if any(LORA_TAG.search(p) for p in prompts):
        raise UserError("generate() does not read <lora:NAME:WEIGHT> tags: merge the file with models.lora.apply_lora"
                        " and take the tag out (tokenizer.prompt_syntax.lora_tags), or use the CLI")  # fmt: skip
    return prompts, negatives
