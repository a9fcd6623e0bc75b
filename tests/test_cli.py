"""The CLI as a user runs it, through a subprocess: a real PNG with its settings in a `parameters` chunk, and a
one-line error with exit code 2 (no traceback, no output file) for each kind of bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cli.main import main
from cli.png_info import read_parameters
from min_pipeline import generate, load_pipeline

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "min_pipeline.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_cli_writes_png_with_parameters(tiny_model_dir, tmp_path):
    out = tmp_path / "fox.png"
    args = [
        "--prompt",
        "a red fox, in snow",
        "--negative-prompt",
        "blurry",
        "--steps",
        "3",
        "--scheduler",
        "dpmpp_2m",
        "--karras",
        "--guidance-scale",
        "6",
        "--seed",
        "7",
        "--height",
        "24",
        "--width",
        "40",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--clip-skip",
        "2",
        "--output",
        str(out),
    ]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    assert "denoising" in result.stderr  # the progress bar
    image = Image.open(out)
    assert image.size == (40, 24) and image.mode == "RGB"
    params = read_parameters(image.text["parameters"])
    assert params["prompt"] == "a red fox, in snow" and params["negative_prompt"] == "blurry"
    assert params["Steps"] == "3" and params["Sampler"] == "DPM++ 2M" and params["Schedule type"] == "Karras"
    assert params["CFG scale"] == "6.0" and params["Seed"] == "7" and params["Size"] == "40x24"
    assert (
        params["Model"] == tiny_model_dir.name and params["Clip skip"] == "2"
    )  # the name, not the path  # A1111 counts from 1
    # The same settings through the API give the same pixels.
    pipe = load_pipeline(str(tiny_model_dir), device="cpu")
    again = generate(
        pipe,
        params["prompt"],
        params["negative_prompt"],
        scheduler="dpmpp_2m",
        karras=True,
        steps=int(params["Steps"]),
        guidance_scale=float(params["CFG scale"]),
        height=24,
        width=40,
        seed=int(params["Seed"]),
        clip_skip=1,
        progress=False,
    )[0]
    assert np.array_equal(np.asarray(again), np.asarray(image))


def test_cli_numbers_several_images_and_img2img(tiny_model_dir, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(init)
    result = run_cli(
        "--prompt",
        "x",
        "--steps",
        "2",
        "--num-images",
        "2",
        "--seed",
        "0",
        "--init-image",
        str(init),
        "--strength",
        "0.6",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--output",
        str(tmp_path) + "/",
    )
    assert result.returncode == 0, result.stderr
    paths = sorted(tmp_path.glob("0*.png"))
    assert [p.name for p in paths] == ["00000-0.png", "00001-1.png"]  # A1111-style numbers, then each image's seed
    image = Image.open(paths[0])
    assert image.size == (30, 20)
    params = read_parameters(image.text["parameters"])
    assert params["Denoising strength"] == "0.6" and params["Batch size"] == "2"


def test_parameters_round_trip_with_commas_and_newlines():
    from cli.png_info import parameters_text
    from settings import Settings

    settings = Settings(steps=20, scheduler="euler_a", seed=1)
    text = parameters_text(settings, "a, b\nc: d", "e, f", (512, 768), model="C:/models/sd, v1.5")
    params = read_parameters(text)
    assert params == {
        "prompt": "a, b\nc: d",
        "negative_prompt": "e, f",
        "Steps": "20",
        "Sampler": "Euler a",
        "CFG scale": "7.5",
        "Seed": "1",
        "Size": "512x768",
        "Model": "C:/models/sd, v1.5",
    }


def test_cli_creates_missing_output_folders(tiny_model_dir, tmp_path):
    out = tmp_path / "results" / "foxes" / "fox.png"
    args = ["--prompt", "x", "--steps", "1", "--height", "16", "--width", "16", "--device", "cpu", "--quiet"]
    assert main([*args, "--model", str(tiny_model_dir), "--output", str(out)]) == 0
    assert Image.open(out).size == (16, 16)


@pytest.fixture(scope="module")
def broken_dirs(tiny_model_dir, tmp_path_factory):
    """A model folder whose UNet weights have the wrong shape, and one without its UNet file."""
    root = tmp_path_factory.mktemp("broken")
    wrong = root / "wrong"
    shutil.copytree(tiny_model_dir, wrong)
    path = wrong / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["conv_in.weight"] = torch.zeros(3, 4, 3, 3)
    save_file(state, path)
    missing = root / "missing"
    shutil.copytree(tiny_model_dir, missing)
    (missing / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    vpred = root / "vpred"  # a v-prediction scheduler config (SD 2.x style), which our samplers do not implement
    shutil.copytree(tiny_model_dir, vpred)
    config_path = vpred / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "prediction_type": "v_prediction"}))
    return {"wrong": wrong, "missing": missing, "vpred": vpred}


BAD_INPUTS = {
    "height": (["--height", "500"], "height must be a multiple of 8"),
    "width": (["--width", "8192"], "width must be a multiple of 8 between 8 and 4096"),
    "steps": (["--steps", "0"], "steps must be between 1 and 999, got 0"),
    "strength-high": (["--strength", "1.5"], "strength must be in (0, 1]"),
    "strength-zero": (["--strength", "0"], "strength must be in (0, 1]"),
    "guidance": (["--guidance-scale", "-1"], "guidance scale must be >= 0"),
    "scheduler": (["--scheduler", "DPM fast"], "unknown scheduler 'DPM fast'"),  # A1111's, not ours ("PLMS" is pndm)
    "init-image": (["--init-image", "{tmp}/nope.png"], "cannot read init image"),
    "init-image-garbage": (["--init-image", "{tmp}/garbage.png"], "cannot read init image"),
    "model-folder": (["--model", "{tmp}/no-model"], "does not exist"),
    "model-files": (["--model", "{missing}"], "missing weights file"),
    "model-shape": (["--model", "{wrong}"], "conv_in.weight has shape (3, 4, 3, 3)"),
    "output-dir": (["--output", "{tmp}/garbage.png/x.png"], "cannot write to"),
    "output-suffix": (["--output", "{tmp}/x.jpg"], "must be a .png file name"),
    "pickle": (["--model", "{tmp}/model.ckpt"], "pickles, which can run arbitrary code"),
    "karras-ddim": (["--scheduler", "ddim", "--karras"], "karras"),
    "steps-not-int": (["--steps", "x"], "argument --steps: invalid int value"),
    "steps-too-many": (["--steps", "1000"], "steps must be between 1 and 999"),
    "eta": (["--scheduler", "ddim", "--eta", "1.5"], "eta must be in [0, 1]"),
    "clip-skip": (["--clip-skip", "4"], "clip skip must be between 0 and 2"),
    "device": (["--device", "cuda:7"], "is not available on this machine"),
    "unknown-device": (["--device", "gpu"], "unknown device 'gpu'"),
    "scheduler-config": (["--model", "{vpred}"], "unsupported scheduler/scheduler_config.json"),
    # Settings that were accepted and then did something else (fuzzing pass).
    "seed-huge": (["--seed", str(2**70)], "seed must be between 0 and 4294967295"),
    "seed-wraps": (["--seed", str(2**32)], "seed must be between 0 and 4294967295"),
    "seed-negative": (["--seed", "-2"], "seed must be between 0 and 4294967295 (or -1 for a random one)"),
    "guidance-nan": (["--guidance-scale", "nan"], "guidance scale must be a finite number"),
    "guidance-inf": (["--guidance-scale", "inf"], "guidance scale must be a finite number"),
    "strength-nan": (["--strength", "nan"], "strength must be a finite number"),
    "eta-nan": (["--scheduler", "ddim", "--eta", "nan"], "eta must be a finite number"),
    "eta-unused": (["--scheduler", "euler", "--eta", "0.7"], "eta is used by ddim only, not euler"),
    "negative-prompt-line": (["--prompt", "a cat\nNegative prompt: dog"], "may not start with 'Negative prompt:'"),
    "output-read-only": (["--output", "{tmp}/readonly.png"], "exists and is read-only"),
    "init-image-huge": (["--init-image", "{tmp}/huge.png"], "is 8000x8000: larger than 4096 pixels per side"),
}


def bad_input_args(case: str, tiny_model_dir: Path, broken_dirs, tmp_path: Path) -> list[str]:
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04 pretend pickle")
    if case == "output-read-only":
        (tmp_path / "readonly.png").write_bytes(b"keep me")
        (tmp_path / "readonly.png").chmod(0o444)
    if case == "init-image-huge":  # refused from its header, before its 64 MB of pixels are decoded
        Image.new("L", (8000, 8000)).save(tmp_path / "huge.png")
    extra, _ = BAD_INPUTS[case]
    fill = {"tmp": tmp_path, **broken_dirs}
    extra = [a.format(**fill) for a in extra]
    model = [] if "--model" in extra else ["--model", str(tiny_model_dir)]
    out = tmp_path / "out.png"
    return [
        "--prompt",
        "x",
        "--steps",
        "2",
        "--height",
        "16",
        "--width",
        "16",
        "--device",
        "cpu",
        "--output",
        str(out),
        *model,
        *extra,
    ]


def check_one_line_error(case: str, code: int, stderr: str, tmp_path: Path) -> None:
    assert code == 2, (code, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("min_pipeline.py: error: "), stderr
    assert BAD_INPUTS[case][1].lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in stderr
    assert not (tmp_path / "out.png").exists() and not list(tmp_path.glob(".*.tmp"))
    if case == "output-read-only":
        assert (tmp_path / "readonly.png").read_bytes() == b"keep me"


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2(case, tiny_model_dir, broken_dirs, tmp_path, capsys):
    """In-process through main() (a subprocess per case would spend most of its time importing torch)."""
    try:
        code = main(bad_input_args(case, tiny_model_dir, broken_dirs, tmp_path))
    except SystemExit as e:  # argparse's own errors exit from parse_args
        code = e.code
    check_one_line_error(case, code, capsys.readouterr().err, tmp_path)


@pytest.mark.parametrize("case", ["height", "model-shape", "init-image-garbage", "steps-not-int", "seed-huge"])
def test_cli_bad_input_through_subprocess(case, tiny_model_dir, broken_dirs, tmp_path):
    result = run_cli(*bad_input_args(case, tiny_model_dir, broken_dirs, tmp_path))
    check_one_line_error(case, result.returncode, result.stderr, tmp_path)


def test_long_prompt_warns_with_dropped_words(tiny_model_dir, tmp_path):
    """Only with --plain-prompt (Diffusers' reading); A1111's reading takes any length."""
    prompt = "a cat " * 40 + "and finally a purple giraffe"
    result = run_cli(
        "--prompt",
        prompt,
        "--steps",
        "1",
        "--height",
        "16",
        "--width",
        "16",
        "--device",
        "cpu",
        "--model",
        str(tiny_model_dir),
        "--plain-prompt",
        "--output",
        str(tmp_path / "o.png"),
    )
    assert result.returncode == 0, result.stderr
    assert "purple giraffe" in result.stderr and "77" in result.stderr


def test_help_documents_defaults():
    result = run_cli("--help")
    assert result.returncode == 0
    text = "".join(result.stdout.split())  # argparse wraps lines at the terminal width
    for option in (
        "--prompt",
        "--scheduler",
        "(default:euler)",
        "--steps",
        "(default:30)",
        "--guidance-scale",
        "(default:7.5)",
        "(default:stable-diffusion-v1-5/stable-diffusion-v1-5)",
        "(default:out.png)",
    ):
        assert option in text, option


def test_prompt_file_runs_each_line_reports_bad_ones_shards_and_resumes(tiny_model_dir, tmp_path, capsys):
    lines = ["a red fox --seed 3 --steps 2", "", "an owl --negative-prompt 'blurry, dark' --steps 1 --width 24",
             "a cat --steps x", "(a dog:1.2) BREAK in snow --scheduler ddim --steps 2"]  # fmt: skip
    (tmp_path / "prompts.txt").write_text("\n".join(lines))
    out = tmp_path / "out"
    base = ["--model", str(tiny_model_dir), "--device", "cpu", "--quiet", "--height", "16", "--width", "16"]
    base += ["--from-file", str(tmp_path / "prompts.txt"), "--output", f"{out}/"]
    assert main(base) == 1  # one line failed, the others ran
    err = capsys.readouterr().err
    assert "prompts.txt line 4: error: --steps 'x' is not a number" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["00001.png", "00003.png", "00005.png"]
    first, third, fifth = (
        read_parameters(Image.open(out / n).text["parameters"]) for n in ("00001.png", "00003.png", "00005.png")
    )
    assert (first["prompt"], first["Seed"], first["Steps"]) == ("a red fox", "3", "2")
    assert (third["negative_prompt"], third["Steps"], third["Size"]) == ("blurry, dark", "1", "24x16")
    assert (fifth["prompt"], fifth["Sampler"]) == ("(a dog:1.2) BREAK in snow", "DDIM")  # as typed
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (tmp_path / "prompts.txt").write_text("\n".join(lines[:3] + ["a cat --steps 1"] + lines[4:]))
    assert main([*base, "--skip-existing"]) == 0  # resumes: only the missing line 4 runs
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in before} == before
    assert (out / "00004.png").exists()
    shard = tmp_path / "shard"
    assert main([*base[:-1], f"{shard}/", "--shard", "1/2"]) == 0  # lines 1, 3, 5 (4 is even)
    assert sorted(p.name for p in shard.iterdir()) == ["00001.png", "00003.png", "00005.png"]


def test_prompt_file_bad_lines_and_lora_weights_are_reported_not_leaked(tiny_model_dir, tmp_path, capsys):
    """Fuzzing findings: an unclosed quote, an unknown option, options-only lines (A1111's own format), a
    non-finite LoRA weight, and a failed line's LoRA leaking into the next line."""
    lines = ['a cat --negative-prompt "ugly', "a cat --model /etc", '--prompt "an owl" --seed 3 --steps 1',
             "x <lora:nope:nan>", "a fox --steps 1"]  # fmt: skip
    (tmp_path / "p.txt").write_text("\n".join(lines))
    (tmp_path / "nope.safetensors").write_bytes(b"")
    base = ["--model", str(tiny_model_dir), "--device", "cpu", "--quiet", "--height", "16", "--width", "16"]
    out = tmp_path / "out"
    assert (
        main([*base, "--from-file", str(tmp_path / "p.txt"), "--lora-dir", str(tmp_path), "--output", f"{out}/"]) == 1
    )
    err = capsys.readouterr().err
    assert "p.txt line 1: error: cannot read the line: No closing quotation" in err
    assert "p.txt line 2: error: cannot read the line: unrecognized arguments: --model /etc" in err
    assert "p.txt line 4: error: LoRA weight 'nan' of " in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["00003.png", "00005.png"]
    params = read_parameters(Image.open(out / "00003.png").text["parameters"])
    assert (params["prompt"], params["Seed"], params["Steps"]) == ("an owl", "3", "1")
    assert main([*base, "--prompt", "x", "--shard", "0/2"]) == 2
    assert "--shard and --skip-existing work with --from-file" in capsys.readouterr().err
