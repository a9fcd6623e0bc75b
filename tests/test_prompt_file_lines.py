"""Prompt files (issue 24 item 6): --output must be a folder there (a file name is refused, not silently turned into
a folder), a line's error is printed on its own line, not onto the progress bar, and --lora works per line (added
to the command line's), with its errors reported per line as the other options'."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from test_png_info import lora_file

from cli.main import main
from cli.png_info import read_parameters
from min_pipeline import generate, load_pipeline
from models.lora import apply_lora

FAST = ["--steps", "2", "--height", "16", "--width", "24", "--device", "cpu", "--dtype", "float32"]


def test_a_file_name_as_output_is_refused(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n")
    args = ["--model", str(tiny_model_dir), *FAST, "--quiet", "--from-file", str(prompts)]
    assert main([*args, "--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"min_pipeline.py: error: --from-file writes one image per line into a folder: give --output a "
                   f"folder ({tmp_path / 'x'}/), not the file name {tmp_path / 'x.png'}")  # fmt: skip
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.png").exists()
    assert main([*args, "--output", str(tmp_path / "x") + "/"]) == 0  # a folder is what it takes
    assert (tmp_path / "x" / "00001.png").is_file()


def test_errors_are_printed_on_their_own_line_not_on_the_bar(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a fox\nan owl --lora {tmp_path / 'bad.safetensors'}\na cat\n")
    assert main(["--model", str(tiny_model_dir), *FAST, "--from-file", str(prompts), "--output", f"{tmp_path}/o/"]) == 1
    err = capsys.readouterr().err
    assert "prompts:" in err  # the bar was drawn
    [line] = [line for line in err.split("\n") if "line 2: error" in line]
    assert line.split("\r")[-1].startswith(f"min_pipeline.py: {prompts} line 2: error: LoRA "), repr(line)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["00001.png", "00003.png"]  # the others went on


def test_lora_per_line(tiny_model_dir, tmp_path, capsys):
    """A line's --lora merges the file for that line only (with the command line's --lora), as the option does, and
    its PNG names it; a line's missing file is that line's error, before the model loads."""
    fox, owl = lora_file(tmp_path / "fox.safetensors", seed=1), lora_file(tmp_path / "owl.safetensors", seed=2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a fox --lora {fox}:0.7\na fox\na fox --lora {tmp_path / 'none.safetensors'}\n")
    args = ["--model", str(tiny_model_dir), *FAST, "--quiet", "--seed", "3", "--lora", f"{owl}:0.5"]
    assert main([*args, "--from-file", str(prompts), "--output", f"{tmp_path}/o/"]) == 1
    err = capsys.readouterr().err
    assert f"line 3: error: LoRA file {tmp_path / 'none.safetensors'} does not exist" in err
    pipe = load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.float32)
    apply_lora(pipe.unet, pipe.text_encoder, owl, 0.5)
    owl_only = np.asarray(generate(pipe, "a fox", steps=2, height=16, width=24, seed=3, progress=False)[0])
    apply_lora(pipe.unet, pipe.text_encoder, fox, 0.7)
    both = np.asarray(generate(pipe, "a fox", steps=2, height=16, width=24, seed=3, progress=False)[0])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o" / "00002.png")), owl_only)  # line 1's fox is gone
    line1 = Image.open(tmp_path / "o" / "00001.png")
    assert np.array_equal(np.asarray(line1), both) and not np.array_equal(both, owl_only)
    assert read_parameters(line1.text["parameters"])["prompt"] == "a fox <lora:owl:0.5> <lora:fox:0.7>"
