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

import cli.main as cli_main
from cli.main import main
from cli.outputs import Output
from cli.png_info import read_parameters
from conftest import max_diff, with_scheduler
from images import image_to_tensor
from min_pipeline import generate, load_pipeline

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--steps", "2", "--height", "16", "--width", "16", "--device", "cpu", "--dtype", "float32", "--quiet"]
FAST += ["--seed", "0"]  # the CLI's default seed is a random one


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


# ----------------------------------------------------------------------------- issue 23: the second fuzzing pass


@pytest.fixture
def no_model(monkeypatch, tmp_path):
    """main()'s arguments for a run that must fail before any model loads (loading one fails the test)."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("cli.main.load_pipeline", load)
    return ["--model", str(tmp_path / "no-model"), *FAST]


def one_error(capsys, *words: str) -> str:
    """The run's only stderr line: an error naming all of `words`."""
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error: " in err and "Traceback" not in err, err
    assert all(w in err for w in words), err
    return err


def test_lora_tags_and_embeddings_cannot_leave_their_folders(no_model, tmp_path, capsys):
    """Item 1: a <lora:NAME> tag is a file inside --lora-dir, an embedding found by name one inside --embeddings-dir;
    `..`, absolute names and links that lead out are refused before the model loads."""
    (tmp_path / "outside").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "outside" / "secret.safetensors"))
    loras, embeddings = tmp_path / "loras", tmp_path / "embeddings"
    loras.mkdir(), embeddings.mkdir()
    (loras / "link.safetensors").symlink_to(tmp_path / "outside" / "secret.safetensors")
    out = ["--lora-dir", str(loras), "--output", str(tmp_path / "o.png")]
    for tag in ("../outside/secret", str(tmp_path / "outside" / "secret"), "link"):
        assert main([*no_model, *out, "--prompt", f"x <lora:{tag}:1>"]) == 2
        one_error(capsys, "outside --lora-dir")
    (embeddings / "secret.safetensors").symlink_to(tmp_path / "outside" / "secret.safetensors")
    assert main([*no_model, *out, "--prompt", "secret", "--embeddings-dir", str(embeddings)]) == 2
    one_error(capsys, "in --embeddings-dir leads outside it")


def write_rank_0_lora(path: Path) -> Path:
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    width = 32  # the tiny text encoder's
    save_file({f"{key}.lora_down.weight": torch.zeros(0, width), f"{key}.lora_up.weight": torch.zeros(width, 0)},
              str(path))  # fmt: skip
    return path


def test_a_bad_lora_on_a_prompt_file_line_fails_that_line_only(tiny_model_dir, tmp_path, capsys):
    """Item 4: a LoRA file that cannot be merged (garbage, rank 0) is its line's error; the other lines run."""
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "garbage.safetensors").write_bytes(b"not safetensors")
    write_rank_0_lora(loras / "rank0.safetensors")
    (tmp_path / "p.txt").write_text("a <lora:garbage:1>\nb <lora:rank0:1>\nc\n")
    out = tmp_path / "out"
    args = ["--model", str(tiny_model_dir), *FAST, "--lora-dir", str(loras), "--output", f"{out}/"]
    assert main([*args, "--steps", "1", "--from-file", str(tmp_path / "p.txt")]) == 1
    err = capsys.readouterr().err
    assert "p.txt line 1: error: LoRA " in err and "p.txt line 2: error: LoRA " in err and "has rank 0" in err
    assert "Traceback" not in err and sorted(p.name for p in out.iterdir()) == ["00003.png"]


def test_the_preview_never_takes_over_a_users_file(no_model, tmp_path, capsys):
    """Item 5: an existing preview.png (output folder) or x.preview.png is the user's: refused before the model
    loads and left alone."""
    folder, mine = tmp_path / "d", b"my own picture"
    folder.mkdir()
    for output, preview in ((f"{folder}/", folder / "preview.png"), (f"{tmp_path}/x.png", tmp_path / "x.preview.png")):
        preview.write_bytes(mine)
        assert main([*no_model, "--prompt", "x", "--output", output, "--preview-every", "1"]) == 2
        one_error(capsys, "preview file", "exists")
        assert preview.read_bytes() == mine


def test_the_preview_is_claimed_exclusively_and_removed_after_every_line(tiny_model_dir, tmp_path, monkeypatch):
    """Item 5: the preview file is created only where none exists (a file that appears after the checks is left
    alone), removed after every prompt-file line, and kept with --keep-preview only."""
    args = ["--model", str(tiny_model_dir), *FAST, "--preview-every", "1"]
    (tmp_path / "p.txt").write_text("a\nb\n")
    assert main([*args, "--from-file", str(tmp_path / "p.txt"), "--output", str(tmp_path / "batch/")]) == 0
    assert sorted(p.name for p in (tmp_path / "batch").iterdir()) == ["00001.png", "00002.png"]
    assert main([*args, "--prompt", "x", "--output", str(tmp_path / "k.png"), "--keep-preview"]) == 0
    assert Image.open(tmp_path / "k.preview.png").size == (16, 16)
    check_job = cli_main.check_job

    def user_file_appears(*a, **kw):  # between the checks and the run
        job = check_job(*a, **kw)
        job.preview_path.write_bytes(b"mine")
        return job

    monkeypatch.setattr(cli_main, "check_job", user_file_appears)
    assert main([*args, "--prompt", "x", "--output", str(tmp_path / "r.png")]) == 2
    assert (tmp_path / "r.preview.png").read_bytes() == b"mine" and not (tmp_path / "r.png").exists()


def test_text_that_is_not_utf8_is_refused_before_the_model_loads(no_model, tmp_path, capsys):
    """Item 8: bytes that are not UTF-8 in --prompt reach Python as lone surrogates, which no PNG chunk can hold."""
    for option in ("--prompt", "--negative-prompt"):
        args = {"--prompt": "a fox", option: "a \udcff fox"}
        assert main([*no_model, *(x for kv in args.items() for x in kv), "--output", str(tmp_path / "o.png")]) == 2
        one_error(capsys, "is not UTF-8 text")


def test_a_prompt_file_that_is_no_regular_file_or_too_large_is_refused(no_model, tmp_path, capsys, monkeypatch):
    """Item 9: /dev/zero, a FIFO (which would block) and a file over the size cap are refused without reading them."""
    os.mkfifo(tmp_path / "fifo")
    out = ["--output", str(tmp_path / "out/")]
    for name in ("/dev/zero", str(tmp_path / "fifo"), str(tmp_path)):
        start = time.monotonic()
        assert main([*no_model, *out, "--from-file", name]) == 2
        one_error(capsys, "is not a regular file")
        assert time.monotonic() - start < 5
    monkeypatch.setattr("cli.prompt_files.MAX_FILE", 100)
    (tmp_path / "big.txt").write_text("a fox\n" * 20)
    assert main([*no_model, *out, "--from-file", str(tmp_path / "big.txt")]) == 2
    one_error(capsys, "is larger than")


def test_every_output_place_is_checked_before_the_model_loads(no_model, tmp_path, capsys):
    """Item 10: a trajectory that is a folder or cannot be written, an output that cannot be created (/proc), and
    (fuzzing) an output or trajectory that is a device, which running as root would replace."""
    (tmp_path / "t.gif").mkdir()
    (tmp_path / "null.png").symlink_to("/dev/null")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    base = [*no_model, "--prompt", "x"]
    cases = [(["--trajectory", str(tmp_path / "t.gif")], "is a folder"),
             (["--trajectory", "/proc/nowhere/t.gif"], "cannot write to /proc/nowhere"),
             (["--output", "/proc/nowhere/o.png"], "cannot write to /proc/nowhere"),
             (["--output", f"{tmp_path}/{'x' * 300}/o.png"], "File name too long"),
             (["--output", str(tmp_path / "null.png")], "is a folder or a special file"),
             (["--trajectory", str(tmp_path / "null.png")], "is a folder or a special file"),
             (["--output", str(tmp_path / "loop" / "o.png")], "is not a writable folder"),
             (["--trajectory", str(tmp_path / "loop" / "t.gif")], "is not a writable folder")]  # fmt: skip
    for extra, message in cases:
        assert main([*base, "--output", str(tmp_path / "o.png"), *extra]) == 2
        one_error(capsys, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop", "null.png", "t.gif"]


def test_an_all_black_mask_with_a_trajectory_keeps_the_image(tiny_model_dir, tmp_path, capsys):
    """Item 10: nothing is sampled, so there is no trajectory: a warning, and the image is written."""
    Image.new("RGB", (16, 16), "red").save(tmp_path / "init.png")
    Image.new("L", (16, 16), 0).save(tmp_path / "mask.png")
    args = ["--model", str(tiny_model_dir), *FAST, "--prompt", "x", "--output", str(tmp_path / "o.png")]
    args += ["--init-image", str(tmp_path / "init.png"), "--mask-image", str(tmp_path / "mask.png")]
    for trajectory in ("t.gif", "t.png"):
        assert main([*args, "--trajectory", str(tmp_path / trajectory)]) == 0
        assert "no step ran, so there is no trajectory" in capsys.readouterr().err
        assert (tmp_path / "o.png").exists() and not (tmp_path / trajectory).exists()


def test_skip_existing_needs_every_image_of_a_line(tmp_path):
    """Item 11: with --num-images 2 a line whose second image is missing runs again."""
    (tmp_path / "p.txt").write_text("a fox\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "00001-0.png").write_bytes(b"done")
    args = cli_main.parse_args(["--from-file", str(tmp_path / "p.txt"), "--output", f"{tmp_path}/out/"]
                               + ["--skip-existing", "--num-images", "2"])  # fmt: skip
    (number, line), *_ = cli_main.prompt_file_jobs(args)
    assert cli_main.check_job(args, line, number, True, None, None) is not None
    (tmp_path / "out" / "00001-1.png").write_bytes(b"done")
    assert cli_main.check_job(args, line, number, True, None, None) is None


def test_a_prompt_file_never_replaces_a_read_only_file(no_model, tmp_path, capsys):
    """Item 12: as with --output x.png, a read-only image is refused (the line fails), not replaced."""
    (tmp_path / "p.txt").write_text("a fox\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "00001.png").write_bytes(b"keep me")
    (tmp_path / "out" / "00001.png").chmod(0o444)
    assert main([*no_model, "--from-file", str(tmp_path / "p.txt"), "--output", f"{tmp_path}/out/"]) == 1
    one_error(capsys, "p.txt line 1: error: ", "is read-only")
    assert (tmp_path / "out" / "00001.png").read_bytes() == b"keep me"


def test_prompt_file_global_option_errors_are_reported_once_with_exit_2(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Item 13: a bad --embeddings-dir, --device or --embedding is one error, before any line and exit code 2; an
    embedding name clash loads the model once."""
    (tmp_path / "p.txt").write_text("a fox\nan owl\n")
    base = ["--model", str(tiny_model_dir), *FAST, "--from-file", str(tmp_path / "p.txt"), "--output", f"{tmp_path}/o/"]
    for extra, message in ((["--embeddings-dir", str(tmp_path / "nope")], "is not a folder"),
                           (["--device", "cuda:7"], "is not available"),
                           (["--embedding", str(tmp_path / "nope.safetensors")], "no --embedding file")):  # fmt: skip
        assert main([*base, *extra]) == 2
        one_error(capsys, message)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        save_file({"emb_params": torch.randn(1, 32)}, str(tmp_path / folder / "tok.safetensors"))
    loads = []
    monkeypatch.setattr("cli.main.load_pipeline", lambda *a, **k: loads.append(a) or load_pipeline(*a, **k))
    extra = ["--embedding", str(tmp_path / "a" / "tok.safetensors"), "--embeddings-dir", str(tmp_path / "b")]
    assert main([*base, *extra]) == 2
    one_error(capsys, "embedding ", "tok")
    assert len(loads) == 1 and not (tmp_path / "o").exists()


def test_prompt_file_lines_split_at_newlines_only_and_bad_bytes_fail_one_line(tmp_path):
    """Items 14 and 15: \\x0c, \\x85 and U+2028 are text inside a line (str.splitlines would split there and shift
    the numbers); a byte that is not UTF-8 fails its line only."""
    (tmp_path / "p.txt").write_bytes("a\x0cb --seed 1\nc\u2028d\ne\x85f\r\nbad \xff byte\ng\n".encode() + b"bad \xff\n")
    args = cli_main.parse_args(["--from-file", str(tmp_path / "p.txt")])
    jobs = cli_main.prompt_file_jobs(args)
    assert [n for n, _ in jobs] == [1, 2, 3, 4, 5, 6]
    assert [line.prompt for _, line in jobs[:5]] == ["a\x0cb", "c\u2028d", "e\x85f", "bad \xff byte", "g"]
    assert isinstance(jobs[5][1], str) and "not UTF-8" in jobs[5][1]


def test_an_upright_exif_orientation_is_applied(tmp_path):
    """Item 17: a JPEG stored 64x32 and shown 32x64 (EXIF orientation 6) is read as shown, as Diffusers' load_image."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (64, 32), "red").save(tmp_path / "sideways.jpg", exif=exif)
    assert image_to_tensor(tmp_path / "sideways.jpg", 8).shape == (1, 3, 64, 32)


def test_shard_numbers_are_ascii_digits(no_model, tmp_path, capsys):
    """Item 18: str.isdigit accepts superscripts, which int() does not."""
    (tmp_path / "p.txt").write_text("a fox\n")
    for spec in ("0/\u00b2", "\u00b2/3", "1/" + "9" * 5000):
        assert main([*no_model, "--from-file", str(tmp_path / "p.txt"), "--shard", spec]) == 2
        one_error(capsys, "--shard must be K/N")


def test_settings_and_prompts_that_overflow_are_bad_input_before_loading(no_model, tmp_path, capsys):
    """Items 19, 20 and 23: a mask blur PIL cannot take, an emphasis weight that overflows to inf, A1111 syntax errors,
    a 1x1 init image, --embeddings-dir a file, a missing --embedding or a folder named like one: one line, exit code
    2, no model loaded."""
    Image.new("RGB", (16, 16)).save(tmp_path / "init.png")
    Image.new("RGB", (1, 1)).save(tmp_path / "tiny.png")
    (tmp_path / "dir.safetensors").mkdir()
    os.mkfifo(tmp_path / "fifo.png")  # open() would wait for a writer
    init = ["--init-image", str(tmp_path / "init.png"), "--mask-image", str(tmp_path / "init.png")]
    cases = [(["--prompt", "x", *init, "--mask-blur", str(2**62)], "mask blur must be at most 4096"),
             (["--prompt", "(x:" + "9" * 400 + ")"], "emphasis weight overflows"),
             (["--prompt", "x", "--negative-prompt", "(x:1.2.3)"], "cannot read the prompt's A1111 syntax"),
             (["--prompt", "[a:b:1e999]"], "cannot read the prompt's A1111 syntax"),
             (["--prompt", "x", "--init-image", str(tmp_path / "tiny.png")], "init image is 1x1"),
             (["--prompt", "x", "--init-image", str(tmp_path / "fifo.png")], "not a file"),
             (["--prompt", "x", "--embeddings-dir", str(tmp_path / "init.png")], "is not a folder"),
             (["--prompt", "x", "--embedding", str(tmp_path / "no.safetensors")], "no --embedding file"),
             (["--prompt", "x", "--embedding", str(tmp_path / "dir.safetensors")], "is not a file")]  # fmt: skip
    for extra, message in cases:
        assert main([*no_model, "--output", str(tmp_path / "o.png"), *extra]) == 2
        one_error(capsys, message)


def test_trajectory_names_that_collide_are_refused(no_model, tmp_path, capsys):
    """Item 22: the trajectory may not be the output, the preview, nor an A1111-numbered name in the output folder."""
    out = str(tmp_path / "t.png")
    for extra in (["--output", out, "--trajectory", out],
                  ["--output", out, "--num-images", "2", "--trajectory", str(tmp_path / "t-1.png")],
                  ["--output", out, "--preview-every", "1", "--trajectory", str(tmp_path / "t.preview.png")],
                  ["--output", f"{tmp_path}/", "--trajectory", str(tmp_path / "00000-0.png")]):  # fmt: skip
        assert main([*no_model, "--prompt", "x", *extra]) == 2
        one_error(capsys, "would replace an output image or the preview")
    init = str(tmp_path / "init.png")
    Image.new("RGB", (16, 16)).save(init)  # (fuzzing) nor replace an input image
    for extra in (["--output", init], ["--output", out, "--trajectory", init]):
        assert main([*no_model, "--prompt", "x", "--init-image", init, *extra]) == 2
        one_error(capsys, "names the --init-image or --mask-image")
