"""The command line's ControlNets: `--controlnet PATH --control-image IMG [--control-scale W] [--control-start F]
[--control-end F] [--control-preprocess canny [--canny-low L] [--canny-high H]]`, repeatable (each option applies to
the --controlnet before it), and `--guess-mode`; checked before any model loads, and recorded in the PNG as A1111's
ControlNet extension does.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from cli.png_info import model_name
from images import canny, open_image
from models.loading import hub_repo_id
from settings import UserError

PREPROCESSORS = ("none", "canny")  # others: bring a prepared control image (an edge, depth or pose map)


@dataclass(frozen=True)
class Unit:
    """One --controlnet and its options, as A1111's ControlNet extension calls a ControlNet with its settings."""

    model: str
    image: str | None = None
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: str = "none"
    canny_low: float = 100.0  # A1111's defaults for the canny module
    canny_high: float = 200.0


UNIT_OPTIONS = {  # option: (Unit field, type)
    "--control-image": ("image", str),
    "--control-scale": ("scale", float),
    "--control-start": ("start", float),
    "--control-end": ("end", float),
    "--control-preprocess": ("preprocess", str),
    "--canny-low": ("canny_low", float),
    "--canny-high": ("canny_high", float),
}


class UnitOption(argparse.Action):
    """--controlnet starts a Unit; the other options set a field of the last one."""

    def __call__(self, parser, namespace, value, option_string=None):
        units = list(getattr(namespace, self.dest) or [])
        if option_string == "--controlnet":
            units.append(Unit(value))
        elif not units:
            parser.error(f"{option_string} applies to the --controlnet before it; give --controlnet PATH first")
        else:
            name, kind = UNIT_OPTIONS[option_string]
            if getattr(units[-1], name) != getattr(Unit(""), name):
                parser.error(f"{option_string} given twice for --controlnet {units[-1].model}")
            try:
                units[-1] = replace(units[-1], **{name: kind(value)})
            except ValueError:
                parser.error(f"{option_string} {value!r} is not a number")
        setattr(namespace, self.dest, units)


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--controlnet", dest="controlnets", action=UnitOption, default=[], metavar="PATH",
                   help="a ControlNet: Diffusers folder, hub repo id or A1111 .safetensors; repeatable, the "
                   "--control-* options after it apply to it")  # fmt: skip
    helps = {
        "--control-image": "the control image (an edge, depth, pose... map; or a photo with --control-preprocess)",
        "--control-scale": "the ControlNet's weight (default 1)",
        "--control-start": "the fraction of the steps where it starts acting (default 0)",
        "--control-end": "the fraction of the steps where it stops acting (default 1)",
        "--control-preprocess": f"turn --control-image into the control map first: {', '.join(PREPROCESSORS)}",
        "--canny-low": "canny: the low hysteresis threshold (default 100)",
        "--canny-high": "canny: the high hysteresis threshold (default 200)",
    }
    for flag, help in helps.items():
        p.add_argument(flag, dest="controlnets", action=UnitOption, metavar=flag.split("-")[-1].upper(), help=help)
    p.add_argument("--guess-mode", action="store_true", help="ControlNets on the conditional half of CFG only, "
                   "weighted 0.1 (shallow) to 1 (deep): the control image speaks without a prompt")  # fmt: skip


def check_units(args: argparse.Namespace) -> list[tuple[Unit, Image.Image]]:
    """Every ControlNet option checked before any model loads; returns the units with their control images read."""
    units = args.controlnets
    if args.guess_mode and not units:
        raise UserError("--guess-mode needs a --controlnet")
    out = []
    for u in units:
        path = Path(u.model).expanduser()
        if not path.exists() and not hub_repo_id(u.model):
            raise UserError(f"--controlnet {u.model} does not exist (a folder, a .safetensors file or a hub repo id)")
        if u.image is None:
            raise UserError(f"--controlnet {u.model} needs a --control-image after it")
        if not all(math.isfinite(v) for v in (u.scale, u.start, u.end, u.canny_low, u.canny_high)):
            raise UserError(f"--controlnet {u.model}: its --control-* numbers must be finite")
        if not 0 <= u.start < u.end <= 1:
            raise UserError(f"--controlnet {u.model}: --control-start {u.start:g} and --control-end {u.end:g} must "
                            "satisfy 0 <= start < end <= 1")  # fmt: skip
        if u.preprocess not in PREPROCESSORS:
            raise UserError(f"--control-preprocess {u.preprocess!r} is not one of {', '.join(PREPROCESSORS)}; for "
                            "others give a prepared control image")  # fmt: skip
        if not 0 <= u.canny_low <= u.canny_high <= 255 * 8:  # |dx| + |dy| of 8-bit pixels stays below 8 * 255
            raise UserError(f"--canny-low {u.canny_low:g} and --canny-high {u.canny_high:g} must satisfy 0 <= low "
                            "<= high <= 2040")  # fmt: skip
        out.append((u, open_image(u.image, "control image")))
    return out


def control_image(unit: Unit, image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The image the ControlNet sees, for an output of `size` = (W, H): as given (generate() resizes it), or its Canny
    edges found at the output size (on the RGB image, as A1111's canny module)."""
    if unit.preprocess == "none":
        return image
    rgb = np.asarray(image.resize(size, resample=Image.LANCZOS).convert("RGB"))
    return Image.fromarray(canny(rgb, unit.canny_low, unit.canny_high))


def generate_arguments(controls: list[tuple[Unit, Image.Image, object]], size: tuple[int, int],
                       guess_mode: bool) -> dict:  # fmt: skip
    """generate()'s ControlNet arguments for the units, each (Unit, its image, its ControlNet), and an output of
    `size` = (W, H)."""
    if not controls:
        return {}
    units = [u for u, _, _ in controls]
    return dict(controlnet=[net for _, _, net in controls], guess_mode=guess_mode,
                control_image=[control_image(u, image, size) for u, image, _ in controls],
                control_scale=[u.scale for u in units], control_start=[u.start for u in units],
                control_end=[u.end for u in units])  # fmt: skip


def png_records(controls: list[tuple[Unit, Image.Image, object]], size: tuple[int, int], guess_mode: bool) -> list:
    """Each unit's `ControlNet i` text for the PNG, the model by name (a repo id's last part, as A1111's file name)."""
    return [infotext(u, model_name(u.model).rsplit("/")[-1], guess_mode, size) for u, _, _ in controls]


def infotext(unit: Unit, name: str, guess_mode: bool, size: tuple[int, int]) -> str:
    """A unit as A1111's ControlNet extension writes it into the PNG (`ControlNet 0: "Module: ..."`, its
    scripts/infotext.py): our control image is stretched to the output size ("Just Resize", as Diffusers), and guess
    mode is the extension's "ControlNet is more important" (which weights the residuals 0.825^k, Diffusers 0.1..1)."""
    thresholds = {"Processor Res": min(size), "Threshold A": f"{unit.canny_low:g}",
                  "Threshold B": f"{unit.canny_high:g}"} if unit.preprocess == "canny" else {}  # fmt: skip
    fields = {"Module": unit.preprocess, "Model": name, "Weight": f"{unit.scale:g}", "Resize Mode": "Just Resize",
              "Low Vram": False, **thresholds, "Guidance Start": f"{unit.start:g}", "Guidance End": f"{unit.end:g}",
              "Pixel Perfect": False,
              "Control Mode": "ControlNet is more important" if guess_mode else "Balanced"}  # fmt: skip
    return ", ".join(f"{k}: {v}" for k, v in fields.items())
