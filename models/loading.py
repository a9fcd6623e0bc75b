"""Weights: find a model's files (local folder or hub repo), read its configs, and load safetensors into
modules built on the meta device.

Loading never runs a random initialisation and never copies a tensor twice: the module is built on the
`meta` device (shapes only), then `load_state_dict(strict=True, assign=True)` makes the memory-mapped
safetensors tensors the parameters themselves. Checkpoint quirks (CLIP's `position_ids` buffer and
`text_model.` prefix, the VAE's legacy attention names) are handled in `_fix_keys`, and nowhere else.
Pickled checkpoints (`.bin`, `.ckpt`, `.pt`) are never read: unpickling can run arbitrary code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


class WeightsError(Exception):
    """A user-facing problem with model files: the message is one line saying what and how to fix it."""


# ----------------------------------------------------------------------------- configs

C = TypeVar("C")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise WeightsError(f"missing config file {path}: the model folder is incomplete") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot parse {path}: {e}") from None


def read_config(cls: type[C], path: Path) -> C:
    """Fill the frozen config dataclass `cls` from a Diffusers/Transformers `config.json`.

    Keys the dataclass does not have are ignored (the files carry many we never vary); missing keys keep
    the dataclass defaults, which are the SD 1.5 values. JSON lists become tuples so configs stay hashable.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in read_json(path).items() if k in names})


# ----------------------------------------------------------------------------- tensors


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a .safetensors file (memory-mapped by safetensors; pages load on first use)."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise WeightsError(
            f"refusing to load {path}: {path.suffix} files are Python pickles, which can run arbitrary code "
            "when loaded; download the .safetensors version instead (model pages on the HF hub and Civitai offer one)"
        )
    if not path.is_file():
        raise WeightsError(f"missing weights file {path}: the model folder is incomplete")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"cannot read {path}: not a valid safetensors file ({e}); re-download it") from None


def _fix_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The one place that maps known checkpoint quirks onto our (= Diffusers') parameter names."""
    out = {}
    for k, v in state.items():
        # CLIP: the official file (Transformers 4.22) prefixes every key with `text_model.` and stores the
        # constant buffer `position_ids` = arange(77); Transformers 5 writes neither. We keep neither.
        if k.endswith("embeddings.position_ids"):
            continue
        k = k.removeprefix("text_model.")
        # VAE: files written before Diffusers 0.14 name the mid-block attention like this (the official SD 1.5
        # VAE among them); Diffusers 0.42 still renames them on load.
        for old, new in _LEGACY_VAE_ATTENTION.items():
            if k.endswith(old) and ".attentions." in k:
                k = k[: -len(old)] + new
        out[k] = v
    return out


_LEGACY_VAE_ATTENTION = {
    ".query.weight": ".to_q.weight",
    ".query.bias": ".to_q.bias",
    ".key.weight": ".to_k.weight",
    ".key.bias": ".to_k.bias",
    ".value.weight": ".to_v.weight",
    ".value.bias": ".to_v.bias",
    ".proj_attn.weight": ".to_out.0.weight",
    ".proj_attn.bias": ".to_out.0.bias",
}

M = TypeVar("M", bound=nn.Module)


def build(
    module_cls: type[M], config: object, state: dict[str, torch.Tensor], source: str, dtype=None, device=None
) -> M:
    """Build `module_cls(config)` on the meta device and assign `state` to it, strictly.

    Every expected key must be present with its exact shape and no other key may be left over; errors name
    the file (`source`) and the first offending keys. `dtype` converts floating tensors (fp16 files can run in
    fp32 and back); `device` moves them. Without either, the mmapped tensors are used as they are.
    """
    try:
        with torch.device("meta"):
            model = module_cls(config)
    except ValueError as e:  # e.g. a block type SD 1.5 does not have
        raise WeightsError(f"{source}: the model's config.json is not supported: {e}") from None
    expected = model.state_dict()
    state = _fix_keys(state)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:3])}")
        raise WeightsError(
            f"{source} does not fit {module_cls.__name__}: {'; '.join(parts)} (wrong file or config.json?)"
        )
    for k, ref in expected.items():
        if state[k].shape != ref.shape:
            raise WeightsError(
                f"{source}: tensor {k} has shape {tuple(state[k].shape)}, the config expects "
                f"{tuple(ref.shape)} (config.json and weights do not belong together)"
            )
    if dtype is not None or device is not None:
        state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- model folders

# What generation needs from a Diffusers-layout folder, and nothing else (no safety checker, no pickles).
COMPONENT_WEIGHTS = {
    "text_encoder": "model",
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
}
CONFIG_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "unet/config.json",
    "vae/config.json",
    "tokenizer/merges.txt",
    "tokenizer/vocab.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
]


def weights_file(folder: Path, component: str, half: bool) -> Path:
    """The safetensors file of a component, preferring the `.fp16` variant when running in float16 (bfloat16
    reads the float32 file: going through fp16 would round twice)."""
    stem = folder / component / COMPONENT_WEIGHTS[component]
    candidates = [stem.with_name(stem.name + ".fp16.safetensors")] if half else []
    candidates.append(stem.with_name(stem.name + ".safetensors"))
    for path in candidates:
        if path.is_file():
            return path
    pickles = [p.name for p in (folder / component).glob("*") if p.suffix in PICKLE_SUFFIXES]
    hint = f" (only pickles found: {', '.join(pickles)}; they are never loaded)" if pickles else ""
    raise WeightsError(f"missing weights file {candidates[-1]}{hint}")


def resolve_model(model: str, half: bool = False) -> Path:
    """A local folder as it is, or a hub repo id downloaded (only what generation needs) into the HF cache.

    A local folder never touches the network. `HF_HUB_OFFLINE=1` makes the hub path use the cache only.
    """
    path = Path(model).expanduser()
    if path.exists():
        if path.is_file() and path.suffix in PICKLE_SUFFIXES:
            load_safetensors(path)  # raises the explanation
        return path
    looks_local = model.startswith((".", "/", "~")) or model.count("/") != 1 or os.sep == "\\" and "\\" in model
    if looks_local:
        raise WeightsError(f"model folder {model} does not exist; pass --model with a Diffusers-layout folder")
    return _download(model, half)


def _download(repo_id: str, half: bool) -> Path:
    """Configs, tokenizer files and the weights generation needs: the `.fp16` files in half precision (falling
    back to the float32 file of a component that has none), else the float32 ones."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    suffix = ".fp16.safetensors" if half else ".safetensors"
    try:
        patterns = CONFIG_FILES + [f"{c}/{stem}{suffix}" for c, stem in COMPONENT_WEIGHTS.items()]
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
        missing = [c for c, stem in COMPONENT_WEIGHTS.items() if not (folder / c / f"{stem}{suffix}").is_file()]
        if half and missing:
            patterns = [f"{c}/{COMPONENT_WEIGHTS[c]}.safetensors" for c in missing]
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
        return folder
    except LocalEntryNotFoundError:
        raise WeightsError(
            f"cannot download {repo_id}: no network connection (or HF_HUB_OFFLINE=1) and no cached copy; "
            "connect once, or pass --model /path/to/a/local/sd15/folder"
        ) from None
    except RepositoryNotFoundError:
        raise WeightsError(f"hub repo {repo_id} not found (or gated); check the name or pass a local folder") from None
    except (HfHubHTTPError, OSError) as e:
        raise WeightsError(f"download of {repo_id} failed ({type(e).__name__}: {e}); pass a local folder") from None
