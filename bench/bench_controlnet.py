"""Seconds per step with one ControlNet and without, ours (min_pipeline) beside Diffusers' StableDiffusionPipeline /
StableDiffusionControlNetPipeline, on the CPU in float32: the full-size SD 1.5 folder with random weights (built by
bench_pipeline.py, or tests/conftest.py here when missing) and a ControlNet made from its UNet by Diffusers'
ControlNetModel.from_unet, 256x256, Euler, CFG 7.5 by default.

    uv run python bench/bench_controlnet.py                    # /tmp/minsd-bench-sd15, 256x256, 3 steps, 2 threads
    uv run python bench/bench_controlnet.py --size 512 --steps 4 --threads 4

Each configuration: one untimed 1-step warm-up (pages the weights in, primes oneDNN), then timed runs with
output_type="latent" (no VAE decode), reported as time / steps (the text encoder's share is a few percent), the best
of --repeats runs, with and without the ControlNet alternating so that a change of load hits both. The 1-minute load
average is printed with each row; on a shared machine the figures are marked by it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse on the moon", "blurry, low quality"


def timed(runs: dict, steps: int, repeats: int) -> dict[str, float]:
    """{name: run(steps)} -> {name: best seconds per step}, the runs alternating."""
    best = dict.fromkeys(runs, float("inf"))
    for run in runs.values():
        run(1)  # warm-up
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run(steps)
            best[name] = min(best[name], (time.perf_counter() - start) / steps)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="/tmp/minsd-bench-sd15")
    p.add_argument("--controlnet", default="/tmp/minsd-bench-controlnet")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    torch.set_num_threads(args.threads)
    model, cn_folder = Path(args.model), Path(args.controlnet)
    if not (model / "unet").is_dir():
        from conftest import build_model_folder

        build_model_folder(model, {}, {}, {})
    import diffusers

    if not (cn_folder / "config.json").is_file():
        unet = diffusers.UNet2DConditionModel.from_pretrained(model / "unet")
        diffusers.ControlNetModel.from_unet(unet).save_pretrained(cn_folder)
        del unet

    rng = np.random.default_rng(0)
    hint = Image.fromarray(rng.integers(0, 2, (args.size, args.size), dtype=np.uint8) * 255).convert("RGB")
    print(f"{os.cpu_count()} CPUs, {args.threads} threads, torch {torch.__version__}, diffusers "
          f"{diffusers.__version__}; {args.size}x{args.size}, {args.steps} Euler steps, CFG 7.5, fp32")  # fmt: skip
    bench_ours(model, cn_folder, hint, args)
    bench_diffusers(model, cn_folder, hint, args)


def rows(times: dict[str, float]) -> None:
    for name, seconds in times.items():
        print(f"{name:34s} {seconds:7.2f} s/step   (load average {os.getloadavg()[0]:.1f})", flush=True)


def bench_ours(model: Path, cn_folder: Path, hint, args) -> None:
    import torch

    from min_pipeline import generate, load_controlnet, load_pipeline

    pipe = load_pipeline(str(model), device="cpu", dtype=torch.float32)
    net = load_controlnet(str(cn_folder), "cpu", "float32")

    def run(steps: int, **control) -> None:
        generate(pipe, PROMPT, NEGATIVE, steps=steps, height=args.size, width=args.size, output_type="latent",
                 progress=False, **control)  # fmt: skip

    runs = {"ours, no ControlNet": run, "ours, one ControlNet": lambda n: run(n, controlnet=net, control_image=hint)}
    rows(timed(runs, args.steps, args.repeats))


def bench_diffusers(model: Path, cn_folder: Path, hint, args) -> None:
    import diffusers
    import torch

    base = diffusers.StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    base.scheduler = diffusers.EulerDiscreteScheduler.from_config(base.scheduler.config)
    base.set_progress_bar_config(disable=True)
    net = diffusers.ControlNetModel.from_pretrained(cn_folder)
    control = diffusers.StableDiffusionControlNetPipeline(**base.components, controlnet=net)
    control.set_progress_bar_config(disable=True)
    size = dict(height=args.size, width=args.size, output_type="latent")
    text = dict(prompt=PROMPT, negative_prompt=NEGATIVE)
    with torch.inference_mode():
        runs = {
            "Diffusers, no ControlNet": lambda n: base(**text, num_inference_steps=n, **size),
            "Diffusers, one ControlNet": lambda n: control(**text, image=hint, num_inference_steps=n, **size),
        }
        rows(timed(runs, args.steps, args.repeats))


if __name__ == "__main__":
    main()
