"""Weights: find a model's files (local folder, hub repo or one LDM file), read its configs, and load safetensors into
modules built on the meta device. `load_model` is the one door for the driver; `load_component` and
`load_single_file` load the networks of one folder component or one single file.

Loading never runs a random initialisation and never copies a tensor twice: the module is built on the `meta`
device (shapes only), then `load_state_dict(strict=True, assign=True)` makes the memory-mapped safetensors tensors
the parameters themselves. Key names are `models.ldm`'s job (checkpoint quirks, the single-file layout), checking the
config files `models.configs`'; this file turns whatever goes wrong into a one-line WeightsError naming the file.
Pickled checkpoints (`.bin`, `.ckpt`, `.pt`) are never read: unpickling can run arbitrary code.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from models import ldm
from models.clip import CLIPTextConfig, CLIPTextModel
from models.configs import SD2, SDXL, WeightsError, read_config
from models.controlnet import ControlNet, ControlNetConfig
from models.taesd import TinyAutoencoder, TinyAutoencoderConfig, TinyDecoder, original_keys
from models.unet import UNet, UNetConfig
from models.vae import AutoencoderKL, VAEConfig
from scheduler import SD15_SCHEDULER_CONFIG, SchedulerConfig
from tokenizer import CLIPTokenizer

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


# ----------------------------------------------------------------------------- tensors


def looks_pickled(path: Path) -> bool:
    r"""Whether a file that is not valid safetensors starts like a torch.save checkpoint: a zip archive (`PK\x03\x04`,
    PyTorch >= 1.6) or a bare pickle (`\x80` and protocol 2-5), and not like a safetensors file cut short (the 8-byte
    header length, then `{`)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    pickle = len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5
    return (head[:4] == b"PK\x03\x04" or pickle) and head[8:9] != b"{"


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
        if looks_pickled(path):
            raise WeightsError(
                f"cannot read {path}: not a valid safetensors file but a PyTorch pickle/zip checkpoint under a "
                ".safetensors name, which is never loaded (unpickling can run arbitrary code); download the "
                ".safetensors version instead"
            ) from None
        raise WeightsError(f"cannot read {path}: not a valid safetensors file ({e}); re-download it") from None


M = TypeVar("M", bound=nn.Module)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the networks compute in (quantised: no)


def build(
    module_cls: type[M], config: object, state: dict[str, torch.Tensor], source: str, dtype=None, device=None
) -> M:
    """Build `module_cls(config)` on the meta device and assign `state` (already in our names) to it, strictly.

    Every expected key must be present with its exact shape and a SUPPORTED_DTYPES dtype, and no other key may be
    left over; errors name the file (`source`) and the first offending keys. `dtype` converts floating tensors (fp16
    files can run in fp32 and back); `device` moves them. Without either, the mmapped tensors are used as they are.
    """
    try:
        with torch.device("meta"):
            model = module_cls(config)
    except Exception as e:  # the config dataclasses check every value, so this is a gap in their checks
        raise WeightsError(
            f"{source}: cannot build {module_cls.__name__} from {config} ({type(e).__name__}: {e})"
        ) from None
    if bad := next((k for k, v in state.items() if v.dtype not in SUPPORTED_DTYPES), None):
        raise WeightsError(
            f"{source}: tensor {bad} is {str(state[bad].dtype).removeprefix('torch.')}; minsd loads float32, float16 "
            "and bfloat16 weights only (a quantised checkpoint?): use an unquantised .safetensors file"
        )
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
        state = convert(state, dtype, device)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def convert(state: dict[str, torch.Tensor], dtype, device) -> dict[str, torch.Tensor]:
    """`state`'s floating tensors in `dtype` on `device`, one tensor at a time, each memory-mapped source tensor's
    pages dropped from RSS (resources.release_tensors) as soon as its copy exists: the peak of a bf16 load from a
    float32 file is the bf16 weights (2.0 GB for SD 1.5), not those plus the float32 file's pages (5.8 GB before:
    bench/README.md). bfloat16 convolution weights on the CPU come out channels_last at once, the layout
    load_pipeline gives them for oneDNN's AMX kernels, so no second copy is made there."""
    out, cpu = {}, device is None or torch.device(device).type == "cpu"
    for k, v in state.items():
        nhwc = v.ndim == 4 and dtype == torch.bfloat16 and cpu
        fmt = torch.channels_last if nhwc else torch.preserve_format
        out[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else None, memory_format=fmt)
        if out[k].untyped_storage().data_ptr() != v.untyped_storage().data_ptr():
            release_tensors([v])
    return out


# ----------------------------------------------------------------------------- mapped pages and the heap (CPU)


def trim_heap() -> None:
    """Hand the free memory at the top of glibc's heap back to the kernel (malloc_trim(0)): after tune_malloc the
    UNet's freed activations stay there, and the VAE decode's large buffers (mmap'ed, over 32 MiB) would come on top;
    -0.5 GB peak RSS at 512x512 (bench/README.md). Also called once a converted copy of weights is written. A no-op
    without glibc."""
    if sys.platform.startswith("linux"):
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
        if trim is not None:
            trim(0)


def release_tensors(tensors: list[torch.Tensor]) -> None:
    """Take the memory-mapped `tensors` out of this process's resident memory until they are next read: for each CPU
    tensor, madvise(MADV_DONTNEED) on its whole pages if every one is a file page or not in memory, as
    /proc/self/pagemap tells (a 64-bit entry per page, bits 63/62/61: present/swapped/file page; Linux's
    Documentation/admin-guide/mm/pagemap.rst). The kernel keeps the pages in its page cache, so a later read maps
    them back from memory. Anonymous pages (ordinary memory, or a mapped page written to: DONTNEED would throw that
    private copy away) and swapped ones are never touched; a no-op where pagemap cannot be read.
    Callers: convert() on each source tensor right after its copy is made, resources.release_pages on a network."""
    if not sys.platform.startswith("linux") or not os.access("/proc/self/pagemap", os.R_OK):
        return  # not Linux, or no /proc (some sandboxes)
    page, libc = os.sysconf("SC_PAGE_SIZE"), ctypes.CDLL(None)
    storages = [t.untyped_storage() for t in tensors if t.device.type == "cpu"]
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        for begin, end in {(s.data_ptr(), s.data_ptr() + s.nbytes()) for s in storages if s.nbytes()}:
            first, last = begin // page, -(-end // page)  # the whole pages the tensor touches
            entries = os.pread(pagemap.fileno(), 8 * (last - first), 8 * first)
            flags = np.frombuffer(entries, dtype=np.uint64) >> np.uint64(61)
            if ((flags == 0b101) | (flags <= 0b001)).all():  # each page a present file page, or not in memory
                libc.madvise(ctypes.c_void_p(first * page), ctypes.c_size_t((last - first) * page), 4)  # DONTNEED


# ----------------------------------------------------------------------------- converted copies (CPU)

CACHE_ENV = "MINSD_CACHE"  # where converted weights are kept; "off": never written, converted at each load
HALF_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16"}  # safetensors' names of the dtypes a copy is made in


def cache_folder() -> Path | None:
    value = os.environ.get(CACHE_ENV, "")
    if value == "off":
        return None
    return Path(value or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minsd")


def read_weights(path: Path, dtype, device) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, for a run in `dtype` on `device`: the file itself (memory-mapped), or, when the
    CPU runs it in another floating dtype (bf16 from a float32 file), a converted copy kept in cache_folder().

    Why a file and not converted tensors in memory: generate() takes a network's weights out of RSS while it is not
    needed (resources.release_pages: the text encoder during the loop, the UNet during the decode), which works for
    file pages only. With the bf16 UNet in ordinary memory, a 512x512 bf16 run peaked at 3.56 GB (bf16 weights +
    1.5 GB, the decode on top of all the weights); with the copy, at the UNet's weights plus its activations
    (bench/README.md). The copy is written once per source file (its path, size and modification time name it;
    about half the float32 size), atomically, 4-D weights in the channels_last order load_pipeline wants; a later
    load only maps it. If it cannot be written (read-only, full disk), the tensors are converted in memory."""
    path, folder = Path(path), cache_folder()
    cpu = device is None or torch.device(device).type == "cpu"
    if folder is None or dtype not in HALF_NAMES or not cpu:  # float32 runs (the reference) read the file itself
        return load_safetensors(path)
    try:
        stat = path.resolve().stat()
        with safe_open(path, framework="pt") as f:  # the header only: which dtypes the file holds
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    except (SafetensorError, OSError, ValueError):
        return load_safetensors(path)  # raises the explanation
    name = str(dtype).removeprefix("torch.")
    if dtypes - {"I64"} <= {HALF_NAMES[dtype]} or not dtypes <= {"F32", "F16", "BF16", "I64"}:
        return load_safetensors(path)  # already in dtype, or a dtype build() refuses with the explanation
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{name}".encode()).hexdigest()[:16]
    copy = folder / f"{path.stem}-{name}-{key}.safetensors"
    if copy.is_file():
        try:
            return channels_last_views(load_safetensors(copy), copy)
        except WeightsError:
            pass  # a damaged copy: written again below
    state = convert(load_safetensors(path), dtype, device)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(folder).free < 2 * sum(t.nbytes for t in state.values()):
            raise OSError(f"less than twice its size free in {folder}")
        nhwc = [k for k, t in state.items() if t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last)]
        flat = {k: t.permute(0, 2, 3, 1) if k in nhwc else t for k, t in state.items()}  # NHWC order: contiguous
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".partial", delete=False) as tmp:
            pass
        try:
            save_file(flat, tmp.name, {"source": str(path), "nhwc": ",".join(nhwc)})
            os.replace(tmp.name, copy)
        finally:
            Path(tmp.name).unlink(missing_ok=True)
    except (OSError, SafetensorError) as e:  # a full disk surfaces as either
        warnings.warn(f"cannot keep a {name} copy of {path} in {folder} ({e}): converting it at each load, and "
                      f"its weights stay in memory (set {CACHE_ENV} to a writable folder)", stacklevel=4)  # fmt: skip
        return state
    del state, flat
    trim_heap()  # the converted tensors' memory back to the system: the copy's pages replace it
    return channels_last_views(load_safetensors(copy), copy)


def channels_last_views(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """A converted copy's tensors as they were written: the 4-D ones named in its `nhwc` metadata are stored in
    (O, H, W, I) order and come back as channels_last (O, I, H, W) views of the mapped file."""
    with safe_open(path, framework="pt") as f:
        nhwc = [k for k in (f.metadata() or {}).get("nhwc", "").split(",") if k]
    if any(k not in state or state[k].ndim != 4 for k in nhwc):
        raise WeightsError(f"{path}: damaged converted copy")
    return {k: t.permute(0, 3, 1, 2) if k in nhwc else t for k, t in state.items()}


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


REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name as the hub spells them: no ./, /, ~ or \\


def hub_repo_id(name: str) -> bool:
    """Whether a path that does not exist may be a hub repo id: owner/name as the hub spells them, and no local
    folder named like the owner (`m/sd15-tny` beside a local m/ is a typo in a path, not a repo)."""
    return bool(REPO_ID.fullmatch(name)) and not Path(name.split("/")[0]).is_dir()


def resolve_model(model: str, half: bool = False) -> Path:
    """A local folder or file as it is, or a hub repo id downloaded (only what generation needs) into the HF cache.

    A local path never touches the network, nor does a missing one: only `owner/name` whose `owner` is no local
    folder is taken for a repo id (with a warning). `HF_HUB_OFFLINE=1` makes the hub path use the cache only.
    """
    path = Path(model).expanduser()
    if path.exists():
        if path.is_file() and path.suffix in PICKLE_SUFFIXES:
            load_safetensors(path)  # raises the explanation
        # A component folder (`m/unet`) or a file in one (`m/unet/diffusion_pytorch_model.safetensors`, which would
        # otherwise be read as a single-file checkpoint): point at the model folder `m`.
        full = Path(os.path.abspath(path))
        above = full.parent.parent if full.is_file() else full.parent
        if not (full / "unet").is_dir() and (above / "unet" / "config.json").is_file():
            raise WeightsError(f"{model} is part of the model folder {above}, not a model; pass --model {above}")
        return path
    if not hub_repo_id(model):
        raise WeightsError(f"model folder {model} does not exist; pass --model with a Diffusers-layout folder")
    if model != DEFAULT_MODEL:  # a typo in a local path would be sent to the hub: say so
        warnings.warn(f"{model} is not a local path; trying the hub", stacklevel=2)
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


def check_fit(folder: Path, text: CLIPTextConfig, unet: UNetConfig, vae: VAEConfig) -> None:
    """The UNet denoises the VAE's latents, cross-attending to the text encoder's states: their widths must agree."""
    c = vae.latent_channels  # an inpainting UNet also sees the mask and the masked image's latents: 2 c + 1
    if unet.out_channels != c or unet.in_channels not in (c, 2 * c + 1):
        raise WeightsError(
            f"the configs in {folder} do not fit together: unet in_channels={unet.in_channels} and out_channels="
            f"{unet.out_channels} must be vae latent_channels={c} (in_channels {2 * c + 1} for inpainting)"
        )
    if unet.cross_attention_dim != text.hidden_size:
        raise WeightsError(
            f"the configs in {folder} do not fit together: unet cross_attention_dim={unet.cross_attention_dim} "
            f"must equal text_encoder hidden_size={text.hidden_size}"
        )


def read_network_configs(config_dir: Path | None) -> tuple[CLIPTextConfig, UNetConfig, VAEConfig]:
    """The networks' configs from a Diffusers-layout folder; without one SD 1.5's (the dataclass defaults). The three
    must fit together: the UNet denoises the VAE's latents, cross-attending to the text encoder's states."""
    if config_dir is None:
        return CLIPTextConfig(), UNetConfig(), VAEConfig()
    text, unet, vae = (read_config(cls, config_dir / name / "config.json") for name, (_, cls, _) in LAYOUT.items())
    check_fit(config_dir, text, unet, vae)
    return text, unet, vae


def _component(folder: Path, name: str, config: object, dtype, device) -> nn.Module:
    path = weights_file(folder, name, half=dtype == torch.float16)
    return build(LAYOUT[name][2], config, ldm.fix_keys(read_weights(path, dtype, device)), str(path), dtype, device)


def load_component(
    folder: Path, name: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> CLIPTextModel | UNet | AutoencoderKL:
    """The network `name` ("text_encoder", "unet" or "vae") of a Diffusers-layout folder: `<name>/config.json` and
    its safetensors file (the `.fp16` one when running in float16 and the folder has one)."""
    folder = Path(folder)
    return _component(folder, name, read_config(LAYOUT[name][1], folder / name / "config.json"), dtype, device)


def _single_file(path: Path, configs: tuple, dtype, device) -> tuple[CLIPTextModel, UNet, AutoencoderKL]:
    state = read_weights(path, dtype, device)  # refuses pickles (.ckpt, ...): they can run code when loaded
    conv_in, c = state.get(f"{ldm.UNET}input_blocks.0.0.weight"), configs[2].latent_channels
    if configs[1].in_channels == c and conv_in is not None and conv_in.ndim == 4 and conv_in.shape[1] == 2 * c + 1:
        # sd-v1-5-inpainting.safetensors: the UNet sees the mask and the masked image's latents too, and only this
        # tensor tells (its configs are the base model's)
        configs = (configs[0], dataclasses.replace(configs[1], in_channels=2 * c + 1), configs[2])
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


# ----------------------------------------------------------------------------- a VAE of its own

VAE_CLASSES = {"AutoencoderKL": (VAEConfig, AutoencoderKL), "AutoencoderTiny": (TinyAutoencoderConfig, TinyAutoencoder)}
VAE_FILES = ["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"]


def _vae_folder(folder: Path, dtype, device) -> AutoencoderKL | TinyAutoencoder:
    """A Diffusers VAE folder (config.json + diffusion_pytorch_model.safetensors), or a model folder's vae/."""
    folder = folder / "vae" if (folder / "vae" / "config.json").is_file() else folder
    try:
        name = json.loads((folder / "config.json").read_text()).get("_class_name", "AutoencoderKL")
    except (OSError, ValueError, AttributeError) as e:
        raise WeightsError(f"cannot read {folder / 'config.json'}: {e}") from None
    if name not in VAE_CLASSES:
        raise WeightsError(f"{folder} holds a {name}, not a VAE minsd runs ({' or '.join(VAE_CLASSES)})")
    config_cls, module = VAE_CLASSES[name]
    stem = folder / "diffusion_pytorch_model"
    half = stem.with_name(stem.name + ".fp16.safetensors")
    path = half if dtype == torch.float16 and half.is_file() else stem.with_name(stem.name + ".safetensors")
    config = read_config(config_cls, folder / "config.json")
    return build(module, config, ldm.fix_keys(load_safetensors(path)), str(path), dtype, device)


def _vae_file(path: Path, dtype, device, config: VAEConfig) -> AutoencoderKL | TinyAutoencoder:
    """One safetensors file: an LDM VAE (`vae-ft-mse-840000-ema-pruned.safetensors`, keys with or without
    `first_stage_model.`; a whole LDM checkpoint gives its VAE), the same in Diffusers' names, or madebyollin's TAESD
    taesd_decoder / taesd_encoder file, with its partner beside it if there is one (the decoder alone decodes only).
    An AutoencoderKL file has no config: `config` (the model's VAE's) says its shape."""
    state = load_safetensors(path)
    if state and all(k.split(".")[0].isdigit() for k in state):  # a bare nn.Sequential: TAESD's original files
        part = "encoder" if state.get("0.weight", torch.empty(0)).ndim == 4 else "decoder"
        partner = {"encoder": "decoder", "decoder": "encoder"}[part]
        other = path.with_name(path.name.replace(part, partner))  # taesd_decoder <-> taesd_encoder
        found = other != path and other.is_file()
        if part == "encoder" and not found:
            raise WeightsError(f"{path} is a TAESD encoder; give its decoder (taesd_decoder.safetensors)")
        parts = {path: part} | ({other: partner} if found else {})
        try:
            files = {p: state if p == path else load_safetensors(p) for p in parts}  # the given one read once
            state = {k: v for p, q in parts.items() for k, v in original_keys(files[p], q).items()}
        except ValueError as e:
            raise WeightsError(f"{path}: {e}") from None
        module = TinyAutoencoder if len(parts) == 2 else TinyDecoder
        return build(module, TinyAutoencoderConfig(), state, f"{path} [TAESD]", dtype, device)
    if any(k.startswith(ldm.VAE) for k in state):  # a whole single-file checkpoint: its VAE
        state = {k.removeprefix(ldm.VAE): v for k, v in state.items() if k.startswith(ldm.VAE)}
    state = ldm.fix_keys(state)
    if not any(".down_blocks." in k or ".up_blocks." in k for k in state):  # LDM's names (encoder.down.0.block.0)
        try:
            state = ldm.rename(state, ldm.vae_blocks(config), "")
        except ValueError as e:
            raise WeightsError(f"{path}: {e}") from None
    return build(AutoencoderKL, config, state, str(path), dtype, device)


def load_vae(vae: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
             config: VAEConfig | None = None) -> AutoencoderKL | TinyAutoencoder:  # fmt: skip
    """A VAE to use in place of a model's own: a Diffusers AutoencoderKL or AutoencoderTiny (TAESD) folder or hub
    repo (`stabilityai/sd-vae-ft-mse`, `madebyollin/taesd`), or one safetensors file (see _vae_file), whose shape is
    `config` (the model's VAE config; default SD 1.5's) or TAESD's."""
    path = Path(vae).expanduser()
    if not path.exists():
        if not hub_repo_id(str(vae)):
            raise WeightsError(f"VAE {vae} does not exist; give a VAE folder, a .safetensors file or a hub repo id")
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:  # the fp16 file when running in float16 and the repo has one, else the float32 one
            files = VAE_FILES[:2] if dtype != torch.float16 else VAE_FILES[::2]
            path = Path(snapshot_download(str(vae), allow_patterns=files))
            if dtype == torch.float16 and not (path / "diffusion_pytorch_model.fp16.safetensors").is_file():
                path = Path(snapshot_download(str(vae), allow_patterns=VAE_FILES[:2]))
        except LocalEntryNotFoundError:
            raise WeightsError(f"cannot download the VAE {vae}: offline and not in the cache") from None
        except (HfHubHTTPError, OSError) as e:
            raise WeightsError(f"download of the VAE {vae} failed ({type(e).__name__}: {e})") from None
    if path.is_dir():
        return _vae_folder(path, dtype, device)
    return _vae_file(path, dtype, device, config if config is not None else VAEConfig())


# ----------------------------------------------------------------------------- ControlNets

CONTROLNET_WEIGHTS = "diffusion_pytorch_model"  # beside config.json, as a hub repo such as lllyasviel/control_v11p_*


def load_controlnet(
    model: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    config: Path | None = None,
) -> ControlNet:  # fmt: skip
    """A ControlNet from a Diffusers-layout folder (`config.json` and `diffusion_pytorch_model.safetensors`, or its
    `.fp16` variant in float16), a hub repo id of one (`lllyasviel/control_v11p_sd15_canny`), or an A1111 single file
    (`control_v11p_sd15_canny.safetensors`, LDM names): SD 1.5's ControlNet config, or the folder `config`'s."""
    path, half = Path(model).expanduser(), dtype == torch.float16
    if not path.exists():
        if not hub_repo_id(str(model)):
            raise WeightsError(f"ControlNet {model} does not exist; pass a folder, a .safetensors file or a repo id")
        path = _download_controlnet(str(model), half)
    if path.is_dir():
        cfg = read_config(ControlNetConfig, path / "config.json")
        names = [f"{CONTROLNET_WEIGHTS}.fp16.safetensors"] * half + [f"{CONTROLNET_WEIGHTS}.safetensors"]
        file = next((path / n for n in names if (path / n).is_file()), path / names[-1])
        return build(ControlNet, cfg, load_safetensors(file), str(file), dtype, device)
    cfg = read_config(ControlNetConfig, Path(config) / "config.json") if config else ControlNetConfig()
    state = load_safetensors(path)  # refuses pickles (.pth, ...)
    # An SD 2.x or SDXL ControlNet cross-attends to a wider text encoder: say which model it is for.
    width = next((v.shape[-1] for k, v in state.items() if k.endswith("attn2.to_k.weight")), cfg.cross_attention_dim)
    if width != cfg.cross_attention_dim:
        base = {1024: SD2, 2048: SDXL}.get(width, f"a text encoder of width {width}")
        raise WeightsError(f"{path} is a ControlNet for {base}; minsd runs SD 1.x ControlNets only")
    try:
        state = ldm.controlnet_single_file(state, cfg)
    except ValueError as e:  # a key that is in no ControlNet
        raise WeightsError(f"{path}: {e}") from None
    return build(ControlNet, cfg, state, str(path), dtype, device)


def _download_controlnet(repo_id: str, half: bool) -> Path:
    """config.json and the weights: the `.fp16` file in half precision where the repo has one, else the float32 one."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        for suffix in [".fp16.safetensors"] * half + [".safetensors"]:
            folder = Path(snapshot_download(repo_id, allow_patterns=["config.json", CONTROLNET_WEIGHTS + suffix]))
            if (folder / (CONTROLNET_WEIGHTS + suffix)).is_file():
                break
        return folder
    except LocalEntryNotFoundError:
        raise WeightsError(f"cannot download ControlNet {repo_id}: no network connection and no cached copy") from None
    except RepositoryNotFoundError:
        raise WeightsError(f"hub repo {repo_id} not found (or gated); check the ControlNet's name") from None
    except (HfHubHTTPError, OSError) as e:
        raise WeightsError(f"download of {repo_id} failed ({type(e).__name__}: {e}); pass a local folder") from None


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
    # Every config (and the tokenizer) before any weights: a model our samplers cannot run (v-prediction, other betas,
    # ...) or a broken config.json is refused at once, not after gigabytes of weights were read.
    scheduler_config = SD15_SCHEDULER_CONFIG
    if config_dir is not None:
        scheduler_config = read_config(SchedulerConfig, config_dir / "scheduler" / "scheduler_config.json")
    configs = read_network_configs(config_dir)
    tokenizer = CLIPTokenizer()  # OpenAI's vocabulary, shipped in tokenizer/
    if config_dir is not None:
        try:
            tokenizer = CLIPTokenizer.from_folder(config_dir / "tokenizer")
        except (OSError, ValueError, KeyError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise WeightsError(f"cannot read the tokenizer files in {config_dir / 'tokenizer'}: {e}") from None
    if (top := max(tokenizer.encoder.values())) >= configs[0].vocab_size:  # an id the text encoder has no row for
        raise WeightsError(
            f"the tokenizer's vocab.json has token id {top}, but the text encoder's config.json says vocab_size="
            f"{configs[0].vocab_size}: the tokenizer and text encoder in {config_dir} do not belong together"
        )
    if path.is_file():
        networks = _single_file(path, configs, dtype, device)
    else:
        networks = tuple(_component(path, name, cfg, dtype, device) for name, cfg in zip(LAYOUT, configs, strict=True))
    return Model(tokenizer, *networks, scheduler_config)
