"""What a preview costs: one 512x512 latent (1, 4, 64, 64) -> picture through the SD 1.5 VAE decoder, TAESD
(models/taesd.py, madebyollin/taesd's shape) and the linear "approx cheap" map (cli/trajectory.py), with random
weights (the cost does not depend on them). Prints the best of --repeats after one warm-up, and the machine's load.

    uv run python bench/bench_preview.py [--threads 2] [--repeats 3] [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli.trajectory import LATENT_RGB  # noqa: E402
from models.taesd import TinyAutoencoder, TinyAutoencoderConfig  # noqa: E402
from models.vae import AutoencoderKL, VAEConfig  # noqa: E402


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, oneDNN primitive caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    z = torch.randn(1, 4, args.size // 8, args.size // 8, dtype=dtype)
    vae = AutoencoderKL(VAEConfig()).to(dtype).eval()
    taesd = TinyAutoencoder(TinyAutoencoderConfig()).to(dtype).eval()
    weights = torch.tensor(LATENT_RGB, dtype=dtype)
    runs = {
        "SD 1.5 VAE decoder": lambda: vae.decode(z / vae.config.scaling_factor),
        "TAESD decoder": lambda: taesd.decode(z),
        "approx cheap (linear map)": lambda: torch.einsum("chw,cr->hwr", z[0], weights),
    }
    load = os.getloadavg()
    print(f"{args.size}x{args.size}, {args.dtype}, {args.threads} threads, best of {args.repeats}; "
          f"load average before: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")  # fmt: skip
    params = {"SD 1.5 VAE decoder": vae.decoder, "TAESD decoder": taesd.decoder}
    base = None
    with torch.inference_mode():
        for name, fn in runs.items():
            seconds = best_of(fn, args.repeats if name != "approx cheap (linear map)" else 20)
            base = base or seconds
            n = sum(q.numel() for q in params[name].parameters()) if name in params else 12
            print(f"{name:28s} {seconds * 1000:10.2f} ms  {seconds / base:8.4f} x VAE   {n / 1e6:7.2f} M params")
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
