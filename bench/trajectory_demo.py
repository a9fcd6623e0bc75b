"""The README's trajectory picture: `--trajectory`'s frames from the real sampler code, driven by a denoiser whose
answer is known instead of SD 1.5's UNet (no trained weights exist on our machines; random weights show noise).

The denoiser is the ideal one for a "dataset" of 3000 small drawn scenes y_i (Karras et al. 2022, EDM,
arXiv:2206.00364, Eq. 57): D(x; sigma) = sum_i w_i y_i with w = softmax_i(-|x - y_i|^2 / (2 sigma^2)), the mean of
the data under the posterior given x. At high sigma it is a blurred average of many scenes; as sigma falls the
sampler settles the coarse layout (sky, horizon) first and the details (what stands where) last, until it lands on
one scene: the story a trained UNet tells, where "the dataset" is LAION and the scenes are never copied whole. The
pictures live in latent space: each is the least-squares latent whose cheap RGB preview (cli.trajectory.LATENT_RGB)
they are.

    uv run python bench/trajectory_demo.py [--out bench/trajectory.png] [--steps 12] [--seed 3] [--scheduler euler]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import scheduler as sampling  # noqa: E402
from cli.trajectory import LATENT_RGB, Watcher  # noqa: E402
from min_pipeline import StepInfo  # noqa: E402

SIDE = 24  # latents per side: 192x192 pixels after the 8x preview


def pictures(n: int = 3000, seed: int = 0) -> torch.Tensor:
    """n small scenes (n, SIDE, SIDE, 3) in [-1, 1], drawn at random: a sky, a ground of some height, and a sun, moon
    or house somewhere in the sky."""
    g = torch.Generator().manual_seed(seed)
    skies, grounds = ["#f4a040", "#8cc8f0", "#101838", "#c070a0"], ["#204a80", "#3c8c3c", "#202020", "#c8b070"]
    drawings = []
    for _ in range(n):
        sky, ground, shape, x, y, r, horizon = (int(v) for v in torch.randint(0, 1000, (7,), generator=g))
        im = Image.new("RGB", (SIDE, SIDE), skies[sky % 4])
        d = ImageDraw.Draw(im)
        horizon = SIDE // 2 + horizon % (SIDE // 3)
        d.rectangle((0, horizon, SIDE, SIDE), fill=grounds[ground % 4])
        r, x, y = 3 + r % 4, 4 + x % (SIDE - 8), 4 + y % (horizon - 6)
        if shape % 3 == 2:  # a house standing on the ground
            d.rectangle((x - r, horizon - 2 * r, x + r, horizon), fill="#c03020")
            d.polygon(
                [(x - r - 2, horizon - 2 * r), (x, horizon - 3 * r - 1), (x + r + 2, horizon - 2 * r)], fill="#602010"
            )
        else:
            d.ellipse((x - r, y - r, x + r, y + r), fill="#ffe060" if shape % 3 == 0 else "#f0f0d0")
        drawings.append(
            torch.tensor(list(im.get_flattened_data()), dtype=torch.float32).view(SIDE, SIDE, 3) / 127.5 - 1
        )
    return torch.stack(drawings)


def ideal_denoiser(data: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """D(x; sigma) of EDM Eq. 57 for latents `data` (K, 4, H, W); x (1, 4, H, W) in the EDM variable x0 + sigma n."""
    w = torch.softmax(-((x - data) ** 2).flatten(1).sum(1) / (2 * sigma**2), dim=0)
    return (w[:, None, None, None] * data).sum(0, keepdim=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("trajectory.png"))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--scheduler", default="euler", choices=list(sampling.SAMPLERS))
    args = p.parse_args()

    to_rgb = torch.tensor(LATENT_RGB)  # (4, 3): latent channel -> RGB
    data = torch.einsum("khwr,rc->kchw", pictures(), torch.linalg.pinv(to_rgb))  # least-squares latents (3, 4, H, W)
    schedule = sampling.make_schedule(args.scheduler, args.steps, sampling.SchedulerConfig())
    generator = torch.Generator().manual_seed(args.seed)
    x = (
        sampling.draw_noise((1, 4, SIDE, SIDE), torch.float32, torch.device("cpu"), generator)
        * schedule.init_noise_sigma
    )

    # The CLI's own trajectory writer (--trajectory FILE --trajectory-noisy), fed the StepInfo records generate() makes.
    pipe = SimpleNamespace(vae=SimpleNamespace(downsample_factor=8))
    watcher = Watcher(pipe, trajectory=True, decoder="cheap", noisy=True)
    state = None
    for i, t in enumerate(schedule.timesteps):
        sigma = float(schedule.sigmas[i])
        x_t = sampling.scale_model_input(
            schedule, i, x
        )  # what the UNet would see: DDPM's x_t = sqrt(abar) (x0 + sigma n)
        x_edm = x_t * (1 + sigma**2) ** 0.5
        eps = (x_edm - ideal_denoiser(data, x_edm, sigma)) / sigma  # the noise the UNet is trained to predict
        x_before, (x, state) = x, sampling.step(schedule, i, x, eps, state, generator=generator)
        x0 = sampling.predict_x0(schedule, i, x_before, eps)
        watcher(StepInfo(i, len(schedule.timesteps), float(t), sigma, x, x0))
    watcher.write_trajectory(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
