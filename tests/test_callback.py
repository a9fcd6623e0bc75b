"""Watching the sampler: generate()'s per-call callback (indices, timesteps, sigmas and x0 predictions against
Diffusers' `pred_original_sample`), and the CLI's trajectory picture and live preview file."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

import scheduler as sampling
from cli.main import main
from cli.trajectory import preview
from conftest import DIFFUSERS_SCHEDULERS, max_diff, with_scheduler
from min_pipeline import generate, load_pipeline

KW = dict(steps=4, height=24, width=16, seed=3, output_type="np", progress=False)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.float32), ref


def diffusers_x0(ref, sampler: str) -> list[torch.Tensor]:
    """Run the reference pipeline and keep what its scheduler returns as pred_original_sample at every call."""
    with_scheduler(ref, sampler)
    step, seen = ref.scheduler.step, []

    @functools.wraps(step)  # the pipeline passes `generator` only to a step whose signature has it
    def recording_step(*args, **kwargs):
        out = step(*args, **{**kwargs, "return_dict": True})
        seen.append(out.pred_original_sample)
        return (out.prev_sample,)

    ref.scheduler.step = recording_step
    ref("a fox", num_inference_steps=4, height=24, width=16, generator=torch.Generator().manual_seed(3))
    return seen


@pytest.mark.parametrize("sampler", list(DIFFUSERS_SCHEDULERS))
def test_callback_once_per_unet_call_with_the_samplers_x0(tiny, sampler):
    ours, ref = tiny
    records = []
    with_callback = generate(ours, "a fox", scheduler=sampler, callback=records.append, **KW)
    assert np.array_equal(with_callback, generate(ours, "a fox", scheduler=sampler, **KW))  # watching changes nothing
    schedule = sampling.make_schedule(sampler, 4, ours.scheduler_config)
    calls = len(schedule.timesteps)
    assert calls == (7 if sampler == "heun" else 4)  # Heun: two calls per step but the last
    assert [r.i for r in records] == list(range(calls)) and {r.calls for r in records} == {calls}
    assert [r.t for r in records] == schedule.timesteps.tolist()
    assert [r.sigma for r in records] == schedule.sigmas[:-1].tolist()
    if sampler == "dpmpp_2m":  # Diffusers returns no pred_original_sample; the last step lands on x_θ exactly
        torch.testing.assert_close(records[-1].x0, records[-1].latents, atol=1e-6, rtol=0)
        return
    want = diffusers_x0(ref, sampler)
    assert len(want) == calls
    for r, w in zip(records, want, strict=True):
        torch.testing.assert_close(
            r.x0, w, atol=1e-4, rtol=0, msg=lambda m, r=r, w=w: f"call {r.i}: {max_diff(r.x0, w)}"
        )


@pytest.mark.parametrize("suffix", [".gif", ".png"])
def test_trajectory_has_a_frame_per_step_ending_on_the_final_x0(tiny, tiny_model_dir, tmp_path, suffix):
    ours, _ = tiny
    trajectory, out = tmp_path / f"t{suffix}", tmp_path / "o.png"
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--quiet", "--prompt", "a fox", "--steps", "4"]
    args += ["--height", "64", "--width", "64", "--output", str(out), "--trajectory", str(trajectory), "--seed", "0"]
    assert main(args) == 0
    records = []
    generate(ours, "a fox", steps=4, height=64, width=64, callback=records.append, progress=False)
    want = np.asarray(preview(ours, records[-1].x0), dtype=float)[32:]  # below the label
    image = Image.open(trajectory)
    if suffix == ".gif":
        assert image.n_frames == 4
        image.seek(3)
        got = np.asarray(image.convert("RGB"), dtype=float)[32:]
        assert np.abs(got - want).mean() < 4, np.abs(got - want).mean()  # GIF's 256-colour palette
    else:
        assert image.size == (128, 128)  # a 2x2 contact sheet of 64x64 frames
        got = np.asarray(image, dtype=float)[64 + 32 :, 64:]
        assert np.array_equal(got, want)


def test_trajectory_with_noisy_latents_and_vae_decoder(tiny_model_dir, tmp_path):
    trajectory = tmp_path / "t.png"
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--quiet", "--prompt", "a", "--steps", "2"]
    args += ["--height", "32", "--width", "32", "--output", str(tmp_path / "o.png"), "--trajectory", str(trajectory)]
    assert main([*args, "--trajectory-noisy", "--trajectory-decoder", "vae"]) == 0
    assert Image.open(trajectory).size == (2 * 2 * 32, 32)  # two frames side by side, each noisy | x0


@pytest.mark.parametrize("keep", [False, True])
def test_preview_file_is_rewritten_and_removed_unless_kept(tiny_model_dir, tmp_path, monkeypatch, keep):
    import cli.outputs
    import cli.trajectory

    written = []
    real = cli.outputs.replace_file
    for module in (cli.trajectory, cli.outputs):  # the preview's writer and the image's
        monkeypatch.setattr(
            module, "replace_file", lambda path, *a, **k: (written.append(path.name), real(path, *a, **k))
        )
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--quiet", "--prompt", "a", "--steps", "5"]
    args += ["--height", "16", "--width", "16", "--output", str(tmp_path / "o.png"), "--preview-every", "2"]
    assert main(args + (["--keep-preview"] if keep else [])) == 0
    assert written == ["o.preview.png"] * 3 + ["o.png"]  # after calls 2, 4 and the last
    assert (tmp_path / "o.preview.png").exists() == keep
