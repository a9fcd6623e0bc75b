"""The `parameters` PNG text chunk as A1111's web UI writes it (Civitai and ComfyUI importers read it too), and back."""

from __future__ import annotations

import json
import re
from pathlib import Path

import scheduler as sampling
from settings import Settings, UserError

NEGATIVE = "Negative prompt:"  # starts the second part of A1111's parameters text


def parameters_text(s: Settings, prompt: str, negative_prompt: str, size: tuple[int, int], model: str,
                    img2img: bool = False, controlnets: list[str] = ()) -> str:  # fmt: skip
    """The `parameters` PNG text chunk as A1111's web UI writes it (and Civitai, ComfyUI importers read it):
    prompt line, "Negative prompt: ..." line, then "Key: value" pairs. Our clip skip k is A1111's k + 1. `model`
    is recorded by name (see model_name), never as a path. `controlnets`: each ControlNet's unit text, recorded as
    `ControlNet 0: "..."` as A1111's ControlNet extension does (cli/controlnets.py: infotext)."""
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
