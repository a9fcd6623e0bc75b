"""The CLI's seeds and clip skip as A1111 counts them (issue 24, items 1-3): a random seed by default, image i of a
batch with seed + i and its own PNG record, and --clip-skip in A1111's numbering, while generate() keeps its
reproducible seed 0, Diffusers' batch draw and Diffusers' clip skip numbering."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from cli.main import main, parse_args
from cli.png_info import read_parameters
from min_pipeline import generate, load_pipeline

FAST = ["--steps", "2", "--height", "16", "--width", "24", "--device", "cpu", "--dtype", "float32", "--quiet"]
KW = dict(steps=2, height=16, width=24, progress=False)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.float32)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def params(path) -> dict[str, str]:
    return read_parameters(Image.open(path).text["parameters"])


def test_the_default_seed_is_random_printed_recorded_and_reproducible(tiny, tiny_model_dir, tmp_path, capsys):
    assert parse_args(["--prompt", "x"]).seed == -1
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "(default: -1)" in " ".join(capsys.readouterr().out.split())  # --help shows it
    seeds = []
    for name in ("a.png", "b.png"):
        assert main(["--model", str(tiny_model_dir), *FAST, "--prompt", "a fox", "--output", str(tmp_path / name)]) == 0
        printed = re.findall(r"^seed: (\d+)$", capsys.readouterr().err, re.MULTILINE)
        seed = int(params(tmp_path / name)["Seed"])
        assert printed == [str(seed)] and 0 <= seed < 2**32
        want = generate(tiny, "a fox", seed=seed, **KW)[0]
        assert np.array_equal(pixels(tmp_path / name), np.asarray(want))
        seeds.append(seed)
    assert seeds[0] != seeds[1]  # drawn anew (1 chance in 2**32 of a false failure)


def test_a_batch_gives_image_i_the_seed_plus_i_and_records_it(tiny, tiny_model_dir, tmp_path):
    args = ["--model", str(tiny_model_dir), *FAST, "--prompt", "a fox", "--num-images", "2", "--seed", "8"]
    assert main([*args, "--output", f"{tmp_path}/out/"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000-8.png", "00001-9.png"]  # A1111's names
    assert main([*args, "--output", str(tmp_path / "x.png"), "--trajectory", str(tmp_path / "t.gif")]) == 0
    for seed, folder_file, file in ((8, "00000-8.png", "x-0.png"), (9, "00001-9.png", "x-1.png")):
        want = np.asarray(generate(tiny, "a fox", seed=seed, num_images=1, **KW)[0])
        for path in (tmp_path / "out" / folder_file, tmp_path / file):
            assert params(path)["Seed"] == str(seed) and params(path)["Batch size"] == "2"  # as A1111 writes
            assert np.array_equal(pixels(path), want), (path, seed)
    assert Image.open(tmp_path / "t.gif").n_frames == 2  # the trajectory follows the first image's 2 steps
    # generate(num_images=2) keeps Diffusers' batch draw: its second image is not seed 9's.
    batch = generate(tiny, "a fox", seed=8, num_images=2, **KW)
    assert not np.array_equal(np.asarray(batch[1]), pixels(tmp_path / "x-1.png"))


def test_a_batch_whose_last_seed_would_pass_the_range_is_refused(tiny_model_dir, tmp_path, capsys):
    args = ["--model", str(tmp_path / "no-model"), *FAST, "--prompt", "x", "--output", str(tmp_path / "o.png")]
    assert main([*args, "--num-images", "2", "--seed", str(2**32 - 1)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("min_pipeline.py: error: --seed 4294967295 with --num-images 2") and "\n" not in err


def test_clip_skip_counts_as_a1111_on_the_command_line(tiny, tiny_model_dir, tmp_path, capsys):
    args = ["--model", str(tiny_model_dir), *FAST, "--prompt", "a fox", "--seed", "3"]
    for a1111, diffusers in (("2", 1), ("1", None)):
        out = tmp_path / f"skip{a1111}.png"
        assert main([*args, "--clip-skip", a1111, "--output", str(out)]) == 0
        want = np.asarray(generate(tiny, "a fox", seed=3, clip_skip=diffusers, **KW)[0])
        assert np.array_equal(pixels(out), want), a1111
        assert params(out).get("Clip skip") == (a1111 if diffusers else None)  # A1111 omits clip skip 1
    assert not np.array_equal(pixels(tmp_path / "skip1.png"), pixels(tmp_path / "skip2.png"))
    capsys.readouterr()
    for bad in ("0", "13"):
        assert main([*args, "--clip-skip", bad, "--output", str(tmp_path / "bad.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"min_pipeline.py: error: --clip-skip must be between 1 (no layer skipped) and 12 (A1111's " \
            f"numbering), got {bad}"  # fmt: skip
    assert not (tmp_path / "bad.png").exists()
