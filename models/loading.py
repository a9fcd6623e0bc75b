"""Weights: find a model's files (local folder, hub repo or one LDM file), read its configs, and load safetensors into
modules built on the meta device. `load_model` is the one door for the driver; `load_component` and
`load_single_file` load the networks of one folder component or one single file.

Loading never runs a random initialisation and never copies a tensor twice: the module is built on the `meta`
device (shapes only), then `load_state_dict(strict=True, assign=True)` makes the memory-mapped safetensors tensors
the parameters themselves. Key names are `models.ldm`'s job (checkpoint quirks, the single-file layout); this file
turns whatever goes wrong into a one-line WeightsError naming the file. Pickled checkpoints (`.bin`, `.ckpt`, `.pt`)
are never read: unpickling can run arbitrary code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from models import ldm
from models.clip import CLIPTextConfig, CLIPTextModel
from models.unet import UNet, UNetConfig
from models.vae import AutoencoderKL, VAEConfig
from scheduler import SD15_SCHEDULER_CONFIG, SchedulerConfig
from tokenizer import CLIPTokenizer

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


class WeightsError(Exception):
    """A user-facing problem with model files: the message is one line saying what and how to fix it."""


# ----------------------------------------------------------------------------- configs

C = TypeVar("C")


def read_config(cls: type[C], path: Path) -> C:
    """Fill the frozen config dataclass `cls` from a Diffusers/Transformers `config.json`.

    Keys the dataclass does not have are ignored (the files carry many we never vary); missing keys keep
    the dataclass defaults, which are the SD 1.5 values. JSON lists become tuples so configs stay hashable.
    A value the dataclass refuses (its `__post_init__` checks) is a WeightsError naming the file.
    """
    path, names = Path(path), {f.name for f in dataclasses.fields(cls)}
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"missing config file {path}: the model folder is incomplete") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot parse {path}: {e}") from None
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names})
    except (TypeError, ValueError) as e:
        raise WeightsError(f"unsupported {path.parent.name}/{path.name} in {path.parent.parent}: {e}") from None


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
            return {k: f.get_tensor(k) for k in f.keys()}  # safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"cannot read {path}: not a valid safetensors file ({e}); re-download it") from None


M = TypeVar("M", bound=nn.Module)


def build(
    module_cls: type[M], config: object, state: dict[str, torch.Tensor], source: str, dtype=None, device=None
) -> M:
    """Build `module_cls(config)` on the meta device and assign `state` (already in our names) to it, strictly.

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
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        problems = (("missing", missing), ("unexpected", unexpected))
        parts = [f"{len(keys)} {what} key(s), e.g. {', '.join(keys[:3])}" for what, keys in problems if keys]
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

# The official (Diffusers) layout of the networks: <folder>/<component>/config.json, read into the config dataclass,
# and <stem>.safetensors (or <stem>.fp16.safetensors), loaded into the module. Nothing else is ever read (no safety
# checker, no pickles).
LAYOUT = {  # component: (weights file stem, config dataclass, module)
    "text_encoder": ("model", CLIPTextConfig, CLIPTextModel),
    "unet": ("diffusion_pytorch_model", UNetConfig, UNet),
    "vae": ("diffusion_pytorch_model", VAEConfig, AutoencoderKL),
}
CONFIG_FILES = ["model_index.json", "scheduler/scheduler_config.json", *(f"{c}/config.json" for c in LAYOUT)] + [
    f"tokenizer/{name}" for name in ("merges.txt", "vocab.json", "tokenizer_config.json", "special_tokens_map.json")
]


def weights_file(folder: Path, component: str, half: bool) -> Path:
    """The safetensors file of a component, preferring the `.fp16` variant when running in float16 (bfloat16
    reads the float32 file: going through fp16 would round twice)."""
    stem = folder / component / LAYOUT[component][0]
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
        patterns = CONFIG_FILES + [f"{c}/{stem}{suffix}" for c, (stem, _, _) in LAYOUT.items()]
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
        missing = [c for c, (stem, _, _) in LAYOUT.items() if not (folder / c / f"{stem}{suffix}").is_file()]
        if half and missing:
            patterns = [f"{c}/{LAYOUT[c][0]}.safetensors" for c in missing]
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


# ----------------------------------------------------------------------------- the networks


def read_network_configs(config_dir: Path | None) -> tuple[CLIPTextConfig, UNetConfig, VAEConfig]:
    """The networks' configs from a Diffusers-layout folder; without one SD 1.5's (the dataclass defaults)."""
    if config_dir is None:
        return CLIPTextConfig(), UNetConfig(), VAEConfig()
    text, unet, vae = (read_config(cls, config_dir / name / "config.json") for name, (_, cls, _) in LAYOUT.items())
    return text, unet, vae


def _component(folder: Path, name: str, config: object, dtype, device) -> nn.Module:
    path = weights_file(folder, name, half=dtype == torch.float16)
    return build(LAYOUT[name][2], config, ldm.fix_keys(load_safetensors(path)), str(path), dtype, device)


def load_component(
    folder: Path, name: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> CLIPTextModel | UNet | AutoencoderKL:
    """The network `name` ("text_encoder", "unet" or "vae") of a Diffusers-layout folder: `<name>/config.json` and
    its safetensors file (the `.fp16` one when running in float16 and the folder has one)."""
    folder = Path(folder)
    return _component(folder, name, read_config(LAYOUT[name][1], folder / name / "config.json"), dtype, device)


def _single_file(path: Path, configs: tuple, dtype, device) -> tuple[CLIPTextModel, UNet, AutoencoderKL]:
    state = load_safetensors(path)  # refuses pickles (.ckpt, ...): they can run code when loaded
    try:
        text, unet, vae = ldm.split_single_file(state, configs[1], configs[2])
    except ValueError as e:  # a key that is in no network
        raise WeightsError(f"{path}: {e}") from None
    return (
        build(CLIPTextModel, configs[0], text, f"{path} [{ldm.TEXT}*]", dtype, device),
        build(UNet, configs[1], unet, f"{path} [{ldm.UNET}*]", dtype, device),
        build(AutoencoderKL, configs[2], vae, f"{path} [{ldm.VAE}*]", dtype, device),
    )


def load_single_file(
    path: Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None, config: Path | None = None
) -> tuple[CLIPTextModel, UNet, AutoencoderKL]:
    """Text encoder, UNet and VAE from one LDM-layout safetensors file. The configs are SD 1.5's (our dataclass
    defaults), or those of the Diffusers-layout folder `config` (`text_encoder/`, `unet/`, `vae/config.json`)."""
    return _single_file(Path(path), read_network_configs(None if config is None else Path(config)), dtype, device)


# ----------------------------------------------------------------------------- the model


class Model(NamedTuple):
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet
    vae: AutoencoderKL
    scheduler_config: SchedulerConfig


def load_model(model: str | Path, dtype: torch.dtype, device: torch.device, config: str | Path | None = None) -> Model:
    """Everything generation needs from a Diffusers-layout folder, a hub repo id (the fp16 files when `dtype` is
    float16) or an original single-file checkpoint (configs: SD 1.5's built in, or the Diffusers folder `config`)."""
    path = resolve_model(str(model), half=dtype == torch.float16)
    config_dir = Path(config) if config else (None if path.is_file() else path)
    # Every config before any weights: a model our samplers cannot run (v-prediction, other betas, ...) or a broken
    # config.json is refused at once, not after gigabytes of weights were read.
    scheduler_config = SD15_SCHEDULER_CONFIG
    if config_dir is not None:
        scheduler_config = read_config(SchedulerConfig, config_dir / "scheduler" / "scheduler_config.json")
    configs = read_network_configs(config_dir)
    if path.is_file():
        networks = _single_file(path, configs, dtype, device)
    else:
        networks = tuple(_component(path, name, cfg, dtype, device) for name, cfg in zip(LAYOUT, configs, strict=True))
    tokenizer = CLIPTokenizer()  # OpenAI's vocabulary, shipped in tokenizer/
    if config_dir is not None:
        try:
            tokenizer = CLIPTokenizer.from_folder(config_dir / "tokenizer")
        except (OSError, ValueError, KeyError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise WeightsError(f"cannot read the tokenizer files in {config_dir / 'tokenizer'}: {e}") from None
    return Model(tokenizer, *networks, scheduler_config)
