"""Bad input never becomes a traceback, a black image or a lost file: one test per finding of the fuzzing pass
that the one-line-error table in test_cli.py does not cover (writing files, types, non-finite values, images)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cli.main import main
from cli.outputs import Output
from cli.png_info import read_parameters
from conftest import max_diff, with_scheduler
from images import image_to_tensor
from min_pipeline import generate, load_pipeline

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--steps", "2", "--height", "16", "--width", "16", "--device", "cpu", "--quiet"]


def cli(tiny_model_dir: Path, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "min_pipeline.py"), "--model", str(tiny_model_dir), *FAST, *args]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.float32)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- writing files safely


def test_two_processes_writing_one_file_never_mix(tiny_model_dir, tiny, tmp_path):
    """Both runs replace x.png (an explicitly named file); whichever lands last, the file is one run's whole
    image with that run's own metadata, each run's report names it, and no temporary file is left."""
    out = tmp_path / "x.png"
    runs = [subprocess.Popen(cli(tiny_model_dir, "--prompt", "fox", "--seed", str(seed), "--output", str(out)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]  # fmt: skip
    for run in runs:
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr
        assert stdout.startswith(f"wrote {out} in ")
    image = Image.open(out)
    seed = int(read_parameters(image.text["parameters"])["Seed"])
    want = generate(tiny, "fox", steps=2, height=16, width=16, seed=seed, progress=False)[0]
    assert np.array_equal(np.asarray(image), np.asarray(want))
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


@pytest.mark.parametrize("is_folder", [False, True])
def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch, is_folder):
    def interrupted(self, fp, *args, **kwargs):
        fp.write(b"half a png")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    output = Output.parse(str(tmp_path) + "/" if is_folder else str(tmp_path / "x.png"), 1)
    with pytest.raises(KeyboardInterrupt):
        output.save(Image.new("RGB", (8, 8)), "parameters", 0, 1, seed=0)
    assert list(tmp_path.iterdir()) == []


def test_temporary_files_are_unique(tmp_path, monkeypatch):
    """Two saves of the same file use two temporary names (a fixed `.x.png.tmp` let concurrent runs swap files)."""
    sources = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (sources.append(src), real_replace(src, dst)))
    output = Output.parse(str(tmp_path / "x.png"), 1)
    for _ in range(2):
        output.save(Image.new("RGB", (8, 8)), "p", 0, 1, seed=0)
    assert len(set(sources)) == 2 and all(Path(s).parent == tmp_path for s in sources), sources


def test_folder_output_never_overwrites(tiny_model_dir, tmp_path):
    for prompt in ("fox", "owl"):
        assert main(["--model", str(tiny_model_dir), *FAST, "--prompt", prompt, "--output", f"{tmp_path}/"]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00000-0.png", "00001-0.png"], names
    prompts = [read_parameters(Image.open(tmp_path / n).text["parameters"])["prompt"] for n in names]
    assert prompts == ["fox", "owl"]


def test_replaced_file_keeps_its_mode_and_new_files_follow_the_umask(tiny_model_dir, tmp_path):
    kept, new = tmp_path / "kept.png", tmp_path / "new.png"
    kept.write_bytes(b"old")
    kept.chmod(0o640)
    for out in (kept, new):
        assert main(["--model", str(tiny_model_dir), *FAST, "--prompt", "x", "--output", str(out)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (kept.stat().st_mode & 0o777, new.stat().st_mode & 0o777) == (0o640, 0o666 & ~umask)
    assert Image.open(kept).size == (16, 16)


def test_ctrl_c_during_denoising_exits_130_and_leaves_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "x.png"
    args = [a for a in cli(tiny_model_dir, "--prompt", "x", "--output", str(out)) if a != "--quiet"]
    args += ["--steps", "999"]  # a long run, with its progress bar
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    seen = ""
    while "denoising" not in seen and time.monotonic() < deadline and run.poll() is None:
        seen += run.stderr.read(1)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=60)
    stderr = seen + stderr
    assert run.returncode == 130, stderr
    assert "min_pipeline.py: interrupted" in stderr and "Traceback" not in stderr, stderr
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- settings through the API


def test_random_seed_is_printed_recorded_and_reproducible(tiny_model_dir, tiny, tmp_path):
    out = tmp_path / "x.png"
    result = subprocess.run(cli(tiny_model_dir, "--prompt", "x", "--seed", "-1", "--output", str(out)),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    seed = int(read_parameters(Image.open(out).text["parameters"])["Seed"])
    assert f"seed: {seed}" in result.stderr and 0 <= seed < 2**32
    want = generate(tiny, "x", steps=2, height=16, width=16, seed=seed, progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want))


def test_float16_on_a_cpu_warns_and_dtype_names_are_accepted(tiny_model_dir):
    with pytest.warns(UserWarning, match="float16 on a CPU is about 27x slower"):
        pipe = load_pipeline(str(tiny_model_dir), device="cpu", dtype="float16")
    assert pipe.dtype == pipe.unet.conv_in.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="dtype must be one of float32, float16, bfloat16, got 'half'"):
        load_pipeline(str(tiny_model_dir), device="cpu", dtype="half")


def test_latent_and_pt_outputs_match_diffusers(tiny, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    with_scheduler(ref, "euler")
    kwargs = dict(steps=3, height=16, width=24, seed=5, progress=False)
    latents = generate(tiny, "fox", output_type="latent", **kwargs)
    want = ref("fox", num_inference_steps=3, height=16, width=24, output_type="latent",
               generator=torch.Generator().manual_seed(5)).images  # fmt: skip
    torch.testing.assert_close(latents, want, atol=1e-5, rtol=0, msg=lambda m: f"{m}\n{max_diff(latents, want)}")
    pt, np_images = generate(tiny, "fox", output_type="pt", **kwargs), generate(tiny, "fox", output_type="np", **kwargs)
    assert pt.shape == (1, 3, 16, 24) and pt.dtype == torch.float32
    assert torch.equal(pt, torch.from_numpy(np_images).permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="output_type must be one of pil, np, pt, latent, got 'bogus'"):
        generate(tiny, "fox", output_type="bogus", **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(steps="10"), TypeError, "steps must be int, got str '10'"),
        (dict(height=64.0), TypeError, "height must be int, got float"),
        (dict(guidance_scale="7"), TypeError, "guidance_scale must be float"),
        (dict(karras=1), TypeError, "karras must be bool"),
        (dict(prompt=None), TypeError, "prompt must be a string or a non-empty list of strings"),
        (dict(prompt=[]), TypeError, "prompt must be a string or a non-empty list of strings"),
        (dict(negative_prompt=3), TypeError, "negative_prompt must be a string"),
        (dict(init_image=np.zeros((16, 16, 3), np.uint8)), TypeError, "init_image must be a PIL image or a file path"),
    ],
)
def test_wrong_types_are_named(tiny, kwargs, error, match):
    kwargs = {"prompt": "x", "steps": 1, "height": 16, "width": 16, "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        generate(tiny, **kwargs)


def test_numpy_integers_are_integers(tiny):
    kwargs = dict(height=16, width=16, output_type="np", progress=False)
    got = generate(tiny, "x", steps=np.int64(2), seed=np.int64(3), **kwargs)
    assert np.array_equal(got, generate(tiny, "x", steps=2, seed=3, **kwargs))


# ----------------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize(
    "component, key, stage",
    [("unet", "conv_out.weight", "denoising loop"), ("vae", "post_quant_conv.weight", "VAE decoder")],
)
def test_nan_weights_fail_without_writing(tiny_model_dir, tmp_path, capsys, component, key, stage):
    folder = tmp_path / "nan-model"
    shutil.copytree(tiny_model_dir, folder)
    path = folder / component / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, path)
    out = tmp_path / "out.png"
    assert main(["--model", str(folder), *FAST, "--prompt", "x", "--output", str(out)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and stage in lines[0] and "NaN or inf" in lines[0], lines
    assert not out.exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- images


def test_decompression_bomb_is_a_one_line_error(tiny_model_dir, tmp_path, monkeypatch, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels is then over twice the limit: PIL refuses
    args = ["--model", str(tiny_model_dir), *FAST, "--prompt", "x", "--init-image", str(tmp_path / "bomb.png")]
    assert main([*args, "--output", str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("min_pipeline.py: error: cannot read init image") and "\n" not in err, err
    assert "decompression bomb" in err.lower()


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_greyscale_is_scaled_not_clipped(tmp_path, mode):
    ramp = np.linspace(0, 1, 64 * 32).reshape(32, 64)
    if mode == "F":
        image = Image.fromarray(ramp.astype(np.float32), mode="F")
    else:
        image = Image.fromarray((ramp * 65535).round().astype(np.uint16)).convert(mode)
    path = tmp_path / ("deep.png" if mode == "I;16" else "deep.tiff")  # PNG stores 16-bit greyscale as I;16
    image.save(path)
    want = torch.from_numpy(np.round(ramp * 255) / 255 * 2 - 1).float()
    for source in (path, Image.open(path)):
        got = image_to_tensor(source, 8)[0, 0]
        assert got.shape == (32, 64)
        diff = max_diff(got, want)
        torch.testing.assert_close(got, want, atol=2 / 255, rtol=0, msg=lambda m, diff=diff: f"{m}\n{diff}")


def test_images_are_decoded_one_at_a_time(tiny, monkeypatch):
    """--num-images 64 would otherwise decode all images in one VAE call (~65 GB at 512x512)."""
    batches = []
    decode = tiny.vae.decode
    monkeypatch.setattr(tiny.vae, "decode", lambda z, **kw: (batches.append(len(z)), decode(z, **kw))[1])
    images = generate(tiny, ["a", "b"], steps=1, height=16, width=16, num_images=2, output_type="np", progress=False)
    assert images.shape == (4, 16, 16, 3) and batches == [1, 1, 1, 1]


# ----------------------------------------------------------------------------- sizes that cannot finish or fit


def test_a_size_that_cannot_finish_is_refused_before_any_work(tiny_model_dir, tmp_path, capsys):
    """The tiny VAE only halves the size: 2048x2048 is a 1024x1024 latent, self-attention over a million positions
    (the fuzzing pass ran it 12 minutes without finishing step 1, deaf to Ctrl-C)."""
    start = time.monotonic()
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--prompt", "x", "--output", str(tmp_path / "o.png")]
    assert main([*args, "--height", "2048", "--width", "2048"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("min_pipeline.py: error: 2048x2048 would take about") and "h per step" in err, err
    assert time.monotonic() - start < 60 and list(tmp_path.iterdir()) == []


def test_a_size_that_cannot_fit_is_refused_with_the_estimate(tiny, monkeypatch):
    monkeypatch.setattr("resources.available_bytes", lambda device: 2**20)
    with pytest.raises(ValueError, match=r"64x64 needs about 0\.\d GB of working memory, but only 0\.0 GB is free"):
        generate(tiny, "x", steps=1, height=64, width=64, progress=False)


def test_a_long_run_is_announced(tiny, monkeypatch):
    monkeypatch.setattr("resources.cpu_flops_per_second", lambda: 1.0)  # a very slow CPU
    monkeypatch.setattr("resources.MAX_STEP_SECONDS", float("inf"))
    with pytest.warns(UserWarning, match=r"16x16 may take up to \d+ min on this CPU"):
        generate(tiny, "x", steps=1, height=16, width=16, progress=False)
