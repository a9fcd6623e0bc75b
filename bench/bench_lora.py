"""Merge a 144 MB rank-128 LoRA into full-size SD 1.5 (random weights) with `models.lora.apply_lora`, on the CPU:
seconds to apply and to remove, and the RSS it adds.

The LoRA is what a Kohya rank-128 SD 1.5 LoRA holds (264 layers, 144 MiB = 151 MB): random float16 pairs for every
layer of the UNet's spatial transformers (proj_in/out 1x1 convs, attention, feed-forward) and of the text encoder;
then LoCon pairs (3x3 down, 1x1 up) on other convs while the file stays under --megabytes. The model is built in a
temporary folder by the test fixtures' `build_model_folder` (~4 GB written, a few minutes), or read from --model.

Every weight is read once before the apply (as after a first generate: our loading maps the files lazily), so the
RSS added is the merge's own: new tensors for the touched weights (the originals stay, for remove_loras) and the
LoRA file's pages. `RssAnon` is the memory the merge allocates; `RssFile` the mapped file pages (reclaimable).

    uv run python bench/bench_lora.py                 # builds the model in a temp dir
    uv run python bench/bench_lora.py --model DIR     # a Diffusers-layout SD 1.5 folder (built there if empty)
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_pipeline import proc_status_mb  # noqa: E402  (this folder is on sys.path)

from min_pipeline import load_pipeline  # noqa: E402
from models.lora import apply_lora, remove_loras  # noqa: E402

TRANSFORMER_LAYERS = ("attentions", "encoder.layers")  # UNet spatial transformers, CLIP layers: Kohya's LoRA targets


def build(folder: Path) -> None:
    """The test fixtures' random full-size model, built in a child process (its Diffusers models stay out of ours)."""
    code = (
        "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from conftest import build_model_folder; "
    )
    code += f"build_model_folder(Path({str(folder)!r}), {{}}, {{}}, {{}})"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def kohya_lora(pipe, rank: int, megabytes: float) -> dict[str, torch.Tensor]:
    """Random float16 Kohya tensors: every transformer layer, then 3x3 ResNet convs (LoCon) up to `megabytes`."""
    g = torch.Generator().manual_seed(0)
    targets = []
    for net, prefix in ((pipe.unet, "lora_unet_"), (pipe.text_encoder, "lora_te_text_model_")):
        for name, m in net.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                targets.append(
                    (prefix + name.replace(".", "_"), m.weight.shape, any(t in name for t in TRANSFORMER_LAYERS))
                )
    targets.sort(key=lambda t: not t[2])  # transformer layers first, then the convs
    state, size = {}, 0
    for name, (out, inp, *kernel), _ in targets:
        down = torch.randn(rank, inp, *kernel, generator=g).half() / inp**0.5
        up = torch.randn(out, rank, *[1] * len(kernel), generator=g).half() * 0.01
        if size + 2 * (down.numel() + up.numel()) > megabytes * 2**20:
            continue
        state |= {
            f"{name}.lora_down.weight": down,
            f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(rank / 2),
        }
        size += 2 * (down.numel() + up.numel())
    return state


def memory() -> dict[str, float]:
    return {field: proc_status_mb(field) for field in ("VmRSS", "RssAnon", "RssFile")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="Diffusers-layout SD 1.5 folder (default: a temporary one)")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--megabytes", type=float, default=144, help="LoRA size, MiB of float16 tensors")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or Path(tmp) / "sd15"
        if not (folder / "unet").is_dir():
            print(f"building random SD 1.5 in {folder} ...", flush=True)
            build(folder)
        pipe = load_pipeline(str(folder), device="cpu", dtype=torch.float32)
        lora = kohya_lora(pipe, args.rank, args.megabytes)
        path = Path(tmp) / "lora.safetensors"
        save_file(lora, str(path))
        layers = len({k.split(".")[0] for k in lora})
        del lora
        size = path.stat().st_size
        print(f"LoRA: {size / 2**20:.0f} MiB ({size / 1e6:.0f} MB), rank {args.rank}, {layers} layers, ", end="")
        print(f"{args.threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")

        for net in (pipe.unet, pipe.text_encoder):  # page every weight in once
            for p in net.parameters():
                p.sum()
        before = memory()
        t0 = time.perf_counter()
        changed = apply_lora(pipe.unet, pipe.text_encoder, path, 0.8)
        applied = time.perf_counter() - t0
        after = memory()
        kept = [t for net in (pipe.unet, pipe.text_encoder) for t in net.lora_originals.values()]
        touched_mb = sum(t.numel() * t.element_size() for t in kept) / 2**20
        t0 = time.perf_counter()
        remove_loras(pipe.unet, pipe.text_encoder)
        removed = time.perf_counter() - t0
        final = memory()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap memory; give it back to see what is still used
        trimmed = memory()

    gflop = 2 * args.rank * touched_mb * 2**20 / 4 / 1e9  # B A: 2 r flops per float32 weight
    print(f"apply_lora: {applied:.2f} s for {changed} layers ({touched_mb:.0f} MB of weights replaced; {gflop:.0f} "
          f"GFLOP, {gflop / applied:.1f} GFLOP/s); remove_loras: {removed * 1e3:.1f} ms")  # fmt: skip
    print("MB         before   after apply        after remove       + malloc_trim(0)")
    for field, b in before.items():
        cells = [f"{m[field]:7.0f} ({m[field] - b:+5.0f})" for m in (after, final, trimmed)]
        print(f"{field:8s} {b:7.0f}   " + "   ".join(cells))


if __name__ == "__main__":
    main()
