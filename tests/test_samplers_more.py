"""The samplers after the first six (issue 25): pndm, lms, unipc, dpmpp_2m_sde, dpm2, dpm2_a and lcm, each equal to
its Diffusers 0.42 scheduler (conftest.MORE_SCHEDULERS), as loaded from SD 1.5's scheduler_config.json.

Three levels: the schedule (timesteps, each call's σ, init_noise_sigma) against set_timesteps; the sampler alone
(make_schedule + scale_model_input + step, driven by a fixed function standing in for the UNet) against
<Scheduler>.step call by call, txt2img and img2img; and generate() against StableDiffusionPipeline /
StableDiffusionImg2ImgPipeline on the tiny model (1e-4) and, once per sampler, on the full-size configs.
"""

from __future__ import annotations

import ast
import copy
import inspect
import math
import sys
import warnings
from functools import cache
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_cli import run_cli
from test_inpaint import mask, photo
from test_inpaint import run_both as run_inpainting
from test_pipeline import PROMPTS, init_image, reference_pipeline

import scheduler as S
from conftest import MORE_SCHEDULERS, assert_images_close, max_diff, official_config, run_both
from fast_path import GraphLoop
from min_pipeline import generate, load_pipeline
from settings import Settings, UserError

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

NEW = list(MORE_SCHEDULERS)
KARRAS = [name for name in NEW if S.SAMPLERS[name].karras]
STOCHASTIC = ["dpmpp_2m_sde", "dpm2_a", "lcm"]
CONFIG = official_config("scheduler")
OURS = S.SD15_SCHEDULER_CONFIG


@cache
def unset_reference(sampler: str, karras: bool, spacing: str | None = None):
    """Diffusers' scheduler for `sampler` as a loaded pipeline swaps it in (conftest.with_scheduler); built once (its
    constructor sets 1000 timesteps, slow for KDPM2)."""
    loaded = diffusers.PNDMScheduler.from_config(CONFIG).config
    cls, options = MORE_SCHEDULERS[sampler]
    options = {**options, **({"use_karras_sigmas": True} if karras else {})}
    return getattr(diffusers, cls).from_config(loaded, **options, **({"timestep_spacing": spacing} if spacing else {}))


def reference_scheduler(sampler: str, steps: int, karras: bool = False, spacing: str | None = None):
    ref = copy.deepcopy(unset_reference(sampler, karras, spacing))
    ref.set_timesteps(steps)
    return ref


def reference_call_sigmas(sampler: str, ref) -> torch.Tensor:
    """The σ of each UNet call's input, as Diffusers' scale_model_input reads it, then where the last call lands."""
    n = len(ref.timesteps)
    if sampler == "dpm2":  # odd calls: the midpoint (sigmas_interpol at the call's index)
        calls = [ref.sigmas[j] if j % 2 == 0 else ref.sigmas_interpol[j] for j in range(n)]
    elif sampler == "dpm2_a":  # odd calls: sigmas_interpol at the previous index
        calls = [ref.sigmas[j] if j % 2 == 0 else ref.sigmas_interpol[j - 1] for j in range(n)]
    else:
        calls = list(ref.sigmas[:n])
    return torch.tensor([float(s) for s in calls] + [0.0])


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 50])
@pytest.mark.parametrize("sampler,karras", [(n, False) for n in NEW] + [(n, True) for n in KARRAS])
def test_schedule_matches_diffusers_set_timesteps(sampler, karras, steps):
    ref = reference_scheduler(sampler, steps, karras)
    ours = S.make_schedule(sampler, steps, S.SchedulerConfig(), karras)
    assert ours.timesteps.dtype == (torch.int64 if ref.timesteps.dtype == torch.int64 else torch.float32)
    # fractional timesteps (DPM2's midpoints, Karras) come from a float32 log-interpolation in Diffusers
    torch.testing.assert_close(ours.timesteps.double(), ref.timesteps.double(), atol=1e-3, rtol=0)
    if hasattr(ref, "sigmas"):  # PNDM and LCM step between ᾱ only
        torch.testing.assert_close(ours.sigmas, reference_call_sigmas(sampler, ref), rtol=1e-6, atol=0)
    assert math.isclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rel_tol=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("sampler", NEW)
def test_schedule_with_another_spacing_matches_diffusers(sampler, spacing):
    """A scheduler_config.json may name a timestep_spacing (LCM's timesteps ignore it, in Diffusers too)."""
    for steps in (1, 3, 10):
        ref, ours = (
            reference_scheduler(sampler, steps, spacing=spacing),
            S.make_schedule(sampler, steps, OURS, spacing=spacing),
        )
        torch.testing.assert_close(ours.timesteps.double(), ref.timesteps.double(), atol=1e-3, rtol=0)
        if hasattr(ref, "sigmas"):
            torch.testing.assert_close(ours.sigmas, reference_call_sigmas(sampler, ref), rtol=1e-6, atol=0)
        assert math.isclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rel_tol=1e-6)


@pytest.mark.parametrize("sampler", NEW)
def test_sampler_records_agree_with_diffusers(sampler):
    record, ref = S.SAMPLERS[sampler], reference_scheduler(sampler, 10)
    assert record.karras == ("use_karras_sigmas" in inspect.signature(type(ref).__init__).parameters)
    assert record.unet_calls == ref.order and record.spacing == ref.config.timestep_spacing
    x = torch.ones(1, 4, 2, 2)  # Diffusers scales the input for the samplers that move x_0 + σ ε
    assert (record.variable == S.EDM_X) == (not torch.equal(ref.scale_model_input(x, ref.timesteps[0]), x))
    assert record.eager_only and record.graph is None  # generate() hands them to the eager loop


def test_lms_weights_equal_scipy_quad_of_the_lagrange_basis():
    """Diffusers integrates each Lagrange basis polynomial with scipy.integrate.quad; ours integrates it exactly."""
    ref = reference_scheduler("lms", 12)
    got = S.lms_weights(ref.sigmas)
    for i in range(12):
        order = min(i + 1, 4)
        want = torch.tensor([ref.get_lms_coefficient(order, i, j) for j in range(order)], dtype=torch.float64)
        torch.testing.assert_close(got[i, :order], want, rtol=1e-5, atol=1e-7)
        assert (got[i, order:] == 0).all()


def test_lms_needs_no_scipy_at_run_time(monkeypatch):
    tree = ast.parse(Path(S.__file__).read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert not [n for n in imports if "scipy" in ast.unparse(n)]
    monkeypatch.setitem(sys.modules, "scipy", None)  # any import of scipy now fails
    S.make_schedule("lms", 10, S.SD15_SCHEDULER_CONFIG)


# ----------------------------------------------------------------------------- the sampler alone, call by call


def fake_unet(x_in: torch.Tensor, t) -> torch.Tensor:
    """A fixed smooth function of the scaled input and t standing in for the UNet's ε."""
    return torch.tanh(0.7 * x_in + float(t) / 1000) + 0.1 * x_in.roll(1, dims=-1)


CUTS = [(steps, strength) for steps in (1, 2, 5, 8) for strength in (1.0, 0.5, 0.875) if int(steps * strength) >= 1]


@pytest.mark.parametrize("steps,strength", CUTS)  # strength 1: txt2img
@pytest.mark.parametrize("sampler", NEW)
def test_step_matches_diffusers_call_by_call(sampler, steps, strength):
    """make_schedule + scale_model_input + step against Diffusers' own loop on the same stand-in UNet: the x after
    every call, img2img's cut (Img2ImgPipeline.get_timesteps: timesteps[t_start * order:], set_begin_index) and
    add_noise included, and predict_x0 against the pred_original_sample Diffusers returns (LMS, DPM2, DPM2 a)."""
    ref = reference_scheduler(sampler, steps)
    ours = S.make_schedule(sampler, steps, S.SchedulerConfig(), strength=strength)
    t_start = steps - min(int(steps * strength), steps)
    timesteps = ref.timesteps[t_start * ref.order :]
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(t_start * ref.order)
    assert torch.equal(ours.timesteps.double(), timesteps.double()) or torch.allclose(
        ours.timesteps.double(), timesteps.double(), atol=1e-3, rtol=0
    )
    noise = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0))
    if strength == 1.0:
        x = noise * ours.init_noise_sigma
        x_ref = noise * ref.init_noise_sigma
    else:
        x0 = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(1))
        x, x_ref = S.add_noise(ours, x0, noise), ref.add_noise(x0, noise, timesteps[:1])
    g_ours, g_ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    state = None
    for i, t in enumerate(timesteps):
        torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-5 * max(1.0, x_ref.abs().max().item()))
        eps = fake_unet(S.scale_model_input(ours, i, x), t)
        eps_ref = fake_unet(ref.scale_model_input(x_ref, t), t)
        x0 = S.predict_x0(ours, i, x, eps)
        kwargs = {"generator": g_ref} if "generator" in ref.step.__code__.co_varnames else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = ref.step(eps_ref, t, x_ref, **kwargs)
        x, state = S.step(ours, i, x, eps, state, generator=g_ours)
        x_ref = out.prev_sample
        if getattr(out, "pred_original_sample", None) is not None:
            torch.testing.assert_close(x0, out.pred_original_sample, rtol=0, atol=1e-5, msg=lambda m: f"x0 {m}")
    torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-5 * max(1.0, x_ref.abs().max().item()))


@pytest.mark.parametrize("sampler", KARRAS)
def test_karras_step_matches_diffusers(sampler):
    ref, ours = reference_scheduler(sampler, 6, karras=True), S.make_schedule(sampler, 6, S.SchedulerConfig(), True)
    x = x_ref = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(2)) * ours.init_noise_sigma
    g_ours, g_ref, state = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5), None
    for i, t in enumerate(ref.timesteps):
        eps, eps_ref = fake_unet(S.scale_model_input(ours, i, x), t), fake_unet(ref.scale_model_input(x_ref, t), t)
        kwargs = {"generator": g_ref} if "generator" in ref.step.__code__.co_varnames else {}
        x_ref = ref.step(eps_ref, t, x_ref, **kwargs).prev_sample
        x, state = S.step(ours, i, x, eps, state, generator=g_ours)
        torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-5 * max(1.0, x_ref.abs().max().item()))


def test_noise_is_drawn_where_and_as_diffusers_draws_it():
    """ε per call: every call for DPM++ 2M SDE (float32, whatever the UNet's dtype), the second call of each step for
    DPM2 a, every call but the last for LCM; none for the deterministic ones."""

    def calls(name: str, steps: int = 4) -> list[int]:
        s = S.make_schedule(name, steps, S.SchedulerConfig())
        return [i for i, d in enumerate(S.draws_noise(s, 0.0)) if d]

    assert calls("dpmpp_2m_sde") == [0, 1, 2, 3] and S.SAMPLERS["dpmpp_2m_sde"].noise_dtype == torch.float32
    assert calls("dpm2_a") == [1, 3, 5]  # 7 calls: the last step has no midpoint call
    assert calls("lcm") == [0, 1, 2]
    assert all(calls(name) == [] for name in ("pndm", "lms", "unipc", "dpm2"))


def test_lcm_takes_at_most_its_50_distillation_steps():
    with pytest.raises(ValueError, match="lcm takes at most 50 steps"):
        S.make_schedule("lcm", 51, S.SchedulerConfig())


# ----------------------------------------------------------------------------- generate() against the pipelines


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.float32), reference_pipeline(tiny_model_dir)


SIZE = dict(height=40, width=24)  # a 20x12 latent on the tiny VAE


@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("sampler", NEW)
def test_txt2img_matches_diffusers(tiny, sampler, steps):
    got, want = run_both(*tiny, PROMPTS, "blurry", scheduler=sampler, steps=steps, guidance_scale=7.5, seed=3, **SIZE)
    assert_images_close(got, want, atol=1e-4)


@pytest.mark.parametrize("sampler", KARRAS)
def test_txt2img_karras_matches_diffusers(tiny, sampler):
    got, want = run_both(*tiny, PROMPTS[0], scheduler=sampler, karras=True, steps=5, seed=1, **SIZE)
    assert_images_close(got, want, atol=1e-4)


@pytest.mark.parametrize("sampler", STOCHASTIC)
def test_stochastic_samplers_follow_the_seed_like_diffusers(tiny, sampler):
    for seed in (11, 12):
        got, want = run_both(*tiny, PROMPTS[1], scheduler=sampler, steps=3, seed=seed, **SIZE)
        assert_images_close(got, want, atol=1e-4)


@pytest.mark.parametrize("strength", [0.5, 0.875])  # 0.875 of 8 steps: img2img starts at PNDM's repeated call
@pytest.mark.parametrize("sampler", NEW)
def test_img2img_matches_diffusers(tiny, sampler, strength):
    got, want = run_both(*tiny, PROMPTS[0], "blurry", init_image=init_image(24, 40), scheduler=sampler, steps=8,
                         strength=strength, seed=4)  # fmt: skip
    assert_images_close(got, want, atol=1e-4)


@pytest.mark.parametrize("sampler", [name for name in NEW if name != "dpm2"])
def test_inpainting_with_an_ordinary_model_matches_diffusers(tiny, sampler):
    """StableDiffusionInpaintPipeline with a 4-channel UNet: the kept region re-noised to the next call's level after
    every call (images.Inpainting). dpm2 differs on purpose: after its midpoint call Diffusers re-noises the kept
    region to the next step's σ (its add_noise reads sigmas[step_index]), ours to the midpoint's σ, where the latents
    are (dpm2_a's midpoint σ equals the next step's σ, so both agree there)."""
    ours, ref = tiny
    inpaint_ref = diffusers.StableDiffusionInpaintPipeline(**ref.components)
    inpaint_ref.set_progress_bar_config(disable=True)
    inpaint_ref.loaded_scheduler_config = getattr(ref, "loaded_scheduler_config", ref.scheduler.config)
    got, want = run_inpainting(ours, inpaint_ref, photo(45, 37), mask(45, 37), sampler, strength=0.75)
    assert_images_close(got, want, atol=1e-4)


@pytest.mark.parametrize("sampler", NEW)
def test_callback_gets_every_call_with_its_x0(tiny, sampler):
    """One StepInfo per UNet call, with Diffusers' timesteps, the latents the loop continues from and predict_x0."""
    ours, _ = tiny
    infos = []
    out = generate(ours, PROMPTS[0], scheduler=sampler, steps=3, seed=2, output_type="latent", progress=False,
                   callback=infos.append, **SIZE)  # fmt: skip
    ref = reference_scheduler(sampler, 3)
    assert [info.i for info in infos] == list(range(len(ref.timesteps))) == list(range(infos[0].calls))
    torch.testing.assert_close(torch.tensor([i.t for i in infos]).double(), ref.timesteps.double(), atol=1e-3, rtol=0)
    assert torch.equal(infos[-1].latents, out)
    assert all(i.x0.shape == out.shape and torch.isfinite(i.x0).all() for i in infos)
    # the last call lands on (about) σ = 0 (PNDM on ᾱ_0, a DDIM-like σ of 0.029): its x0 is the result
    assert (infos[-1].x0 - out).abs().max() < 0.05 * out.abs().max()


@pytest.mark.parametrize("sampler", ["pndm", "dpm2_a"])
def test_fast_path_hands_eager_only_samplers_to_the_eager_loop(tiny, sampler):
    """Sampler.eager_only: no graph_step (it says so), and generate() runs the eager loop for them even with the
    fast path installed: the same image."""
    ours, _ = tiny
    assert S.SAMPLERS[sampler].eager_only
    s = S.make_schedule(sampler, 3, S.SchedulerConfig())
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="no graph step"):
        S.graph_step(s, torch.zeros(1, dtype=torch.long), x, x, (), None)
    kw = dict(scheduler=sampler, steps=3, seed=6, output_type="latent", progress=False, **SIZE)
    eager = generate(ours, PROMPTS, **kw)
    ours.fast_loop = GraphLoop()
    try:
        fast = generate(ours, PROMPTS, **kw)
    finally:
        ours.fast_loop = None
    assert torch.equal(fast, eager), max_diff(fast, eager)


def test_cli_scheduler_option(tiny_model_dir, tmp_path):
    """--scheduler takes the new names (settings.py lists SAMPLERS); LCM's step limit is a one-line UserError."""
    out = tmp_path / "out.png"
    result = run_cli("--prompt", "a fox", "--steps", "2", "--scheduler", "dpm2_a", "--seed", "1", "--height", "24",
                     "--width", "16", "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32",
                     "--output", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (16, 24) and "Sampler: DPM2 a" in Image.open(out).info["parameters"]
    with pytest.raises(UserError, match="lcm takes at most 50 steps, got 60"):
        Settings(scheduler="lcm", steps=60).ready(img2img=False, inpaint=False)


# ----------------------------------------------------------------------------- the full-size configs


@pytest.fixture(scope="module")
def sd15(sd15_model_dir):
    return load_pipeline(str(sd15_model_dir), device="cpu", dtype=torch.float32), reference_pipeline(sd15_model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", NEW)
def test_sd15_txt2img_matches_diffusers(sd15, sampler):
    """The true SD 1.5 configs (random weights): 256x256, 2 steps, atol 1e-4 on [0, 1] pixels. Without CFG, which
    halves the UNet's batch (about 60 s a case with it on a busy 2-core CPU); the tiny tests cover CFG."""
    got, want = run_both(*sd15, PROMPTS[0], scheduler=sampler, steps=2, guidance_scale=1.0, height=256, width=256)
    assert float(((want <= 0) | (want >= 1)).mean()) < 0.05  # not a saturated image, where any error would hide
    assert_images_close(got, want, atol=1e-4)


def test_readme_lists_every_sampler():
    readme = (Path(S.__file__).parent / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in S.SAMPLERS), [n for n in S.SAMPLERS if f"`{n}`" not in readme]
