"""scheduler.py as an executable spec: equal to Diffusers 0.42 number for number, and right on closed forms.

The Diffusers references are built the way a loaded pipeline builds them: the SD 1.5 scheduler_config.json
goes through PNDMScheduler (the class it names), and `Cls.from_config(pipe.scheduler.config)` swaps in the
sampler. Samples are compared with atol = 1e-5 * max(1, max |reference|) (1e-5 relative to the sample scale:
Euler-type latents start at σ_max ≈ 14.6) and rtol = 0.
"""

import inspect
import json
import math
import re
import sys
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import scheduler as S  # noqa: E402
from models.loading import WeightsError, read_config  # noqa: E402

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
)

CONFIG_FILE = ROOT / "tests/sd15_configs/scheduler/scheduler_config.json"
CONFIG = json.loads(CONFIG_FILE.read_text())  # what the Diffusers references are built from
OURS = read_config(S.SchedulerConfig, CONFIG_FILE)  # the same file as our loader reads it
CLASSES = {
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
}
STEP_COUNTS = (1, 2, 3, 7, 10, 20, 25, 50, 100)
# Diffusers 0.42 with numpy 2 warns about np.array(tensor, copy=False) on every set_timesteps
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@cache
def pipeline_config():
    """What `pipe.scheduler.config` holds after StableDiffusionPipeline.from_pretrained(SD 1.5)."""
    return PNDMScheduler.from_config(CONFIG).config


def reference(sampler, steps, karras=False, spacing=None):
    options = {"timestep_spacing": spacing} if spacing else {}
    if karras:
        options["use_karras_sigmas"] = True
    ref = CLASSES[sampler].from_config(pipeline_config(), **options)
    ref.set_timesteps(steps)
    return ref


def assert_close(actual, expected, what, **tolerances):
    """torch.testing.assert_close (which prints the max difference), prefixed with what is compared."""
    torch.testing.assert_close(actual, expected, **tolerances, msg=lambda m: f"{what}: {m}")


def assert_samples_close(ours, ref, what):
    assert_close(ours, ref, what, rtol=0, atol=1e-5 * max(1.0, ref.abs().max().item()))


# ----------------------------------------------------------------------------- schedules


def test_both_config_routes_give_each_class_its_own_default_spacing():
    for sampler, cls in CLASSES.items():
        direct, via_pipeline = cls.from_config(CONFIG), cls.from_config(pipeline_config())
        assert direct.config.timestep_spacing == via_pipeline.config.timestep_spacing == S.SAMPLERS[sampler].spacing
        assert direct.config.steps_offset == via_pipeline.config.steps_offset == 1
        direct.set_timesteps(50), via_pipeline.set_timesteps(50)
        assert torch.equal(direct.timesteps, via_pipeline.timesteps), sampler


@pytest.mark.parametrize("karras", [False, True], ids=["plain", "karras"])
@pytest.mark.parametrize("spacing", [None, "leading", "linspace", "trailing"])
@pytest.mark.parametrize("sampler", CLASSES)  # the others: tests/test_samplers_more.py
def test_schedule_equals_diffusers(sampler, spacing, karras):
    if karras and not S.SAMPLERS[sampler].karras:
        with pytest.raises(ValueError):
            S.make_schedule(sampler, 10, OURS, karras=True)
        return
    for steps in STEP_COUNTS:
        ref, ours = reference(sampler, steps, karras, spacing), S.make_schedule(sampler, steps, OURS, karras, spacing)
        what = f"{sampler} spacing={spacing} karras={karras} steps={steps}"
        assert ours.timesteps.dtype == ref.timesteps.dtype, what
        if ours.timesteps.dtype == torch.int64:
            assert ours.timesteps.tolist() == ref.timesteps.tolist(), what
        else:  # Karras timesteps come from a float32 log whose last bit numpy and torch round differently
            assert_close(ours.timesteps, ref.timesteps, what, rtol=1e-6, atol=1e-6)
        if hasattr(ref, "sigmas"):
            assert ours.sigmas.dtype == ref.sigmas.dtype, what
            assert_close(ours.sigmas, ref.sigmas, what, rtol=1e-6, atol=1e-6)
        assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6), what


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_integer_grids_equal_diffusers_for_every_step_count(sampler, spacing):
    """Rounding to integers makes every .5 tie count, so the grids are checked for all n, not a sample."""
    ref = reference(sampler, 1, spacing=spacing)
    for steps in range(1, 1000):  # (1000 steps "leading" asks for t = 1000, out of range, in both)
        ref.set_timesteps(steps)
        ours = S.make_schedule(sampler, steps, OURS, spacing=spacing)
        if len(ref.timesteps) != steps:  # Diffusers bug: np.arange(1000, 0, -1000 / n) can give n + 1 points
            assert (
                spacing == "trailing"
                and ref.timesteps[-1] == -1
                and ref.timesteps[:-1].tolist() == ours.timesteps.tolist()
            )
            continue
        assert ours.timesteps.tolist() == ref.timesteps.tolist(), steps


def test_sd15_leading_rule_and_ddim_final_alpha():
    assert S.sd15_leading_timesteps(50).tolist() == list(range(981, 0, -20))
    ddim = S.make_schedule("ddim", 50, OURS)
    assert ddim.timesteps.tolist() == list(range(981, 0, -20))
    abar = S.alphas_cumprod_from(OURS)
    assert ddim.alpha_bar_prev[-1] == abar[0]  # set_alpha_to_one=False: not 1
    assert ddim.sigmas[-1].item() == pytest.approx(0.0292, abs=1e-4)
    assert S.make_schedule("ddpm", 50, OURS).alpha_bar_prev[-1] == 1.0  # DDPM lands on ᾱ = 1


def test_noise_schedule_closed_form():
    # scaled_linear in float64: β = linspace(sqrt(β_0), sqrt(β_1), T)², ᾱ = Π(1 - β), σ = sqrt((1-ᾱ)/ᾱ)
    betas = torch.linspace(CONFIG["beta_start"] ** 0.5, CONFIG["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    sigma = ((1 - abar) / abar) ** 0.5
    # float32 (as Diffusers) vs float64: a 1000-term float32 cumulative product drifts by ~1e-5 relative
    torch.testing.assert_close(S.alphas_cumprod_from(OURS).double(), abar, rtol=5e-5, atol=0)
    euler = S.make_schedule("euler", 1000, OURS)  # linspace over all 1000 timesteps: σ_999 ... σ_0, 0
    torch.testing.assert_close(euler.sigmas[:-1].double(), sigma.flip(0), rtol=5e-5, atol=0)
    assert (euler.sigmas[0].item(), euler.sigmas[-2].item()) == pytest.approx((14.6146, 0.029168), rel=1e-4)
    train_sigmas = ((1 - S.alphas_cumprod_from(OURS)) / S.alphas_cumprod_from(OURS)) ** 0.5
    t = torch.tensor([0.0, 1.0, 17.0, 500.0, 998.0, 999.0])
    torch.testing.assert_close(S.sigma_to_t(S.sigma_at(t, train_sigmas), train_sigmas), t.double(), rtol=0, atol=1e-4)
    t_frac = torch.tensor([0.25, 300.5, 998.75])  # between grid points: linear in σ vs linear in log σ
    torch.testing.assert_close(
        S.sigma_to_t(S.sigma_at(t_frac, train_sigmas), train_sigmas), t_frac.double(), atol=0.05, rtol=0
    )


def test_karras_sigmas_follow_eq5():
    sigmas = S.karras_sigmas(0.0292, 14.6146, 10)
    assert (sigmas[0].item(), sigmas[-1].item()) == pytest.approx((14.6146, 0.0292), rel=1e-12)
    steps = (sigmas ** (1 / 7)).diff()  # σ^(1/ρ) is linear in i
    torch.testing.assert_close(steps, steps[:1].expand(9), rtol=1e-9, atol=0)
    dpm = S.make_schedule("dpmpp_2m", 10, OURS, karras=True)
    assert dpm.sigmas[-1] == 0 and dpm.timesteps[0] == 999 and dpm.timesteps[-1] == 0


# ----------------------------------------------------------------------------- trajectories against Diffusers


def fake_eps(x_in, t):
    """A deterministic stand-in for the UNet: a fixed function of its input and timestep."""
    return 0.3 * x_in * math.cos(float(t) / 300) + 0.1 * torch.sin(x_in)


def run_ours(schedule, x, generator, eta=0.0):
    out, state = [], None
    for i, t in enumerate(schedule.timesteps):
        x_in = S.scale_model_input(schedule, i, x)
        x, state = S.step(schedule, i, x, fake_eps(x_in, t), state, generator, eta=eta)
        out.append((x_in, x))
    return out


def run_diffusers(ref, timesteps, x, generator, eta):
    accepted = inspect.signature(ref.step).parameters  # as StableDiffusionPipeline.prepare_extra_step_kwargs
    kwargs = {k: v for k, v in {"generator": generator, "eta": eta}.items() if k in accepted}
    out = []
    for t in timesteps:
        x_in = ref.scale_model_input(x, t)
        x = ref.step(fake_eps(x_in, t), t, x, **kwargs).prev_sample
        out.append((x_in, x))
    return out


def compare_runs(ours, ref, what):
    assert len(ours) == len(ref), what
    for i, ((x_in, x), (ref_in, ref_x)) in enumerate(zip(ours, ref, strict=True)):
        assert_samples_close(x_in, ref_in, f"{what}: model input at call {i}")
        assert_samples_close(x, ref_x, f"{what}: sample after call {i}")


TRAJECTORIES = [(sampler, steps, {}) for sampler in CLASSES for steps in (10, 25)] + [
    ("euler", 10, {"karras": True}),
    ("heun", 10, {"karras": True}),
    ("dpmpp_2m", 25, {"karras": True}),
    ("euler_a", 10, {"spacing": "leading"}),  # init_noise_sigma = sqrt(σ_max² + 1)
    ("ddim", 10, {"eta": 1.0}),
    ("ddim", 10, {"spacing": "linspace"}),  # steps back by T // n, not to the next timestep
    ("ddpm", 10, {"spacing": "trailing"}),
]


@pytest.mark.parametrize("sampler,steps,options", TRAJECTORIES, ids=lambda v: str(v).replace(" ", ""))
def test_trajectory_equals_diffusers(sampler, steps, options):
    options = dict(options)  # (the parametrize dict is shared)
    eta = options.pop("eta", 0.0)
    ref = reference(sampler, steps, **options)
    schedule = S.make_schedule(sampler, steps, OURS, **options)
    latent = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    assert schedule.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    ours = run_ours(schedule, latent * schedule.init_noise_sigma, torch.Generator().manual_seed(1), eta)
    theirs = run_diffusers(ref, ref.timesteps, latent * ref.init_noise_sigma, torch.Generator().manual_seed(1), eta)
    compare_runs(ours, theirs, f"{sampler} {steps} steps {options} eta={eta}")


@pytest.mark.parametrize("strength", [0.5, 0.75])
@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m", "ddim", "euler_a"])
def test_img2img_truncation_and_noising_equal_diffusers(sampler, strength):
    steps = 25  # 25 * 0.75 = 18.75: int() truncates, as Diffusers does
    ref = reference(sampler, steps)
    fake_pipe = SimpleNamespace(scheduler=ref)  # get_timesteps only touches pipe.scheduler
    timesteps, n_steps = StableDiffusionImg2ImgPipeline.get_timesteps(fake_pipe, steps, strength, "cpu")
    schedule = S.make_schedule(sampler, steps, OURS, strength=strength)
    assert schedule.timesteps.tolist() == timesteps.tolist() and n_steps == int(steps * strength)
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn((1, 4, 8, 8), generator=g), torch.randn((1, 4, 8, 8), generator=g)
    x, ref_x = S.add_noise(schedule, x0, noise), ref.add_noise(x0, noise, timesteps[:1])
    assert_samples_close(x, ref_x, "add_noise")
    ours = run_ours(schedule, x, torch.Generator().manual_seed(3))
    compare_runs(ours, run_diffusers(ref, timesteps, ref_x, torch.Generator().manual_seed(3), 0.0), sampler)


def test_builtin_sd15_config_is_the_official_file():
    assert S.SD15_SCHEDULER_CONFIG == S.SchedulerConfig() == OURS
    assert all(CONFIG[key] == getattr(OURS, key) for key in CONFIG if hasattr(OURS, key))
    for sampler in S.SAMPLERS:
        a, b = S.make_schedule(sampler, 20, OURS), S.make_schedule(sampler, 20, S.SD15_SCHEDULER_CONFIG)
        assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas), sampler


def test_strength_too_small_is_an_error():
    with pytest.raises(ValueError):
        S.make_schedule("euler", 10, OURS, strength=0.05)


def test_make_schedule_refuses_unknown_samplers_and_step_counts():
    for args in [("plms", 10), ("euler", 0), ("euler", 1001)]:
        with pytest.raises(ValueError):
            S.make_schedule(*args, OURS)


REFUSED = [  # (key, value): what SD 1.5 does not sample with, and JSON values of the wrong type
    ("prediction_type", "v_prediction"),
    ("clip_sample", True),
    ("beta_schedule", "squaredcos_cap_v2"),
    ("timestep_spacing", "uniform"),
    ("trained_betas", (0.001, 0.002)),
    ("rescale_betas_zero_snr", True),
    ("num_train_timesteps", "1000"),
    ("num_train_timesteps", True),
    ("num_train_timesteps", 1),
    ("beta_start", 0.0),
    ("beta_end", 1.0),
    ("beta_start", "0.00085"),
    ("steps_offset", "1"),
    ("set_alpha_to_one", "false"),
]


@pytest.mark.parametrize("key,value", REFUSED, ids=lambda v: str(v))
def test_scheduler_config_refuses_what_sd15_does_not_use(key, value, tmp_path):
    with pytest.raises(ValueError, match="^" + re.escape(f"scheduler config {key}={value!r} is not supported; use ")):
        S.SchedulerConfig(**{key: value})
    (tmp_path / "scheduler_config.json").write_text(json.dumps(CONFIG | {key: value}))  # the loader's route
    with pytest.raises((ValueError, WeightsError), match=key):
        read_config(S.SchedulerConfig, tmp_path / "scheduler_config.json")


def test_scheduler_config_accepts_the_supported_variants():
    with pytest.raises(ValueError, match="v-prediction"):
        S.SchedulerConfig(prediction_type="v_prediction")
    variant = S.SchedulerConfig(
        beta_schedule="linear", timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True
    )
    assert S.make_schedule("ddim", 10, variant).alpha_bar_prev[-1] == 1.0


def test_sampler_records_agree_with_diffusers():
    assert list(S.SAMPLERS)[: len(CLASSES)] == list(CLASSES)  # iteration order: the CLI's list (then those of
    # tests/test_samplers_more.py)
    for name, cls in CLASSES.items():
        record, ref = S.SAMPLERS[name], reference(name, 10)
        assert record.name == name
        assert record.karras == ("use_karras_sigmas" in inspect.signature(cls.__init__).parameters), name
        assert record.unet_calls == cls.order, name
        x = torch.ones(1, 4, 2, 2)  # Diffusers scales the input exactly for the samplers that move x_0 + σ ε
        assert (record.variable == S.EDM_X) == (not torch.equal(ref.scale_model_input(x, ref.timesteps[0]), x)), name


@pytest.mark.parametrize("sampler,options,draws", [
    ("euler", {}, [False] * 10), ("heun", {}, [False] * 19), ("dpmpp_2m", {}, [False] * 10),
    ("ddim", {}, [False] * 10), ("ddim", {"eta": 0.5}, [True] * 10), ("euler_a", {}, [True] * 10),
    ("ddpm", {}, [True] * 10), ("ddpm", {"spacing": "linspace"}, [True] * 9 + [False]),
])  # fmt: skip
def test_noise_is_drawn_only_by_the_calls_that_use_it(sampler, options, draws):
    options = dict(options)  # (the parametrize dict is shared)
    eta = options.pop("eta", 0.0)
    schedule, g = S.make_schedule(sampler, 10, OURS, **options), torch.Generator().manual_seed(10)
    x, state, drew = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(11)), None, []
    for i, t in enumerate(schedule.timesteps):
        before = g.get_state()
        x, state = S.step(schedule, i, x, fake_eps(S.scale_model_input(schedule, i, x), t), state, g, eta=eta)
        drew.append(not torch.equal(before, g.get_state()))
    assert drew == draws


def test_draw_noise_draws_on_the_generators_device_in_the_given_dtype():
    ours = S.draw_noise((2, 3), torch.float16, "cpu", torch.Generator().manual_seed(12))
    assert torch.equal(ours, torch.randn((2, 3), generator=torch.Generator().manual_seed(12), dtype=torch.float16))
    torch.manual_seed(12)  # without a generator: the global RNG
    assert torch.equal(S.draw_noise((2, 3), torch.float16, "cpu", None), ours)
    # in half precision a step draws its ε in eps's dtype, before computing in float32 (as Diffusers' randn_tensor)
    schedule = S.make_schedule("euler_a", 10, OURS)
    x, eps = torch.ones((1, 4, 2, 2), dtype=torch.float16), torch.zeros((1, 4, 2, 2), dtype=torch.float16)
    out, _ = S.step(schedule, 0, x, eps, None, torch.Generator().manual_seed(13))
    noise = S.draw_noise(eps.shape, torch.float16, "cpu", torch.Generator().manual_seed(13))
    expected = S.euler_ancestral_step(x.float(), eps.float(), schedule.sigmas[0], schedule.sigmas[1], noise)
    assert out.dtype == torch.float16 and torch.equal(out, expected.half())


# ----------------------------------------------------------------------------- the math itself


def test_ddim_eta0_is_exact_for_the_true_noise():
    """DDIM Eq. 12 with η = 0: if the model returns the ε that x_T was made with, every step lands exactly on
    sqrt(ᾱ_prev) x_0 + sqrt(1 - ᾱ_prev) ε, the final one on ᾱ_0 (set_alpha_to_one=False)."""
    g = torch.Generator().manual_seed(4)
    x0, e = torch.randn((1, 4, 8, 8), generator=g, dtype=torch.float64), torch.randn((1, 4, 8, 8), generator=g)
    e = e.double()
    schedule = S.make_schedule("ddim", 25, OURS)
    abar = schedule.alpha_bar[0].double()
    x, state = abar**0.5 * x0 + (1 - abar) ** 0.5 * e, None
    for i in range(len(schedule.timesteps)):
        x, state = S.step(schedule, i, x, e, state)
        abar_prev = schedule.alpha_bar_prev[i].double()
        expected = abar_prev**0.5 * x0 + (1 - abar_prev) ** 0.5 * e  # step() computes in float32
        assert_close(x, expected, f"step {i}", rtol=0, atol=1e-5)


def run_on_gaussian_data(sampler, steps, data_std):
    """Data ~ N(0, s² I) has the exact denoiser D(x; σ) = x s² / (s² + σ²), so ε = (x - D) / σ in the
    variable x_0 + σ ε, and the probability-flow ODE is solved by x(σ) ∝ sqrt(s² + σ²) (EDM Eq. 1, 3).
    Returns the relative error where the run lands on σ_min, the last noise level before σ = 0."""
    schedule = S.make_schedule(sampler, steps, OURS, karras=True)  # same σ_max, σ_min for every step count
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x_start = x * schedule.sigmas[0].double()
    x, state, landed = (
        x_start / (1.0 if S.SAMPLERS[sampler].variable == S.EDM_X else (1 + schedule.sigmas[0] ** 2) ** 0.5),
        None,
        [],
    )
    for i in range(len(schedule.timesteps)):
        sigma = schedule.sigmas[i].double()
        x_in = S.scale_model_input(schedule, i, x)  # = x_0 + σ ε scaled by 1 / sqrt(σ² + 1), for every sampler
        eps = x_in * (1 + sigma**2) ** 0.5 * sigma / (data_std**2 + sigma**2)
        x, state = S.step(schedule, i, x, eps, state)
        landed.append(x)
    sigma_min = schedule.sigmas[-2].double()
    x_end = landed[-2] * ((1 + sigma_min**2) ** 0.5 if sampler == "dpmpp_2m" else 1.0)
    exact = x_start * (data_std**2 + sigma_min**2) ** 0.5 / (data_std**2 + schedule.sigmas[0].double() ** 2) ** 0.5
    return ((x_end - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("sampler,order,max_error", [("euler", 1, 0.03), ("heun", 2, 1.5e-3), ("dpmpp_2m", 2, 1.5e-3)])
def test_ode_solvers_converge_at_their_order_on_gaussian_data(sampler, order, max_error):
    errors = [run_on_gaussian_data(sampler, steps, data_std=0.7) for steps in (20, 40, 80)]
    ratios = [errors[1] / errors[0], errors[2] / errors[1]]  # halving the step divides the error by 2^order
    assert all(abs(r - 0.5**order) < 0.1 * 0.5 ** (order - 1) for r in ratios), (errors, ratios)
    assert errors[-1] < max_error, errors


@pytest.mark.parametrize("sampler,options", [("ddpm", {}), ("ddpm", {"spacing": "linspace"}), ("ddim", {"eta": 1.0}),
                                             ("ddim", {"eta": 0.5}), ("euler_a", {})])  # fmt: skip
def test_stochastic_samplers_keep_the_forward_marginals(sampler, options):
    """With an oracle for data at a point x_0, ancestral sampling draws x from the posterior q(x_prev | x, x_0)
    (DDPM Eq. 7; DDIM Eq. 12 + 16 for any η; Euler a = DDIM η=1 in x_0 + σ ε), so every step must land on the
    forward marginal q(x | x_0) = N(sqrt(ᾱ) x_0, (1 - ᾱ) I) (DDPM Eq. 4; DDIM Eq. 7). A wrong variance drifts."""
    options = dict(options)  # (the parametrize dict is shared)
    eta = options.pop("eta", 0.0)
    schedule = S.make_schedule(sampler, 10, OURS, **options)
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn((1, 1000), generator=g).expand(200, 1000)  # 200k samples of the same data point
    if S.SAMPLERS[sampler].variable == S.EDM_X:  # x = x_0 + σ ε
        means, stds = torch.ones(len(schedule.sigmas)), schedule.sigmas
    else:
        abar = torch.cat([schedule.alpha_bar[:1], schedule.alpha_bar_prev])
        means, stds = abar**0.5, (1 - abar) ** 0.5
    x, state = means[0] * x0 + stds[0] * torch.randn(x0.shape, generator=g), None
    for i in range(len(schedule.timesteps)):
        eps = (x - means[i] * x0) / stds[i]  # the noise that is actually in x
        x, state = S.step(schedule, i, x, eps, state, g, eta=eta)
        if stds[i + 1] < 1e-6:  # landed on the data itself
            torch.testing.assert_close(x, x0, rtol=0, atol=1e-4)
            continue
        z = (x - means[i + 1] * x0) / stds[i + 1]
        assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.01, (i, z.mean().item(), z.std().item())


def test_noise_comes_only_from_the_generator():
    schedule = S.make_schedule("euler_a", 10, OURS)
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7)) * schedule.init_noise_sigma
    runs = []
    for seed in (8, 8, 9):
        torch.manual_seed(seed + 100)  # the global RNG must not matter
        runs.append(run_ours(schedule, x, torch.Generator().manual_seed(seed))[-1][1])
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_cli_prints_the_schedule(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["scheduler.py", "--print-schedule", "heun", "--steps", "3", "--karras"])
    S.main()
    out = capsys.readouterr().out
    assert "UNet calls: 5" in out and "init_noise_sigma: 14.6146" in out and "timesteps:" in out and "sigmas:" in out
