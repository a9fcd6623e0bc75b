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
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from tqdm import tqdm

import scheduler as sampling
from models.clip import CLIPTextModel, load_text_encoder
from models.ldm import load_single_file
from models.loading import DEFAULT_MODEL, WeightsError, read_json, resolve_model
from models.unet import UNet, load_unet
from models.vae import AutoencoderKL, load_vae, sample_latent
from tokenizer import CLIPTokenizer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# SD 1.5 was trained on 1000 timesteps; "leading" spacing with steps_offset 1 would ask for t = 1000 at 1000 steps.
MAX_STEPS = 999
# generate()'s sampling settings, also the CLI's option names; each one is checked by check_settings().
SETTINGS = ("scheduler", "karras", "steps", "guidance_scale", "height", "width", "num_images", "clip_skip", "strength",
            "eta")  # fmt: skip


class UserError(Exception):
    """Bad input from the user: reported as one line and exit code 2, never as a traceback."""


# ----------------------------------------------------------------------------- loading


@dataclass
class Pipeline:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet
    vae: AutoencoderKL
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype
    model: str  # what the user asked for (repo id or path), recorded in the PNG metadata


def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_pipeline(
    model: str = DEFAULT_MODEL, device: str | None = None, dtype: torch.dtype | None = None, config: str | None = None
) -> Pipeline:
    """Load tokenizer, text encoder, UNet, VAE and the scheduler config from a Diffusers-layout folder, a hub repo
    id, or an original single-file checkpoint (`.safetensors`; SD 1.5 configs built in, or those of the
    Diffusers-layout folder `config`).

    dtype defaults to float16 on CUDA (half the memory, tensor cores) and float32 elsewhere (CPUs have no fast
    fp16 matmul). bfloat16 is allowed; on a CPU it is only worth it with AVX-512 (BF16/AMX): on an AVX2-only
    CPU a bf16 convolution measured about 100x slower than fp32 (bench/README.md), so that case gets a warning.
    """
    dev = pick_device(device)
    dtype = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    if dev.type == "cpu" and dtype == torch.bfloat16 and "AVX512" not in torch.backends.cpu.get_cpu_capability():
        print("minsd: warning: bfloat16 on a CPU without AVX-512 is very slow; use --dtype float32", file=sys.stderr)
    path = resolve_model(model, half=dtype == torch.float16)
    config_dir = Path(config) if config else (None if path.is_file() else path)
    if path.is_file():
        text_encoder, unet, vae = load_single_file(path, dtype, dev, config=config_dir)
    else:
        text_encoder, unet, vae = (
            load_text_encoder(path, dtype, dev),
            load_unet(path, dtype, dev),
            load_vae(path, dtype, dev),
        )
    scheduler_config = sampling.SD15_SCHEDULER_CONFIG
    tokenizer = CLIPTokenizer()  # OpenAI's vocabulary, shipped in tokenizer/
    if config_dir is not None:
        scheduler_config = read_json(config_dir / "scheduler" / "scheduler_config.json")
        try:
            tokenizer = CLIPTokenizer.from_folder(config_dir / "tokenizer")
        except (OSError, ValueError, KeyError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise WeightsError(f"cannot read the tokenizer files in {config_dir / 'tokenizer'}: {e}") from None
    try:  # a folder may ship a scheduler config our samplers do not implement (v-prediction, other betas, ...)
        sampling.make_schedule("euler", 1, scheduler_config)
    except (ValueError, KeyError) as e:
        raise WeightsError(f"unsupported scheduler/scheduler_config.json in {config_dir}: {e}") from None
    return Pipeline(tokenizer, text_encoder, unet, vae, scheduler_config, dev, dtype, model)


# ----------------------------------------------------------------------------- the algorithm


def encode_prompts(pipe: Pipeline, prompts: list[str], clip_skip: int | None) -> torch.Tensor:
    """Prompts -> CLIP context (B, 77, D). Clip skip applies to every prompt, negative ones included (as A1111)."""
    for p in prompts:
        if dropped := pipe.tokenizer.truncated(p):
            print(f"minsd: warning: the prompt is longer than CLIP's 77 tokens; dropped: {dropped!r}", file=sys.stderr)
    ids = pipe.tokenizer(prompts).to(pipe.device)
    return pipe.text_encoder(ids, clip_skip=clip_skip)


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Ho & Salimans 2022 (arXiv:2207.12598) Eq. 6, (1 + w) eps_c - w eps_u, written with s = 1 + w as Diffusers
    does: eps_u + s * (eps_c - eps_u). s = 1 is the conditional model alone."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def open_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read init image {path}: {e}") from None


def image_to_tensor(image: Image.Image | str | Path, multiple: int) -> torch.Tensor:
    """An init image -> (1, 3, H, W) in [-1, 1], its size cut down to a multiple of the VAE factor (Lanczos
    resize), as Diffusers' VaeImageProcessor does."""
    image = image.convert("RGB") if isinstance(image, Image.Image) else open_image(image)
    w, h = (s - s % multiple for s in image.size)
    if w == 0 or h == 0:
        raise UserError(f"init image is {image.size[0]}x{image.size[1]}: smaller than {multiple} pixels")
    if (w, h) != image.size:
        image = image.resize((w, h), resample=Image.LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return 2.0 * x - 1.0


@torch.inference_mode()
def generate(
    pipe: Pipeline,
    prompt: str | list[str],
    negative_prompt: str | list[str] = "",
    scheduler: str = "euler",
    karras: bool = False,
    steps: int = 30,
    guidance_scale: float = 7.5,
    height: int = 512,
    width: int = 512,
    seed: int = 0,
    num_images: int = 1,
    clip_skip: int | None = None,
    init_image: Image.Image | str | Path | None = None,
    strength: float = 0.8,
    eta: float = 0.0,
    output_type: str = "pil",
    progress: bool = True,
) -> list[Image.Image] | np.ndarray:
    """Generate `num_images` images per prompt. Returns PIL images, or with output_type="np" a float32 array
    (N, H, W, 3) in [0, 1]. With `init_image`, image-to-image: the image (which sets the size) is encoded,
    noised to `strength` and denoised from there."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    factor = pipe.vae.scale_factor
    check_settings(scheduler=scheduler, karras=karras, steps=steps, guidance_scale=guidance_scale, height=height,
                   width=width, num_images=num_images, clip_skip=clip_skip, strength=strength, eta=eta,
                   img2img=init_image is not None, factor=factor,
                   clip_layers=pipe.text_encoder.config.num_hidden_layers)  # fmt: skip
    if not prompts or len(negatives) != len(prompts):
        raise UserError(f"got {len(prompts)} prompts and {len(negatives)} negative prompts; give one, or one each")
    dev, dtype = pipe.device, pipe.dtype
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same noise, so the same image, on any device
    n = len(prompts) * num_images

    # 1. Text -> context. Each prompt's context is repeated num_images times (p0, p0, p1, p1, ...).
    use_cfg = guidance_scale > 1.0  # at s <= 1 the unconditional pass is skipped, as in Diffusers
    context = encode_prompts(pipe, prompts, clip_skip).repeat_interleave(num_images, dim=0)
    if use_cfg:
        uncond = encode_prompts(pipe, negatives, clip_skip).repeat_interleave(num_images, dim=0)
        context = torch.cat([uncond, context])  # (2B, 77, D): one UNet call for both halves

    # 2. The noise schedule, and the starting latent: pure noise, or the init image's latent noised to `strength`.
    schedule = sampling.make_schedule(
        scheduler, steps, pipe.scheduler_config, karras=karras, strength=strength if init_image is not None else 1.0
    )  # the config was checked at load time and the settings above, so this does not raise
    if init_image is None:
        shape = (n, pipe.unet.config.in_channels, height // factor, width // factor)
        x = torch.randn(shape, generator=generator, dtype=dtype).to(dev) * schedule.init_noise_sigma
    else:
        image = image_to_tensor(init_image, factor).to(dev, vae_dtype(pipe))
        mean, logvar = pipe.vae.encode(image)
        x0 = pipe.vae.config.scaling_factor * sample_latent(mean, logvar, generator)  # draws noise FIRST
        x0 = x0.to(dtype).expand(n, -1, -1, -1)
        noise = torch.randn(x0.shape, generator=generator, dtype=dtype).to(dev)
        x = sampling.add_noise(schedule, x0, noise)

    # 3. The sampling loop: scale the input, one UNet call on the CFG batch, guidance, one sampler step.
    state = None
    timesteps = schedule.timesteps.to(dev)  # once, not a host-to-device copy per step
    for i, t in enumerate(tqdm(timesteps, desc="denoising", disable=not progress)):
        x_in = sampling.scale_model_input(schedule, i, x)
        x_in = torch.cat([x_in, x_in]) if use_cfg else x_in
        eps = pipe.unet(x_in, t, context)
        if use_cfg:
            eps = classifier_free_guidance(*eps.chunk(2), guidance_scale)
        x, state = sampling.step(schedule, i, x, eps, state, generator=generator, eta=eta)

    # 4. Latent -> pixels.
    images = decode(pipe, x)
    if output_type == "np":
        return images
    return [Image.fromarray(img) for img in (images * 255).round().astype(np.uint8)]


def vae_dtype(pipe: Pipeline) -> torch.dtype:
    return pipe.vae.post_quant_conv.weight.dtype  # float32 after an fp16 overflow, else the pipeline's


def decode(pipe: Pipeline, x: torch.Tensor) -> np.ndarray:
    """VAE decode -> float32 (N, H, W, 3) in [0, 1]. fp16 decodes can overflow to inf/NaN (black images) on the
    SD 1.5 VAE: if that happens, say so and decode again in float32."""
    scale = pipe.vae.config.scaling_factor  # LDM trained the UNet on latents * scale (about unit variance)
    pixels = pipe.vae.decode((x / scale).to(vae_dtype(pipe)))
    if pixels.dtype == torch.float16 and not torch.isfinite(pixels).all():
        print("minsd: the float16 VAE decode overflowed; decoding again in float32", file=sys.stderr)
        pipe.vae.float()  # and keep it so: the next images would overflow too
        pixels = pipe.vae.decode(x.float() / scale)
    return (pixels.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def check_settings(*, scheduler, karras, steps, guidance_scale, height, width, num_images, clip_skip, img2img,
                   strength, eta, factor: int, clip_layers: int) -> None:  # fmt: skip
    """Every user setting is checked before any work, each failure a one-line UserError."""
    if scheduler not in sampling.SAMPLERS:
        raise UserError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(sampling.SAMPLERS)}")
    if karras and scheduler not in sampling.KARRAS_SAMPLERS:
        raise UserError(f"--karras works with {', '.join(sampling.KARRAS_SAMPLERS)}, not {scheduler}")
    if not 1 <= steps <= MAX_STEPS:
        raise UserError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
    if guidance_scale < 0:
        raise UserError(f"guidance scale must be >= 0 (1 disables guidance), got {guidance_scale}")
    for name, size in (("height", height), ("width", width)):
        if size % factor or not factor <= size <= 4096:
            raise UserError(f"{name} must be a multiple of {factor} between {factor} and 4096, got {size}")
    if not 1 <= num_images <= 64:
        raise UserError(f"num_images must be between 1 and 64, got {num_images}")
    if not 0 < strength <= 1:
        raise UserError(f"strength must be in (0, 1], got {strength}")
    if img2img and int(steps * strength) < 1:
        raise UserError(f"steps x strength = {steps * strength:g} < 1 leaves no step to run; raise either")
    if clip_skip is not None and not 0 <= clip_skip < clip_layers:
        raise UserError(f"clip skip must be between 0 and {clip_layers - 1} for this text encoder, got {clip_skip}")
    if not 0 <= eta <= 1:
        raise UserError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise), got {eta}")


# ----------------------------------------------------------------------------- PNG metadata

SAMPLER_NAMES = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpmpp_2m": "DPM++ 2M",
    "ddim": "DDIM",
    "ddpm": "DDPM",
}


def parameters_text(args: argparse.Namespace, width: int, height: int) -> str:
    """The `parameters` PNG text chunk as A1111's web UI writes it (and Civitai, ComfyUI importers read it):
    prompt line, "Negative prompt: ..." line, then "Key: value" pairs. Our clip skip k is A1111's k + 1."""
    fields = {
        "Steps": args.steps,
        "Sampler": SAMPLER_NAMES[args.scheduler],
        "Schedule type": "Karras" if args.karras else None,
        "CFG scale": args.guidance_scale,
        "Seed": args.seed,
        "Size": f"{width}x{height}",
        "Model": args.model,
        "Batch size": args.num_images if args.num_images > 1 else None,
        "Clip skip": args.clip_skip + 1 if args.clip_skip else None,
        "Denoising strength": args.strength if args.init_image else None,
        "Eta": args.eta if args.eta else None,
    }
    pairs = ", ".join(f"{k}: {a1111_value(v)}" for k, v in fields.items() if v is not None)
    negative = f"\nNegative prompt: {args.negative_prompt}" if args.negative_prompt else ""
    return f"{args.prompt}{negative}\n{pairs}"


def a1111_value(value: object) -> str:
    text = str(value)  # A1111 quotes a value that holds its separators (JSON string syntax)
    return json.dumps(text) if any(c in text for c in ",:\n") else text


def read_parameters(text: str) -> dict[str, str]:
    """Parse a `parameters` chunk back into {"prompt", "negative_prompt", "Steps", "Sampler", ...}."""
    *head, last = text.split("\n")
    out = {"prompt": "", "negative_prompt": ""}
    key = "prompt"
    for line in head:
        if line.startswith("Negative prompt: "):
            key, line = "negative_prompt", line.removeprefix("Negative prompt: ")
        out[key] = line if not out[key] else out[key] + "\n" + line
    # "Key: value" pairs; a value with a comma, colon or newline is JSON-quoted.
    for k, v in re.findall(r'\s*([\w ]+): ("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', last):
        out[k] = json.loads(v) if v.startswith('"') else v
    return out


# ----------------------------------------------------------------------------- CLI


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
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (replaces the empty prompt in CFG)")
    p.add_argument("--steps", type=int, default=30, help="number of denoising steps")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance scale; <= 1 disables")
    p.add_argument("--scheduler", default="euler", help=f"sampler: one of {', '.join(sampling.SAMPLERS)}")
    p.add_argument("--karras", action="store_true", help="use the Karras et al. 2022 noise levels (rho 7)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same image on any device")
    p.add_argument("--height", type=int, default=512, help="image height in pixels (multiple of 8)")
    p.add_argument("--width", type=int, default=512, help="image width in pixels (multiple of 8)")
    p.add_argument("--num-images", type=int, default=1, help="images to generate for the prompt")
    p.add_argument("--clip-skip", type=int, help="use the CLIP layer this many before the last (1 = A1111 clip skip 2)")
    p.add_argument("--init-image", default=None, help="image-to-image: start from this picture (sets the size)")
    p.add_argument("--strength", type=float, default=0.8, help="image-to-image: how much of the init image to redraw")
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub repo id, Diffusers folder or .safetensors single file")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available, in that order)")
    p.add_argument("--dtype", choices=list(DTYPES), help="weights/activations (default: float16 on CUDA, else float32)")
    p.add_argument("--output", default="out.png", help="PNG file, or a folder; several images get numbered names")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def output_paths(output: str, count: int, seed: int) -> list[Path]:
    """Where each image goes. A folder gets `<seed>-<i>.png`; a file name gets `-<i>` before its suffix when
    there are several images."""
    path = Path(output).expanduser()
    if path.is_dir() or output.endswith(("/", os.sep)):
        paths = [path / f"{seed}-{i}.png" for i in range(count)]
    elif path.suffix.lower() != ".png":
        raise UserError(f"output {output} must be a .png file name or an existing folder")
    else:
        paths = [path] if count == 1 else [path.with_name(f"{path.stem}-{i}.png") for i in range(count)]
    parent = paths[0].parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"cannot write to {parent}: not an existing writable folder")
    return paths


def save_png(image: Image.Image, path: Path, parameters: str) -> None:
    """Write through a temporary file and rename, so a failure never leaves a half-written PNG behind."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        # Cheap checks first, so a typo costs no model loading. The size is checked against SD 1.5's VAE factor
        # here and against the loaded VAE in generate().
        settings = {k: getattr(args, k) for k in SETTINGS}  # the CLI's options are generate()'s arguments
        check_settings(**settings, img2img=args.init_image is not None, factor=8, clip_layers=12)
        paths = output_paths(args.output, args.num_images, args.seed)
        init = open_image(args.init_image) if args.init_image else None  # before loading the model
        device = check_device(args.device)
        if device.type == "cpu":
            tune_malloc()  # -20% per step on the CPU (bench/README.md)
        pipe = load_pipeline(args.model, str(device), DTYPES.get(args.dtype))
        images = generate(pipe, args.prompt, args.negative_prompt, seed=args.seed, init_image=init,
                          progress=not args.quiet, **settings)  # fmt: skip
        for image, path in zip(images, paths, strict=True):
            save_png(image, path, parameters_text(args, *image.size))
    except (UserError, WeightsError) as e:
        print(f"min_pipeline.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(map(str, paths))} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
