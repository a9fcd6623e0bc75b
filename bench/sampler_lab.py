"""The sampler lab: how fast each sampler of scheduler.SAMPLERS converges to the solution of the ODE it solves.

(a) An exact "UNet". The ideal denoiser of a finite point set {y_i} (Karras et al. 2022, EDM, arXiv:2206.00364,
Eq. 57), D(x; sigma) = sum_i y_i N(x; y_i, sigma^2 I) / sum_i N(x; y_i, sigma^2 I), is the posterior mean E[y | x] when
x = y + sigma n; the noise an eps-UNet is trained to predict is then eps = (x - D(x; sigma)) / sigma (EDM Eq. 7 and
Table 1: D = x - sigma eps in the variable x = x_0 + sigma eps). Wrapped as a UNet it drives every sampler through the
functions generate() uses (make_schedule, scale_model_input, step), from the same unit-variance draws z. The sampler's
answer is compared with the true solution of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (EDM Eq. 1
with Eq. 3's score and sigma(t) = t), integrated from the run's first sigma and starting point to its last sigma with
RK4 in u = log sigma (dx/du = x - D) in float64, checked by halving the step. Where a run ends at sigma = 0, its last
step starts at the smallest sigma > 0 it visits, sigma_min, and lands on D(x; sigma_min): no sampler resolves the ODE
below sigma_min (it is one step at any step count), so the reference integrates to sigma_min and applies the same map.
Error = RMS over a batch of starting points of the final x in the EDM variable. Convergence order = minus the slope
of log error against log UNet calls, fitted over the last points above the float64 floor. Two more measurements
separate causes: the last call's x_0 prediction against the reference at sigma_min (the ODE part without the last
step), and, where Diffusers rounds or truncates the timesteps of a sigma schedule, the run again with the UNet told
that integer t (told_sigmas).

The point set is chosen so that the ODE problem is well conditioned: points close together (neighbours 0.012 apart,
below sigma_min = 0.029, SD 1.5's smallest sigma) along two smooth closed curves in R^4, one latent pixel. With
points far apart, every converged run lands on the same data point and the final D(x; sigma_min) erases the error
(it is flat around each point), so the error falls to round-off at any step count and shows no order.

Stochastic samplers (those whose Sampler.draws says they draw noise at eta = 0) are not ODE solvers: they draw a fresh
eps at every call from the generator, so runs with different step counts follow different Brownian paths and there is
no strong error to converge; the table lists them as such. DDIM runs with eta = 0.

The samplers run in float64: x and eps are float64, and the schedule's tensors are promoted to float64 (the same
float32 grid values, exactly) so that step()'s coefficients are float64 too.

(b) A real UNet (--model-dir, any SD 1.5 folder): generate() with output_type="latent" for each deterministic sampler at
--unet-steps, against a many-step run of --unet-reference, RMS of the final latent difference. The UNet runs in
float32, which sets an error floor of roughly 1e-6 of the latent's scale.

    OMP_NUM_THREADS=1 python bench/sampler_lab.py                      # (a): ~1-2 min, writes bench/sampler_lab.png
    python bench/sampler_lab.py --model-dir PATH --skip-ideal           # (b) only
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import scheduler as sampling  # noqa: E402

HERE = Path(__file__).resolve().parent

# The paper order of each ODE sampler (global error ~ calls^-p), for the table. Names missing from scheduler.SAMPLERS
# are listed as "not yet measured".
NOMINAL = {
    "euler": ("1", "Euler's method, EDM Alg. 1 without the correction"),
    "heun": ("2", "Heun's method, EDM Alg. 1 (the last step to sigma = 0 is Euler)"),
    "dpmpp_2m": ("2", "DPM-Solver++(2M), Lu et al. 2022 arXiv:2211.01095 Alg. 2"),
    "ddim": ("1", "DDIM eta = 0 is DPM-Solver-1, Lu et al. 2022 arXiv:2206.00927 Sec. 4.1"),
    "lms": ("4", "Adams-Bashforth in sigma with variable steps, order 4 (Diffusers' default), started with orders 1-3"),
    "pndm": ("2", "PLMS, Liu et al. 2022 arXiv:2202.09778: AB4 means eps over t, DDIM's transfer needs sigma"),
    "unipc": ("3", "UniPC-2 + UniC, Zhao et al. 2023 arXiv:2302.04867: the corrector adds one order"),
    "dpm2": ("2", "DPM-Solver-2, Lu et al. 2022 arXiv:2206.00927 (k-diffusion's sample_dpm_2)"),
    "euler_a": ("-", "stochastic"),
    "ddpm": ("-", "stochastic"),
    "dpmpp_2m_sde": ("-", "stochastic"),
    "dpm2_a": ("-", "stochastic"),
    "lcm": ("-", "stochastic"),
}
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#000000", "#3f3fbf", "#bf3f3f"]  # fmt: skip


# ----------------------------------------------------------------------------- (a) the exact denoiser


def curve_points(n_curves: int = 2, per_curve: int = 1024, seed: int = 0) -> Tensor:
    """The "dataset": n_curves random smooth closed curves in R^4 (three Fourier modes each, coordinates of order 1 as
    SD 1.5's scaled latents), per_curve points each, as latents (K, 4, 1, 1) in float64."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.arange(per_curve, dtype=torch.float64) * (2 * math.pi / per_curve)
    curves = []
    for _ in range(n_curves):
        y = (0.8 * torch.randn(4, generator=g, dtype=torch.float64)).expand(per_curve, 4).clone()  # the centre
        for m in (1, 2, 3):
            a, b = (0.6 / m * torch.randn(4, generator=g, dtype=torch.float64) for _ in range(2))
            y += torch.cos(m * theta)[:, None] * a + torch.sin(m * theta)[:, None] * b
        curves.append(y)
    return torch.cat(curves)[:, :, None, None]


def ideal_denoiser(data: Tensor, x: Tensor, sigma: float | Tensor) -> Tensor:
    """EDM Eq. 57 for a batch x (B, C, H, W) and points `data` (K, C, H, W): D(x; sigma) = sum_i w_i y_i with
    w = softmax_i(-|x - y_i|^2 / (2 sigma^2)). |x|^2 is the same for every i and drops out of the softmax, leaving
    (x . y_i - |y_i|^2 / 2) / sigma^2 (one matmul instead of a (B, K, C H W) difference)."""
    y = data.flatten(1)  # (K, CHW)
    logits = (x.flatten(1) @ y.T - (y * y).sum(1) / 2) / sigma**2  # (B, K)
    return (torch.softmax(logits, dim=1) @ y).view_as(x)


def ideal_eps(data: Tensor, x_in: Tensor, sigma: Tensor) -> Tensor:
    """The ideal eps-UNet at one call: the samplers feed it x_in = scale_model_input(x) = x_t = x / sqrt(sigma^2 + 1)
    (EDM Table 1's c_in; DPM++/DDIM already move x_t), so x = x_in sqrt(sigma^2 + 1) = x_0 + sigma eps, and the best
    guess of eps is (x - D(x; sigma)) / sigma."""
    x = x_in * (sigma**2 + 1) ** 0.5
    return (x - ideal_denoiser(data, x, sigma)) / sigma


def pf_ode(data: Tensor, x: Tensor, sigma_from: float, sigma_to: float, n: int) -> Tensor:
    """RK4 with n equal steps in u = log sigma on the probability-flow ODE, EDM Eq. 1 with sigma(t) = t and Eq. 3:
    dx/dsigma = (x - D(x; sigma)) / sigma, i.e. dx/du = x - D(x; e^u)."""
    u, h = math.log(sigma_from), (math.log(sigma_to) - math.log(sigma_from)) / n

    def f(x: Tensor, u: float) -> Tensor:
        return x - ideal_denoiser(data, x, math.exp(u))

    for k in range(n):
        u_k = u + k * h
        k1 = f(x, u_k)
        k2 = f(x + h / 2 * k1, u_k + h / 2)
        k3 = f(x + h / 2 * k2, u_k + h / 2)
        k4 = f(x + h * k3, u_k + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


@dataclass(frozen=True)
class Problem:
    """What one sampler run solves: start z * scale at sigma_from, integrate to sigma_to, then D(x; sigma_to) if the
    run's last step goes to sigma = 0 (denoise_at_end)."""

    scale: float
    sigma_from: float
    sigma_to: float
    denoise_at_end: bool


def references(data: Tensor, z: Tensor, problems: set[Problem], n: int) -> tuple[dict[Problem, Tensor], float]:
    """The converged answer of each Problem (EDM variable) and an error estimate. Problems that start alike lie on one
    trajectory: it is integrated once, through their sigma_to in turn. RK4 at about n steps over log(sigma_max /
    sigma_min) and at half as many, Richardson extrapolated (x_n + (x_n - x_n/2) / 15, RK4's error falls 16x per
    halving); the estimate is the largest RMS(x_n - x_n/2) / 15, the error of x_n, above that of the extrapolation."""
    answers, estimate = {}, 0.0
    for start in {(p.scale, p.sigma_from) for p in problems}:
        group = sorted((p for p in problems if (p.scale, p.sigma_from) == start), key=lambda p: -p.sigma_to)
        h = math.log(start[1] / group[-1].sigma_to) / n * 2  # the step in log sigma of the half-step run
        ends = {}
        for halving in (1, 2):
            x, sigma = z * start[0], start[1]
            for p in group:
                if p.sigma_to < sigma:
                    x = pf_ode(data, x, sigma, p.sigma_to, halving * math.ceil(math.log(sigma / p.sigma_to) / h))
                    sigma = p.sigma_to
                ends.setdefault(p, []).append(ideal_denoiser(data, x, sigma) if p.denoise_at_end else x)
        for p, (half, full) in ends.items():
            answers[p] = full + (full - half) / 15
            estimate = max(estimate, rms(full - half) / 15)
    return answers, estimate


def rms(x: Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item()


# ----------------------------------------------------------------------------- driving the samplers


def schedule_types(name: str) -> list[str]:
    """The schedule types (scheduler.SCHEDULES) generate() offers this sampler."""
    return list(sampling.SAMPLERS[name].schedules)


def make(name: str, schedule_type: str, steps: int) -> sampling.Schedule:
    """make_schedule as generate() calls it (SD 1.5's scheduler config, the sampler's own spacing)."""
    return sampling.make_schedule(name, steps, sampling.SD15_SCHEDULER_CONFIG, schedule=schedule_type)


def allowed(name: str, schedule_type: str, steps: int) -> bool:
    """Does make_schedule accept this step count (align_your_steps refuses counts that repeat a timestep)?"""
    try:
        make(name, schedule_type, steps)
    except ValueError:
        return False
    return True


def float64(schedule: sampling.Schedule) -> sampling.Schedule:
    """The same schedule with every floating-point tensor in float64 (its float32 values kept exactly), so that
    step()'s coefficients are computed in float64 rather than from float32 scalars."""
    values = {f.name: getattr(schedule, f.name) for f in fields(schedule)}
    floats = {k: v.double() for k, v in values.items() if isinstance(v, Tensor) and v.is_floating_point()}
    return replace(schedule, **floats)


def is_stochastic(name: str, schedule_type: str) -> bool:
    """Does step() draw noise anywhere in a run at eta = 0 (Sampler.draws)?"""
    return any(sampling.draws_noise(make(name, schedule_type, 10), 0.0))


def train_sigmas() -> Tensor:
    """sigma_t of the training timesteps t = 0..T-1 (EDM Table 1), float32 as make_schedule computes them."""
    alphas_cumprod = sampling.alphas_cumprod_from(sampling.SD15_SCHEDULER_CONFIG)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def told_sigmas(s: sampling.Schedule) -> Tensor | None:
    """The noise level a real UNet is told at each call, where it differs from the sigma the sampler steps with: the
    sigma of the call's timestep t, log-linear between training timesteps (the inverse of scheduler.sigma_to_t). They
    differ where Diffusers rounds or truncates the timesteps of a sigma schedule (DPM++, UniPC, DPM2 with Karras
    sigmas...); the UNet then denoises as if the noise were sigma_t. None where they agree to 1e-4 (linear against
    log-linear interpolation between neighbouring timesteps, and float32 t, differ by less)."""
    t = s.timesteps.double().clamp(0, len(train_sigmas()) - 1)
    log_sigmas = train_sigmas().double().log()
    lo = t.floor().long().clamp(max=len(log_sigmas) - 2)
    told = (log_sigmas[lo] + (t - lo) * (log_sigmas[lo + 1] - log_sigmas[lo])).exp()
    return None if torch.allclose(told, s.sigmas[: len(t)].double(), rtol=1e-4, atol=0) else told


@dataclass
class Run:
    """One sampler run: its final x in the EDM variable x_0 + sigma eps and the ODE problem that x answers; the last
    call's x_0 prediction (scheduler.predict_x0: D(x; sigma_min) of the x the last call saw) and its problem."""

    x: Tensor
    calls: int
    problem: Problem
    x0: Tensor
    x0_problem: Problem


def run(data: Tensor, z: Tensor, name: str, schedule_type: str, steps: int, told_t: bool = False) -> Run:
    """One deterministic run, as generate()'s loop does it: x = z * init_noise_sigma, then for each UNet call
    x_in = scale_model_input(x), eps = UNet(x_in, t), x = step(x, eps). The ideal UNet denoises at the sampler's own
    sigma of the call, or, with told_t, at the sigma of the timestep it is told (told_sigmas)."""
    s = float64(make(name, schedule_type, steps))
    x_t_variable = sampling.SAMPLERS[name].variable == sampling.X_T
    sigmas, calls = s.sigmas, len(s.timesteps)
    told = told_sigmas(s) if told_t else None
    unet_sigmas = told if told is not None else sigmas
    x, state = z * s.init_noise_sigma, None
    for i in range(calls):
        eps = ideal_eps(data, sampling.scale_model_input(s, i, x), unet_sigmas[i])
        x0 = sampling.predict_x0(s, i, x, eps)
        x, state = sampling.step(s, i, x, eps, state)
    sigma_end, sigma_min = sigmas[calls].item(), sigmas[calls - 1].item()  # where the last call lands / is made
    to_edm = (sigmas[0].item() ** 2 + 1) ** 0.5 if x_t_variable else 1.0  # x_t = x_edm / sqrt(sigma^2 + 1)
    start = (s.init_noise_sigma * to_edm, sigmas[0].item())
    problem = Problem(*start, sigma_end if sigma_end > 0 else sigma_min, denoise_at_end=sigma_end == 0)
    x_edm = x * (sigma_end**2 + 1) ** 0.5 if x_t_variable else x
    return Run(x_edm, calls, problem, x0, Problem(*start, sigma_min, denoise_at_end=True))


def fit_order(calls: list[int], errors: list[float], floor: float, points: int) -> tuple[float | None, list[int]]:
    """Minus the least-squares slope of log error against log calls over the last `points` runs whose error is above
    `floor` (the asymptotic range before round-off); None with fewer than 3 such runs."""
    above = [(c, e) for c, e in zip(calls, errors, strict=True) if e > floor][-points:]
    if len(above) < 3:
        return None, [c for c, _ in above]
    lx = torch.tensor([math.log(c) for c, _ in above], dtype=torch.float64)
    ly = torch.tensor([math.log(e) for _, e in above], dtype=torch.float64)
    slope = ((lx - lx.mean()) * (ly - ly.mean())).sum() / ((lx - lx.mean()) ** 2).sum()
    return -slope.item(), [c for c, _ in above]


def ideal_lab(args: argparse.Namespace) -> tuple[list[dict], float]:
    """Part (a): every sampler x schedule type x step count; one dict per (sampler, schedule type), and the error
    estimate of the reference solutions."""
    data = curve_points(args.curves, args.points // args.curves, args.seed)
    z = torch.randn((args.batch, 4, 1, 1), generator=torch.Generator().manual_seed(args.seed + 1), dtype=torch.float64)
    rows = []
    t0 = time.perf_counter()
    for name in sampling.SAMPLERS:
        for stype in schedule_types(name):
            row = {"sampler": name, "schedule": stype}
            if not is_stochastic(name, stype):
                steps = [n for n in args.steps if allowed(name, stype, n)]
                row |= {"steps": steps, "runs": [run(data, z, name, stype, n) for n in steps]}
                if told_sigmas(make(name, stype, steps[-1])) is not None:  # as with a real UNet: told integer t
                    row["told_runs"] = [run(data, z, name, stype, n, told_t=True) for n in steps]
            rows.append(row)
    t1 = time.perf_counter()
    problems = {p for r in rows for u in r.get("runs", []) for p in (u.problem, u.x0_problem)}
    answers, estimate = references(data, z, problems, args.ref_steps)
    t2 = time.perf_counter()
    print(f"sampler runs {t1 - t0:.0f} s, {len(answers)} reference solutions {t2 - t1:.0f} s (error <= {estimate:.0e})")
    floor = max(args.floor, 10 * estimate)
    for row in rows:
        if "runs" not in row:
            row["stochastic"] = True
            continue
        runs = row.pop("runs")
        row["calls"] = [u.calls for u in runs]
        row["error"] = [rms(u.x - answers[u.problem]) for u in runs]
        row["x0_error"] = [rms(u.x0 - answers[u.x0_problem]) for u in runs]
        if "told_runs" in row:
            row["told_error"] = [rms(u.x - answers[u.problem]) for u in row.pop("told_runs")]
        row["order"], row["fit_calls"] = fit_order(row["calls"], row["error"], floor, args.fit_points)
        row["x0_order"], _ = fit_order(row["calls"], row["x0_error"], floor, args.fit_points)
        order = f"{row['order']:.2f}" if row["order"] is not None else "n/a"
        errors = " ".join(f"{e:.1e}" for e in row["error"])
        print(f"{row['sampler']:>14} {row['schedule']:<16} order {order:>5}  {errors}")
    return rows, floor


# ----------------------------------------------------------------------------- (b) a real UNet


def unet_lab(args: argparse.Namespace) -> tuple[list[dict], float]:
    """Part (b): generate(output_type="latent") for each deterministic sampler of args.unet_samplers and schedule type
    of args.unet_schedules at args.unet_steps against args.unet_reference_steps steps of args.unet_reference (its
    default schedule); RMS of the final latent difference (float32). Samplers that start or end at other noise levels
    than the reference (DDIM and PNDM start lower and end at sigma = 0.029) keep that difference at any step count."""
    from min_pipeline import generate, load_pipeline

    pipe = load_pipeline(str(args.model_dir), device=args.device, dtype="float32")
    common = dict(seed=args.seed, height=args.size, width=args.size, guidance_scale=args.guidance, progress=False)

    def latent(name: str, stype: str, steps: int) -> Tensor:
        return generate(pipe, args.prompt, scheduler=name, schedule=stype, steps=steps, output_type="latent",
                        **common).double().cpu()  # fmt: skip

    ref_name, ref_type = args.unet_reference, "default"
    want = latent(ref_name, ref_type, args.unet_reference_steps)
    rows = []
    for name in args.unet_samplers:
        for stype in [t for t in schedule_types(name) if t in args.unet_schedules]:
            if is_stochastic(name, stype):
                rows.append({"sampler": name, "schedule": stype, "stochastic": True})
                continue
            errors = [rms(latent(name, stype, n) - want) for n in args.unet_steps]
            rows.append({"sampler": name, "schedule": stype, "steps": args.unet_steps, "error": errors})
            print(f"{name:>14} {stype:<8} {' '.join(f'{e:.2e}' for e in errors)}", flush=True)
    return rows, rms(want)


# ----------------------------------------------------------------------------- the plot and the table


def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Log-log error against UNet calls, one panel per schedule type (three to a row), one line per sampler (thin with
    hollow dots: the UNet told the integer timestep, see told_sigmas), grey guides of slope -1 .. -4."""
    rows = [r for r in rows if not r.get("stochastic")]
    types, names = list(dict.fromkeys(r["schedule"] for r in rows)), list(dict.fromkeys(r["sampler"] for r in rows))
    colour = {n: COLOURS[i % len(COLOURS)] for i, n in enumerate(names)}
    pw, ph, left, top, gap, legend_w, cols = 460, 380, 70, 50, 70, 170, min(3, len(types))
    grid_rows = math.ceil(len(types) / cols)
    img = Image.new("RGB", (left + cols * (pw + gap) + legend_w, top + grid_rows * (ph + 70)), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 12), title, fill="black", font=font(16))
    errors = [e for r in rows for e in r["error"] + r.get("told_error", []) if e > 0]
    calls = [c for r in rows for c in r["calls"]]
    x_lo, x_hi = math.log10(min(calls)) - 0.1, math.log10(max(calls)) + 0.1
    y_lo, y_hi = max(math.floor(math.log10(min(errors))), -16), math.ceil(math.log10(max(errors)))
    for k, stype in enumerate(types):
        x0, y0 = left + (k % cols) * (pw + gap), top + (k // cols) * (ph + 70)

        def at(c: float, e: float, x0: int = x0, y0: int = y0) -> tuple[float, float]:
            fx = (math.log10(c) - x_lo) / (x_hi - x_lo)
            fy = (math.log10(max(e, 10.0**y_lo)) - y_lo) / (y_hi - y_lo)
            return x0 + fx * pw, y0 + (1 - fy) * ph

        for p in range(math.floor(x_lo), math.ceil(x_hi)):
            for m in range(1, 10):
                if x_lo <= math.log10(m * 10.0**p) <= x_hi:
                    gx = at(m * 10.0**p, 1.0)[0]
                    d.line((gx, y0, gx, y0 + ph), fill="#b0b0b0" if m == 1 else "#e8e8e8")
                    if m in (1, 2, 5):
                        d.text((gx - 8, y0 + ph + 5), f"{m * 10**p}", fill="black", font=font(12))
        for p in range(y_lo, y_hi + 1):
            gy = at(1, 10.0**p)[1]
            d.line((x0, gy, x0 + pw, gy), fill="#d0d0d0")
            d.text((x0 - 45, gy - 7), f"1e{p}", fill="black", font=font(12))
        for order in (1, 2, 3, 4):  # guides from (10 calls, 1e-1) to the panel's edge
            c_end = min(10 * 10 ** ((-1 - y_lo) / order), 10**x_hi)
            end = at(c_end, 0.1 * (c_end / 10) ** -order)
            d.line((*at(10, 0.1), *end), fill="#a0a0a0", width=1)
            d.text((end[0] - 22, end[1] - 16), f"-{order}", fill="#707070", font=font(12))
        d.rectangle((x0, y0, x0 + pw, y0 + ph), outline="black")
        d.text((x0 + pw / 2 - 80, y0 + ph + 22), f"UNet calls, schedule: {stype}", fill="black", font=font(13))
        for r in rows:
            if r["schedule"] != stype:
                continue
            for key, width in (("error", 2), ("told_error", 1)):
                if key in r:
                    pts = [at(c, e) for c, e in zip(r["calls"], r[key], strict=True)]
                    d.line(pts, fill=colour[r["sampler"]], width=width)
                    c = colour[r["sampler"]]
                    for px, py in pts:
                        d.ellipse((px - 3, py - 3, px + 3, py + 3), fill=c if width == 2 else "white", outline=c)
    lx = left + cols * (pw + gap)
    for i, n in enumerate(names):
        d.line((lx, top + 20 + 22 * i, lx + 25, top + 20 + 22 * i), fill=colour[n], width=3)
        d.text((lx + 32, top + 12 + 22 * i), n, fill="black", font=font(14))
    d.text((lx, top + 30 + 22 * len(names)), "thin, hollow: the\nUNet told integer t\n(told_sigmas)", fill="black",
           font=font(12))  # fmt: skip
    img.save(path)


def table(rows: list[dict], floor: float) -> str:
    """The markdown table of part (a)."""
    out = ["| sampler | schedule | paper order | measured order (fit over calls) | last call's x0: order | error at "
           "10 steps (calls) | at 20 steps | at 40 steps | UNet told integer t: error at 40 steps, at the most |",
           "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        nominal = NOMINAL.get(r["sampler"], ("?", ""))[0]
        if r.get("stochastic"):
            out.append(f"| {r['sampler']} | {r['schedule']} | - | stochastic: not an ODE solver | | | | | |")
            continue
        order = "n/a" if r["order"] is None else f"**{r['order']:.2f}** ({r['fit_calls'][0]}-{r['fit_calls'][-1]})"
        x0_order = "n/a" if r["x0_order"] is None else f"{r['x0_order']:.2f}"
        at = {s: (c, e) for s, c, e in zip(r["steps"], r["calls"], r["error"], strict=True)}
        cells = [f"{at[s][1]:.1e} ({at[s][0]})" if s in at else "" for s in (10, 20, 40)]
        told = dict(zip(r["steps"], r.get("told_error", []), strict=False))
        cells.append(f"{told[40]:.1e}, {told[r['steps'][-1]]:.1e}" if 40 in told else "")
        out.append(f"| {r['sampler']} | {r['schedule']} | {nominal} | {order} | {x0_order} | {' | '.join(cells)} |")
    for name in NOMINAL:
        if name not in sampling.SAMPLERS:
            out.append(f"| {name} | | {NOMINAL[name][0]} | not yet measured (not in scheduler.SAMPLERS) | | | | | |")
    out.append(f"\nOrders fitted over the last runs with error above {floor:.0e} (10x the reference's error estimate).")
    return "\n".join(out)


def unet_table(rows: list[dict], steps: list[int], scale: float) -> str:
    """The markdown table of part (b)."""
    head = "| sampler | schedule | " + " | ".join(f"{n} steps" for n in steps) + " |"
    out = [head, "|---|---|" + "---|" * len(steps)]
    for r in rows:
        if r.get("stochastic"):
            out.append(f"| {r['sampler']} | {r['schedule']} | stochastic |" + " |" * (len(steps) - 1))
        else:
            out.append(f"| {r['sampler']} | {r['schedule']} | " + " | ".join(f"{e:.2e}" for e in r["error"]) + " |")
    out.append(f"\nRMS of the reference latent: {scale:.3f}.")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    divisors = [4, 5, 8, 10, 20, 25, 40, 50, 100, 125, 200, 250, 500]  # of 1000: 'leading' grids stay aligned (DDIM)
    p.add_argument("--steps", type=int, nargs="+", default=divisors, help="step counts of part (a)")
    p.add_argument("--batch", type=int, default=16, help="starting points z")
    p.add_argument("--points", type=int, default=2048, help="data points (K)")
    p.add_argument("--curves", type=int, default=2)
    p.add_argument("--ref-steps", type=int, default=2000, help="RK4 steps of the reference (checked at half)")
    p.add_argument("--floor", type=float, default=1e-11, help="errors below this are round-off, not fitted")
    p.add_argument("--fit-points", type=int, default=4, help="runs in the fitted asymptotic range")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "sampler_lab.png")
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    p.add_argument("--skip-ideal", action="store_true", help="only part (b)")
    p.add_argument("--model-dir", type=Path, help="(b): an SD 1.5 model folder")
    p.add_argument("--unet-steps", type=int, nargs="+", default=[5, 10, 20, 40])
    p.add_argument("--unet-samplers", nargs="+", default=list(sampling.SAMPLERS), metavar="SAMPLER")
    p.add_argument("--unet-schedules", nargs="+", default=["default"], metavar="SCHEDULE", help="schedule types")
    p.add_argument("--unet-reference", default="dpmpp_2m", choices=list(sampling.SAMPLERS))
    p.add_argument("--unet-reference-steps", type=int, default=200)
    p.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    if not args.skip_ideal:
        t0 = time.perf_counter()
        rows, floor = ideal_lab(args)
        title = f"Ideal denoiser of {args.points} points: RMS error of the final x vs the exact PF-ODE solution"
        plot(rows, args.out, title)
        print(table(rows, floor))
        print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")
        results["ideal"] = rows
    if args.model_dir is not None:
        rows, scale = unet_lab(args)
        print(unet_table(rows, args.unet_steps, scale))
        results["unet"] = rows
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
