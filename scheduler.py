"""Noise schedules and samplers for Stable Diffusion 1.5: pure functions over tensors computed once.

The UNet predicts the noise eps in x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps. make_schedule() picks the
timesteps and noise levels before the loop; step() turns one UNet prediction into one step of a sampler.
Both match Diffusers 0.42 (`<Scheduler>.from_config(sd15_scheduler_config)`) number for number, which
tests/test_scheduler.py and tests/test_samplers_more.py check, including where Diffusers departs from the papers
(noted "Diffusers:").

Notation (code name -> symbol -> source). Papers: Ho et al. 2020 (DDPM) arXiv:2006.11239; Song et al. 2020
(DDIM) arXiv:2010.02502; Karras et al. 2022 (EDM) arXiv:2206.00364; Lu et al. 2022 (DPM-Solver++)
arXiv:2211.01095; Lin et al. 2023 arXiv:2305.08891; Liu et al. 2022 (PNDM) arXiv:2202.09778; Lu et al. 2022
(DPM-Solver) arXiv:2206.00927; Zhao et al. 2023 (UniPC) arXiv:2302.04867; Song et al. 2023 (Consistency Models)
arXiv:2303.01469; Luo et al. 2023 (LCM) arXiv:2310.04378.
  t, T             t, T        training timestep fed to the UNet (fractional for Karras sigmas), T = 1000
  alphas_cumprod   ᾱ_t         DDPM Eq. 4: ᾱ_t = prod_{s<=t} (1 - β_s); DDIM writes it α_t
  alpha_bar(_prev) ᾱ_t, ᾱ_t-1  ᾱ at a DDIM/DDPM step's timestep and at the one it lands on
  alpha_t, beta_t  α_t, β_t    DDPM's per-step ᾱ_t / ᾱ_t-1 and 1 - α_t (of the strided chain)
  sigma            σ           EDM Table 1 (iDDPM+DDIM column): σ = sqrt((1 - ᾱ) / ᾱ). Euler-type samplers move
                               x = x_t / sqrt(ᾱ_t) = x_0 + σ ε, the other samplers move x_t itself
  denoise()        D(x; σ)     EDM Eq. 7 + Table 1: c_skip x + c_out F = x - σ ε (c_skip = 1, c_out = -σ)
  denoised, D      x_θ, D_i    DPM-Solver++: the data prediction and its multistep combination
  c_in             c_in        EDM Table 1: 1 / sqrt(σ² + 1), the scale of the UNet input (scale_model_input)
  d, d_prime       d_i, d'_i   EDM Alg. 1 lines 4, 7 with σ(t) = t, s(t) = 1: the slope (x - D(x; σ)) / σ
  alpha_s, sigma_s α_t, σ_t    DPM-Solver++: x_t = α_t x_0 + σ_t ε, so α_t = 1 / sqrt(σ² + 1), σ_t = σ α_t
  lam, h, r        λ_t, h_i, r_i  DPM-Solver++ Alg. 2: λ = log(α_t / σ_t), h_i = λ_ti - λ_ti-1, r_i = h_i-1 / h_i
  eta, sigma_eta   η, σ_t(η)   DDIM Eq. 16
  sigma_up/down    σ_up, σ_down  the noise added / the level the deterministic part lands on (ancestral)
  eps_prime        ε'_t        PNDM: the ε its transfer part φ is given (PLMS: Adams-Bashforth of past ε)
  sigma_mid        σ_mid       DPM2: the midpoint of a step in log σ, where its second UNet call is
  w_ij             (weights)   LMS: ∫ of the j-th Lagrange basis polynomial over the step (Schedule.coefficients)
  B_h, rho, D1     B(h), ρ, D_1  UniPC: B(h) = e^h - 1 ("bh2"), the corrector's weights, x_θ differences / r
  c_skip, c_out    c_skip, c_out  LCM / Consistency Models: f(x, t) = c_skip x + c_out x̂_0 (boundary condition)
"""

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from numpy.polynomial import Polynomial
from torch import Tensor

# What a sampler moves: EDM's x = x_t / sqrt(ᾱ_t) = x_0 + σ ε (with float32 timesteps, as in Diffusers), or x_t
EDM_X, X_T = "x_0 + sigma eps", "x_t"


@dataclass(frozen=True)
class SchedulerConfig:
    """scheduler/scheduler_config.json. Defaults: the official SD 1.5 file (written for PNDM), and Diffusers'
    defaults for the keys it omits. Only what SD 1.5 samples with is accepted, checked here and only here."""

    num_train_timesteps: int = 1000  # T
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    steps_offset: int = 1  # see sd15_leading_timesteps
    set_alpha_to_one: bool = False  # see ddim_alpha_bar_prev
    clip_sample: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None  # None: each sampler's own default (Sampler.spacing)
    trained_betas: tuple[float, ...] | None = None
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        T, b0, b1, offset = self.num_train_timesteps, self.beta_start, self.beta_end, self.steps_offset
        checks = {  # key: (is the value supported, what is); exact types, so that "1000" or true fail here
            "num_train_timesteps": (type(T) is int and T >= 2, "an integer >= 2"),
            "beta_start": (isinstance(b0, float) and 0 < b0 < 1, "a number in (0, 1)"),
            "beta_end": (isinstance(b1, float) and 0 < b1 < 1, "a number in (0, 1)"),
            "beta_schedule": (self.beta_schedule in ("scaled_linear", "linear"), "'scaled_linear' or 'linear'"),
            "steps_offset": (type(offset) is int and offset >= 0, "an integer >= 0"),
            "set_alpha_to_one": (type(self.set_alpha_to_one) is bool, "true or false"),
            "clip_sample": (self.clip_sample is False, "false (SD 1.5 does not clip x_0)"),
            "prediction_type": (self.prediction_type == "epsilon",
                                "'epsilon' (SD 1.x): v-prediction (SD 2.x) is not supported"),
            "timestep_spacing": (self.timestep_spacing in (None, "leading", "linspace", "trailing"),
                                 "null, 'leading', 'linspace' or 'trailing'"),
            "trained_betas": (self.trained_betas is None, "null (betas come from beta_start/end/schedule)"),
            "rescale_betas_zero_snr": (self.rescale_betas_zero_snr is False, "false (a v-prediction feature)"),
        }  # fmt: skip
        for key, (ok, supported) in checks.items():
            if not ok:
                raise ValueError(f"scheduler config {key}={getattr(self, key)!r:.60} is not supported; use {supported}")


SD15_SCHEDULER_CONFIG = SchedulerConfig()  # for checkpoints that come without a scheduler_config.json


# ----------------------------------------------------------------------------- the noise schedule


def alphas_cumprod_from(config: SchedulerConfig) -> Tensor:
    """ᾱ_t for t = 0..T-1 (float32, as Diffusers computes it)."""
    T, b0, b1 = config.num_train_timesteps, config.beta_start, config.beta_end
    if config.beta_schedule == "scaled_linear":  # LDM's "linear": linear in sqrt(β) (code only, no equation)
        betas = torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float32) ** 2
    else:  # "linear", DDPM Sec. 4
        betas = torch.linspace(b0, b1, T, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)  # DDPM Eq. 4


def sigma_at(t: Tensor, train_sigmas: Tensor) -> Tensor:
    """σ at (fractional) timesteps t, linear in σ between neighbouring training timesteps (float64; t is
    clamped to [0, T-1] like numpy.interp, which Diffusers uses)."""
    s, t = train_sigmas.double(), t.double().clamp(0, len(train_sigmas) - 1)
    lo = t.floor().clamp(max=len(s) - 2).long()
    return (s[lo + 1] - s[lo]) * (t - lo) + s[lo]


def sigma_to_t(sigma: Tensor, train_sigmas: Tensor) -> Tensor:
    """The inverse: fractional timestep of each σ, linear in log σ between neighbouring timesteps (float64).
    Diffusers converts Karras sigmas to UNet timesteps this way."""
    log_sigmas, log_sigma = train_sigmas.log().double(), sigma.double().clamp(min=1e-10).log()
    lo = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    w = ((log_sigmas[lo] - log_sigma) / (log_sigmas[lo] - log_sigmas[lo + 1])).clamp(0, 1)
    return (1 - w) * lo + w * (lo + 1)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> Tensor:
    """EDM Eq. 5: σ_i = (σ_max^(1/ρ) + i/(N-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ for i < N (float64)."""
    ramp = linspace(0.0, 1.0, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


# ----------------------------------------------------------------------------- schedule types (A1111's "Schedule type")
# Where the noise levels of a run lie between σ_max and σ_min. "default" is each sampler's own (Diffusers' default:
# evenly spaced timesteps, which A1111 calls "Uniform"); the others are the Diffusers 0.42 options that give them. Each
# Sampler record lists the ones its Diffusers class offers (Sampler.schedules). Ours -> A1111's label:
SCHEDULES = {
    "default": "Uniform",  # timestep_spacing (Sampler.spacing)
    "karras": "Karras",  # use_karras_sigmas=True: EDM Eq. 5, ρ = 7
    "exponential": "Exponential",  # use_exponential_sigmas=True: evenly spaced in log σ
    "beta": "Beta",  # use_beta_sigmas=True: Beta(0.6, 0.6) quantiles (Lee et al. 2024, arXiv:2407.12173)
    "align_your_steps": "Align Your Steps",  # set_timesteps(timesteps=...): Sabour et al. 2024 (arXiv:2404.14507)
}
ALL_SCHEDULES = tuple(SCHEDULES)
# Sabour et al. 2024, "Align Your Steps": the 10 timesteps optimised for SD 1.5 (Diffusers'
# AysSchedules["StableDiffusionTimesteps"], from NVIDIA's how-to page).
AYS_SD15_TIMESTEPS = (999, 850, 736, 645, 545, 455, 343, 233, 124, 24)


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> Tensor:
    """n noise levels evenly spaced in log σ from σ_max down to σ_min (float64)."""
    return linspace(math.log(sigma_max), math.log(sigma_min), n).exp()


def beta_cdf(x: Tensor, a: float, b: float) -> Tensor:
    """The Beta(a, b) CDF, the regularized incomplete beta function I_x(a, b) = B_x(a, b) / B(a, b) (DLMF 8.17.1-2),
    float64. For x <= 1/2: B_x(a, b) = ∫_0^x t^(a-1) (1-t)^(b-1) dt with (1-t)^(b-1) = Σ_n (1-b)_n t^n / n! (the
    binomial series) integrated term by term: Σ_n (1-b)_n / n! x^(a+n) / (a+n), terms shrinking at least as 2^-n for
    a, b <= 2, so 64 of them reach float64 round-off. For x > 1/2 the symmetry I_x(a, b) = 1 - I_1-x(b, a) (DLMF
    8.17.4)."""
    x, lower = x.double(), x <= 0.5
    a_, b_ = torch.full_like(x, a), torch.full_like(x, b)
    x, a, b = torch.where(lower, x, 1 - x), torch.where(lower, a_, b_), torch.where(lower, b_, a_)
    total, coefficient = torch.zeros_like(x), torch.ones_like(x)  # (1-b)_n / n!
    for n in range(64):
        total = total + coefficient * x ** (a + n) / (a + n)
        coefficient = coefficient * (n + 1 - b) / (n + 1)
    log_beta = torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)  # B(a, b) = Γ(a) Γ(b) / Γ(a + b)
    cdf = total / log_beta.exp()
    return torch.where(lower, cdf, 1 - cdf)


def beta_ppf(q: Tensor, a: float = 0.6, b: float = 0.6) -> Tensor:
    """The Beta(a, b) quantile function, the inverse of beta_cdf (float64), by bisection: the CDF is increasing, and 64
    halvings of [0, 1] reach float64 round-off. 0 and 1 map to themselves exactly."""
    q = q.double()
    lo, hi = torch.zeros_like(q), torch.ones_like(q)
    for _ in range(64):
        mid = (lo + hi) / 2
        below = beta_cdf(mid, a, b) < q
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return torch.where(q <= 0, 0.0, torch.where(q >= 1, 1.0, (lo + hi) / 2))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, a: float = 0.6, b: float = 0.6) -> Tensor:
    """Lee et al. 2024 (arXiv:2407.12173), "Beta Sampling is All You Need": σ_i = σ_min + F^-1(1 - i/(N-1)) (σ_max -
    σ_min) with F the Beta(0.6, 0.6) CDF, so that steps crowd at both ends of the range (float64)."""
    return sigma_min + beta_ppf(1 - linspace(0.0, 1.0, n), a, b) * (sigma_max - sigma_min)


def align_your_steps_timesteps(n: int) -> Tensor:
    """AYS_SD15_TIMESTEPS for n = 10; for other n, as A1111 stretches its AYS schedule (sd_schedulers.py,
    loglinear_interp): log t, in ascending order, interpolated linearly (numpy.interp) at n evenly spaced positions
    in [0, 1], then descending again; here rounded to the integer training timesteps the UNet was trained on.
    float64 integers. Past about 430 steps neighbours round to the same t (see schedule_problem)."""
    log_t = torch.tensor(AYS_SD15_TIMESTEPS, dtype=torch.float64).flip(0).log()  # ascending
    known, wanted = linspace(0.0, 1.0, len(log_t)), linspace(0.0, 1.0, n)
    j = (torch.searchsorted(known, wanted, right=True) - 1).clamp(0, len(known) - 2)  # wanted in [known_j, known_j+1]
    slope = (log_t[j + 1] - log_t[j]) / (known[j + 1] - known[j])
    return (slope * (wanted - known[j]) + log_t[j]).exp().flip(0).round()


# Schedules that replace a sampler's noise levels: (σ_min, σ_max, n) -> n levels from σ_max down to σ_min, float64.
SIGMA_SCHEDULES = {"karras": karras_sigmas, "exponential": exponential_sigmas, "beta": beta_sigmas}
SIGMA_ONLY = ("default", *SIGMA_SCHEDULES)  # a class with use_<type>_sigmas but no set_timesteps(timesteps=...)


# ----------------------------------------------------------------------------- choosing the timesteps


def linspace(start: float, stop: float, n: int) -> Tensor:
    """n evenly spaced values, computed as numpy does (i * step, exact end point) so that ties at .5 round
    as in Diffusers, which builds its grids with numpy (torch.linspace differs in the last bit)."""
    x = torch.arange(n, dtype=torch.float64) * ((stop - start) / (n - 1) if n > 1 else 0.0) + start
    if n > 1:
        x[-1] = stop
    return x


def sd15_leading_timesteps(n: int, T: int = 1000, steps_offset: int = 1) -> Tensor:
    """The SD 1.5 timestep rule ("leading" spacing with steps_offset = 1), from LDM's DDIM sampler.

    Every (T // n)-th training step counted up from 0, shifted by steps_offset: 50 steps give
    [981, 961, ..., 21, 1]. The first UNet call is at t = 981, not 999, and the last at t = 1 (LDM: "add one
    to get the final alpha values right"). See ddim_alpha_bar_prev for where the last DDIM step lands."""
    return torch.arange(n - 1, -1, -1, dtype=torch.float64) * (T // n) + steps_offset


def ddim_alpha_bar_prev(timesteps: Tensor, alphas_cumprod: Tensor, config: SchedulerConfig) -> Tensor:
    """The ᾱ each DDIM step lands on, the second half of the SD 1.5 rule. Diffusers steps back by T // n from t
    (n steps) whatever the spacing (so under linspace/trailing a step does not land on the next call's t). Below
    t = 0 it lands on 1 if set_alpha_to_one, but SD 1.5 sets it False, as LDM's sampler did: the last step lands
    on ᾱ_0, and the final latent keeps noise σ = sqrt((1 - ᾱ_0) / ᾱ_0) ≈ 0.029."""
    prev = timesteps - len(alphas_cumprod) // len(timesteps)
    final = alphas_cumprod.new_tensor(1.0) if config.set_alpha_to_one else alphas_cumprod[0]
    return torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], final)


def ddpm_alpha_bar_prev(timesteps: Tensor, alphas_cumprod: Tensor, config: SchedulerConfig) -> Tensor:
    """DDPM lands on the next call's t, and on ᾱ = 1 after the last (Diffusers ignores set_alpha_to_one here)."""
    return torch.cat([alphas_cumprod[timesteps[1:]], alphas_cumprod.new_ones(1)])


def spaced_timesteps(n: int, spacing: str, T: int, steps_offset: int) -> Tensor:
    """n descending training timesteps, float64, unrounded for linspace (Lin et al. 2023, Table 2)."""
    if spacing == "linspace":  # T-1 ... 0, both ends included
        return linspace(0.0, T - 1.0, n).flip(0)
    if spacing == "leading":
        return sd15_leading_timesteps(n, T, steps_offset)
    if spacing == "trailing":  # T ... T/n, minus 1; T + i * delta is how Diffusers' np.arange(T, 0, -T / n) computes
        return (T + torch.arange(n, dtype=torch.float64) * ((T - T / n) - T)).round() - 1
    raise ValueError(f"spacing must be 'leading', 'linspace' or 'trailing', not {spacing!r}")


@dataclass(frozen=True)
class Schedule:
    """Everything a sampler needs, precomputed. N = number of UNet calls. Tensors live on the CPU: step() reads
    them as scalars, which costs no GPU sync (move `timesteps` to the device once if the UNet wants it there)."""

    sampler: str
    timesteps: Tensor  # (N,) t fed to the UNet at each call, in order (Heun repeats); float32 or int64 as Diffusers
    sigmas: Tensor  # (N+1,) float32 σ at each call, then where the last call lands (Diffusers' scheduler.sigmas)
    init_noise_sigma: float  # txt2img starts from randn * init_noise_sigma
    alpha_bar: Tensor | None = None  # (N,) ᾱ at each call's t (DDIM, DDPM)
    alpha_bar_prev: Tensor | None = None  # (N,) ᾱ each step lands on (DDIM, DDPM)
    first_step: int = 0  # the step number of the first call: the steps img2img skips (A1111 counts from 0)
    coefficients: Tensor | None = None  # (N, k) per-call numbers a sampler precomputes (Sampler.schedule): LMS's
    # weights of its past slopes, PNDM's ᾱ one stride above t

    def step_of(self, i: int) -> int:
        """The step that UNet call i belongs to (prompt editing switches text at steps, not calls)."""
        return self.first_step + i // SAMPLERS[self.sampler].unet_calls


@dataclass(frozen=True)
class SamplerState:
    """What a sampler carries from one UNet call to the next."""

    x: Tensor | None = None  # Heun: x_i, where the step started (the corrector restarts from it)
    d: Tensor | None = None  # Heun: d_i, the slope the predictor used
    denoised: Tensor | None = None  # DPM++ 2M: x_θ of the previous call
    history: tuple[Tensor, ...] = ()  # multistep samplers' past values, oldest first (PNDM: ε, LMS: d, UniPC: x_θ)


# ----------------------------------------------------------------------------- the samplers, one step each


def vp_coefficients(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """α_t, σ_t of x_t = α_t x_0 + σ_t ε from the σ of x_t / α_t = x_0 + σ ε (DPM-Solver++ notation)."""
    alpha_s = 1 / (sigma**2 + 1) ** 0.5
    return alpha_s, sigma * alpha_s


def denoise(x: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
    """The ε-UNet as a denoiser, EDM Eq. 7 + Table 1: D(x; σ) = c_skip x + c_out ε with c_skip = 1, c_out = -σ
    (and the UNet fed c_in x, see scale_model_input)."""
    return x - sigma * eps


def euler_step(x: Tensor, eps: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """Euler's method on the probability-flow ODE dx/dσ = (x - D(x; σ)) / σ: EDM Alg. 1 without lines 6-8."""
    d = (x - denoise(x, eps, sigma)) / sigma  # line 4
    return x + d * (sigma_next - sigma)  # line 5


def ancestral_sigmas(sigma: Tensor, sigma_next: Tensor) -> tuple[Tensor, Tensor]:
    """σ_i+1 split into (σ_up, σ_down) for an ancestral step: σ_up² is DDPM's posterior variance (DDIM Eq. 7 and 16
    with η = 1) in the variable x_0 + σ ε, and σ_down² + σ_up² = σ_next²."""
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    return sigma_up, (sigma_next**2 - sigma_up**2) ** 0.5


def euler_ancestral_step(x: Tensor, eps: Tensor, sigma: Tensor, sigma_next: Tensor, noise: Tensor) -> Tensor:
    """DDIM Eq. 12 with η = 1 (Eq. 16) in the variable x_0 + σ ε: an Euler step down to σ_down, then fresh noise
    σ_up ε (ancestral_sigmas)."""
    sigma_up, sigma_down = ancestral_sigmas(sigma, sigma_next)
    d = (x - denoise(x, eps, sigma)) / sigma
    return x + d * (sigma_down - sigma) + noise * sigma_up


def heun_predictor(x: Tensor, eps: Tensor, sigma: Tensor, sigma_next: Tensor) -> tuple[Tensor, SamplerState]:
    """EDM Alg. 1 lines 4-5 (Heun's method, first UNet call of a step): the Euler prediction of x_i+1."""
    d = (x - denoise(x, eps, sigma)) / sigma  # d_i
    return x + d * (sigma_next - sigma), SamplerState(x=x, d=d)


def heun_corrector(x: Tensor, eps: Tensor, sigma: Tensor, sigma_next: Tensor, state: SamplerState) -> Tensor:
    """EDM Alg. 1 lines 6-8 (second UNet call, at the prediction x = x_i+1, σ_i+1): the trapezoidal step."""
    d_prime = (x - denoise(x, eps, sigma_next)) / sigma_next  # d'_i
    return state.x + (state.d + d_prime) / 2 * (sigma_next - sigma)


def dpmpp_2m_step(x: Tensor, eps: Tensor, sigma: Tensor, sigma_next: Tensor, sigma_prev: Tensor | None = None,
                  denoised_prev: Tensor | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """DPM-Solver++(2M), Lu et al. 2022 Alg. 2, on x_t = α_t x_0 + σ_t ε. Without the previous call's x_θ it is
    the first-order update (= DDIM η = 0); with it, x_θ is extrapolated linearly in λ to the step's midpoint.
    Returns the new x and this call's x_θ."""
    alpha_s, sigma_s = vp_coefficients(sigma)
    alpha_t, sigma_t = vp_coefficients(sigma_next)
    lam_s, lam_t = alpha_s.log() - sigma_s.log(), alpha_t.log() - sigma_t.log()  # λ = log(α / σ)
    h = lam_t - lam_s  # λ_t = +∞ at σ_next = 0: e^-h = 0 and the step returns D exactly
    denoised = (x - sigma_s * eps) / alpha_s  # x_θ(x_t, t), the data prediction
    D = denoised
    if denoised_prev is not None:
        alpha_p, sigma_p = vp_coefficients(sigma_prev)
        r = (lam_s - (alpha_p.log() - sigma_p.log())) / h  # r_i = h_i-1 / h_i
        D = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * denoised_prev
    return (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * D, denoised


def ddim_step(x: Tensor, eps: Tensor, abar: Tensor, abar_prev: Tensor, eta: float, noise: Tensor | None) -> Tensor:
    """Song et al. 2020 Eq. 12, with σ_t(η) from Eq. 16 (η = 0: deterministic)."""
    x0 = (x - (1 - abar) ** 0.5 * eps) / abar**0.5  # "predicted x_0"
    sigma_eta = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)) ** 0.5
    x = abar_prev**0.5 * x0 + (1 - abar_prev - sigma_eta**2) ** 0.5 * eps  # + "direction pointing to x_t"
    return x if noise is None else x + sigma_eta * noise  # + "random noise"


def ddpm_step(x: Tensor, eps: Tensor, abar: Tensor, abar_prev: Tensor, noise: Tensor | None) -> Tensor:
    """Ancestral sampling from the posterior q(x_t-1 | x_t, x_0) of Ho et al. 2020 Eq. 6-7, x_0 from Eq. 15, on
    the strided chain β_t = 1 - ᾱ_t / ᾱ_t-1 (Nichol & Dhariwal 2021, arXiv:2102.09672 Sec. 4)."""
    alpha_t = abar / abar_prev
    beta_t = 1 - alpha_t
    x0 = (x - (1 - abar) ** 0.5 * eps) / abar**0.5  # Eq. 15
    x = (abar_prev**0.5 * beta_t / (1 - abar)) * x0 + (alpha_t**0.5 * (1 - abar_prev) / (1 - abar)) * x  # μ̃_t
    if noise is None:  # no noise at t = 0
        return x
    # σ_t² = β̃_t (Diffusers' default variance_type "fixed_small"), floored at 1e-20 like Diffusers
    return x + ((1 - abar_prev) / (1 - abar) * beta_t).clamp(min=1e-20) ** 0.5 * noise


# ----------------------------------------------------------------------------- one UNet call of each sampler
# A sampler without branches or state (Euler, Euler a, DDIM, DDPM) is one function for both loops, reading the schedule
# with at(). One with them (Heun, DPM++ 2M) is written twice: for step() (i an int, branches taken in Python) and for
# graph_step(), as a function of device tensors only (i a (1,) tensor, both sides of a branch computed and one picked
# with torch.where, the state a tuple of Sampler.states tensors, zeros before the first call).

Noise = Tensor | None  # the ε drawn for this call (Sampler.draws): None where step() draws none, or zeros
Out = tuple[Tensor, SamplerState | None]  # the new x and the state for the next call
States = tuple[Tensor, ...]  # graph_step's sampler state
GraphOut = tuple[Tensor, States]


def at(v: Tensor, i: int | Tensor, k: int = 0) -> Tensor:
    """v[i + k] for step()'s int i, or for a call index i held in a (1,) int64 tensor on v's device, read there (no
    host sync, so a CUDA graph can replay it); clamped into range, since graph_step also computes the branch it then
    drops. 0-dim either way, so dtype promotion is the same (float16 ε times it stays float16)."""
    if isinstance(i, int):
        return v[i + k]
    return v.index_select(0, (i + k).clamp(0, len(v) - 1)).squeeze(0)


def euler(s: Schedule, i: int | Tensor, x: Tensor, eps: Tensor, state, noise: Noise, eta: float):
    return euler_step(x, eps, at(s.sigmas, i), at(s.sigmas, i, 1)), state


def euler_a(s: Schedule, i: int | Tensor, x: Tensor, eps: Tensor, state, noise: Noise, eta: float):
    return euler_ancestral_step(x, eps, at(s.sigmas, i), at(s.sigmas, i, 1), noise), state


def heun(s: Schedule, i: int, x: Tensor, eps: Tensor, state: SamplerState | None, noise: Noise, eta: float) -> Out:
    """Two UNet calls per step: even calls predict x_i+1, odd calls correct it (the last call, to σ = 0, stays
    Euler). The schedule visits each σ after the first twice: [σ0, σ1, σ1, σ2, σ2, ..., 0]."""
    if i % 2 == 0:
        return heun_predictor(x, eps, s.sigmas[i], s.sigmas[i + 1])
    return heun_corrector(x, eps, s.sigmas[i - 1], s.sigmas[i], state), None


def heun_graph(s: Schedule, i: Tensor, x: Tensor, eps: Tensor, state: States, noise: Noise, eta: float) -> GraphOut:
    """heun() with state (x_i, d_i): even calls predict, odd calls correct the step from σ_i-1 to σ_i."""
    x_pred, pred = heun_predictor(x, eps, at(s.sigmas, i), at(s.sigmas, i, 1))
    x_corr = heun_corrector(x, eps, at(s.sigmas, i, -1), at(s.sigmas, i), SamplerState(x=state[0], d=state[1]))
    even = i.squeeze(0) % 2 == 0
    state = tuple(torch.where(even, new, old) for new, old in zip((pred.x, pred.d), state, strict=True))
    return torch.where(even, x_pred, x_corr), state


def dpmpp_2m(s: Schedule, i: int, x: Tensor, eps: Tensor, state: SamplerState | None, noise: Noise, eta: float) -> Out:
    """First order on the first call (no history) and on the last, where λ = +∞ (Diffusers' lower_order_final
    with final_sigmas_type="zero"); second order in between."""
    if i == 0 or i == len(s.timesteps) - 1:
        x, denoised = dpmpp_2m_step(x, eps, s.sigmas[i], s.sigmas[i + 1])
    else:
        x, denoised = dpmpp_2m_step(x, eps, s.sigmas[i], s.sigmas[i + 1], s.sigmas[i - 1], state.denoised)
    return x, SamplerState(denoised=denoised)


def dpmpp_2m_graph(s: Schedule, i: Tensor, x: Tensor, eps: Tensor, state: States, noise: Noise, eta: float) -> GraphOut:
    """dpmpp_2m() with state (x_θ of the previous call,)."""
    sigma, sigma_next = at(s.sigmas, i), at(s.sigmas, i, 1)
    x_first, denoised = dpmpp_2m_step(x, eps, sigma, sigma_next)
    x_second, _ = dpmpp_2m_step(x, eps, sigma, sigma_next, at(s.sigmas, i, -1), state[0])
    first_order = ((i == 0) | (i == len(s.timesteps) - 1)).squeeze(0)
    return torch.where(first_order, x_first, x_second), (denoised,)


def ddim(s: Schedule, i: int | Tensor, x: Tensor, eps: Tensor, state, noise: Noise, eta: float):
    return ddim_step(x, eps, at(s.alpha_bar, i), at(s.alpha_bar_prev, i), eta, noise), state


def ddpm(s: Schedule, i: int | Tensor, x: Tensor, eps: Tensor, state, noise: Noise, eta: float):
    return ddpm_step(x, eps, at(s.alpha_bar, i), at(s.alpha_bar_prev, i), noise), state  # graph: zero ε at t = 0 adds 0


# ----------------------------------------------------------------------------- multistep and two-call samplers
# These run in the eager loop only (Sampler.eager_only): their state is a history of past calls or their branches
# depend on the call's position; GraphLoop hands them to the eager loop.

ADAMS_BASHFORTH = {1: ((1,), 1), 2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}  # newest first


def pndm_transfer(x: Tensor, eps: Tensor, abar: Tensor, abar_prev: Tensor) -> Tensor:
    """PNDM's transfer part φ (Liu et al. 2022, arXiv:2202.09778, Eq. 9): x_t -> x_t-δ given an ε; with the UNet's
    own ε it is DDIM's deterministic step (Song et al. Eq. 12, η = 0) rearranged."""
    denominator = abar * (1 - abar_prev) ** 0.5 + (abar * (1 - abar) * abar_prev) ** 0.5
    return (abar_prev / abar) ** 0.5 * x - (abar_prev - abar) * eps / denominator


def pndm(s: Schedule, i: int, x: Tensor, eps: Tensor, state: SamplerState | None, noise: Noise, eta: float) -> Out:
    """PLMS (the PNDM paper's pseudo linear multistep method) started as Diffusers' skip_prk_steps does instead
    of with Runge-Kutta steps: call 0 steps with ε_0 alone; call 1 sits at the same t as call 2 (pndm_calls) and redoes
    step 0 from x_0 with (ε_0 + ε_1) / 2, from ᾱ one stride above its t (Schedule.coefficients); from call 2 on,
    Adams-Bashforth of order 2, 3, then 4 on the ε of calls 0, 2, 3, ... (ε_1 is not kept)."""
    history = state.history if state is not None else ()
    if i == 1:  # back to x_0, from ᾱ_t+Δ to ᾱ_t
        x_next = pndm_transfer(state.x, (eps + history[-1]) / 2, s.coefficients[i], s.alpha_bar[i])
        return x_next, SamplerState(history=history)
    history = (*history[-3:], eps)
    weights, denominator = ADAMS_BASHFORTH[len(history)]
    eps_prime = sum(w * e for w, e in zip(weights, reversed(history), strict=True)) / denominator  # ε'_t
    return pndm_transfer(x, eps_prime, s.alpha_bar[i], s.alpha_bar_prev[i]), SamplerState(x=x, history=history)


def pndm_calls(s: Schedule, steps: int, config: SchedulerConfig, schedule: str) -> Schedule:
    """PNDM with skip_prk_steps runs steps + 1 UNet calls: the second step's t twice (Diffusers' plms_timesteps).
    Each call's step goes from ᾱ_t to ᾱ_t-Δ (Δ = T // steps, the DDIM rule); call 1 restarts the first step, from
    ᾱ_t+Δ to ᾱ_t: the coefficients hold ᾱ_t+Δ for every call (img2img may cut the schedule anywhere)."""
    calls = torch.tensor([0, *[1][: steps - 1], *range(1, steps)])  # [0, 1, 1, 2, ..., steps - 1]
    timesteps, alpha_bar, alpha_bar_prev = s.timesteps[calls], s.alpha_bar[calls], s.alpha_bar_prev[calls]
    alphas_cumprod, T = alphas_cumprod_from(config), config.num_train_timesteps
    ab = torch.cat([alpha_bar, alpha_bar_prev[-1:]])
    above = alphas_cumprod[(timesteps + T // steps).clamp(max=T - 1)]  # call 0's (past T - 1 at 2 steps) is unused
    return replace(s, timesteps=timesteps, sigmas=((1 - ab) / ab) ** 0.5, alpha_bar=alpha_bar,
                   alpha_bar_prev=alpha_bar_prev, coefficients=above)  # fmt: skip


def lms_weights(sigmas: Tensor, order: int = 4) -> Tensor:
    """(N, order) float64: for call i, ∫ from σ_i to σ_i+1 of the Lagrange basis polynomials through σ_i, σ_i-1, ...
    (min(i + 1, order) nodes), the weights of the slopes d_i, d_i-1, ... in one linear multistep step: Adams-Bashforth
    with variable steps (Hairer, Nørsett & Wanner, Solving ODEs I, Sec. III.5). The basis polynomials are integrated
    exactly (Diffusers integrates them numerically with scipy's quad; equal to float round-off)."""
    s, weights = sigmas.double().numpy(), torch.zeros(len(sigmas) - 1, order, dtype=torch.float64)
    for i in range(len(s) - 1):
        nodes = s[i - np.arange(min(i + 1, order))]  # σ_i, σ_i-1, ...
        for j, node in enumerate(nodes):
            basis = Polynomial([1.0])
            for other in np.delete(nodes, j):
                basis *= Polynomial([-other, 1.0]) / (node - other)  # ∏_k≠j (τ - σ_k) / (σ_j - σ_k)
            weights[i, j] = basis.integ()(s[i + 1]) - basis.integ()(s[i])
    return weights


def lms_calls(s: Schedule, steps: int, config: SchedulerConfig, schedule: str) -> Schedule:
    """Euler's timesteps and σ, plus each call's multistep weights, computed over the whole schedule: cut for img2img,
    the first call keeps its order-4 weight (Diffusers' order follows the step index, its history the calls run)."""
    return replace(s, coefficients=lms_weights(s.sigmas))


def lms(s: Schedule, i: int, x: Tensor, eps: Tensor, state: SamplerState | None, noise: Noise, eta: float) -> Out:
    """Linear multistep on the probability-flow ODE dx/dσ = d (EDM Alg. 1 line 4's slope): x_i+1 = x_i + Σ_j w_ij
    d_i-j over the last (up to 4) slopes, weights from lms_weights."""
    d = (x - denoise(x, eps, s.sigmas[i])) / s.sigmas[i]
    history = (*(state.history[-3:] if state is not None else ()), d)
    weights = s.coefficients[i, : len(history)]  # zero beyond the order
    return x + sum(w * d_j for w, d_j in zip(weights, reversed(history), strict=True)), SamplerState(history=history)


def unipc_update(x: Tensor, sigma_s: Tensor, sigma_t: Tensor, m: tuple[Tensor, ...], order: int,
                 sigma_1: Tensor | None = None, m_t: Tensor | None = None) -> Tensor:  # fmt: skip
    """One UniPC update with B(h) = e^h - 1 ("bh2"), Zhao et al. 2023 (arXiv:2302.04867), in the data prediction:
    from x at σ_s to σ_t given the x_θ history m (m[-1] at σ_s, m[-2] at sigma_1). Without m_t it is the predictor
    UniP-p (p = order; p = 1 is DPM-Solver++(1), p = 2 adds ρ = 1/2 of the difference D_1); with m_t = x_θ(x_t, t)
    it is the corrector UniC-p, its weights ρ solving R_p ρ = g_p / B(h) (the paper's a_p; p = 1: ρ = 1/2)."""
    alpha_t, s_t = vp_coefficients(sigma_t)
    alpha_s, s_s = vp_coefficients(sigma_s)
    lam_s = alpha_s.log() - s_s.log()
    h = alpha_t.log() - s_t.log() - lam_s  # h = λ_t - λ_s
    B_h = torch.expm1(-h)  # B(h) = e^h - 1, in -h for the data prediction; also φ_1's e^-h - 1
    x_t = s_t / s_s * x - alpha_t * B_h * m[-1]  # the first-order part, DPM-Solver++(1)
    if order == 2:
        alpha_1, s_1 = vp_coefficients(sigma_1)
        r = (alpha_1.log() - s_1.log() - lam_s) / h  # r_1 = (λ_s-1 - λ_s) / h
        D1 = (m[-2] - m[-1]) / r
    if m_t is None:
        return x_t - alpha_t * B_h * (0.5 * D1 if order == 2 else 0)
    D1_t = m_t - m[-1]
    if order == 1:
        return x_t - alpha_t * B_h * (0.5 * D1_t)
    phi_2 = B_h / -h - 1  # h φ_2-type terms of g_p, in -h: (e^-h - 1)/(-h) - 1
    b1, b2 = phi_2 / B_h, 2 * (phi_2 / -h - 0.5) / B_h
    rho = (b2 - b1) / (r - 1)  # R_2 = [[1, 1], [r_1, 1]], (ρ, b1 - ρ) = R_2^-1 (b1, b2)
    return x_t - alpha_t * B_h * (rho * D1 + (b1 - rho) * D1_t)


def unipc(s: Schedule, i: int, x: Tensor, eps: Tensor, state: SamplerState | None, noise: Noise, eta: float) -> Out:
    """UniPC-2 as Diffusers' UniPCMultistepScheduler runs it by default (bh2, order 2, lower_order_final): each call
    first corrects its own input x_i with UniC (now that x_θ(x_i) is known), then predicts x_i+1 with UniP. Order 1 at
    the first call (no history) and at the last (to σ = 0); the corrector uses the order its predictor used."""
    n, sig = len(s.timesteps), s.sigmas
    alpha, sigma = vp_coefficients(sig[i])
    denoised = (x - sigma * eps) / alpha  # x_θ(x_i, t_i)
    history = state.history if state is not None else ()
    if i > 0:
        x = unipc_update(state.x, sig[i - 1], sig[i], history, min(2, n - i + 1, i), sig[i - 2] if i > 1 else None,
                         m_t=denoised)  # fmt: skip
    history = (*history[-1:], denoised)
    x_next = unipc_update(x, sig[i], sig[i + 1], history, min(2, n - i, i + 1), sig[i - 1] if i > 0 else None)
    return x_next, SamplerState(x=x, history=history)


def dpmpp_2m_sde_step(x: Tensor, eps: Tensor, sigma: Tensor, sigma_next: Tensor, noise: Tensor,
                      sigma_prev: Tensor | None = None,
                      denoised_prev: Tensor | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """DPM-Solver++(2M) for the reverse SDE (Lu et al. 2022, arXiv:2211.01095: the data-prediction solver, with the
    SDE's exact linear part): x_t = (σ_t/σ_s) e^-h x_s + α_t (1 - e^-2h) D + σ_t sqrt(1 - e^-2h) ε, where D is x_θ
    (first order) or x_θ + (1/2)(x_θ - x_θ,prev)/r extrapolated in λ (second order, as DPM-Solver++(2M), Alg. 2)."""
    alpha_s, sigma_s = vp_coefficients(sigma)
    alpha_t, sigma_t = vp_coefficients(sigma_next)
    lam_s = alpha_s.log() - sigma_s.log()
    h = alpha_t.log() - sigma_t.log() - lam_s  # +∞ at σ_next = 0: x_t = x_θ
    denoised = (x - sigma_s * eps) / alpha_s
    x = sigma_t / sigma_s * torch.exp(-h) * x + alpha_t * (1 - torch.exp(-2.0 * h)) * denoised
    if denoised_prev is not None:
        alpha_p, sigma_p = vp_coefficients(sigma_prev)
        r = (lam_s - (alpha_p.log() - sigma_p.log())) / h  # r_i = h_i-1 / h_i
        x = x + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * (1.0 / r * (denoised - denoised_prev))
    return x + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise, denoised


def dpmpp_2m_sde(s: Schedule, i: int, x: Tensor, eps: Tensor, state: SamplerState | None, noise: Noise,
                 eta: float) -> Out:  # fmt: skip
    """First order at the first call and the last (to σ = 0), second order between; fresh ε at every call."""
    previous = () if i == 0 or i == len(s.timesteps) - 1 else (s.sigmas[i - 1], state.denoised)
    x, denoised = dpmpp_2m_sde_step(x, eps, s.sigmas[i], s.sigmas[i + 1], noise, *previous)
    return x, SamplerState(denoised=denoised)


def dpm2_calls(s: Schedule, steps: int, config: SchedulerConfig, schedule: str, ancestral: bool = False) -> Schedule:
    """DPM2's UNet calls [σ_0, σ_mid,0, σ_1, σ_mid,1, ..., σ_N-1] then 0: between the steps' σ, their midpoint in
    log σ (the geometric mean of σ_i and σ_i+1; ancestral: of σ_i and σ_down), its timestep by sigma_to_t. The last
    step has no midpoint call: it goes straight to σ = 0. Diffusers rounds the Karras timesteps (not Euler's)."""
    train_sigmas = (lambda a: ((1 - a) / a) ** 0.5)(alphas_cumprod_from(config))
    timesteps = s.timesteps.round() if schedule == "karras" else s.timesteps
    sigma, sigma_next = s.sigmas[:-1], s.sigmas[1:]
    if ancestral:  # the midpoint towards σ_down (euler_ancestral_step's), in float32 like Diffusers
        mid = sigma.log().lerp(ancestral_sigmas(sigma, sigma_next)[1].log(), 0.5).exp()[:-1]
    else:
        mid = sigma_next.log().lerp(sigma.log(), 0.5).exp()[:-1]
    t_mid = sigma_to_t(mid, train_sigmas).to(timesteps.dtype)
    sigmas = torch.stack([sigma[:-1], mid], 1).flatten()
    return replace(s, timesteps=torch.cat([torch.stack([timesteps[:-1], t_mid], 1).flatten(), timesteps[-1:]]),
                   sigmas=torch.cat([sigmas, s.sigmas[-2:]]))  # fmt: skip


def dpm2_midpoint(x: Tensor, eps: Tensor, sigma: Tensor, sigma_mid: Tensor) -> tuple[Tensor, SamplerState]:
    """Even calls of DPM2: an Euler step to the midpoint (EDM Alg. 1 lines 4-5 with σ_i+1 -> σ_mid)."""
    return euler_step(x, eps, sigma, sigma_mid), SamplerState(x=x)


def dpm2(s: Schedule, i: int, x: Tensor, eps: Tensor, state: SamplerState | None, noise: Noise, eta: float) -> Out:
    """DPM-Solver-2 (Lu et al. 2022, arXiv:2206.00927, Alg. 1 with r_1 = 1/2: the midpoint in λ = -log σ) in EDM's
    variable: the slope at the midpoint, from the step's start, x_i+1 = x_i + d(x_mid; σ_mid) (σ_i+1 - σ_i)."""
    if i % 2 == 0:
        return dpm2_midpoint(x, eps, s.sigmas[i], s.sigmas[i + 1])
    d_mid = (x - denoise(x, eps, s.sigmas[i])) / s.sigmas[i]
    return state.x + d_mid * (s.sigmas[i + 1] - s.sigmas[i - 1]), None


def dpm2_a(s: Schedule, i: int, x: Tensor, eps: Tensor, state: SamplerState | None, noise: Noise, eta: float) -> Out:
    """DPM2 ancestral: the midpoint step down to σ_down, then fresh noise σ_up ε, as euler_ancestral_step splits
    σ_i+1 (DDIM Eq. 16 with η = 1)."""
    if i % 2 == 0:
        return dpm2_midpoint(x, eps, s.sigmas[i], s.sigmas[i + 1])
    sigma, sigma_next = s.sigmas[i - 1], s.sigmas[i + 1]
    sigma_up, sigma_down = ancestral_sigmas(sigma, sigma_next)
    d_mid = (x - denoise(x, eps, s.sigmas[i])) / s.sigmas[i]
    return state.x + d_mid * (sigma_down - sigma) + noise * sigma_up, None


LCM_ORIGINAL_STEPS, LCM_TIMESTEP_SCALING, LCM_SIGMA_DATA = 50, 10.0, 0.5  # Diffusers' LCMScheduler defaults


def lcm_calls(s: Schedule, steps: int, config: SchedulerConfig, schedule: str) -> Schedule:
    """LCM's timesteps (Luo et al. 2023, arXiv:2310.04378: its distillation's skipping-step schedule, as Diffusers
    builds it): of the 50 distillation timesteps k - 1, 2k - 1, ..., T - 1 (k = T // 50), `steps` taken at evenly spaced
    positions from the top, floored. Each call lands on the next call's ᾱ; the last returns its x_0 (no noise)."""
    T = config.num_train_timesteps
    k = T // LCM_ORIGINAL_STEPS
    origin = (torch.arange(LCM_ORIGINAL_STEPS, 0, -1) * k - 1).long()
    timesteps = origin[(linspace(0, LCM_ORIGINAL_STEPS, steps + 1)[:-1]).floor().long()]
    alpha_bar = alphas_cumprod_from(config)[timesteps]
    alpha_bar_prev = torch.cat([alpha_bar[1:], alpha_bar.new_ones(1)])  # the last call returns x_0
    ab = torch.cat([alpha_bar, alpha_bar_prev[-1:]])
    return replace(s, timesteps=timesteps, sigmas=((1 - ab) / ab) ** 0.5, init_noise_sigma=1.0, alpha_bar=alpha_bar,
                   alpha_bar_prev=alpha_bar_prev)  # fmt: skip


def lcm(s: Schedule, i: int, x: Tensor, eps: Tensor, state: SamplerState | None, noise: Noise, eta: float) -> Out:
    """LCM's multistep sampling (Consistency Models' Alg. 1, "multistep consistency sampling", in LCM's latent
    form): the consistency function f(x, t) = c_skip x + c_out x̂_0, whose scalings c_skip = σ_d² / ((s t)² + σ_d²),
    c_out = s t / sqrt((s t)² + σ_d²) make f(x, 0) = x (the boundary condition; σ_d = 0.5, s = 10, Diffusers'
    values), x̂_0 from DDIM Eq. 12; then noised forward to the next call's ᾱ (DDPM Eq. 4) with a fresh ε, except at
    the last call."""
    abar, abar_prev = s.alpha_bar[i], s.alpha_bar_prev[i]
    scaled_t = s.timesteps[i] * LCM_TIMESTEP_SCALING  # float32 (Diffusers' tensor arithmetic)
    c_skip = LCM_SIGMA_DATA**2 / (scaled_t**2 + LCM_SIGMA_DATA**2)
    c_out = scaled_t / (scaled_t**2 + LCM_SIGMA_DATA**2) ** 0.5
    x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    denoised = c_out * x0 + c_skip * x
    if noise is None:
        return denoised, state
    return abar_prev.sqrt() * denoised + (1 - abar_prev).sqrt() * noise, state


@dataclass(frozen=True)
class Sampler:
    """One sampler as data: what make_schedule builds for it and what step() and graph_step() do at each UNet call."""

    name: str  # ours, the CLI's --scheduler value
    a1111_name: str  # A1111's name for it, written in the PNG metadata
    variable: str  # what it moves: EDM_X or X_T
    schedules: tuple[str, ...]  # the schedule types (SCHEDULES) Diffusers 0.42 offers for it: "default" always;
    # "karras", "exponential", "beta" where its class takes use_karras/exponential/beta_sigmas; "align_your_steps"
    # where its set_timesteps takes `timesteps=`
    unet_calls: int  # UNet calls per step (Diffusers' scheduler.order)
    spacing: str  # Diffusers' default timestep_spacing for it
    step: Callable[[Schedule, int, Tensor, Tensor, SamplerState | None, Noise, float], Out]  # one UNet call's update
    graph: Callable[[Schedule, Tensor, Tensor, Tensor, States, Noise, float], GraphOut] | None = None  # graph_step's
    # update where `step` has branches or state (None: `step` serves graph_step too)
    states: int = 0  # how many tensors of state graph() carries from call to call (its States)
    draws: Callable[[Schedule, int, float], bool] = lambda s, i, eta: False  # does step() draw ε at call i, given η
    alpha_bar_prev: Callable[[Tensor, Tensor, SchedulerConfig], Tensor] | None = None  # DDIM/DDPM: the ᾱ steps land on
    eta: bool = False  # takes DDIM's η (Eq. 16); the others would ignore it
    make_calls: Callable[[Schedule, int, SchedulerConfig, str], Schedule] | None = None  # turns the per-step schedule
    # (one entry per step, before img2img's cut) into its UNet calls' where they differ: PNDM's repeated call, DPM2's
    # midpoints, LCM's timesteps, LMS's weights (Schedule.coefficients); given steps, config, schedule type
    eager_only: bool = False  # True: no graph_step; GraphLoop (fast_path.py) hands it to the eager loop
    noise_dtype: torch.dtype | None = None  # the dtype Diffusers draws its ε in (None: the UNet output's)
    max_steps: int | None = None  # the most steps it takes (LCM: the 50 steps of its distillation schedule)
    a1111_schedule: str = "default"  # what A1111 1.9+ runs for it under "Schedule type: Automatic" (its sampler's
    # options["scheduler"]: karras for DPM++ 2M, DPM2, DPM2 a; exponential for DPM++ 2M SDE), for reading its PNGs

    @property
    def karras(self) -> bool:  # the --karras alias of schedule "karras"
        return "karras" in self.schedules


# The SD 1.5 scheduler file was written for PNDM and names no timestep_spacing, so every Diffusers class keeps
# its own default (verified in 0.42; older versions carried PNDM's "leading" over to all of them).
SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("euler", "Euler", EDM_X, schedules=ALL_SCHEDULES, unet_calls=1, spacing="linspace",
            step=euler),
    Sampler("euler_a", "Euler a", EDM_X, schedules=("default",), unet_calls=1, spacing="linspace",
            step=euler_a, draws=lambda s, i, eta: True),
    Sampler("heun", "Heun", EDM_X, schedules=ALL_SCHEDULES, unet_calls=2, spacing="linspace",
            step=heun, graph=heun_graph, states=2),  # x_i, d_i
    Sampler("dpmpp_2m", "DPM++ 2M", X_T, schedules=ALL_SCHEDULES, unet_calls=1, spacing="linspace",
            step=dpmpp_2m, graph=dpmpp_2m_graph, states=1, a1111_schedule="karras"),  # state: the previous x_θ
    Sampler("ddim", "DDIM", X_T, schedules=("default",), unet_calls=1, spacing="leading",
            step=ddim, draws=lambda s, i, eta: eta > 0, alpha_bar_prev=ddim_alpha_bar_prev, eta=True),
    Sampler("ddpm", "DDPM", X_T, schedules=("default", "align_your_steps"), unet_calls=1, spacing="leading",
            step=ddpm, draws=lambda s, i, eta: bool(s.timesteps[i] > 0), alpha_bar_prev=ddpm_alpha_bar_prev),
    Sampler("pndm", "PLMS", X_T, schedules=("default",), unet_calls=1, spacing="leading",
            step=pndm, alpha_bar_prev=ddim_alpha_bar_prev, make_calls=pndm_calls, eager_only=True),
    Sampler("lms", "LMS", EDM_X, schedules=SIGMA_ONLY, unet_calls=1, spacing="linspace",
            step=lms, make_calls=lms_calls, eager_only=True),
    Sampler("unipc", "UniPC", X_T, schedules=SIGMA_ONLY, unet_calls=1, spacing="linspace",
            step=unipc, eager_only=True),
    Sampler("dpmpp_2m_sde", "DPM++ 2M SDE", X_T, schedules=ALL_SCHEDULES, unet_calls=1, spacing="linspace",
            step=dpmpp_2m_sde, draws=lambda s, i, eta: True, noise_dtype=torch.float32, eager_only=True,
            a1111_schedule="exponential"),
    Sampler("dpm2", "DPM2", EDM_X, schedules=SIGMA_ONLY, unet_calls=2, spacing="linspace",
            step=dpm2, make_calls=dpm2_calls, eager_only=True, a1111_schedule="karras"),
    Sampler("dpm2_a", "DPM2 a", EDM_X, schedules=SIGMA_ONLY, unet_calls=2, spacing="linspace",
            step=dpm2_a, make_calls=partial(dpm2_calls, ancestral=True), draws=lambda s, i, eta: i % 2 == 1,
            eager_only=True, a1111_schedule="karras"),
    Sampler("lcm", "LCM", X_T, schedules=("default",), unet_calls=1, spacing="leading",
            step=lcm, make_calls=lcm_calls, draws=lambda s, i, eta: i < len(s.timesteps) - 1, eager_only=True,
            max_steps=LCM_ORIGINAL_STEPS),
)}  # fmt: skip


# ----------------------------------------------------------------------------- names: ours, A1111's, your own
BUILT_IN = frozenset(SAMPLERS)


def schedule_problem(sampler: str, schedule: str, steps: int | None = None) -> str | None:
    """Why `sampler` cannot run `schedule` (at `steps` steps), as one line; None if it can."""
    if schedule not in SCHEDULES:
        return f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}"
    if schedule not in SAMPLERS[sampler].schedules:
        takes = [name for name, s in SAMPLERS.items() if schedule in s.schedules]
        return f"schedule {schedule} works with {', '.join(takes)}, not {sampler} (Diffusers has no such option for it)"
    if steps is not None and steps > (SAMPLERS[sampler].max_steps or steps):
        return f"{sampler} takes at most {SAMPLERS[sampler].max_steps} steps, got {steps}"
    if schedule == "align_your_steps" and steps is not None:
        if steps < 2:
            return "align_your_steps needs at least 2 steps (1 would be its last, nearly noise-free timestep)"
        t = align_your_steps_timesteps(steps)
        if (t[1:] >= t[:-1]).any():
            return f"align_your_steps at {steps} steps repeats timesteps (t is an integer below 1000); use fewer steps"
    return None


def find_sampler(name: str) -> tuple[str, str | None]:
    """(our sampler name, the schedule the name implies or None) for our name ("dpmpp_2m") or A1111's ("DPM++ 2M",
    "Euler a", "PLMS"), case-insensitive, optionally followed by a schedule as A1111's names were before 1.9
    ("DPM++ 2M Karras", "Euler Exponential"). A name alone implies no schedule; A1111's "Automatic" is read only from
    its PNGs (sampler_from_a1111). ValueError with the choices for any other name."""
    names = {key.casefold(): s.name for s in SAMPLERS.values() for key in (s.a1111_name, s.name)}
    key = " ".join(name.split()).casefold()
    if key in names:
        return names[key], None
    for schedule, label in SCHEDULES.items():
        for suffix in (label.casefold(), schedule):
            if key.endswith(" " + suffix) and key[: -len(suffix) - 1] in names:
                return names[key[: -len(suffix) - 1]], schedule
    a1111 = ", ".join(s.a1111_name for s in SAMPLERS.values())
    raise ValueError(f"unknown scheduler {name!r:.60}; choose one of {', '.join(SAMPLERS)}, or A1111's {a1111}, "
                     f"optionally followed by a schedule type ({', '.join(list(SCHEDULES.values())[1:])})")  # fmt: skip


def find_schedule(name: str) -> str | None:
    """Our schedule type for our name or A1111's label ("Karras", "Align Your Steps"; "Uniform" is default),
    case-insensitive; None for any other name."""
    key = " ".join(name.split()).casefold()
    return next((ours for ours, label in SCHEDULES.items() if key in (ours, label.casefold())), None)


def sampler_to_a1111(sampler: str, schedule: str) -> tuple[str, str | None]:
    """A1111 1.9+'s "Sampler" and "Schedule type" fields for a run (PNG metadata), "Schedule type" None where it is
    "Automatic" (the sampler's own; A1111 reads a missing field as that, modules/infotext_utils.py)."""
    record = SAMPLERS[sampler]
    if schedule == record.a1111_schedule == "default":
        return record.a1111_name, None
    return record.a1111_name, SCHEDULES[schedule]  # "Uniform" where A1111's Automatic would be another one


def sampler_from_a1111(sampler_field: str, schedule_field: str | None = None) -> tuple[str, str]:
    """(sampler, schedule) from an A1111 PNG's "Sampler" and "Schedule type" fields, read as A1111 1.9+ reads them
    (modules/sd_samplers.py, get_sampler_and_scheduler): a schedule suffix of the sampler's name wins, then the field;
    "Automatic" or no field is the sampler's own (Sampler.a1111_schedule: Karras for DPM++ 2M). ValueError (one
    line) for a sampler or schedule type we do not have, or a combination Diffusers does not offer."""
    sampler, schedule = find_sampler(sampler_field)
    label = " ".join((schedule_field or "Automatic").split()).casefold()
    if schedule is None and label == "automatic":
        schedule = SAMPLERS[sampler].a1111_schedule
    elif schedule is None:
        schedule = find_schedule(label)
        if schedule is None:
            known = ", ".join(["Automatic", *SCHEDULES.values()])
            raise ValueError(f"schedule type {schedule_field!r:.40} is not one of ours: {known}")
    if problem := schedule_problem(sampler, schedule):
        raise ValueError(problem)
    return sampler, schedule


def register(sampler: Sampler) -> Sampler:
    """Bring your own sampler: add `sampler` (a Sampler record with a step function of your own) under its name, for
    generate(scheduler=name), the CLI in the same process and bench/sampler_lab.py. Registering a name again replaces
    your earlier record; the built-in names are taken. A sampler with state or branches also needs `graph` and
    `states` for the CUDA-graph loop of speed_up() (see heun_graph), or eager_only=True; the eager loop needs only
    `step`. README: "Your own sampler"."""
    taken = {key.casefold(): s.name for s in SAMPLERS.values() for key in (s.name, s.a1111_name)}
    problems = {
        "name must be a lowercase identifier, like 'ab2'": not (sampler.name.isidentifier() and sampler.name.islower()),
        f"{sampler.name!r} is a built-in sampler": sampler.name in BUILT_IN,
        f"a1111_name {sampler.a1111_name!r} names another sampler":
            taken.get(sampler.a1111_name.casefold(), sampler.name) != sampler.name,
        "variable must be EDM_X or X_T": sampler.variable not in (EDM_X, X_T),
        f"schedules must include 'default' and only {', '.join(SCHEDULES)}":
            "default" not in sampler.schedules or not set(sampler.schedules) <= set(SCHEDULES),
        "unet_calls must be >= 1": sampler.unet_calls < 1,
        "spacing must be leading, linspace or trailing": sampler.spacing not in ("leading", "linspace", "trailing"),
    }  # fmt: skip
    for problem, found in problems.items():
        if found:
            raise ValueError(f"cannot register {sampler.name!r}: {problem}")
    SAMPLERS[sampler.name] = sampler
    return sampler


# ----------------------------------------------------------------------------- the schedule of a run


def make_schedule(sampler: str, steps: int, config: SchedulerConfig, karras: bool = False, spacing: str | None = None,
                  strength: float = 1.0, schedule: str = "default") -> Schedule:  # fmt: skip
    """The schedule `<Scheduler>.from_config(config)` + `set_timesteps(steps)` gives in Diffusers 0.42, cut to
    the last min(int(steps * strength), steps) steps for img2img as StableDiffusionImg2ImgPipeline does. `schedule`
    (SCHEDULES) is Diffusers' use_<schedule>_sigmas=True, or set_timesteps(timesteps=align_your_steps_timesteps(steps));
    karras=True is schedule="karras"."""
    schedule = "karras" if karras else schedule
    if sampler not in SAMPLERS:
        raise ValueError(f"no sampler {sampler!r}")
    if problem := schedule_problem(sampler, schedule, steps):
        raise ValueError(problem)
    record, T, offset = SAMPLERS[sampler], config.num_train_timesteps, config.steps_offset
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}]")
    spacing = spacing or config.timestep_spacing or record.spacing
    alphas_cumprod = alphas_cumprod_from(config)
    train_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # σ_t for t = 0..T-1 (EDM Table 1)
    alpha_bar = alpha_bar_prev = None
    init_noise_sigma = torch.tensor(1.0)
    ays = align_your_steps_timesteps(steps) if schedule == "align_your_steps" else None  # replaces the spaced ones

    if record.variable == EDM_X:
        timesteps = (ays if ays is not None else spaced_timesteps(steps, spacing, T, offset)).float()
        sigmas = sigma_at(timesteps, train_sigmas)
        if schedule in SIGMA_SCHEDULES:  # Diffusers: between the σ of the first and last spaced timestep, not T-1, 0
            sigmas = SIGMA_SCHEDULES[schedule](sigmas[-1].item(), sigmas[0].item(), steps)
            timesteps = sigma_to_t(sigmas, train_sigmas).float()
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).float()  # σ_N = 0 (EDM Eq. 5)
        init_noise_sigma = sigmas.max()
        if spacing == "leading":  # Diffusers: sqrt(σ_max² + 1) under "leading", σ_max otherwise
            init_noise_sigma = (init_noise_sigma**2 + 1) ** 0.5
        if record.unet_calls > 1 and record.make_calls is None:  # each step's calls after the first repeat its σ,
            # σ_N excepted (Heun)
            sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(record.unet_calls), sigmas[-1:]])
            timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(record.unet_calls)])
    elif record.alpha_bar_prev is None:  # DPM++: steps between σ only
        if schedule in SIGMA_SCHEDULES:  # between the σ of t = T-1 and t = 0; Diffusers rounds the Karras timesteps,
            sigmas = SIGMA_SCHEDULES[schedule](train_sigmas[0].item(), train_sigmas[-1].item(), steps)
            t = sigma_to_t(sigmas, train_sigmas)  # and truncates the others (a cast to int64)
            timesteps = (t.round() if schedule == "karras" else t.trunc()).long()
        else:  # DPM-Solver's grid has steps+1 points ending at t=0; the last step goes to σ=0 instead
            n = steps if spacing == "trailing" else steps + 1
            timesteps = spaced_timesteps(n, spacing, T, offset)[:steps].round().long() if ays is None else ays.long()
            sigmas = sigma_at(timesteps, train_sigmas)
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).float()
    else:  # DDIM, DDPM: steps from ᾱ at each call's t to the ᾱ it lands on
        timesteps = (ays if ays is not None else spaced_timesteps(steps, spacing, T, offset)).round().long()
        alpha_bar, alpha_bar_prev = alphas_cumprod[timesteps], record.alpha_bar_prev(timesteps, alphas_cumprod, config)
        ab = torch.cat([alpha_bar, alpha_bar_prev[-1:]])
        sigmas = ((1 - ab) / ab) ** 0.5

    full = Schedule(sampler, timesteps, sigmas, float(init_noise_sigma), alpha_bar, alpha_bar_prev)
    if record.make_calls is not None:
        full = record.make_calls(full, steps, config, schedule)

    # img2img skips the first steps: t_start UNet calls (Diffusers' t_start * scheduler.order)
    t_start = (steps - min(int(steps * strength), steps)) * record.unet_calls
    if t_start >= len(full.timesteps):
        raise ValueError(f"strength {strength} leaves no step out of {steps}")
    per_call = ("timesteps", "sigmas", "alpha_bar", "alpha_bar_prev", "coefficients")
    cut = {k: getattr(full, k)[t_start:] for k in per_call if getattr(full, k) is not None}
    return replace(full, **cut, first_step=t_start // record.unet_calls)


def add_noise(schedule: Schedule, x0: Tensor, noise: Tensor, i: int = 0) -> Tensor:
    """Sample the forward process q(x | x_0) at the noise level of UNet call i, in the variable the sampler moves:
    i = 0 starts img2img (Diffusers' add_noise at timesteps[t_start]); inpainting with an ordinary model re-noises
    the kept region to the next call's level after every step."""
    if SAMPLERS[schedule.sampler].variable == EDM_X:  # x = x_0 + σ ε (EDM Sec. 2, p(x; σ))
        return x0 + noise * schedule.sigmas[i].to(x0.dtype)
    if schedule.alpha_bar is None:  # DPM++ knows only σ: x_t = α_t x_0 + σ_t ε
        alpha_s, sigma_s = vp_coefficients(schedule.sigmas[i].to(x0.dtype))
        return alpha_s * x0 + sigma_s * noise
    abar = schedule.alpha_bar[i].to(x0.dtype)  # DDPM Eq. 4
    return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise


# ----------------------------------------------------------------------------- one UNet call


def scale_model_input(schedule: Schedule, i: int | Tensor, x: Tensor) -> Tensor:
    """The UNet was trained on x_t = sqrt(ᾱ) x_0 + sqrt(1-ᾱ) ε. Euler-type samples are x_t / sqrt(ᾱ), so they
    are scaled by c_in = 1 / sqrt(σ² + 1) = sqrt(ᾱ) (EDM Table 1); DPM++, DDIM and DDPM already move x_t.
    i: the call index, or (graph_step's loop) a (1,) device tensor."""
    if SAMPLERS[schedule.sampler].variable == EDM_X:
        sigma = schedule.sigmas[i] if isinstance(i, int) else at(schedule.sigmas, i)
        return x / (sigma**2 + 1) ** 0.5
    return x


def predict_x0(schedule: Schedule, i: int, x: Tensor, eps: Tensor) -> Tensor:
    """The sampler's estimate of the clean latent x_0 at UNet call i, from the x it was called on and its (guided)
    ε, in x's dtype; it is what Diffusers returns as `pred_original_sample`. Euler family: D(x; σ) = x - σ ε (EDM
    Eq. 7, x = x_0 + σ ε); DDIM/DDPM: "predicted x_0" (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t) (DDIM Eq. 12, DDPM
    Eq. 15); DPM++: the data prediction x_θ = (x_t - σ_t ε) / α_t (DPM-Solver++ Sec. 3). The samplers added later
    follow their variable: PNDM and LCM the DDIM form (LCM's boundary-condition `denoised` differs from it by under
    1e-5 relative at its smallest t, 19), UniPC and DPM++ 2M SDE x_θ, LMS and DPM2 (a) D(x; σ) at the call's σ."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xc, e = x.to(compute), eps.to(compute)
    if SAMPLERS[schedule.sampler].variable == EDM_X:
        x0 = denoise(xc, e, schedule.sigmas[i])
    elif schedule.alpha_bar is not None:
        abar = schedule.alpha_bar[i]
        x0 = (xc - (1 - abar) ** 0.5 * e) / abar**0.5
    else:
        alpha_s, sigma_s = vp_coefficients(schedule.sigmas[i])
        x0 = (xc - sigma_s * e) / alpha_s
    return x0.to(x.dtype)


def draw_noise(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str,
               generator: torch.Generator | None) -> Tensor:  # fmt: skip
    """ε ~ N(0, I), the one place every random draw goes through: drawn as Diffusers' randn_tensor draws it, on
    the generator's device and then moved, so a CPU generator gives the same numbers on any device."""
    on = generator.device if generator is not None else device
    x = torch.randn(shape, generator=generator, dtype=dtype, device=on)
    if x.device.type == "cpu" and torch.device(device).type == "cuda":  # a plain .to() would wait for the GPU's queue
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def step(schedule: Schedule, i: int, x: Tensor, eps: Tensor, state: SamplerState | None = None,
         generator: torch.Generator | None = None, eta: float = 0.0) -> tuple[Tensor, SamplerState | None]:  # fmt: skip
    """Advance x by UNet call i given its (guided) noise prediction eps; returns the new x (in x's dtype,
    computed in at least float32) and the state for call i + 1. eta is DDIM's η (0: deterministic). Stochastic
    samplers draw one ε per call from `generator` (in eps's dtype), where Diffusers does: every call for euler_a
    and for DDIM with η > 0, calls with t > 0 for DDPM."""
    sampler, compute = SAMPLERS[schedule.sampler], torch.promote_types(x.dtype, torch.float32)
    draws = sampler.draws(schedule, i, eta)
    noise = draw_noise(eps.shape, sampler.noise_dtype or eps.dtype, eps.device, generator) if draws else None
    x_next, state = sampler.step(schedule, i, x.to(compute), eps.to(compute), state, noise, eta)
    return x_next.to(x.dtype), state


# ----------------------------------------------------------------------------- the same step for a CUDA graph


def draws_noise(schedule: Schedule, eta: float) -> list[bool]:
    """The UNet calls at which step() draws a fresh ε (Sampler.draws)."""
    return [bool(SAMPLERS[schedule.sampler].draws(schedule, i, eta)) for i in range(len(schedule.timesteps))]


def graph_step(s: Schedule, i: Tensor, x: Tensor, eps: Tensor, state: States, noise: Noise,
               eta: float = 0.0) -> GraphOut:  # fmt: skip
    """step() for a loop captured once as a CUDA graph and replayed, on device tensors only (Sampler.graph): the
    schedule's tensors on x's device, the call index i a (1,) int64 tensor (see at), ε drawn before the loop (zeros
    at the calls where step() draws none, see draws_noise), the state a tuple of Sampler.states tensors (zeros
    before the first call). Returns the new x and state; bit for bit step()'s on the same device (test_compile)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    sampler = SAMPLERS[s.sampler]
    if sampler.eager_only:
        raise ValueError(f"{s.sampler} has no graph step (Sampler.eager_only): run it with step(), in the eager loop")
    x_next, state = (sampler.graph or sampler.step)(s, i, x.to(compute), eps.to(compute), state, noise, eta)
    return x_next.to(x.dtype), state


def main() -> None:
    p = argparse.ArgumentParser(description="Print a sampler's schedule as Diffusers 0.42 would run it.")
    p.add_argument("--print-schedule", choices=SAMPLERS, required=True, metavar="SAMPLER", help=", ".join(SAMPLERS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--karras", action="store_true", help="Karras et al. 2022 sigmas (= --schedule karras)")
    p.add_argument("--schedule", choices=SCHEDULES, default="default", help="schedule type (Sampler.schedules)")
    p.add_argument("--spacing", choices=("leading", "linspace", "trailing"), help="default: the sampler's own")
    p.add_argument("--strength", type=float, default=1.0, help="img2img strength: run only the last steps")
    p.add_argument("--config", type=Path, help="a scheduler_config.json (default: SD 1.5's)")
    a = p.parse_args()
    raw, keys = json.loads(a.config.read_text()) if a.config else {}, {f.name for f in fields(SchedulerConfig)}
    config = SchedulerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in keys})
    s = make_schedule(a.print_schedule, a.steps, config, a.karras, a.spacing, a.strength, a.schedule)
    print(f"timesteps: {[round(v, 4) for v in s.timesteps.tolist()]}")
    print(f"sigmas:    {[round(v, 4) for v in s.sigmas.tolist()]}")
    print(f"init_noise_sigma: {s.init_noise_sigma:.6f}")
    print(f"UNet calls: {len(s.timesteps)}")


if __name__ == "__main__":
    main()
