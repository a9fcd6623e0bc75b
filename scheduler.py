"""Noise schedules and samplers for Stable Diffusion 1.5: pure functions over tensors computed once.

The UNet predicts the noise eps in x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps. make_schedule() picks the
timesteps and noise levels before the loop; step() turns one UNet prediction into one step of a sampler.
Both match Diffusers 0.42 (`<Scheduler>.from_config(sd15_scheduler_config)`) number for number, which
tests/test_scheduler.py checks, including where Diffusers departs from the papers (noted "Diffusers:").

Notation (code name -> symbol -> source). Papers: Ho et al. 2020 (DDPM) arXiv:2006.11239; Song et al. 2020
(DDIM) arXiv:2010.02502; Karras et al. 2022 (EDM) arXiv:2206.00364; Lu et al. 2022 (DPM-Solver++)
arXiv:2211.01095; Lin et al. 2023 arXiv:2305.08891.
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
"""

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
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

    def step_of(self, i: int) -> int:
        """The step that UNet call i belongs to (prompt editing switches text at steps, not calls)."""
        return self.first_step + i // SAMPLERS[self.sampler].unet_calls


@dataclass(frozen=True)
class SamplerState:
    """What a sampler carries from one UNet call to the next."""

    x: Tensor | None = None  # Heun: x_i, where the step started (the corrector restarts from it)
    d: Tensor | None = None  # Heun: d_i, the slope the predictor used
    denoised: Tensor | None = None  # DPM++ 2M: x_θ of the previous call


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


def euler_ancestral_step(x: Tensor, eps: Tensor, sigma: Tensor, sigma_next: Tensor, noise: Tensor) -> Tensor:
    """DDIM Eq. 12 with η = 1 (Eq. 16) in the variable x_0 + σ ε: an Euler step down to σ_down, then fresh noise
    σ_up ε. σ_up² is DDPM's posterior variance (Eq. 7) in this variable, and σ_down² + σ_up² = σ_next²."""
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
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


@dataclass(frozen=True)
class Sampler:
    """One sampler as data: what make_schedule builds for it and what step() and graph_step() do at each UNet call."""

    name: str  # ours, the CLI's --scheduler value
    a1111_name: str  # A1111's name for it, written in the PNG metadata
    variable: str  # what it moves: EDM_X or X_T
    karras: bool  # Diffusers 0.42 offers use_karras_sigmas for it
    unet_calls: int  # UNet calls per step (Diffusers' scheduler.order)
    spacing: str  # Diffusers' default timestep_spacing for it
    step: Callable[[Schedule, int, Tensor, Tensor, SamplerState | None, Noise, float], Out]  # one UNet call's update
    graph: Callable[[Schedule, Tensor, Tensor, Tensor, States, Noise, float], GraphOut] | None = None  # graph_step's
    # update where `step` has branches or state (None: `step` serves graph_step too)
    states: int = 0  # how many tensors of state graph() carries from call to call (its States)
    draws: Callable[[Tensor, float], bool] = lambda t, eta: False  # does step() draw ε at a call at t, given η
    alpha_bar_prev: Callable[[Tensor, Tensor, SchedulerConfig], Tensor] | None = None  # DDIM/DDPM: the ᾱ steps land on
    eta: bool = False  # takes DDIM's η (Eq. 16); the others would ignore it


# The SD 1.5 scheduler file was written for PNDM and names no timestep_spacing, so every Diffusers class keeps
# its own default (verified in 0.42; older versions carried PNDM's "leading" over to all of them).
SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("euler", "Euler", EDM_X, karras=True, unet_calls=1, spacing="linspace",
            step=euler),
    Sampler("euler_a", "Euler a", EDM_X, karras=False, unet_calls=1, spacing="linspace",
            step=euler_a, draws=lambda t, eta: True),
    Sampler("heun", "Heun", EDM_X, karras=True, unet_calls=2, spacing="linspace",
            step=heun, graph=heun_graph, states=2),  # x_i, d_i
    Sampler("dpmpp_2m", "DPM++ 2M", X_T, karras=True, unet_calls=1, spacing="linspace",
            step=dpmpp_2m, graph=dpmpp_2m_graph, states=1),  # the previous call's x_θ
    Sampler("ddim", "DDIM", X_T, karras=False, unet_calls=1, spacing="leading",
            step=ddim, draws=lambda t, eta: eta > 0, alpha_bar_prev=ddim_alpha_bar_prev, eta=True),
    Sampler("ddpm", "DDPM", X_T, karras=False, unet_calls=1, spacing="leading",
            step=ddpm, draws=lambda t, eta: bool(t > 0), alpha_bar_prev=ddpm_alpha_bar_prev),
)}  # fmt: skip


# ----------------------------------------------------------------------------- the schedule of a run


def make_schedule(sampler: str, steps: int, config: SchedulerConfig, karras: bool = False, spacing: str | None = None,
                  strength: float = 1.0) -> Schedule:  # fmt: skip
    """The schedule `<Scheduler>.from_config(config)` + `set_timesteps(steps)` gives in Diffusers 0.42, cut to
    the last min(int(steps * strength), steps) steps for img2img as StableDiffusionImg2ImgPipeline does."""
    if sampler not in SAMPLERS or (karras and not SAMPLERS[sampler].karras):
        raise ValueError(f"no sampler {sampler!r}{' with Karras sigmas' if karras else ''}")
    record, T, offset = SAMPLERS[sampler], config.num_train_timesteps, config.steps_offset
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}]")
    spacing = spacing or config.timestep_spacing or record.spacing
    alphas_cumprod = alphas_cumprod_from(config)
    train_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # σ_t for t = 0..T-1 (EDM Table 1)
    alpha_bar = alpha_bar_prev = None
    init_noise_sigma = torch.tensor(1.0)

    if record.variable == EDM_X:
        timesteps = spaced_timesteps(steps, spacing, T, offset).float()
        sigmas = sigma_at(timesteps, train_sigmas)
        if karras:  # Diffusers: between the σ of the first and last spaced timestep, not σ_max and σ_min
            sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), steps)
            timesteps = sigma_to_t(sigmas, train_sigmas).float()
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).float()  # σ_N = 0 (EDM Eq. 5)
        init_noise_sigma = sigmas.max()
        if spacing == "leading":  # Diffusers: sqrt(σ_max² + 1) under "leading", σ_max otherwise
            init_noise_sigma = (init_noise_sigma**2 + 1) ** 0.5
        if record.unet_calls > 1:  # each step's calls after the first repeat its σ, σ_N excepted (Heun)
            sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(record.unet_calls), sigmas[-1:]])
            timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(record.unet_calls)])
    elif record.alpha_bar_prev is None:  # DPM++: steps between σ only
        if karras:  # between the σ of t = T-1 and t = 0, timesteps rounded
            sigmas = karras_sigmas(train_sigmas[0].item(), train_sigmas[-1].item(), steps)
            timesteps = sigma_to_t(sigmas, train_sigmas).round().long()
        else:  # DPM-Solver's grid has steps+1 points ending at t=0; the last step goes to σ=0 instead
            n = steps if spacing == "trailing" else steps + 1
            timesteps = spaced_timesteps(n, spacing, T, offset)[:steps].round().long()
            sigmas = sigma_at(timesteps, train_sigmas)
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).float()
    else:  # DDIM, DDPM: steps from ᾱ at each call's t to the ᾱ it lands on
        timesteps = spaced_timesteps(steps, spacing, T, offset).round().long()
        alpha_bar, alpha_bar_prev = alphas_cumprod[timesteps], record.alpha_bar_prev(timesteps, alphas_cumprod, config)
        ab = torch.cat([alpha_bar, alpha_bar_prev[-1:]])
        sigmas = ((1 - ab) / ab) ** 0.5

    # img2img skips the first steps: t_start UNet calls (Diffusers' t_start * scheduler.order)
    t_start = (steps - min(int(steps * strength), steps)) * record.unet_calls
    if t_start >= len(timesteps):
        raise ValueError(f"strength {strength} leaves no step out of {steps}")
    cut = slice(t_start, None)
    ab, ab_prev = (alpha_bar[cut], alpha_bar_prev[cut]) if alpha_bar is not None else (None, None)
    first_step = t_start // record.unet_calls
    return Schedule(sampler, timesteps[cut], sigmas[cut], float(init_noise_sigma), ab, ab_prev, first_step)


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
    Eq. 15); DPM++: the data prediction x_θ = (x_t - σ_t ε) / α_t (DPM-Solver++ Sec. 3)."""
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
    draws = sampler.draws(schedule.timesteps[i], eta)
    noise = draw_noise(eps.shape, eps.dtype, eps.device, generator) if draws else None
    x_next, state = sampler.step(schedule, i, x.to(compute), eps.to(compute), state, noise, eta)
    return x_next.to(x.dtype), state


# ----------------------------------------------------------------------------- the same step for a CUDA graph


def draws_noise(schedule: Schedule, eta: float) -> list[bool]:
    """The UNet calls at which step() draws a fresh ε (Sampler.draws)."""
    return [bool(SAMPLERS[schedule.sampler].draws(t, eta)) for t in schedule.timesteps]


def graph_step(s: Schedule, i: Tensor, x: Tensor, eps: Tensor, state: States, noise: Noise,
               eta: float = 0.0) -> GraphOut:  # fmt: skip
    """step() for a loop captured once as a CUDA graph and replayed, on device tensors only (Sampler.graph): the
    schedule's tensors on x's device, the call index i a (1,) int64 tensor (see at), ε drawn before the loop (zeros
    at the calls where step() draws none, see draws_noise), the state a tuple of Sampler.states tensors (zeros
    before the first call). Returns the new x and state; bit for bit step()'s on the same device (test_compile)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    sampler = SAMPLERS[s.sampler]
    x_next, state = (sampler.graph or sampler.step)(s, i, x.to(compute), eps.to(compute), state, noise, eta)
    return x_next.to(x.dtype), state


def main() -> None:
    p = argparse.ArgumentParser(description="Print a sampler's schedule as Diffusers 0.42 would run it.")
    p.add_argument("--print-schedule", choices=SAMPLERS, required=True, metavar="SAMPLER", help=", ".join(SAMPLERS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--karras", action="store_true", help="Karras et al. 2022 sigmas (euler, heun, dpmpp_2m)")
    p.add_argument("--spacing", choices=("leading", "linspace", "trailing"), help="default: the sampler's own")
    p.add_argument("--strength", type=float, default=1.0, help="img2img strength: run only the last steps")
    p.add_argument("--config", type=Path, help="a scheduler_config.json (default: SD 1.5's)")
    a = p.parse_args()
    raw, keys = json.loads(a.config.read_text()) if a.config else {}, {f.name for f in fields(SchedulerConfig)}
    config = SchedulerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in keys})
    s = make_schedule(a.print_schedule, a.steps, config, a.karras, a.spacing, a.strength)
    print(f"timesteps: {[round(v, 4) for v in s.timesteps.tolist()]}")
    print(f"sigmas:    {[round(v, 4) for v in s.sigmas.tolist()]}")
    print(f"init_noise_sigma: {s.init_noise_sigma:.6f}")
    print(f"UNet calls: {len(s.timesteps)}")


if __name__ == "__main__":
    main()
