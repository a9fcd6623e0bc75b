"""bench/sampler_lab.py: its exact denoiser against the textbook formula, and the orders it measures for the two
samplers whose order is not in doubt (Euler 1, Heun 2: EDM, Karras et al. 2022, Alg. 1)."""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import sampler_lab as lab  # noqa: E402


def test_ideal_denoiser_equals_the_posterior_mean_written_out():
    """EDM Eq. 57 term by term in float64: Gaussian densities N(x; y_i, sigma^2 I) with their normalisation, weighted
    sum over normalised weights, one x at a time; the lab drops |x|^2 and uses a softmax and a matmul."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn((50, 4, 1, 1), generator=g, dtype=torch.float64)
    x = 2 * torch.randn((5, 4, 1, 1), generator=g, dtype=torch.float64)
    for sigma in (0.5, 1.0, 4.0):
        want = torch.empty_like(x)
        for b in range(len(x)):
            squared = ((x[b] - data) ** 2).flatten(1).sum(1)  # |x - y_i|^2, (K,)
            density = (2 * math.pi * sigma**2) ** (-x[b].numel() / 2) * torch.exp(-squared / (2 * sigma**2))
            want[b] = (density[:, None, None, None] * data).sum(0) / density.sum()
        got = lab.ideal_denoiser(data, x, sigma)
        print(f"sigma {sigma}: max difference {(got - want).abs().max().item():.1e}")
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_measured_orders_of_euler_and_heun():
    """Runs through scheduler.make_schedule/scale_model_input/step against the RK4 reference: fitted order of Euler
    within [0.8, 1.2], of Heun within [1.8, 2.2] (125 to 500 steps, where the lab's table fits them)."""
    data = lab.curve_points()
    z = torch.randn((4, 4, 1, 1), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    runs = {name: [lab.run(data, z, name, "default", n) for n in (125, 250, 500)] for name in ("euler", "heun")}
    answers, estimate = lab.references(data, z, {u.problem for r in runs.values() for u in r}, 2000)
    assert estimate < 1e-10, f"the reference is not converged: {estimate:.1e}"
    for name, (lo, hi) in {"euler": (0.8, 1.2), "heun": (1.8, 2.2)}.items():
        errors = [lab.rms(u.x - answers[u.problem]) for u in runs[name]]
        order, _ = lab.fit_order([u.calls for u in runs[name]], errors, 1e-10, 3)
        print(f"{name}: order {order:.3f}")
        assert order is not None and lo <= order <= hi, f"{name}: order {order}, errors {errors}"
