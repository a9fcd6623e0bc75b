"""The `parameters` PNG text chunk as A1111's web UI writes it (Civitai and ComfyUI importers read it too), and back."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from PIL import Image

import hires
import scheduler as sampling
from settings import MAX_SIZE, Settings, UserError

NEGATIVE = "Negative prompt:"  # starts the second part of A1111's parameters text


def parameters_text(s: Settings, prompt: str, negative_prompt: str, size: tuple[int, int], model: str,
                    img2img: bool = False, hashes: dict[str, str] | None = None, vae: str | None = None,
                    controlnets: list[str] = ()) -> str:  # fmt: skip
    """The `parameters` PNG text chunk as A1111's web UI writes it (and Civitai, ComfyUI importers read it):
    prompt line, "Negative prompt: ..." line, then "Key: value" pairs. Our clip skip k is A1111's k + 1. `model`
    is recorded by name (see model_name), never as a path; `hashes` are cli.hashes.hash_fields' (Model hash, Lora
    hashes, TI hashes). `controlnets`: each ControlNet's unit text, recorded as `ControlNet 0: "..."` as A1111's
    ControlNet extension does (cli/controlnets.py: infotext)."""
    check_metadata_text(prompt, negative_prompt)
    hashes = hashes or {}
    hires_fix = s.hires_scale > 1 and not img2img
    size = (s.width, s.height) if hires_fix else size  # A1111 records the first pass's size, and the scale
    named = s.with_sampler_names()  # A1111 1.9+'s two fields; "Schedule type" left out where it is "Automatic"
    sampler, schedule_type = sampling.sampler_to_a1111(named.scheduler, named.schedule)
    fields = {
        "Steps": s.steps,
        "Sampler": sampler,
        "Schedule type": schedule_type,
        "CFG scale": s.guidance_scale,
        "Seed": s.seed,
        "Size": f"{size[0]}x{size[1]}",
        "Model hash": hashes.get("Model hash"),
        "Model": model_name(model),
        "VAE": model_name(vae) if vae else None,  # by name too: a file's stem, a folder's name or a repo id
        "Batch size": s.num_images if s.num_images > 1 else None,
        "Clip skip": s.clip_skip + 1 if s.clip_skip else None,
        "Denoising strength": s.strength if img2img else (s.hires_denoise if hires_fix else None),
        "Mask blur": s.mask_blur or None,
        "Eta": s.eta if s.eta else None,
        "Lora hashes": hashes.get("Lora hashes"),
        "TI hashes": hashes.get("TI hashes"),
        "Hires upscale": f"{s.hires_scale:g}" if hires_fix else None,  # A1111's extra_generation_params, in order
        "Hires steps": s.hires_steps or None if hires_fix else None,
        "Hires upscaler": hires.A1111_NAMES[s.hires_upscaler] if hires_fix else None,
        **{f"ControlNet {i}": unit for i, unit in enumerate(controlnets)},
    }
    pairs = ", ".join(f"{k}: {a1111_value(v)}" for k, v in fields.items() if v is not None)
    negative = f"\n{NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{pairs}"


def check_metadata_text(prompt: str, negative_prompt: str) -> None:
    """Text the PNG can hold (bytes that are not UTF-8 reach Python as lone surrogates, which no PNG chunk can
    store), and no prompt line that starts like the negative-prompt line, which would be read back as one."""
    for name, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UserError(f"the {name} is not UTF-8 text (byte {text[e.start]!r} at {e.start})") from None
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
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


# A1111's "Key: value" pair: a key of words (spaces, - and / inside), a value up to the next comma, or a JSON string
# (A1111 quotes a value that holds a comma, colon or newline), then a comma or the end of the line.
PAIR = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def read_parameters(text: str) -> dict[str, str]:
    """Parse a `parameters` chunk back into {"prompt", "negative_prompt", "Steps", "Sampler", ...}, as A1111's
    parse_generation_parameters reads it: prompt lines (several allowed), then from a line starting with
    "Negative prompt:" the negative prompt's lines, then the "Key: value, ..." line, which is taken for one only if
    it holds at least 3 pairs (else it is prompt text). Quoted values are decoded (their commas and colons kept);
    a field's text is kept as written (Size stays "512x768"), unknown fields included."""
    lines = text.rstrip().split("\n")
    last = lines[-1] if len(PAIR.findall(lines[-1])) >= 3 else ""
    out = {"prompt": "", "negative_prompt": ""}
    key = "prompt"
    for line in lines[:-1] if last else lines:
        line = line.removesuffix("\r")
        if line.startswith(NEGATIVE):
            key, line = "negative_prompt", line.removeprefix(NEGATIVE).removeprefix(" ")
        out[key] = line if not out[key] else out[key] + "\n" + line
    for k, v in PAIR.findall(last):
        try:
            out[k] = json.loads(v) if v.startswith('"') and v.endswith('"') and len(v) > 1 else v.strip()
        except json.JSONDecodeError:
            out[k] = v  # as A1111: a value that only looks quoted stays as written
    return out


# ----------------------------------------------------------------------------- --from-png: the text -> CLI options


def sampler_and_schedule(value: str, fields: dict[str, str]) -> tuple[str, str]:
    """A1111's Sampler and Schedule type -> our --scheduler and --schedule (scheduler.sampler_from_a1111). A sampler
    minsd lacks raises NotImplementedError; a schedule type it cannot run with that sampler leaves the sampler's
    default (the "Schedule type" row names it)."""
    try:
        return sampling.sampler_from_a1111(value, fields.get("Schedule type"))
    except ValueError:
        try:
            return sampling.find_sampler(value)[0], "default"
        except ValueError:
            raise NotImplementedError(value) from None


def check_schedule_type(value: str, fields: dict[str, str]) -> tuple:
    """Schedule type is read with Sampler (sampler_and_schedule); this row only refuses one minsd cannot run."""
    try:
        sampling.sampler_from_a1111(fields.get("Sampler", "Euler"), value)
    except ValueError:
        try:
            sampling.find_sampler(fields.get("Sampler", "Euler"))
        except ValueError:
            return ()  # an unknown sampler: its own row names it
        raise NotImplementedError(value) from None
    return ()


def size(value: str, fields: dict[str, str]) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", value)  # width x height
    if match is None:
        raise ValueError(value)
    return int(match[1]), int(match[2])


def denoising_strength(value: str, fields: dict[str, str]) -> tuple[float | None, float | None]:
    """A1111 writes one "Denoising strength": image-to-image's strength, or the hires fix's second pass."""
    return (None, float(value)) if "Hires upscale" in fields else (float(value), None)


def hires_upscaler(value: str, fields: dict[str, str]) -> tuple[str]:
    if hires.upscaler_name(value) is None:  # A1111's ESRGAN & co. are not minsd's
        raise NotImplementedError(value)
    return (value,)


def number(kind: type) -> Callable[[str, dict[str, str]], tuple]:
    return lambda value, fields: (kind(value),)


# What --from-png runs again: A1111 field -> (the CLI options it sets, how its text and the other fields give their
# values). A function raises NotImplementedError for a value minsd cannot run (named in the warning), ValueError for
# text it cannot read. Clip skip is A1111's numbering, as the CLI's --clip-skip.
FROM_PNG: dict[str, tuple[tuple[str, ...], Callable[[str, dict[str, str]], tuple]]] = {
    "Steps": (("steps",), number(int)),
    "Sampler": (("scheduler", "schedule"), sampler_and_schedule),
    "Schedule type": ((), check_schedule_type),
    "CFG scale": (("guidance_scale",), number(float)),
    "Seed": (("seed",), number(int)),
    "Size": (("width", "height"), size),
    "Clip skip": (("clip_skip",), number(int)),
    "Denoising strength": (("strength", "hires_denoise"), denoising_strength),
    "Mask blur": (("mask_blur",), number(int)),
    "Eta": (("eta",), number(float)),
    "Eta DDIM": (("eta",), number(float)),  # A1111's name for DDIM's eta
    "Hires upscale": (("hires_scale",), number(float)),
    "Hires steps": (("hires_steps",), number(int)),
    "Hires upscaler": (("hires_upscaler",), hires_upscaler),
}
# Fields that say what made the image, and set nothing: the model and files (compared, not loaded), A1111's version,
# and the batch (each image of one is recreated alone by its own seed).
INFORMATIONAL = ("Model", "Model hash", "VAE", "Lora hashes", "TI hashes", "Version", "Batch size")


def read_png(path: str) -> dict[str, str]:
    """The `parameters` text of a PNG written by minsd or A1111, parsed (read_parameters); one UserError if the file
    cannot be read or holds no such text."""
    if not Path(path).expanduser().is_file():
        raise UserError(f"--from-png {path}: no such file")
    try:
        with Image.open(Path(path).expanduser()) as image:
            text = image.info.get("parameters")  # a text chunk before the pixels (where A1111 and PIL write it)
            if text is None and hasattr(image, "text") and max(image.size) <= MAX_SIZE:  # after them: decode
                text = image.text.get("parameters")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"--from-png {path}: cannot read the image ({e})") from None
    if not text:
        raise UserError(f"--from-png {path} holds no `parameters` text (written by minsd or A1111's web UI); nothing "
                        f"to run again")  # fmt: skip
    return read_parameters(text)


def options_from_png(fields: dict[str, str]) -> tuple[dict[str, object], list[str]]:
    """The CLI options a parsed `parameters` text sets ({"prompt": ..., "steps": 20, ...}), and the "Key: value"
    fields minsd does not implement (neither in FROM_PNG nor INFORMATIONAL, or with a value it cannot run)."""
    options = {"prompt": fields["prompt"], "negative_prompt": fields["negative_prompt"]}
    missing = []
    for key, value in fields.items():
        if key in ("prompt", "negative_prompt") or key in INFORMATIONAL:
            continue
        if key not in FROM_PNG:
            missing.append(f"{key}: {a1111_value(value)}")
            continue
        names, read = FROM_PNG[key]
        try:
            options |= {k: v for k, v in zip(names, read(value, fields), strict=True) if v is not None}
        except NotImplementedError:
            missing.append(f"{key}: {a1111_value(value)}")
        except ValueError:
            raise UserError(f"cannot read the PNG's {key}: {value!r}") from None
    return options, missing
