"""Schedule types (A1111's "Schedule type"), A1111's sampler names and samplers of one's own, as executable specs.

Each schedule type is checked against Diffusers 0.42 for every sampler whose record offers it: the schedule against
`<Scheduler>.from_config(config, use_<type>_sigmas=True).set_timesteps(steps)` (or `set_timesteps(timesteps=...)` for
Align Your Steps), the images against StableDiffusionPipeline on the tiny random-weight model at 1e-4. The Beta quantile
function is checked against scipy at 1e-10, the Align Your Steps interpolation against A1111's formula, the A1111 names
by a round trip through the PNG text, and a registered sampler against the built-in one it copies (bit for bit) and
against Diffusers' LMS of order 2 (the README's example).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import scheduler as S
from cli.main import main
from cli.png_info import parameters_text, read_parameters
from conftest import DIFFUSERS_SCHEDULERS, MORE_SCHEDULERS, assert_images_close, max_diff
from min_pipeline import generate, load_pipeline
from settings import Settings, UserError

ROOT = Path(__file__).resolve().parent.parent
CONFIG = json.loads((ROOT / "tests/sd15_configs/scheduler/scheduler_config.json").read_text())
OURS = S.SchedulerConfig()
# The Diffusers class (and options) of each sampler, ours and the ones added beside them.
REFERENCE = {name: (cls, {}) for name, cls in DIFFUSERS_SCHEDULERS.items()} | MORE_SCHEDULERS
# Every (sampler, schedule type other than default) a record offers, for the samplers in scheduler.SAMPLERS now.
PAIRS = [(name, schedule) for name, s in S.SAMPLERS.items() for schedule in s.schedules if schedule != "default"]
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def diffusers_scheduler(name: str, schedule: str, config=None):
    """The Diffusers scheduler of `name` with `schedule`'s option, from the SD 1.5 config as a pipeline loads it."""
    import diffusers

    cls_name, options = REFERENCE[name]
    if config is None:
        config = diffusers.PNDMScheduler.from_config(CONFIG).config  # what pipe.scheduler.config holds
    if schedule in S.SIGMA_SCHEDULES:
        options = {**options, f"use_{schedule}_sigmas": True}
    return getattr(diffusers, cls_name).from_config(config, **options)


def set_timesteps(ref, schedule: str, steps: int) -> dict:
    """Diffusers' steps argument for `schedule`: custom timesteps for Align Your Steps, else the step count."""
    if schedule == "align_your_steps":
        return dict(timesteps=S.align_your_steps_timesteps(steps).long().tolist())
    return dict(num_inference_steps=steps)


# ----------------------------------------------------------------------------- the math


@pytest.mark.parametrize("a,b", [(0.6, 0.6), (0.3, 1.7), (2.0, 0.8)])  # Diffusers' (and A1111's default), others
def test_beta_quantiles_equal_scipy(a, b):
    from scipy import stats

    q = np.concatenate([np.linspace(0, 1, 1001), [1e-15, 1e-9, 1e-6, 0.5 - 1e-12, 1 - 1e-9, 1 - 1e-12]])
    want = torch.from_numpy(stats.beta.ppf(q, a, b))
    got = S.beta_ppf(torch.from_numpy(q), a, b)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0, msg=lambda m: f"ppf Beta({a}, {b}): {m}")
    x = torch.linspace(0, 1, 1001, dtype=torch.float64)
    cdf = S.beta_cdf(x, a, b)
    torch.testing.assert_close(cdf, torch.from_numpy(stats.beta.cdf(x.numpy(), a, b)), atol=1e-12, rtol=0)


def a1111_loglinear_interp(t_steps: list[float], num_steps: int) -> np.ndarray:
    """A1111's modules/sd_schedulers.py, get_align_your_steps_sigmas.loglinear_interp, as we read it: xs evenly spaced
    in [0, 1] over the (decreasing) list, ys = log of the list reversed, np.interp at num_steps evenly spaced points,
    exp, reversed again. A1111 applies it to the AYS sigmas; we apply it to the timesteps and round."""
    xs = np.linspace(0, 1, len(t_steps))
    ys = np.log(t_steps[::-1])
    new_ys = np.interp(np.linspace(0, 1, num_steps), xs, ys)
    return np.exp(new_ys)[::-1].copy()


def test_align_your_steps_interpolates_as_a1111():
    from diffusers.schedulers.scheduling_utils import AysSchedules

    published = AysSchedules["StableDiffusionTimesteps"]
    assert S.align_your_steps_timesteps(10).tolist() == published  # 10 steps: the published list itself
    for n in range(2, 431):
        want = a1111_loglinear_interp(published, n)
        assert np.abs(want - np.floor(want) - 0.5).min() > 1e-6  # no value near a rounding tie: the ints below mean it
        got = S.align_your_steps_timesteps(n)
        assert got.tolist() == np.round(want).tolist(), n
        assert (got[1:] < got[:-1]).all(), n  # distinct up to 430 steps
    assert S.schedule_problem("euler", "align_your_steps", 431) is not None  # where rounding would repeat a t


# ----------------------------------------------------------------------------- the records and the schedules


@pytest.mark.parametrize("name", [n for n in S.SAMPLERS if n in REFERENCE])
def test_each_record_offers_the_schedules_its_diffusers_class_has(name):
    import inspect

    import diffusers

    cls = getattr(diffusers, REFERENCE[name][0])
    flags = inspect.signature(cls.__init__).parameters
    offered = {"default"} | {s for s in S.SIGMA_SCHEDULES if f"use_{s}_sigmas" in flags}
    if "timesteps" in inspect.signature(cls.set_timesteps).parameters and name != "lcm":  # LCM takes timesteps= but
        offered.add("align_your_steps")  # warns that times off its distillation grid give "unexpected results"
    assert set(S.SAMPLERS[name].schedules) == offered, name
    assert S.SAMPLERS[name].karras == ("karras" in offered)  # the --karras alias


@pytest.mark.parametrize("name,schedule", PAIRS)
def test_schedule_equals_diffusers_set_timesteps(name, schedule):
    for steps in (2, 3, 7, 10, 20, 25, 50):
        ref = diffusers_scheduler(name, schedule)
        ref.set_timesteps(**set_timesteps(ref, schedule, steps))
        ours, what = S.make_schedule(name, steps, OURS, schedule=schedule), f"{name} {schedule} {steps} steps"
        assert ours.timesteps.is_floating_point() == ref.timesteps.is_floating_point(), what  # DPM2's are float64
        if ours.timesteps.dtype == torch.int64:
            assert ours.timesteps.tolist() == ref.timesteps.tolist(), what
        else:  # timesteps from a float32 log whose last bit numpy and torch round differently (as for Karras)
            t, t_ref = ours.timesteps.double(), ref.timesteps.double()
            torch.testing.assert_close(t, t_ref, rtol=1e-6, atol=1e-6, msg=lambda m, w=what: f"{w}: {m}")
        if getattr(ref, "sigmas", None) is not None and len(ref.sigmas) == len(ours.sigmas):
            torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=1e-6, atol=1e-6, msg=lambda m, w=what: f"{w}: {m}")
        assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6), what


# ----------------------------------------------------------------------------- images against Diffusers


def reference_pipeline(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.loaded_scheduler_config = pipe.scheduler.config  # the PNDM config as loaded
    return pipe


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.float32), reference_pipeline(tiny_model_dir)


SIZE = dict(height=24, width=16)  # the tiny VAE halves the size: a 12x8 latent


def both_images(tiny, name: str, schedule: str, steps: int = 4, seed: int = 2, init_image=None, **settings):
    """generate() with `scheduler=name, schedule=schedule` and Diffusers' pipeline with the same schedule option, both
    float32 (N, H, W, 3). The same settings dict goes to both (a sampler given by A1111's name included)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    ours, ref = tiny
    s = Settings(scheduler=name, schedule=schedule, steps=steps, seed=seed, **SIZE, **settings)
    kw = {k: v for k, v in asdict(s).items() if k not in ("height", "width")} if init_image else asdict(s)
    got = generate(ours, "a red fox in snow", "blurry", init_image=init_image, output_type="np", progress=False, **kw)
    ready = s.ready(img2img=init_image is not None, inpaint=False)
    ref.scheduler = diffusers_scheduler(ready.scheduler, ready.schedule, ref.loaded_scheduler_config)
    pipe = StableDiffusionImg2ImgPipeline(**ref.components) if init_image else ref
    pipe.set_progress_bar_config(disable=True)
    size = dict(image=init_image, strength=ready.strength) if init_image else SIZE
    want = pipe("a red fox in snow", negative_prompt="blurry", guidance_scale=s.guidance_scale, output_type="np",
                generator=torch.Generator().manual_seed(seed), **set_timesteps(ref, ready.schedule, steps),
                **size).images  # fmt: skip
    return got, want


@pytest.mark.parametrize("name,schedule", PAIRS)
def test_txt2img_with_schedule_matches_diffusers(tiny, name, schedule):
    got, want = both_images(tiny, name, schedule)
    assert_images_close(got, want, atol=1e-4)


@pytest.mark.parametrize("name,schedule", [("euler", "beta"), ("dpmpp_2m", "align_your_steps")])
def test_img2img_with_schedule_matches_diffusers(tiny, name, schedule):
    init = Image.fromarray(np.random.default_rng(4).integers(0, 256, (24, 16, 3), dtype=np.uint8))
    got, want = both_images(tiny, name, schedule, steps=5, init_image=init, strength=0.6)
    assert_images_close(got, want, atol=1e-4)


def test_a1111_name_runs_the_same_as_ours(tiny):
    kw = dict(steps=3, seed=1, output_type="latent", progress=False, **SIZE)
    a1111 = generate(tiny[0], "a fox", scheduler="DPM++ 2M Karras", **kw)
    assert torch.equal(a1111, generate(tiny[0], "a fox", scheduler="dpmpp_2m", karras=True, **kw))
    assert torch.equal(a1111, generate(tiny[0], "a fox", scheduler="dpm++ 2m", schedule="karras", **kw))


# ----------------------------------------------------------------------------- A1111's names and the PNG text


def test_a1111_names_resolve():
    cases = {
        "DPM++ 2M Karras": ("dpmpp_2m", "karras"),
        "DPM++ 2M": ("dpmpp_2m", None),
        "Euler a": ("euler_a", None),
        "euler A": ("euler_a", None),
        "Euler Exponential": ("euler", "exponential"),
        "Heun Align Your Steps": ("heun", "align_your_steps"),
        "DPM++ 2M beta": ("dpmpp_2m", "beta"),
        "DDIM": ("ddim", None),
        "heun": ("heun", None),
        "DPM++ 2M Uniform": ("dpmpp_2m", "default"),
        "PLMS": ("pndm", None),
        "LMS": ("lms", None),
        "UniPC": ("unipc", None),
        "DPM++ 2M SDE": ("dpmpp_2m_sde", None),
        "DPM++ 2M SDE Exponential": ("dpmpp_2m_sde", "exponential"),
        "DPM2": ("dpm2", None),
        "DPM2 a": ("dpm2_a", None),
        "DPM2 a Karras": ("dpm2_a", "karras"),
        "LCM": ("lcm", None),
    }
    for name, want in cases.items():
        assert S.find_sampler(name) == want, name
    for name in ("DPM fast", "Euler Polyexponential", "euler karras karras", ""):
        with pytest.raises(ValueError, match="unknown scheduler"):
            S.find_sampler(name)


@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_every_sampler_and_schedule_round_trips_through_the_png_text(name):
    for schedule in S.SAMPLERS[name].schedules:
        s = Settings(scheduler=name, schedule=schedule).ready(img2img=False, inpaint=False)
        params = read_parameters(parameters_text(s, "a fox", "", (512, 512), "sd15"))
        assert S.sampler_from_a1111(params["Sampler"], params.get("Schedule type")) == (name, schedule)
        assert params["Sampler"] == S.SAMPLERS[name].a1111_name


def test_png_text_uses_a1111_fields():
    text = parameters_text(Settings(scheduler="DPM++ 2M Karras").ready(False, False), "a", "", (512, 512), "m")
    assert "Sampler: DPM++ 2M, Schedule type: Karras," in text
    text = parameters_text(Settings(scheduler="euler").ready(False, False), "a", "", (512, 512), "m")
    assert "Sampler: Euler, CFG scale" in text  # Automatic (the sampler's own) is left out, as A1111 reads it
    text = parameters_text(Settings(scheduler="dpmpp_2m").ready(False, False), "a", "", (512, 512), "m")
    assert "Sampler: DPM++ 2M, Schedule type: Uniform," in text  # A1111's Automatic would be Karras for it


def test_a1111_fields_read_as_a1111_reads_them():
    cases = {
        ("DPM++ 2M", None): ("dpmpp_2m", "karras"),  # no field (A1111 before 1.9): Automatic, its own
        ("DPM++ 2M", "Automatic"): ("dpmpp_2m", "karras"),
        ("DPM++ 2M", "Uniform"): ("dpmpp_2m", "default"),
        ("DPM++ 2M Karras", None): ("dpmpp_2m", "karras"),  # A1111's old combined names
        ("DPM++ 2M Karras", "Automatic"): ("dpmpp_2m", "karras"),
        ("Euler a", "Automatic"): ("euler_a", "default"),
        ("Euler", "Exponential"): ("euler", "exponential"),
        ("Euler", "Align Your Steps"): ("euler", "align_your_steps"),
        ("Heun", "beta"): ("heun", "beta"),
    }
    cases[("DPM++ 2M SDE", "Automatic")] = ("dpmpp_2m_sde", "exponential")
    cases[("DPM2 a", None)] = ("dpm2_a", "karras")
    for fields, want in cases.items():
        assert S.sampler_from_a1111(*fields) == want, fields
    for fields, error in {
        ("DPM fast", None): "unknown scheduler 'DPM fast'",
        ("Euler", "SGM Uniform"): "schedule type 'SGM Uniform' is not one of ours",
        ("DDIM", "Karras"): "schedule karras works with euler",
        ("Euler a", "Beta"): "not euler_a",
    }.items():
        with pytest.raises(ValueError, match=re.escape(error)):
            S.sampler_from_a1111(*fields)


# ----------------------------------------------------------------------------- bad combinations


@pytest.mark.parametrize("settings,error", [
    (dict(scheduler="ddim", karras=True), "schedule karras works with euler"),
    (dict(scheduler="ddim", schedule="beta"), "schedule beta works with euler"),
    (dict(scheduler="euler_a", schedule="align_your_steps"), "not euler_a"),
    (dict(scheduler="euler", schedule="sgm_uniform"), "unknown schedule 'sgm_uniform'; choose one of default, karras"),
    (dict(scheduler="DPM++ 2M Karras", schedule="beta"), "ask for different schedules (beta, karras)"),
    (dict(scheduler="euler", karras=True, schedule="exponential"), "ask for different schedules"),
    (dict(scheduler="DPM fast"), "unknown scheduler 'DPM fast'; choose one of euler"),
    (dict(scheduler="euler", schedule="align_your_steps", steps=1), "needs at least 2 steps"),
    (dict(scheduler="euler", schedule="align_your_steps", steps=500), "repeats timesteps"),
])  # fmt: skip
def test_bad_combinations_are_user_errors(settings, error):
    with pytest.raises(UserError, match=re.escape(error)) as e:
        Settings(**settings).ready(img2img=False, inpaint=False)
    assert "\n" not in str(e.value)


def test_agreeing_schedules_are_one():
    s = Settings(scheduler="DPM++ 2M Karras", karras=True, schedule="karras").ready(False, False)
    assert (s.scheduler, s.schedule, s.karras) == ("dpmpp_2m", "karras", True)
    s = Settings(scheduler="heun", karras=True).ready(False, False)
    assert (s.scheduler, s.schedule, s.karras) == ("heun", "karras", True)  # the old alias
    s = Settings(scheduler="Euler a").ready(False, False)
    assert (s.scheduler, s.schedule, s.karras) == ("euler_a", "default", False)
    s = Settings(scheduler="DPM++ 2M", schedule="Align Your Steps").ready(False, False)  # A1111's label
    assert (s.scheduler, s.schedule) == ("dpmpp_2m", "align_your_steps")


@pytest.mark.parametrize("args,error", [
    (["--scheduler", "ddim", "--schedule", "karras"], "schedule karras works with"),
    (["--scheduler", "ddim", "--karras"], "schedule karras works with"),
    (["--scheduler", "DPM++ 2M Karras", "--schedule", "exponential"], "ask for different schedules"),
    (["--scheduler", "Euler a", "--schedule", "beta"], "not euler_a"),
    (["--scheduler", "DPM fast"], "unknown scheduler 'DPM fast'"),
])  # fmt: skip
def test_cli_refuses_bad_combinations_with_exit_2(tmp_path, capsys, args, error):
    out = tmp_path / "o.png"
    code = main(["--prompt", "x", "--model", str(tmp_path / "never-loaded"), "--output", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and error in err and err.count("\n") == 1, err
    assert not out.exists()


def test_cli_takes_a1111_names_on_the_command_line_and_in_prompt_files(tiny_model_dir, tmp_path):
    (tmp_path / "prompts.txt").write_text('a cat --scheduler "Euler a"\na dog --scheduler heun --schedule beta\n')
    common = ["--model", str(tiny_model_dir), "--steps", "2", "--seed", "1", "--height", "16", "--width", "16",
              "--device", "cpu", "--dtype", "float32", "--quiet"]  # fmt: skip
    assert main(["--prompt", "x", "--scheduler", "DPM++ 2M Karras", "--output", str(tmp_path / "a.png"), *common]) == 0
    assert main(["--from-file", str(tmp_path / "prompts.txt"), "--output", str(tmp_path) + "/", *common]) == 0
    read = [read_parameters(Image.open(tmp_path / f).text["parameters"]) for f in ("a.png", "00001.png", "00002.png")]
    fields = [S.sampler_from_a1111(p["Sampler"], p.get("Schedule type")) for p in read]
    assert fields == [("dpmpp_2m", "karras"), ("euler_a", "default"), ("heun", "beta")]


# ----------------------------------------------------------------------------- samplers of one's own


@pytest.fixture
def registered():
    """Names registered by a test, taken out of scheduler.SAMPLERS again after it."""
    names = []
    yield names
    for name in names:
        S.SAMPLERS.pop(name, None)


def euler_copy(s, i, x, eps, state, noise, eta):
    return S.euler_step(x, eps, s.sigmas[i], s.sigmas[i + 1]), state


def test_registered_copy_of_euler_equals_euler_bit_for_bit(tiny, registered):
    registered.append(S.register(replace(S.SAMPLERS["euler"], name="my_euler", a1111_name="My Euler",
                                         step=euler_copy)).name)  # fmt: skip
    kw = dict(steps=4, seed=3, output_type="latent", progress=False, **SIZE)
    mine, built_in = (generate(tiny[0], "a fox", scheduler=name, **kw) for name in ("my_euler", "euler"))
    assert torch.equal(mine, built_in), max_diff(mine, built_in)
    assert torch.equal(mine, generate(tiny[0], "a fox", scheduler="My Euler", **kw))  # its A1111 name too
    text = parameters_text(Settings(scheduler="my_euler").ready(False, False), "a", "", (64, 64), "m")
    assert S.sampler_from_a1111(read_parameters(text)["Sampler"]) == ("my_euler", "default")


def readme_sampler_example() -> str:
    """The README's "Your own sampler" code block, without its last line (generate() at 512x512, 20 steps)."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- your own sampler -->\s*```python\n(.*?)```", readme, re.S).group(1)
    *code, last = block.strip().split("\n")
    assert last.startswith("images = generate(pipe,") and 'scheduler="ab2"' in last
    return "\n".join(code)


def test_readme_sampler_equals_diffusers_lms_of_order_2(tiny, registered):
    """The README's Adams-Bashforth 2 in σ is k-diffusion's/Diffusers' linear multistep method of order 2 (the slope
    integrated along the line through the last two): Diffusers' LMSDiscreteScheduler with step(order=2)."""
    from diffusers import LMSDiscreteScheduler

    registered.append("ab2")
    exec(readme_sampler_example(), {})
    assert "ab2" in S.SAMPLERS and Settings(scheduler="AB2").ready(False, False).scheduler == "ab2"
    ours, ref = tiny
    got = generate(ours, "a red fox in snow", "blurry", scheduler="ab2", steps=6, seed=5, output_type="np",
                   progress=False, **SIZE)  # fmt: skip
    ref.scheduler = LMSDiscreteScheduler.from_config(ref.loaded_scheduler_config)
    ref.scheduler.step = functools.partial(ref.scheduler.step, order=2)
    want = ref("a red fox in snow", negative_prompt="blurry", num_inference_steps=6, output_type="np",
               generator=torch.Generator().manual_seed(5), **SIZE).images  # fmt: skip
    assert_images_close(got, want, atol=1e-4)


def test_registration_is_checked_and_names_count_at_call_time(registered):
    euler = S.SAMPLERS["euler"]
    for record, error in [
        (euler, "'euler' is a built-in sampler"),
        (replace(euler, name="Mine"), "lowercase identifier"),
        (replace(euler, name="mine", a1111_name="Heun"), "names another sampler"),
        (replace(euler, name="mine", a1111_name="Mine", schedules=("karras",)), "schedules must include 'default'"),
        (replace(euler, name="mine", a1111_name="Mine", unet_calls=0), "unet_calls must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=re.escape(error)):
            S.register(record)
    with pytest.raises(UserError, match="unknown scheduler 'mine'"):
        Settings(scheduler="mine").ready(False, False)
    registered.append(S.register(replace(euler, name="mine", a1111_name="Mine", step=euler_copy)).name)
    assert Settings(scheduler="mine").ready(False, False).scheduler == "mine"  # registered after Settings was made
    S.register(replace(euler, name="mine", a1111_name="Mine v2", step=euler_copy))  # one's own name: replaced
    assert S.SAMPLERS["mine"].a1111_name == "Mine v2"


def test_readme_schedule_table_lists_what_the_records_offer():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("**Schedule types**") : readme.index("**A1111's sampler names**")]
    rows = re.findall(r"^  \| `(\w+)`.*\| (.*) \|$", section, re.M)
    assert [schedule for schedule, _ in rows] == list(S.SCHEDULES)
    for schedule, samplers in rows:
        offered = [name for name, s in S.SAMPLERS.items() if schedule in s.schedules and name in S.BUILT_IN]
        listed = re.findall(r"`(\w+)`", samplers) if samplers != "all" else [n for n in S.SAMPLERS if n in S.BUILT_IN]
        assert listed == offered, schedule
