"""Config files -> the config dataclasses (`CLIPTextConfig`, `UNetConfig`, `VAEConfig`, `SchedulerConfig`), checked.

Three layers of checks, so that a config.json minsd cannot run is refused, in one line naming the file, the key and
its value, before any weights are read:
- `read_config`: the file is a JSON object; it is not a later Stable Diffusion (LATER_MODELS); the keys SD 1.5's
  architecture fixes (each dataclass's FIXED table) have their one implemented value;
- each dataclass's `__post_init__`: the type and range of every field, with the helpers below. Types are exact, so
  that "2" or true is never a count, and the bounds keep a typo from building a model far larger than SD 1.5 (12
  layers, widths up to 3072);
(That the three networks' configs agree with each other is `models.loading.check_fit`'s check.)
`WeightsError` lives here, below every other module of `models/`; `models.loading` re-exports it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TypeVar


class WeightsError(Exception):
    """A user-facing problem with model files: the message is one line saying what and how to fix it."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.splitlines()))  # one line, whatever a wrapped error said


# ----------------------------------------------------------------------------- value checks (the dataclasses')

MAX_LAYERS = 64  # blocks per level or transformer layers: SD 1.5 has 2 and 12
MAX_WIDTH = 8192  # channels, heads, hidden sizes: SD 1.5's widest is 1280 (3072 in CLIP's MLP)
MAX_LEVELS = 8  # resolution levels (len(block_out_channels)): SD 1.5 has 4, each halves H and W

Check = tuple[bool, str]  # (is the value supported, what is)


def integer(x: object, lo: int, hi: int) -> Check:
    return type(x) is int and lo <= x <= hi, f"an integer in [{lo}, {hi}]"


def number(x: object, lo: float, hi: float) -> Check:
    return type(x) in (int, float) and lo < x < hi, f"a number in ({lo}, {hi})"  # NaN and inf fail too


def widths(xs: object) -> Check:
    ok = type(xs) is tuple and 1 <= len(xs) <= MAX_LEVELS and all(integer(c, 1, MAX_WIDTH)[0] for c in xs)
    return ok, f"a list of 1 to {MAX_LEVELS} integers in [1, {MAX_WIDTH}]"


def names(xs: object, allowed: tuple[str, ...]) -> Check:
    return type(xs) is tuple and all(x in allowed for x in xs), f"a list of {' or '.join(map(repr, allowed))} entries"


def check(name: str, config: object, checks: dict[str, Check]) -> None:
    """Raise a ValueError naming the first key of `checks` whose value is not supported."""
    for key, (ok, supported) in checks.items():
        if not ok:
            raise ValueError(f"{name} config {key}={getattr(config, key)!r:.60} is not supported; use {supported}")


# ----------------------------------------------------------------------------- reading a file

C = TypeVar("C")

# Values by which a config file shows a later Stable Diffusion (stabilityai/stable-diffusion-2-1's and
# stable-diffusion-xl-base-1.0's files differ from SD 1.5's in these keys), named before any other check: "not
# supported" alone would not say why. The first family found is the one named.
SD2, SDXL = "Stable Diffusion 2.x", "Stable Diffusion XL"
LATER_MODELS = {  # key: (does the value mark a later model, which one)
    "addition_embed_type": (lambda v: v == "text_time", SDXL),  # unet: SDXL's size and crop conditioning
    "prediction_type": (lambda v: v == "v_prediction", SD2),  # scheduler (SD 2.1 768; SD 2 base is epsilon)
    "use_linear_projection": (lambda v: v is True, SD2),  # unet: Linear proj_in/proj_out instead of 1x1 convs
    "attention_head_dim": (lambda v: isinstance(v, list), SD2),  # unet: heads per level, [5, 10, 20, 20]
    "cross_attention_dim": (lambda v: v == 1024, SD2),  # unet: the width of OpenCLIP ViT-H, SD 2's text encoder
    "hidden_size": (lambda v: v == 1024, SD2),  # text_encoder: the same
}


def read_config(cls: type[C], path: Path) -> C:
    """Fill the frozen config dataclass `cls` from a Diffusers/Transformers `config.json`.

    Keys the dataclass does not have are ignored (the files carry many we never vary), except those in `cls.FIXED`,
    which must have the value given there. Missing keys keep the dataclass defaults, which are the SD 1.5 values.
    JSON lists become tuples so configs stay hashable.
    """
    path, fields = Path(path), {f.name for f in dataclasses.fields(cls)}
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"missing config file {path}: the model folder is incomplete") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot parse {path}: {e}") from None
    where = f"unsupported {path.parent.name}/{path.name} in {path.parent.parent}"
    if not isinstance(values, dict):
        raise WeightsError(f"{where}: a JSON {type(values).__name__}, not an object {{...}}; re-download it")
    if signs := [(k, model) for k, (is_sign, model) in LATER_MODELS.items() if k in values and is_sign(values[k])]:
        named = ", ".join(f"{k}={values[k]!r}" for k, _ in signs)
        raise WeightsError(f"{where}: {named} looks like {signs[0][1]}; minsd runs SD 1.x models only")
    for key, want in getattr(cls, "FIXED", {}).items():
        value = values.get(key, want)
        if value != want or isinstance(value, bool) != isinstance(want, bool):  # true is not 1
            raise WeightsError(f"{where}: {key}={value!r:.60} is not supported; minsd implements only {want!r}")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields})
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{where}: {e}") from None
