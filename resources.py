"""The machine under a run: which device, whether a run fits in its memory and time, and how the process uses memory.

Nothing here changes an image. The driver asks `choose_tiling` and `check_cost` before any work (a run that cannot
fit or finish is refused with the estimate, a long one announced) and, on the CPU, hands memory back with `trim_heap`
and `release_pages` once it is done with a network; the CLI calls `tune_malloc` once. Figures: bench/README.md.
"""

from __future__ import annotations

import ctypes
import functools
import re
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.loading import release_tensors, trim_heap  # noqa: F401 - trim_heap: for min_pipeline
from settings import UserError

MAX_STEP_SECONDS = 3600  # a longer UNet step cannot be interrupted (Ctrl-C waits for the kernel) nor, in practice, end
# Rough counts behind the estimates, per latent position (token) and per C^2 (C: a level's channels).
CONV3X3_FLOPS = 18  # a 3x3 convolution: 9 multiply-adds
TRANSFORMER_FLOPS = 88  # a transformer block's projections and GEGLU feed-forward (a generous count)
FEED_FORWARD_WIDTH = 12  # activations per token of GEGLU's feed-forward, in C: the 8 C projection and its 4 C product
VAE_FULL_SIZE_TENSORS = 8  # the VAE decoder's working set: about 8 tensors of its widest level at full size


def pick_device(name: str | None = None) -> torch.device:
    """The device named, checked to exist here (a UserError otherwise), or the first available of cuda, mps, cpu."""
    if not name:
        return torch.device(
            "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        )
    try:
        device = torch.device(name)
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


def cpu_has_amx() -> bool:
    """Intel AMX tiles (Xeon since Sapphire Rapids), enabled by the OS: bfloat16 matrix units, a UNet-sized 3x3
    convolution about 11x faster in bfloat16 than in float32 (bench/README.md)."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch >= 2.3; private, so looked up with care
    return bool(check()) if check is not None else False


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A torch dtype, its name ("float16"), or None / "auto" for auto_dtype's choice; a warning where the CPU makes it
    very slow (bf16 without AVX-512, about 100x; float16, about 27x: bench/README.md)."""
    dtype = None if dtype == "auto" else dtype
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if dtype is not None and dtype not in DTYPES.values():
        raise TypeError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    dtype = dtype or auto_dtype(device)[0]
    if device.type == "cpu" and dtype == torch.bfloat16 and "AVX512" not in torch.backends.cpu.get_cpu_capability():
        warnings.warn("bfloat16 on a CPU without AVX-512 is very slow; use --dtype float32", stacklevel=3)
    if device.type == "cpu" and dtype == torch.float16:
        warnings.warn("float16 on a CPU is about 27x slower than float32; use --dtype float32", stacklevel=3)
    return dtype


def auto_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    """What --dtype auto picks on `device`, and why: float16 on CUDA (half the memory, tensor cores), bfloat16 on a CPU
    with AMX, float32 on other CPUs (without AMX, bf16 gains nothing: AVX-512 CPUs emulate it, AVX2 ones are ~100x
    slower; bench/README.md) and other devices."""
    if device.type == "cuda":
        return torch.float16, "CUDA"
    if device.type == "cpu" and cpu_has_amx():
        return torch.bfloat16, "this CPU has AMX"
    return torch.float32, "no AMX on this CPU" if device.type == "cpu" else device.type


# ----------------------------------------------------------------------------- what a run will cost


def unet_flops(cfg, h: int, w: int) -> float:
    """Floating-point operations of one UNet call on one (h, w) latent, roughly: the ResNets' 3x3 convs and, at
    the levels with attention, the transformers (projections and GEGLU feed-forward, and self-attention's
    Q K^T and A V, 4 T^2 C for T = h w tokens: the term that explodes at large sizes)."""
    n, total = cfg.layers_per_block, 0.0
    levels = len(cfg.block_out_channels)
    for i, (c, kind) in enumerate(zip(cfg.block_out_channels, cfg.down_block_types, strict=True)):
        t = (h >> i) * (w >> i)
        total += (2 * n + 1) * 2 * CONV3X3_FLOPS * c * c * t  # n down + n+1 up ResNets, two 3x3 convs each
        if kind.startswith("CrossAttn"):
            total += (2 * n + 1) * (TRANSFORMER_FLOPS * c * c * t + 4 * t * t * c)
    c, t = cfg.block_out_channels[-1], (h >> levels - 1) * (w >> levels - 1)
    mid = 2 * 2 * CONV3X3_FLOPS * c * c * t + TRANSFORMER_FLOPS * c * c * t + 4 * t * t * c  # 2 ResNets, 1 transformer
    return total + mid


@functools.cache
def cpu_flops_per_second() -> float:
    """This CPU's speed on a UNet-sized 3x3 convolution, best of two (about 0.2 s, once per process)."""
    conv, x, times = torch.nn.Conv2d(320, 320, 3, padding=1), torch.randn(1, 320, 48, 48), []
    with torch.inference_mode():
        for _ in range(3):
            start = time.perf_counter()
            conv(x)
            times.append(time.perf_counter() - start)
    return CONV3X3_FLOPS * 320 * 320 * 48 * 48 / max(min(times[1:]), 1e-6)


def available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # Linux: what can be allocated without swapping, page cache included
        meminfo = Path("/proc/meminfo").read_text()
        return int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) * 1024
    except (OSError, AttributeError):
        return None


def vae_bytes(vae, dtype: torch.dtype, pixels: int) -> int:
    return VAE_FULL_SIZE_TENSORS * vae.config.block_out_channels[0] * pixels * torch.finfo(dtype).bits // 8


def choose_tiling(pipe, asked: bool, size: tuple[int, int]) -> bool:
    """Whether the VAE runs in tiles at this image size (H, W): when asked and the size exceeds one tile, or, with a
    warning, when an untiled pass would not fit in free memory."""
    free, needs = available_bytes(pipe.device), pipe.vae.needs_tiling(*size)
    if asked or not needs or free is None or vae_bytes(pipe.vae, pipe.vae_dtype, size[0] * size[1]) <= free:
        return asked and needs
    gb = vae_bytes(pipe.vae, pipe.vae_dtype, size[0] * size[1]) / 2**30
    warnings.warn(f"an untiled VAE pass at {size[1]}x{size[0]} needs about {gb:.1f} GB, {free / 2**30:.1f} GB "
                  "is free: decoding in tiles (--vae-tiling)", stacklevel=3)  # fmt: skip
    return True


def check_cost(pipe, batch: int, size: tuple[int, int], calls: int, tiled: bool) -> None:
    """Refuse, before any work and with the estimate, a run that cannot fit in memory or cannot finish; warn about a
    long one. Memory: the largest working set of the UNet (the skip activations and the first level's feed-forward)
    or of one image's VAE decode (at tile size when tiled); attention needs O(T) memory with PyTorch's fused kernels.
    Time (CPU only): FLOPs / measured speed. `size` is the image's (H, W), `batch` the UNet's."""
    (height, width), cfg, f = size, pipe.unet.config, pipe.vae.downsample_factor
    h, w, item = height // f, width // f, torch.finfo(pipe.dtype).bits // 8
    skips = sum((cfg.layers_per_block + 1) * c * (h >> i) * (w >> i) for i, c in enumerate(cfg.block_out_channels))
    unet_bytes = batch * (skips + FEED_FORWARD_WIDTH * cfg.block_out_channels[0] * h * w) * item
    pixels = min(height * width, pipe.vae.config.sample_size**2) if tiled else height * width
    need, free = max(unet_bytes, vae_bytes(pipe.vae, pipe.vae_dtype, pixels)), available_bytes(pipe.device)
    if free is not None and need > free:
        raise UserError(f"{width}x{height} needs about {need / 2**30:.1f} GB of working memory, but only "
                        f"{free / 2**30:.1f} GB is free on {pipe.device}; use a smaller size")  # fmt: skip
    if pipe.device.type != "cpu":
        return
    per_call = batch * unet_flops(cfg, h, w) / cpu_flops_per_second()
    if per_call > MAX_STEP_SECONDS:
        raise UserError(f"{width}x{height} would take about {per_call / 3600:.1f} h per step on this CPU "
                        f"(self-attention over {h * w} latent positions); use a smaller size")  # fmt: skip
    if per_call * calls > 600:
        minutes = per_call * calls / 60
        warnings.warn(f"{width}x{height} may take up to {minutes:.0f} min on this CPU (a rough estimate)", stacklevel=3)


# ----------------------------------------------------------------------------- the process's memory (CPU)


def tune_malloc() -> None:
    """Keep glibc from handing freed activation buffers back to the kernel between UNet calls (each step would
    otherwise page-fault its ~1 GB of activations back in): -20% per CPU step measured in bench/README.md, +0.1 GB
    peak RSS. Blocks over 32 MiB come from the heap too (M_MMAP_MAX 0): the VAE decoder's 67-134 MB activations were
    fresh mmaps, 500k page faults per 512x512 decode; now 1.8 -> 1.3 s per bf16 decode. generate() trims the heap
    after the decode (trim_heap), without which repeated runs in one process fragment it (fp32 peak 4.4 -> 5.5 GB by
    the third image; with the trim 4.6, bf16 2.7: bench/README.md). glibc's mallopt(param, value) with
    M_MMAP_THRESHOLD -3, M_TRIM_THRESHOLD -1, M_TOP_PAD -2, M_MMAP_MAX -4 (malloc.h); the same as
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=... in the environment. A no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # absent with musl
    if mallopt is not None:
        mallopt(-3, 32 << 20)  # blocks up to 32 MiB (glibc's maximum) come from the heap, not a fresh mmap
        mallopt(-1, 2**31 - 1)  # (almost) never trim the heap top
        mallopt(-2, 1 << 30)  # grow the heap 1 GiB at a time
        mallopt(-4, 0)  # and larger blocks too (M_MMAP_MAX 0): the VAE decode's 67-134 MB activations reuse the heap


def release_pages(module: nn.Module) -> None:
    """Take `module`'s memory-mapped weights out of this process's resident memory until they are next read
    (models.loading.release_tensors, which explains how).

    The safetensors tensors are views of a private mapping of the file: reading them faults its pages in, and they
    count in the process's RSS from then on. generate() calls this on the CPU for a network it is done with (the text
    encoder before the loop, the UNet before the VAE decode): the peak RSS of a run is then the UNet's weights and
    activations, not all the weights plus the decode (bench/README.md). bf16 runs map a converted copy of the files
    (models.loading.read_weights) so that this works for them too. LoRA-merged or GPU tensors are never touched.
    Weights packed for oneDNN (prepack_for_onednn) are dropped, their memory back to the heap (the caller's trim_heap
    hands it to the system); the next call packs them again."""
    release_tensors([*module.parameters(), *module.buffers()])
    for m in module.modules():
        if isinstance(m.__dict__.get("forward"), Packed):
            m.forward.drop()


# ----------------------------------------------------------------------------- oneDNN kernels (CPU, bfloat16)


def prepack_for_onednn(module: nn.Module) -> None:
    """Run `module`'s bfloat16 convolutions and linear layers on the CPU with their weights in oneDNN's blocked
    layout, made once per weight and input shape instead of at every call (what eager PyTorch does, and what
    inductor's freezing saves), with the bias and GEGLU's GELU and product fused into the matmul that makes them.

    Convolutions (PackedConv): a UNet step's convolutions read 1.7 GB of weights per call at batch 2; at the low levels
    (8x8, 16x16 latents) the per-call reorder of a 1280-channel 3x3 weight costs more than the convolution itself: 21 ->
    6 ms at 8x8, and the bf16 UNet call 0.77x in CPU seconds, bit for bit the same output (the same oneDNN kernel runs;
    only the weight's reorder moves out of the call). Linear layers (PackedLinear, PackedGEGLU): no separate bias
    copy, GELU or product pass over the 10240-wide feed-forward activations: the UNet call 0.92x (bench/README.md);
    the bias, GELU and product are applied to the float32 accumulators before the one rounding to bfloat16, so the
    output differs from eager's by bfloat16 rounding (relative 1.2e-2 on a full-size call, as channels_last does).
    The reordered copy is ordinary memory; the original, a page of the mapped bf16 copy (models.loading.read_weights),
    is released from RSS once packed, so the resident weights stay about the same. A weight replaced by another tensor
    (a LoRA merge) or a new input shape packs anew; a weight changed in place is not seen (nothing in minsd does that).
    Elsewhere (float32, autograd, torch.compile tracing, other devices) the layers run as usual. A no-op where this
    PyTorch lacks the oneDNN ops or the CPU cannot run them in bfloat16 (onednn_runs_bfloat16)."""
    if not onednn_runs_bfloat16():
        return
    from models.unet import GEGLU  # the one module whose tail is fused

    in_geglu = {id(m.proj) for m in module.modules() if isinstance(m, GEGLU)}
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str):
            m.forward = PackedConv(m)
        elif isinstance(m, GEGLU):
            m.forward = PackedGEGLU(m)
        elif isinstance(m, nn.Linear) and id(m) not in in_geglu:
            m.forward = PackedLinear(m)


def onednn_runs_bfloat16() -> bool:
    """Whether this PyTorch has the oneDNN ops prepack_for_onednn calls and this CPU runs them in bfloat16 (AVX-512
    BW/VL/DQ or AVX-NE-CONVERT; oneDNN refuses bf16 on an AVX2-only CPU, where eager PyTorch takes a slow path)."""
    mkldnn = torch.ops.mkldnn
    ops = ("_convolution_pointwise", "_linear_pointwise", "_reorder_linear_weight", "_is_mkldnn_bf16_supported")
    if not all(hasattr(mkldnn, op) for op in ops) or not hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"):
        return False
    return bool(mkldnn._is_mkldnn_bf16_supported())


def onednn_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether a packed layer takes its oneDNN path for input `x` and weight `w` (else the plain PyTorch op)."""
    return not (torch.compiler.is_compiling() or torch.is_grad_enabled() or x.device.type != "cpu"
                or x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16)  # fmt: skip


class Packed:
    """A layer's forward with weights packed for oneDNN, made by pack() when `key` changes; drop() frees them."""

    key, packed = None, None

    def get(self, w: torch.Tensor, key: tuple, pack):
        if key != self.key:
            self.packed = None  # the old copy freed before the new one is made
            self.packed, self.key = pack(), key
            release_tensors([w])  # the mapped original leaves RSS: the packed copy is what is read now
        return self.packed

    def drop(self) -> None:
        self.key = self.packed = None


class PackedConv(Packed):
    """`conv`'s forward with a prepacked weight."""

    def __init__(self, conv: nn.Conv2d):
        self.conv = conv
        self.args = [list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c, w = self.conv, self.conv.weight
        if x.ndim != 4 or not onednn_applies(x, w):
            return c._conv_forward(x, w, c.bias)
        key = (w.data_ptr(), tuple(w.shape), tuple(x.shape))
        pack = torch._C._nn.mkldnn_reorder_conv2d_weight
        packed = self.get(w, key, lambda: pack(w.to_mkldnn(), *self.args, list(x.shape)))
        return torch.ops.mkldnn._convolution_pointwise(x, packed, c.bias, *self.args, "none", [], "")


class PackedLinear(Packed):
    """`linear`'s forward with a prepacked weight and the bias added in the matmul."""

    def __init__(self, linear: nn.Linear):
        self.linear = linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.linear.weight, self.linear.bias
        if not onednn_applies(x, w):
            return F.linear(x, w, b)
        rows, reorder = x.shape[:-1].numel(), torch.ops.mkldnn._reorder_linear_weight  # packed for x's row count
        packed = self.get(w, (w.data_ptr(), tuple(w.shape), rows), lambda: reorder(w, rows))
        return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


class PackedGEGLU(Packed):
    """GEGLU's forward, value * GELU(gate) with [value, gate] = proj(x), as two matmuls with prepacked halves of the
    weight: the gate's with GELU (erf) fused, the value's with the product by the gate fused."""

    def __init__(self, geglu: nn.Module):
        self.geglu = geglu

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.geglu.proj.weight, self.geglu.proj.bias
        if not onednn_applies(x, w):
            return type(self.geglu).forward(self.geglu, x)
        n, rows, reorder = w.shape[0] // 2, x.shape[:-1].numel(), torch.ops.mkldnn._reorder_linear_weight
        value, gate = self.get(
            w, (w.data_ptr(), tuple(w.shape), rows), lambda: (reorder(w[:n], rows), reorder(w[n:], rows))
        )
        gelu_gate = torch.ops.mkldnn._linear_pointwise(x, gate, b[n:], "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise.binary(x, gelu_gate, value, b[:n], "mul")
