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

The file reads top to bottom: the sampling settings, loading, the algorithm (encode, noise, loop, decode), the
PNG metadata, and the command line.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import numbers
import operator
import os
import re
import secrets
import shlex
import stat
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, PngImagePlugin
from tqdm import tqdm

import scheduler as sampling
from models.clip import CLIPTextConfig, CLIPTextModel
from models.embeddings import load_embedding  # noqa: F401 (public API: textual-inversion embeddings)
from models.loading import DEFAULT_MODEL, WeightsError, load_model, release_pages
from models.lora import apply_lora, remove_loras  # noqa: F401 (public API: LoRA files merged into the weights)
from models.unet import UNet
from models.vae import AutoencoderKL, sample_latent
from tokenizer import CLIPTokenizer
from tokenizer.prompt_syntax import chunk_prompt, parse_prompt_attention, prompt_schedules

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# SD 1.5 was trained on 1000 timesteps; "leading" spacing with steps_offset 1 would ask for t = 1000 at 1000 steps.
MAX_STEPS = 999
MAX_SIZE = 4096  # pixels per side
MAX_IMAGES = 64
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_SEED = 2**32 - 1  # seeds are taken modulo 2**32 by the generator: larger ones would repeat images
# SD 1.5's shapes, for checking settings before a model is loaded (generate() checks against the loaded model).
SD15_VAE_FACTOR = 8  # pixels per latent: the VAE halves the size at 3 of its 4 levels
SD15_CLIP_LAYERS = CLIPTextConfig.num_hidden_layers


class UserError(ValueError):
    """Bad input from the user: reported as one line and exit code 2, never as a traceback."""


class NonFiniteError(RuntimeError):
    """A stage produced NaN or inf (broken weights, an fp16 overflow): nothing is written, exit code 1."""


# ----------------------------------------------------------------------------- the sampling settings


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

    scheduler: str = setting("euler", f"sampler: one of {', '.join(sampling.SAMPLERS)}")
    karras: bool = setting(False, "use the Karras et al. 2022 noise levels (rho 7)")
    steps: int = setting(30, "number of denoising steps")
    guidance_scale: float = setting(7.5, "classifier-free guidance scale; <= 1 disables")
    height: int = setting(512, "image height in pixels (multiple of 8)")
    width: int = setting(512, "image width in pixels (multiple of 8)")
    seed: int = setting(0, "random seed, 0 to 2**32-1 (-1: a random one, printed and recorded in the PNG)")
    num_images: int = setting(1, "images to generate for each prompt")
    clip_skip: int | None = setting(None, "use the CLIP layer this many before the last (1 = A1111 clip skip 2)", int)
    strength: float | None = setting(None, "image-to-image: how much of the init image to redraw (default 0.8; "
                                     "1 when inpainting, as Diffusers)", float)  # fmt: skip
    eta: float = setting(0.0, "DDIM eta (0: deterministic; ddim only)")
    mask_blur: int = setting(0, "inpainting: Gaussian blur radius of the mask in pixels (A1111's mask blur)")
    mask_keep_pixels: bool = setting(False, "inpainting: paste the original pixels back outside the mask")
    vae_tiling: bool = setting(False, "VAE in overlapping tiles (Diffusers' enable_tiling): large images in bounded "
                               "memory; switched on by itself when an untiled pass would not fit")  # fmt: skip

    def __post_init__(self):  # types first, so that check() compares numbers (numpy integers become ints)
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None or f.default is not None:
                object.__setattr__(self, f.name, as_type(f.name, value, f.metadata["type"]))

    def with_defaults(self, img2img: bool, inpaint: bool) -> Settings:
        """The strength left unset: Diffusers' defaults, 0.8 for image-to-image and 1 for inpainting."""
        return self if self.strength is not None else replace(self, strength=1.0 if inpaint else 0.8)

    def check(self, img2img: bool = False, factor: int = SD15_VAE_FACTOR, clip_layers: int = SD15_CLIP_LAYERS):
        """Every setting is checked before any work, each failure a one-line UserError. `factor` (pixels per
        latent) and `clip_layers` are the loaded model's; the defaults are SD 1.5's."""
        sampler = sampling.SAMPLERS.get(self.scheduler)
        if sampler is None:
            raise UserError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(sampling.SAMPLERS)}")
        if self.karras and not sampler.karras:
            karras = [name for name, s in sampling.SAMPLERS.items() if s.karras]
            raise UserError(f"--karras works with {', '.join(karras)}, not {self.scheduler}")
        if not 1 <= self.steps <= MAX_STEPS:
            raise UserError(f"steps must be between 1 and {MAX_STEPS}, got {self.steps}")
        for name in ("guidance_scale", "strength", "eta"):
            if getattr(self, name) is not None and not math.isfinite(getattr(self, name)):
                raise UserError(f"{name.replace('_', ' ')} must be a finite number, got {getattr(self, name)}")
        if self.guidance_scale < 0:
            raise UserError(f"guidance scale must be >= 0 (1 disables guidance), got {self.guidance_scale}")
        for name, size in (("height", self.height), ("width", self.width)):
            if size % factor or not factor <= size <= MAX_SIZE:
                raise UserError(f"{name} must be a multiple of {factor} between {factor} and {MAX_SIZE}, got {size}")
        if not -1 <= self.seed <= MAX_SEED:
            raise UserError(f"seed must be between 0 and {MAX_SEED} (or -1 for a random one), got {self.seed}")
        if not 1 <= self.num_images <= MAX_IMAGES:
            raise UserError(f"num_images must be between 1 and {MAX_IMAGES}, got {self.num_images}")
        if self.strength is not None and not 0 < self.strength <= 1:
            raise UserError(f"strength must be in (0, 1], got {self.strength}")
        if self.mask_blur < 0:
            raise UserError(f"mask blur must be >= 0 pixels, got {self.mask_blur}")
        if img2img and self.strength is not None and int(self.steps * self.strength) < 1:
            raise UserError(
                f"steps x strength = {self.steps * self.strength:g} < 1 leaves no step to run; raise either"
            )
        if self.clip_skip is not None and not 0 <= self.clip_skip < clip_layers:
            raise UserError(
                f"clip skip must be between 0 and {clip_layers - 1} for this text encoder, got {self.clip_skip}"
            )
        if not 0 <= self.eta <= 1:
            raise UserError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise), got {self.eta}")
        if self.eta and not sampler.eta:
            uses = [name for name, s in sampling.SAMPLERS.items() if s.eta]
            raise UserError(f"eta is used by {', '.join(uses)} only, not {self.scheduler}; leave it at 0")


# ----------------------------------------------------------------------------- loading


@dataclass
class Pipeline:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet
    vae: AutoencoderKL
    scheduler_config: sampling.SchedulerConfig
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype  # the pipeline's dtype, or float32 once a float16 decode has overflowed (see decode)
    graph_loop: bool = False  # run the loop as graph_loop() does (speed_up): one CUDA graph replayed per UNet call
    graphs: dict = field(default_factory=dict, repr=False)  # graph_loop's captured loop: {key: (buffers, step, graph)}


def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_pipeline(
    model: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    config: str | None = None,
) -> Pipeline:
    """Load tokenizer, text encoder, UNet, VAE and the scheduler config from a Diffusers-layout folder, a hub repo
    id, or an original single-file checkpoint (`.safetensors`; SD 1.5 configs built in, or those of the
    Diffusers-layout folder `config`). `dtype` is a torch dtype or its name ("float16").

    dtype defaults to float16 on CUDA (half the memory, tensor cores) and float32 elsewhere (CPUs have no fast
    fp16 matmul). bfloat16 is allowed; on a CPU it is only worth it with AVX-512 (BF16/AMX): on an AVX2-only
    CPU a bf16 convolution measured about 100x slower than fp32 (bench/README.md), so that case gets a warning,
    and so does float16 on a CPU (about 27x slower than float32).
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if dtype is not None and dtype not in DTYPES.values():
        raise TypeError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    dev = pick_device(str(device) if device is not None else None)
    dtype = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    if dev.type == "cpu" and dtype == torch.bfloat16 and "AVX512" not in torch.backends.cpu.get_cpu_capability():
        warnings.warn("bfloat16 on a CPU without AVX-512 is very slow; use --dtype float32", stacklevel=2)
    if dev.type == "cpu" and dtype == torch.float16:
        warnings.warn("float16 on a CPU is about 27x slower than float32; use --dtype float32", stacklevel=2)
    m = load_model(model, dtype, dev, config)
    return Pipeline(m.tokenizer, m.text_encoder, m.unet, m.vae, m.scheduler_config, dev, dtype, vae_dtype=dtype)


def speed_up(pipe: Pipeline, compile: bool = True, cuda_graph: bool | None = None, channels_last: bool = False,
             mode: str = "default", backend: str = "inductor") -> Pipeline:  # fmt: skip
    """The fast path, switched on here and not written into the models; without it (the default) generate() runs
    eager PyTorch, the reference the parity tests hold to Diffusers. Images stay within 1e-4 of eager in float32
    (tests/test_compile.py). One line per switch, with its measured gain (on the CPU: the tiny test UNet, 64x64,
    CFG batch 2, one thread; on CUDA: bench/gpu.sh):
    - compile: torch.compile of the UNet in place (nn.Module.compile keeps the parameter names, so LoRA merging and
      the checks that read pipe.unet still work), dynamic=False: one static graph per shape, and shapes change only
      between calls. mode "default": "max-autotune-no-cudagraphs" autotunes every GEMM and convolution, minutes more
      per shape, and "reduce-overhead" captures CUDA graphs of its own, which our captured loop already is.
      The VAE decoder stays eager: compiled, the tiny one decoded no faster on the CPU (0.032 s) after 45 s of
      compiling, and it runs once per image.
    - cuda_graph (default: on CUDA): the denoising loop as graph_loop() runs it, captured once per shape and
      replayed per UNet call, so the host neither launches kernels nor waits between calls. True on a CPU runs the
      same graph-ready loop uncaptured (how the tests check it equals the eager loop).
    - channels_last: NHWC weights for the UNet's convolutions; off until the GPU bench shows it pays."""
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)  # gain: not yet measured (bench/gpu.sh)
    if compile:
        pipe.unet.compile(mode=mode, dynamic=False, backend=backend)  # CPU, tiny: -24% per call, 100 s to compile
    pipe.graph_loop = pipe.device.type == "cuda" if cuda_graph is None else cuda_graph  # GPU gain: bench/gpu.sh
    return pipe


# ----------------------------------------------------------------------------- the algorithm


def encode_prompts(pipe: Pipeline, prompts: list[str], clip_skip: int | None) -> torch.Tensor:
    """Prompts as plain text (Diffusers' reading: brackets are text, cut at CLIP's 77 tokens) -> context (B, 77, D).
    Clip skip applies to every prompt, negative ones included (as A1111)."""
    for p in prompts:
        if dropped := pipe.tokenizer.truncated(p):
            warnings.warn(f"the prompt is longer than CLIP's 77 tokens; dropped: {dropped!r}", stacklevel=3)
    ids = pipe.tokenizer(prompts).to(pipe.device)
    return pipe.text_encoder(ids, clip_skip=clip_skip)


def encode_a1111(pipe: Pipeline, texts: list[str], clip_skip: int | None) -> list[torch.Tensor]:
    """Prompts as A1111 reads them, any length -> one context (1, 77 k, D) each. parse_prompt_attention finds the
    (emphasis:1.2) weights and BREAKs, chunk_prompt cuts the tokens into k CLIP windows of BOS + 75 + EOS (a full
    window hands the words after its last comma to the next one; an embedding's vectors stay in one window); all
    windows go through the text encoder in one batch; then A1111's "Original" emphasis
    (sd_emphasis.EmphasisOriginal): each token's vector times its weight, the window rescaled to its mean before.
    Plain text of <= 75 tokens is exactly Diffusers' conditioning."""
    tok = pipe.tokenizer
    comma = tok.encode(",")[1]
    windows = [chunk_prompt(parse_prompt_attention(t), tok.encode, tok.BOS, tok.EOS, comma, tok.spans()) for t in texts]
    ids = torch.tensor([w[0] for ws in windows for w in ws], device=pipe.device)
    weights = torch.tensor([w[1] for ws in windows for w in ws], device=pipe.device)
    z = pipe.text_encoder(ids, clip_skip=clip_skip)  # (windows, 77, D)
    if (weights != 1).any():
        mean = z.mean(dim=(1, 2), keepdim=True)
        z = z * weights[:, :, None].to(z.dtype)
        z = z * (mean / z.mean(dim=(1, 2), keepdim=True))
    return [c.reshape(1, -1, z.shape[-1]) for c in z.split([len(ws) for ws in windows])]


def encode_prompt(pipe: Pipeline, text: str, clip_skip: int | None = None) -> torch.Tensor:
    """One prompt as A1111 reads it -> its context (1, 77 k, D), k CLIP windows (see encode_a1111)."""
    return encode_a1111(pipe, [text], clip_skip)[0]


def conditioning(pipe: Pipeline, prompts: list[str], negatives: list[str], s: Settings, use_cfg: bool,
                 syntax: str) -> list[tuple[int, torch.Tensor]]:  # fmt: skip
    """The UNet's context for every step, as [(last step it is used, context (2B or B, L, D))], computed before the
    loop. Plain syntax: one entry. A1111 syntax: prompt editing [from:to:when] and [a|b] alternation switch the text
    at some steps (prompt_schedules); at each switch the prompts and negative prompts, of any number of windows,
    are padded to the same length with the empty prompt's encoding (A1111's "pad prompt/negative prompt to be the
    same length"), so the UNet still runs one batched CFG call."""
    groups = [negatives, prompts] if use_cfg else [prompts]  # the unconditional half first
    if syntax == "plain":
        context = torch.cat([encode_prompts(pipe, group, s.clip_skip) for group in groups])
        return [(s.steps, context.repeat_interleave(s.num_images, dim=0))]
    try:  # A1111 raises on a few malformed weights too: (x:1.2.3), [a:1e999]
        schedules = [prompt_schedules(group, s.steps) for group in groups]
        [parse_prompt_attention(t) for group in schedules for sched in group for _, t in sched]
    except (ValueError, OverflowError) as e:
        raise UserError(f"cannot read the prompt's A1111 syntax ({e}); fix it, or pass --plain-prompt") from None
    texts = [list(dict.fromkeys(t for sched in group for _, t in sched)) for group in schedules]
    encoded = [dict(zip(t, encode_a1111(pipe, t, s.clip_skip), strict=True)) for t in texts]
    empty = encoded[0][""] if "" in encoded[0] else encode_a1111(pipe, [""], s.clip_skip)[0]
    out = []
    for end in sorted({e for group in schedules for sched in group for e, _ in sched}):
        rows = [enc[next(t for e, t in sched if e >= end)] for group, enc in zip(schedules, encoded, strict=True)
                for sched in group]  # fmt: skip
        length = max(r.shape[1] for r in rows)
        rows = [torch.cat([r, *[empty] * ((length - r.shape[1]) // empty.shape[1])], dim=1) for r in rows]
        out.append((end, torch.cat(rows).repeat_interleave(s.num_images, dim=0)))
    return out


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Ho & Salimans 2022 (arXiv:2207.12598) Eq. 6, (1 + w) eps_c - w eps_u, written with s = 1 + w as Diffusers
    does: eps_u + s * (eps_c - eps_u). s = 1 is the conditional model alone."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def open_image(image: Image.Image | str | Path, what: str = "init image") -> Image.Image:
    """A PIL image, or an image file read lazily: its size is checked before its pixels are decoded (a huge or
    decompression-bomb file is refused, not allocated). 8 bits per channel, in the image's own mode."""
    if isinstance(image, Image.Image):
        check_image_size(image, what)
        return to_8bit(image)
    try:
        with Image.open(image) as file:
            check_image_size(file, what)
            file.load()
            return to_8bit(file)
    except UserError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
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


def image_to_tensor(image: Image.Image | str | Path, multiple: int) -> torch.Tensor:
    """An init image -> (1, 3, H, W) in [-1, 1], its size cut down to a multiple of the VAE factor (Lanczos
    resize), as Diffusers' VaeImageProcessor does."""
    image = open_image(image).convert("RGB")
    w, h = (s - s % multiple for s in image.size)
    if w == 0 or h == 0:
        raise UserError(f"init image is {image.size[0]}x{image.size[1]}: smaller than {multiple} pixels")
    if (w, h) != image.size:
        image = image.resize((w, h), resample=Image.LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return 2.0 * x - 1.0


def mask_to_tensor(mask: Image.Image | str | Path, size: tuple[int, int], blur: int) -> tuple[torch.Tensor, ...]:
    """An inpainting mask (white = repaint, black = keep; any mode) at the image's size `size` = (W, H), as
    Diffusers' mask processor makes it: optional Gaussian blur (`VaeImageProcessor.blur`), Lanczos resize in the
    mask's own mode, then greyscale, then binarised at 0.5. Returns the binary (1, 1, H, W) mask and the soft one
    (blurred, not binarised) that --mask-keep-pixels blends with."""
    mask = open_image(mask, "mask image")
    if blur:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    mask = mask.resize(size, resample=Image.LANCZOS).convert("L")
    soft = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    return (soft >= 0.5).float(), soft


def texts(name: str, value: object) -> list[str]:
    """A prompt argument as a list of strings: one string, or a non-empty list of them."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items or not all(isinstance(p, str) for p in items):
        raise TypeError(f"{name} must be a string or a non-empty list of strings, got {value!r:.60}")
    return list(items)


def check_finite(x: torch.Tensor, stage: str) -> None:
    """One host sync per stage: a NaN/inf would otherwise become a black or noise image written with exit 0."""
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"the {stage} produced NaN or inf values (broken weights or an overflow); nothing written")


# ----------------------------------------------------------------------------- what a run will cost

MAX_STEP_SECONDS = 3600  # a longer UNet step cannot be interrupted (Ctrl-C waits for the kernel) nor, in practice, end


def unet_flops(cfg, h: int, w: int) -> float:
    """Floating-point operations of one UNet call on one (h, w) latent, roughly: the ResNets' 3x3 convs and, at
    the levels with attention, the transformers (projections and GEGLU feed-forward, and self-attention's
    Q K^T and A V, 4 T^2 C for T = h w tokens: the term that explodes at large sizes)."""
    n, total = cfg.layers_per_block, 0.0
    levels = len(cfg.block_out_channels)
    for i, (c, kind) in enumerate(zip(cfg.block_out_channels, cfg.down_block_types, strict=True)):
        t = (h >> i) * (w >> i)
        total += (2 * n + 1) * 2 * 18 * c * c * t  # n down + n+1 up ResNets, two 3x3 convs each
        if kind.startswith("CrossAttn"):
            total += (2 * n + 1) * (88 * c * c * t + 4 * t * t * c)
    c, t = cfg.block_out_channels[-1], (h >> levels - 1) * (w >> levels - 1)
    return total + 72 * c * c * t + 88 * c * c * t + 4 * t * t * c  # the mid block: 2 ResNets, 1 transformer


@functools.cache
def cpu_flops_per_second() -> float:
    """This CPU's speed on a UNet-sized 3x3 convolution, best of two (about 0.2 s, once per process)."""
    conv, x, times = torch.nn.Conv2d(320, 320, 3, padding=1), torch.randn(1, 320, 48, 48), []
    with torch.inference_mode():
        for _ in range(3):
            start = time.perf_counter()
            conv(x)
            times.append(time.perf_counter() - start)
    return 18 * 320 * 320 * 48 * 48 / max(min(times[1:]), 1e-6)


def available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # Linux: what can be allocated without swapping, page cache included
        meminfo = Path("/proc/meminfo").read_text()
        return int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) * 1024
    except (OSError, AttributeError):
        return None


def check_cost(pipe: Pipeline, s: Settings, batch: int, latent: tuple[int, int], calls: int) -> bool:
    """Refuse, before any work and with the estimate, a run that cannot fit in memory or cannot finish; warn
    about a long one. Memory: the largest working set of the UNet (the skip activations and the first level's
    feed-forward, 8 C per token) or of one image's VAE decode (about 8 tensors of the VAE's widest level at full
    size, or at tile size when tiled); attention needs O(T) memory with PyTorch's fused kernels. A VAE that would
    not fit untiled is tiled, with a warning. Time (CPU only): FLOPs / measured speed. Returns whether to tile."""
    (h, w), item = latent, torch.finfo(pipe.dtype).bits // 8
    cfg, vae, f = pipe.unet.config, pipe.vae.config, pipe.vae.downsample_factor
    skips = sum((cfg.layers_per_block + 1) * c * (h >> i) * (w >> i) for i, c in enumerate(cfg.block_out_channels))
    unet_bytes = batch * (skips + 12 * cfg.block_out_channels[0] * h * w) * item

    def vae_bytes(pixels: int) -> int:
        return 8 * vae.block_out_channels[0] * pixels * torch.finfo(pipe.vae_dtype).bits // 8

    free, tiled = available_bytes(pipe.device), s.vae_tiling and pipe.vae.needs_tiling(h * f, w * f)
    if free is not None and not tiled and vae_bytes(h * w * f * f) > free and pipe.vae.needs_tiling(h * f, w * f):
        gb = vae_bytes(h * w * f * f) / 2**30
        warnings.warn(f"an untiled VAE pass at {s.width}x{s.height} needs about {gb:.1f} GB, {free / 2**30:.1f} GB "
                      "is free: decoding in tiles (--vae-tiling)", stacklevel=3)  # fmt: skip
        tiled = True
    need = max(unet_bytes, vae_bytes(min(h * w * f * f, vae.sample_size**2) if tiled else h * w * f * f))
    if free is not None and need > free:
        raise UserError(f"{s.width}x{s.height} needs about {need / 2**30:.1f} GB of working memory, but only "
                        f"{free / 2**30:.1f} GB is free on {pipe.device}; use a smaller size")  # fmt: skip
    if pipe.device.type != "cpu":
        return tiled
    per_call = batch * unet_flops(cfg, h, w) / cpu_flops_per_second()
    if per_call > MAX_STEP_SECONDS:
        raise UserError(f"{s.width}x{s.height} would take about {per_call / 3600:.1f} h per step on this CPU "
                        f"(self-attention over {h * w} latent positions); use a smaller size")  # fmt: skip
    if per_call * calls > 600:
        minutes = per_call * calls / 60
        warnings.warn(
            f"{s.width}x{s.height} may take up to {minutes:.0f} min on this CPU (a rough estimate)", stacklevel=3
        )
    return tiled


@dataclass(frozen=True)
class StepInfo:
    """What generate()'s `callback` gets after each UNet call: at the points Diffusers' callback_on_step_end is
    called, once per timestep, so Heun's two calls per step come as two records."""

    i: int  # the UNet call, 0 .. calls - 1
    calls: int  # UNet calls of the run (steps, or 2 * steps - 1 for Heun; fewer for img2img)
    t: float  # the timestep fed to the UNet
    sigma: float  # the noise level of that call's input, sqrt((1 - abar) / abar) for every sampler
    latents: torch.Tensor  # x after the call's update, in the variable the sampler moves
    x0: torch.Tensor  # the sampler's prediction of the clean latent at this call (scheduler.predict_x0)


def graph_loop(pipe: Pipeline, schedule: sampling.Schedule, x: torch.Tensor, context: torch.Tensor, s: Settings,
               use_cfg: bool, generator: torch.Generator, progress: bool) -> torch.Tensor:  # fmt: skip
    """generate()'s sampling loop with every UNet call one function of device tensors (graph_loop_step): the
    latent, call index, context, schedule, sampler state and noise are buffers it reads and updates in place. On
    CUDA it is captured once as a CUDA graph and replayed per call, with no kernel launch, host read or host sync
    in the loop; one captured loop is kept (a new shape, setting or LoRA merge captures anew). Elsewhere the step
    runs as it is. All of the loop's ε are drawn first, in the eager loop's order from the same generator, and moved
    to the device once, so a seed gives the eager loop's image (tests/test_compile.py). Prompt editing, inpainting
    and callbacks take the eager loop."""
    draws = sampling.draws_noise(schedule, s.eta)
    noise = [sampling.draw_noise(x.shape, pipe.dtype, "cpu", generator) if d else torch.zeros(x.shape, dtype=pipe.dtype)
             for d in draws]  # fmt: skip
    states = {"heun": 2, "dpmpp_2m": 1}.get(s.scheduler, 0)  # Heun's x_i and d_i, DPM++'s previous x_0 prediction
    inputs = {"x": x, "i": torch.zeros(1, dtype=torch.long), "context": context,
              "noise": torch.stack(noise) if any(draws) else None,
              **{k: getattr(schedule, k) for k in ("timesteps", "sigmas", "alpha_bar", "alpha_bar_prev")},
              **{f"state{k}": torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32))
                 for k in range(states)}}  # fmt: skip
    inputs = {k: v for k, v in inputs.items() if v is not None}
    weights = tuple(p.data_ptr() for p in pipe.unet.parameters())  # a LoRA merge swaps the tensors a graph reads
    key = (*((k, v.shape, v.dtype) for k, v in inputs.items()), s.scheduler, s.guidance_scale, s.eta, use_cfg, weights)
    if key not in pipe.graphs:
        pipe.graphs.clear()  # each captured loop holds the memory of one UNet call's activations
        buffers = {k: v.to(x.device, copy=True) for k, v in inputs.items()}
        sched = replace(schedule, **{k: buffers.get(k) for k in ("timesteps", "sigmas", "alpha_bar", "alpha_bar_prev")})
        step = functools.partial(graph_loop_step, pipe, sched, buffers, s.guidance_scale if use_cfg else None, s.eta)
        pipe.graphs[key] = buffers, step, capture(step, buffers["i"]) if x.device.type == "cuda" else None
    buffers, step, graph = pipe.graphs[key]
    for k, v in inputs.items():
        buffers[k].copy_(v)  # before the loop: host-to-device copies and their syncs happen here, once
    for _ in tqdm(range(len(schedule.timesteps)), desc="denoising", disable=not progress):
        step() if graph is None else graph.replay()
    return buffers["x"].clone()


def graph_loop_step(pipe: Pipeline, sched: sampling.Schedule, b: dict[str, torch.Tensor], guidance: float | None,
                    eta: float) -> None:  # fmt: skip
    """One UNet call of graph_loop on its buffers b, as generate()'s eager loop does it: scale the input, the UNet
    on the CFG batch, guidance, the sampler step (scheduler.graph_step), then i += 1; all on the device."""
    i, x = b["i"], b["x"]
    x_in = sampling.scale_model_input(sched, i, x)
    eps = pipe.unet(torch.cat([x_in, x_in]) if guidance else x_in, sampling.at(sched.timesteps, i), b["context"])
    if guidance:
        eps = classifier_free_guidance(*eps.chunk(2), guidance)
    noise = sampling.at(b["noise"], i) if "noise" in b else None
    names = [k for k in b if k.startswith("state")]
    x_next, state = sampling.graph_step(sched, i, x, eps, tuple(b[k] for k in names), noise, eta)
    for buffer, value in zip([x, *(b[k] for k in names)], [x_next, *state], strict=True):
        buffer.copy_(value)
    i.add_(1)


def capture(step: Callable[[], None], i: torch.Tensor) -> torch.cuda.CUDAGraph:
    """`step` recorded as a CUDA graph, after two warm-up runs on a side stream where compilation, autotuning and
    cuBLAS/cuDNN workspace allocation happen, outside the capture (as torch.cuda.graph's documentation asks). The
    warm-up changes the buffers; graph_loop refills them before replaying."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
            i.zero_()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


@torch.inference_mode()
def generate(
    pipe: Pipeline,
    prompt: str | list[str],
    negative_prompt: str | list[str] = "",
    scheduler: str = Settings.scheduler,
    karras: bool = Settings.karras,
    steps: int = Settings.steps,
    guidance_scale: float = Settings.guidance_scale,
    height: int = Settings.height,
    width: int = Settings.width,
    seed: int = Settings.seed,
    num_images: int = Settings.num_images,
    clip_skip: int | None = Settings.clip_skip,
    init_image: Image.Image | str | Path | None = None,
    strength: float | None = Settings.strength,
    eta: float = Settings.eta,
    mask_image: Image.Image | str | Path | None = None,
    mask_blur: int = Settings.mask_blur,
    mask_keep_pixels: bool = Settings.mask_keep_pixels,
    vae_tiling: bool = Settings.vae_tiling,
    prompt_syntax: str = "a1111",
    output_type: str = "pil",
    progress: bool = True,
    callback: Callable[[StepInfo], None] | None = None,
) -> list[Image.Image] | np.ndarray | torch.Tensor:
    """Generate `num_images` images per prompt. Returns PIL images; with output_type="np" a float32 array
    (N, H, W, 3) in [0, 1]; "pt" the same as a float32 tensor (N, 3, H, W) on the CPU; "latent" the final latents
    (N, 4, H/8, W/8) before decoding, as Diffusers returns them.

    With `init_image`, image-to-image: the image (which sets the size) is encoded, noised to `strength` and
    denoised from there. With `mask_image` too, inpainting (Diffusers' StableDiffusionInpaintPipeline): only the
    white part of the mask is repainted, by a 9-channel inpainting UNet (which sees the mask and the masked
    image) or by any ordinary model (the kept part is reset to the original, noised to the current level, after
    every step). seed=-1 draws a random seed (and warns with it). `callback(StepInfo)` is called after every UNet
    call; without one the loop does no extra work."""
    prompts, negatives = texts("prompt", prompt), texts("negative_prompt", negative_prompt)
    negatives = negatives * len(prompts) if isinstance(negative_prompt, str) else negatives
    if len(negatives) != len(prompts):
        raise UserError(f"got {len(prompts)} prompts and {len(negatives)} negative prompts; give one, or one each")
    for name, image in (("init_image", init_image), ("mask_image", mask_image)):
        if image is not None and not isinstance(image, Image.Image | str | Path):
            raise TypeError(f"{name} must be a PIL image or a file path, got {type(image).__name__}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    if prompt_syntax not in ("a1111", "plain"):
        raise ValueError(f"prompt_syntax must be 'a1111' or 'plain', got {prompt_syntax!r}")
    s = Settings(scheduler=scheduler, karras=karras, steps=steps, guidance_scale=guidance_scale, height=height,
                 width=width, seed=seed, num_images=num_images, clip_skip=clip_skip, strength=strength, eta=eta,
                 mask_blur=mask_blur, mask_keep_pixels=mask_keep_pixels, vae_tiling=vae_tiling)  # fmt: skip
    inpaint, channels = mask_image is not None, pipe.vae.config.latent_channels
    inpainting_unet = pipe.unet.config.in_channels == 2 * channels + 1  # latents + mask + masked-image latents
    check_inpainting(init_image is not None, inpaint, inpainting_unet)
    s = s.with_defaults(init_image is not None, inpaint)
    factor = pipe.vae.downsample_factor
    s.check(init_image is not None, factor, clip_layers=pipe.text_encoder.config.num_hidden_layers)
    n = len(prompts) * s.num_images
    if init_image is not None:  # the image sets the size
        init_image = image_to_tensor(init_image, factor)
        s = replace(s, height=init_image.shape[2], width=init_image.shape[3])
    if inpaint:
        pixel_mask, soft_mask = mask_to_tensor(mask_image, (s.width, s.height), s.mask_blur)
        if not pixel_mask.any():
            warnings.warn("the mask is all black: nothing to repaint; returning the image as it is", stacklevel=3)
            return to_output(((init_image + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).repeat(n, 1, 1, 1), output_type)
    h, w = s.height // factor, s.width // factor
    strength_used = s.strength if init_image is not None else 1.0
    schedule = sampling.make_schedule(s.scheduler, s.steps, pipe.scheduler_config, s.karras, strength=strength_used)
    use_cfg = s.guidance_scale > 1.0  # at s <= 1 the unconditional pass is skipped, as in Diffusers
    tiled = check_cost(pipe, s, n * (2 if use_cfg else 1), (h, w), len(schedule.timesteps))
    if s.seed == -1:
        s = replace(s, seed=secrets.randbelow(MAX_SEED + 1))
        warnings.warn(f"seed -1: using the random seed {s.seed}", stacklevel=3)
    dev, dtype = pipe.device, pipe.dtype
    generator = torch.Generator().manual_seed(s.seed)  # on the CPU: the same noise, so the same image, on any device

    # 1. Text -> context for each step: (2B, L, D), the unconditional half first, each prompt's rows repeated
    # num_images times (p0, p0, p1, p1, ...), so that one UNet call serves both halves of CFG.
    contexts = conditioning(pipe, prompts, negatives, s, use_cfg, prompt_syntax)
    for _, context in contexts:
        check_finite(context, "text encoder")
    if dev.type == "cpu":
        release_pages(pipe.text_encoder)  # its memory-mapped weights out of RSS until the next run needs them

    # 2. The starting latent: pure noise, or the init image's latent noised to `strength` (the schedule's start).
    # The random draws come in Diffusers' order: image latent, noise, masked-image latent.
    pure_noise = init_image is None or (inpaint and s.strength == 1.0)
    image_latents = None
    if init_image is not None and not (pure_noise and inpainting_unet):  # an ordinary model keeps the original's
        image_latents = encode_image(pipe, init_image, generator, tiled).expand(n, -1, -1, -1)
    noise = sampling.draw_noise((n, channels, h, w), dtype, dev, generator)
    x = noise * schedule.init_noise_sigma if pure_noise else sampling.add_noise(schedule, image_latents, noise)
    if inpaint:
        mask = torch.nn.functional.interpolate(pixel_mask, size=(h, w)).to(dev, dtype).expand(n, -1, -1, -1)  # nearest
        masked = init_image * (pixel_mask < 0.5)  # the part to repaint grey (0)
        if inpainting_unet:
            masked_latents = encode_image(pipe, masked, generator, tiled).expand(n, -1, -1, -1)
            extra = torch.cat([mask, masked_latents], dim=1)  # the UNet's 5 extra input channels
            extra = torch.cat([extra, extra]) if use_cfg else extra
        else:  # Diffusers encodes the masked image here too, unused by a 4-channel UNet: keep its random draws
            sampling.draw_noise((1, channels, h, w), pipe.vae_dtype, dev, generator)

    # 3. The sampling loop: scale the input, one UNet call on the CFG batch, guidance, one sampler step.
    if pipe.graph_loop and len(contexts) == 1 and not inpaint and callback is None:  # the fast path (speed_up)
        x = graph_loop(pipe, schedule, x, contexts[0][1], s, use_cfg, generator, progress)
    else:  # eager, the reference; also for prompt editing, inpainting and callbacks
        state = None
        timesteps = schedule.timesteps.to(dev)  # once, not a host-to-device copy per step
        calls_per_step, first_step = sampling.SAMPLERS[s.scheduler].unet_calls, s.steps - int(s.steps * strength_used)
        for i, t in enumerate(tqdm(timesteps, desc="denoising", disable=not progress)):
            step = first_step + i // calls_per_step  # A1111 counts prompt-editing steps from 0
            context = next(c for end, c in contexts if step <= end)
            x_in = sampling.scale_model_input(schedule, i, x)
            x_in = torch.cat([x_in, x_in]) if use_cfg else x_in
            if inpaint and inpainting_unet:
                x_in = torch.cat([x_in, extra], dim=1)
            eps = pipe.unet(x_in, t, context)
            if use_cfg:
                eps = classifier_free_guidance(*eps.chunk(2), s.guidance_scale)
            x_in, (x, state) = x, sampling.step(schedule, i, x, eps, state, generator=generator, eta=s.eta)
            if inpaint and not inpainting_unet:  # keep the unmasked part: the original at the next call's noise level
                last = i + 1 == len(timesteps)
                known = image_latents if last else sampling.add_noise(schedule, image_latents, noise, i + 1)
                x = (1 - mask) * known + mask * x
            if callback is not None:
                x0 = sampling.predict_x0(schedule, i, x_in, eps)
                callback(StepInfo(i, len(timesteps), float(schedule.timesteps[i]), float(schedule.sigmas[i]), x, x0))
    check_finite(x, "denoising loop (UNet and sampler)")
    if output_type == "latent":
        return x

    # 4. Latent -> pixels, one image at a time: the VAE's activations at full size are the largest of the run.
    if dev.type == "cpu":  # the UNet's freed activations back to the OS and its weights out of RSS before the decode
        trim_heap()
        release_pages(pipe.unet)
    images = torch.cat([decode(pipe, x[i : i + 1], tiled) for i in range(n)])
    if inpaint and s.mask_keep_pixels:  # the original pixels outside the mask, blended through its soft edge
        alpha = soft_mask.permute(0, 2, 3, 1)
        images = alpha * images + (1 - alpha) * ((init_image + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    return to_output(images, output_type)


def check_inpainting(img2img: bool, inpaint: bool, inpainting_unet: bool) -> None:
    if inpaint and not img2img:
        raise UserError("a mask needs an init image: --mask-image marks the part of --init-image to repaint")
    if inpainting_unet and not inpaint:
        raise UserError("this is an inpainting model (9 UNet input channels): give it --init-image and --mask-image")


def encode_image(pipe: Pipeline, image: torch.Tensor, generator: torch.Generator, tiled: bool = False) -> torch.Tensor:
    """An image in [-1, 1] (1, 3, H, W) -> a latent drawn from the VAE encoder's posterior (one random draw),
    times the scaling factor, in the pipeline's dtype: what the UNet works on."""
    mean, logvar = pipe.vae.encode(image.to(pipe.device, pipe.vae_dtype), tiled=tiled)
    z = sample_latent(mean, logvar, sampling.draw_noise(mean.shape, mean.dtype, pipe.device, generator))
    z = (pipe.vae.config.scaling_factor * z).to(pipe.dtype)
    check_finite(z, "VAE encoder")
    return z


def to_output(images: torch.Tensor, output_type: str) -> list[Image.Image] | np.ndarray | torch.Tensor:
    """float32 (N, H, W, 3) pixels in [0, 1] as generate() returns them."""
    if output_type == "pt":
        return images.permute(0, 3, 1, 2).contiguous()
    if output_type == "np":
        return images.numpy()
    return [Image.fromarray(img) for img in (images.numpy() * 255).round().astype(np.uint8)]


def decode(pipe: Pipeline, x: torch.Tensor, tiled: bool = False) -> torch.Tensor:
    """VAE decode -> float32 (N, H, W, 3) in [0, 1]. fp16 decodes can overflow to inf/NaN (black images) on the
    SD 1.5 VAE: if that happens, say so, switch the VAE to float32 for good and decode again."""
    scale = pipe.vae.config.scaling_factor  # LDM trained the UNet on latents * scale (about unit variance)
    pixels = pipe.vae.decode((x / scale).to(pipe.vae_dtype), tiled=tiled)
    if pixels.dtype == torch.float16 and not torch.isfinite(pixels).all():
        warnings.warn("the float16 VAE decode overflowed; decoding again in float32", stacklevel=2)
        pipe.vae, pipe.vae_dtype = pipe.vae.float(), torch.float32  # the next images would overflow too
        pixels = pipe.vae.decode(x.float() / scale, tiled=tiled)
    check_finite(pixels, "VAE decoder")
    return (pixels.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()


# A1111's "Approx cheap" live preview: a linear map from the 4 SD 1.x latent channels (rows) to R, G, B (columns),
# fitted by Keturn on SD 1.4 latents ("Decoding latents to RGB without upscaling", Hugging Face forum, 2022).
LATENT_RGB = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))


def preview(pipe: Pipeline, latent: torch.Tensor, decoder: str = "cheap") -> Image.Image:
    """One latent (1, 4, H, W) as a picture: through the real VAE, or for free with the linear map above (the
    result blown up to the image size)."""
    if decoder == "vae":
        return Image.fromarray((decode(pipe, latent)[0].numpy() * 255).round().astype(np.uint8))
    rgb = torch.einsum("chw,cr->hwr", latent[0].float().cpu(), torch.tensor(LATENT_RGB))  # (H, W, 3), about [-1, 1]
    image = Image.fromarray(((rgb + 1) / 2 * 255).clamp(0, 255).round().byte().numpy())
    f = pipe.vae.downsample_factor
    return image.resize((image.width * f, image.height * f), Image.NEAREST)


# ----------------------------------------------------------------------------- PNG metadata

NEGATIVE = "Negative prompt:"  # starts the second part of A1111's parameters text


def parameters_text(s: Settings, prompt: str, negative_prompt: str, size: tuple[int, int], model: str,
                    img2img: bool = False) -> str:  # fmt: skip
    """The `parameters` PNG text chunk as A1111's web UI writes it (and Civitai, ComfyUI importers read it):
    prompt line, "Negative prompt: ..." line, then "Key: value" pairs. Our clip skip k is A1111's k + 1. `model`
    is recorded by name (see model_name), never as a path."""
    check_metadata_text(prompt, negative_prompt)
    fields = {
        "Steps": s.steps,
        "Sampler": sampling.SAMPLERS[s.scheduler].a1111_name,
        "Schedule type": "Karras" if s.karras else None,
        "CFG scale": s.guidance_scale,
        "Seed": s.seed,
        "Size": f"{size[0]}x{size[1]}",
        "Model": model_name(model),
        "Batch size": s.num_images if s.num_images > 1 else None,
        "Clip skip": s.clip_skip + 1 if s.clip_skip else None,
        "Denoising strength": s.strength if img2img else None,
        "Mask blur": s.mask_blur or None,
        "Eta": s.eta if s.eta else None,
    }
    pairs = ", ".join(f"{k}: {a1111_value(v)}" for k, v in fields.items() if v is not None)
    negative = f"\n{NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{pairs}"


def check_metadata_text(prompt: str, negative_prompt: str) -> None:
    """A prompt line that starts like the negative-prompt line would be read back as the negative prompt."""
    if any(line.startswith(NEGATIVE) for line in f"{prompt}\n{negative_prompt}".split("\n")):
        raise UserError(f"a prompt line may not start with {NEGATIVE!r} (the PNG metadata would misread it)")


def model_name(model: str) -> str:
    """The model as the PNG records it: a hub repo id as it is, a local folder's name or a file's stem (as A1111
    records a checkpoint's name), never a path that would leak the user's folders into every shared image."""
    path = Path(model).expanduser()
    if not path.exists():
        return model
    return path.resolve().stem if path.is_file() else path.resolve().name


def a1111_value(value: object) -> str:
    text = str(value)  # A1111 quotes a value that holds its separators (JSON string syntax)
    return json.dumps(text) if any(c in text for c in ",:\n") else text


def read_parameters(text: str) -> dict[str, str]:
    """Parse a `parameters` chunk back into {"prompt", "negative_prompt", "Steps", "Sampler", ...}."""
    *head, last = text.split("\n")
    out = {"prompt": "", "negative_prompt": ""}
    key = "prompt"
    for line in head:
        if line.startswith(NEGATIVE):
            key, line = "negative_prompt", line.removeprefix(NEGATIVE).removeprefix(" ")
        out[key] = line if not out[key] else out[key] + "\n" + line
    # "Key: value" pairs; a value with a comma, colon or newline is JSON-quoted.
    for k, v in re.findall(r'\s*([\w ]+): ("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', last):
        out[k] = json.loads(v) if v.startswith('"') else v
    return out


# ----------------------------------------------------------------------------- command line


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like our other errors (argparse adds the usage block)
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, "") or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="min_pipeline.py",
        description="Stable Diffusion 1.5 text-to-image / image-to-image in plain PyTorch.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--prompt", help="what to draw (A1111 syntax: (word:1.2), [from:to:when], BREAK, <lora:NAME:W>)")
    p.add_argument("--from-file", metavar="FILE", help="one generation per line: 'prompt --seed 3 --steps 20 ...'")
    p.add_argument("--shard", metavar="K/N", help="--from-file: run lines with number %% N == K; auto: RANK/WORLD_SIZE")
    p.add_argument("--skip-existing", action="store_true", help="--from-file: skip lines whose output exists")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (replaces the empty prompt in CFG)")
    for f in fields(Settings):  # --steps, --guidance-scale, ...: one option per setting
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.metadata["type"] is bool:
            p.add_argument(flag, action="store_true", help=help)
        else:
            p.add_argument(flag, type=f.metadata["type"], default=f.default, help=help)
    p.add_argument("--plain-prompt", action="store_true",
                   help="read prompts as literal text cut at 77 tokens (Diffusers), not A1111's syntax")  # fmt: skip
    p.add_argument("--init-image", default=None, help="image-to-image: start from this picture (sets the size)")
    p.add_argument("--mask-image", default=None, help="inpainting: repaint the white part of --init-image")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="merge a LoRA .safetensors file at WEIGHT (default 1); repeatable")  # fmt: skip
    p.add_argument(
        "--lora-dir", default="loras", help="where the prompt's <lora:NAME:WEIGHT> tags find NAME.safetensors"
    )
    p.add_argument("--embedding", action="append", default=[], metavar="FILE",
                   help="a textual-inversion .safetensors; its file name in a prompt means it; repeatable")  # fmt: skip
    p.add_argument(
        "--embeddings-dir", help="every .safetensors here becomes usable by name (A1111's embeddings folder)"
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub repo id, Diffusers folder or .safetensors single file")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available, in that order)")
    p.add_argument("--dtype", choices=list(DTYPES), help="weights/activations (default: float16 on CUDA, else float32)")
    p.add_argument("--compile", action="store_true", help="the fast path (speed_up): torch.compile the UNet (the "
                   "first image waits minutes for it, then steps are faster); on CUDA the loop replays as a CUDA "
                   "graph")  # fmt: skip
    p.add_argument("--output", default="out.png", help="PNG file, or a folder (created if missing); several images "
                   "get numbered names")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--trajectory", help="also write the x0 prediction after every step: FILE.gif (animated) or FILE.png"
    )
    p.add_argument("--trajectory-decoder", choices=("cheap", "vae"), default="cheap",
                   help="cheap: a linear latent-to-RGB map (free); vae: the real decoder at every step")  # fmt: skip
    p.add_argument("--trajectory-noisy", action="store_true", help="show the noisy latent beside each x0 prediction")
    p.add_argument("--preview-every", type=int, metavar="N", help="rewrite <output>.preview.png every N steps")
    p.add_argument("--keep-preview", action="store_true", help="keep the preview file after the run")
    return p.parse_args(argv)


@dataclass(frozen=True)
class Output:
    """Where the images go: a .png file name (replaced if it exists; `-<i>` before the suffix for several images),
    or a folder, where each image takes the next free A1111-style number `00012-<seed>.png` and nothing is ever
    replaced. Missing folders are created when the first image is saved, as image tools do."""

    path: Path
    is_folder: bool

    @classmethod
    def parse(cls, output: str, count: int) -> Output:
        path = Path(output).expanduser()
        is_folder = path.is_dir() or output.endswith(("/", os.sep))
        if not is_folder and path.suffix.lower() != ".png":
            raise UserError(f"output {output} must be a .png file name or a folder")
        folder = path if is_folder else path.parent
        existing = next(p for p in (folder, *folder.parents) if p.exists())  # where mkdir would start
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"cannot write to {folder}: {existing} is not a writable folder")
        out = cls(path, is_folder)
        for p in [] if is_folder else [out.file(i, count) for i in range(count)]:
            if p.exists() and (not os.access(p, os.W_OK) or not p.stat().st_mode & stat.S_IWUSR):
                raise UserError(f"output {p} exists and is read-only; make it writable or choose another --output")
        return out

    def file(self, i: int, count: int) -> Path:
        return self.path if count == 1 else self.path.with_name(f"{self.path.stem}-{i}.png")

    def save(self, image: Image.Image, parameters: str, i: int, count: int, seed: int) -> Path:
        """Write through a unique temporary file in the target folder, then rename it into place: an error or
        Ctrl-C never leaves a half-written PNG or a temporary file, and two runs never mix their files."""
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
        placed = None
        try:
            if not self.is_folder:
                placed = self.file(i, count)
                replace_file(placed, image, format="PNG", pnginfo=info)
                return placed
            self.path.mkdir(parents=True, exist_ok=True)
            placed = next_free(self.path, seed)  # claimed with an exclusive create: still empty
            try:
                replace_file(placed, image, mode=new_file_mode(), format="PNG", pnginfo=info)
            except BaseException:
                placed.unlink(missing_ok=True)
                raise
            return placed
        except OSError as e:
            raise UserError(f"cannot write {placed or self.path}: {e.strerror or e}") from None


def replace_file(path: Path, image: Image.Image, mode: int | None = None, **save) -> None:
    """Write `image` (PIL's save options `save`) to `path` through a unique temporary file in the same folder,
    renamed into place; the temporary file is removed on any error, Ctrl-C included. The file keeps the mode of
    the one it replaces, or gets `mode`, or that of a new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".minsd-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, **save)
        if mode is None:
            mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else new_file_mode()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def next_free(folder: Path, seed: int) -> Path:
    """The next A1111-style number in `folder`, claimed by creating the empty file exclusively (O_EXCL), so two
    processes saving into one folder at once never pick the same name."""
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := re.match(r"(\d{5,})-", p.name))]
    n = max(numbers, default=-1) + 1
    while True:
        path = folder / f"{n:05d}-{seed}.png"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            return path
        except FileExistsError:
            n += 1


def new_file_mode() -> int:
    """The mode open() would give a new file (0666 less the umask); mkstemp's files are 0600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def check_device(name: str | None) -> torch.device:
    try:
        device = pick_device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cuda, cuda:N, mps or cpu") from None
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
        "mps": torch.backends.mps.is_available(),
    }
    if not available.get(device.type, False):
        raise UserError(f"device {name!r} is not available on this machine; use --device cpu")
    return device


def tune_malloc() -> None:
    """Keep glibc from handing freed activation buffers back to the kernel between UNet calls (each step would
    otherwise page-fault its ~1 GB of activations back in): -20% per CPU step measured in bench/README.md, +0.1 GB
    peak RSS. glibc's mallopt(param, value) with M_MMAP_THRESHOLD -3, M_TRIM_THRESHOLD -1, M_TOP_PAD -2 (malloc.h);
    the same as MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=... in the environment. A no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # absent with musl
    if mallopt is not None:
        mallopt(-3, 32 << 20)  # blocks up to 32 MiB (glibc's maximum) come from the heap, not a fresh mmap
        mallopt(-1, 2**31 - 1)  # (almost) never trim the heap top
        mallopt(-2, 1 << 30)  # grow the heap 1 GiB at a time


def trim_heap() -> None:
    """Hand the free memory at the top of glibc's heap back to the kernel (malloc_trim(0)): after tune_malloc the
    UNet's freed activations stay there, and the VAE decode's large buffers (mmap'ed, over 32 MiB) would come on top;
    -0.5 GB peak RSS at 512x512 (bench/README.md). A no-op without glibc."""
    if sys.platform.startswith("linux"):
        import ctypes

        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
        if trim is not None:
            trim(0)


class Watcher:
    """generate()'s callback for the CLI: collects the trajectory frames (the first image's x0 prediction, labelled
    with step and sigma) and rewrites the preview file every `every` UNet calls."""

    def __init__(self, pipe: Pipeline, args: argparse.Namespace, preview_path: Path | None):
        self.pipe, self.args, self.preview_path, self.frames = pipe, args, preview_path, []

    def __call__(self, info: StepInfo) -> None:
        if self.args.trajectory:
            frame = preview(self.pipe, info.x0[:1], self.args.trajectory_decoder)
            if self.args.trajectory_noisy:  # the latent itself, scaled to unit variance like x_t
                noisy = preview(self.pipe, info.latents[:1] / info.latents[:1].float().std())
                frame = side_by_side(noisy, frame)
            ImageDraw.Draw(frame).text((2, 2), f"{info.i + 1}/{info.calls} sigma {info.sigma:.3g}", fill="white")
            self.frames.append(frame)
        if self.preview_path and ((info.i + 1) % self.args.preview_every == 0 or info.i + 1 == info.calls):
            replace_file(self.preview_path, preview(self.pipe, info.x0[:1]), format="PNG")

    def write_trajectory(self, path: Path) -> None:
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


def print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"min_pipeline.py: warning: {message}", file=sys.stderr)  # one line, not warnings' file:line + source


LORA_TAG = re.compile(r"<lora:([^:<>]+)(?::([^:<>]*))?[^<>]*>")  # A1111's <lora:NAME:WEIGHT> (more fields ignored)


def lora_files(args: argparse.Namespace) -> tuple[list[tuple[Path, float]], str]:
    """The LoRAs to merge: --lora FILE[:WEIGHT] and the prompt's <lora:NAME:WEIGHT> tags, found in --lora-dir as
    NAME.safetensors. Returns them and the prompt without its tags (the PNG keeps the tags, as A1111 does)."""
    loras = []
    for spec in args.lora:
        path, _, weight = spec.rpartition(":")
        loras.append((path, weight) if path and re.fullmatch(r"[-+.\deE]+", weight) else (spec, "1"))
    folder = Path(args.lora_dir).expanduser()
    for name, weight in LORA_TAG.findall(args.prompt):
        path = folder / f"{name}.safetensors"
        if not path.is_file():
            raise UserError(f"<lora:{name}> in the prompt: no {path.name} in {folder.resolve()}; see --lora-dir")
        loras.append((str(path), weight or "1"))
    out = []
    for path, weight in loras:
        try:
            out.append((Path(path).expanduser(), float(weight)))
        except ValueError:
            raise UserError(f"LoRA weight {weight!r} of {path} is not a number") from None
        if not math.isfinite(out[-1][1]):
            raise UserError(f"LoRA weight {weight!r} of {path} is not a finite number")
        if not out[-1][0].is_file():
            raise UserError(f"LoRA file {path} does not exist")
    return out, LORA_TAG.sub("", args.prompt)


def check_watch_options(args: argparse.Namespace, output: Output) -> tuple[Path | None, Path | None]:
    """--trajectory's file and the preview file (`<output>.preview.png`; `preview.png` in an output folder)."""
    trajectory = Path(args.trajectory).expanduser() if args.trajectory else None
    if trajectory is not None and trajectory.suffix.lower() not in (".gif", ".png"):
        raise UserError(f"--trajectory {args.trajectory} must be a .gif or .png file name")
    if args.preview_every is None:
        return trajectory, None
    if args.preview_every < 1:
        raise UserError(f"--preview-every must be at least 1, got {args.preview_every}")
    return trajectory, output.path / "preview.png" if output.is_folder else output.path.with_suffix(".preview.png")


LINE_OPTIONS = ("--prompt", "--negative-prompt", "--seed", "--steps", "--guidance-scale", "--width", "--height",
                "--scheduler")  # fmt: skip


def prompt_file_jobs(args: argparse.Namespace) -> list[tuple[int, argparse.Namespace | str]]:
    """--from-file: one job per non-empty line, `prompt text --seed 3 --steps 20 ...` or, as A1111's "prompts from
    file" script writes them, options only (`--prompt "..." --steps 20`), in our spelling; numbered from 1. A line
    that cannot be read becomes its error message. --shard K/N keeps the lines with number % N == K."""
    try:
        lines = Path(args.from_file).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --from-file {args.from_file}: {e}") from None
    k, n = shard(args.shard)
    jobs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or number % n != k:
            continue
        prompt, sep, rest = f" {line}".partition(" --")
        try:
            options = vars(LineParser(prog="", add_help=False).parse_args(shlex.split(sep.strip() + rest)))
        except ValueError as e:  # UserError from the parser, or shlex's unclosed quote
            jobs.append((number, f"cannot read the line: {e}"))
            continue
        options = {k: v for k, v in options.items() if v is not None}
        prompt = options.pop("prompt", prompt.strip())
        jobs.append((number, argparse.Namespace(**{**vars(args), **options, "prompt": prompt})))
    return jobs


class LineParser(argparse.ArgumentParser):
    """A prompt file's line options; mistakes raise (the line is reported by number) instead of exiting."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for flag in LINE_OPTIONS:
            self.add_argument(flag, type=str)

    def error(self, message: str):
        raise UserError(message)


def shard(spec: str | None) -> tuple[int, int]:
    """K/N, or auto: the launcher's RANK/WORLD_SIZE (torchrun) or SLURM_PROCID/SLURM_NTASKS."""
    if spec is None:
        return 0, 1
    if spec == "auto":
        env = os.environ
        k, n = (
            (env.get("RANK"), env.get("WORLD_SIZE"))
            if "RANK" in env
            else (env.get("SLURM_PROCID"), env.get("SLURM_NTASKS"))
        )
        spec = f"{k or 0}/{n or 1}"
    k, _, n = spec.partition("/")
    if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise UserError(f"--shard must be K/N with 0 <= K < N, or auto; got {spec!r}")
    return int(k), int(n)


def job_settings(args: argparse.Namespace) -> Settings:
    """A job's Settings from the CLI's options (a prompt file's line gives some of them as text)."""
    values = {}
    for f in fields(Settings):
        value = getattr(args, f.name)
        if isinstance(value, str) and f.metadata["type"] is not str:
            try:
                value = f.metadata["type"](value)
            except ValueError:
                raise UserError(f"--{f.name.replace('_', '-')} {value!r} is not a number") from None
        values[f.name] = value
    return Settings(**values)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start, preview_path, pipe, paths, failed = time.perf_counter(), None, None, [], 0
    with warnings.catch_warnings():
        warnings.showwarning = print_warning
        try:
            if (args.prompt is None) == (args.from_file is None):
                raise UserError("give --prompt or --from-file (one of them)")
            if args.from_file is None and (args.shard or args.skip_existing):
                raise UserError("--shard and --skip-existing work with --from-file")
            jobs = prompt_file_jobs(args) if args.from_file else [(0, args)]
            batch = args.from_file is not None
            for number, job in tqdm(jobs, desc="prompts", disable=not batch or args.quiet):
                try:
                    if isinstance(job, str):
                        raise UserError(job)
                    # Cheap checks first, against SD 1.5's shapes, so a typo costs no model loading.
                    settings = job_settings(job)
                    settings.check(img2img=args.init_image is not None)
                    check_metadata_text(job.prompt, job.negative_prompt)
                    output = Output.parse(
                        f"{args.output.removesuffix('.png')}/" if batch else args.output, settings.num_images
                    )
                    if batch:  # numbered by line, so that --skip-existing can resume a killed job
                        output = Output(output.path / f"{number:05d}.png", is_folder=False)
                        if args.skip_existing and output.file(0, settings.num_images).exists():
                            continue
                    trajectory, preview_path = check_watch_options(args, output)
                    loras, prompt = lora_files(job)
                    init = open_image(args.init_image) if args.init_image else None  # before loading the model
                    mask = open_image(args.mask_image, "mask image") if args.mask_image else None
                    check_inpainting(init is not None, mask is not None, inpainting_unet=False)
                    settings = settings.with_defaults(init is not None, mask is not None)
                    if settings.seed == -1:
                        settings = replace(settings, seed=secrets.randbelow(MAX_SEED + 1))
                        print(f"seed: {settings.seed}", file=sys.stderr)
                    if pipe is None:
                        pipe = load_for_cli(args)
                    for path, weight in loras:
                        try:
                            apply_lora(pipe, path, weight)
                        except ValueError as e:
                            raise UserError(f"LoRA {path}: {e}") from None
                    watcher = Watcher(pipe, args, preview_path) if args.trajectory or preview_path else None
                    images = generate(pipe, prompt, job.negative_prompt, init_image=init, mask_image=mask,
                                      prompt_syntax="plain" if args.plain_prompt else "a1111",
                                      progress=not (args.quiet or batch), callback=watcher,
                                      **asdict(settings))  # fmt: skip
                    if args.trajectory:
                        watcher.write_trajectory(trajectory)
                    for i, image in enumerate(images):
                        text = parameters_text(settings, job.prompt, job.negative_prompt, image.size, args.model,
                                               bool(init))  # fmt: skip
                        paths.append(output.save(image, text, i, len(images), settings.seed))
                except (UserError, NonFiniteError) as e:
                    if not batch:
                        raise
                    print(f"min_pipeline.py: {args.from_file} line {number}: error: {e}", file=sys.stderr)
                    failed += 1
                finally:
                    if pipe is not None:
                        remove_loras(pipe)  # a line's LoRAs never reach the next line
        except (UserError, WeightsError) as e:
            print(f"min_pipeline.py: error: {e}", file=sys.stderr)
            return 2
        except NonFiniteError as e:
            print(f"min_pipeline.py: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nmin_pipeline.py: interrupted", file=sys.stderr)
            return 130
        finally:
            if preview_path is not None and not args.keep_preview:
                preview_path.unlink(missing_ok=True)
    print(f"wrote {', '.join(map(str, paths)) or 'nothing'} in {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


def load_for_cli(args: argparse.Namespace) -> Pipeline:
    """The model once per run, with the embeddings of --embedding and --embeddings-dir."""
    device = check_device(args.device)
    if device.type == "cpu":
        tune_malloc()  # -20% per step on the CPU (bench/README.md)
    pipe = load_pipeline(args.model, device, args.dtype)
    if args.compile:
        speed_up(pipe)
    folder = Path(args.embeddings_dir).expanduser() if args.embeddings_dir else None
    if folder is not None and not folder.is_dir():
        raise UserError(f"--embeddings-dir {args.embeddings_dir} is not a folder")
    for path in [*map(Path, args.embedding), *(sorted(folder.glob("*.safetensors")) if folder else [])]:
        try:
            load_embedding(pipe, path)
        except ValueError as e:  # a name already taken
            raise UserError(f"embedding {path}: {e}") from None
    return pipe


if __name__ == "__main__":
    sys.exit(main())
