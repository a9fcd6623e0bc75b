"""The fast path (fast_path.speed_up) against eager generate(), the reference the parity tests hold to Diffusers:
- the graph-ready loop (fast_path.GraphLoop: every UNet call one function of device tensors, all noise drawn first), run
  uncaptured on the CPU, gives the eager loop's latents bit for bit, for every sampler, seeded noise included;
- torch.compile of the UNet (inductor, as the CLI's --compile) gives images within 1e-4 of eager (float32);
- on CUDA: the captured loop (replayed CUDA graph) equals eager within 1e-4 and syncs nothing with the host.
The compile test costs one inductor compile of the tiny UNet: about 100 s on a 2-core CPU with a cold inductor
cache (~/.cache or /tmp/torchinductor_*), about 10 s with a warm one; the CLI test reuses the compiled graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cli.main import main
from conftest import assert_images_close, check_loop_never_syncs, max_diff
from fast_path import GraphLoop, speed_up
from min_pipeline import generate, load_pipeline

# The eager loop and the graph-ready loop on the same pipeline: pipe.fast_loop picks the loop (speed_up sets it).
CASES = [
    ("euler", {}),
    ("euler", {"guidance_scale": 1.0}),  # no CFG batch
    ("euler", {"karras": True}),
    ("euler_a", {}),  # a fresh ε per call
    ("heun", {}),  # two calls per step: predictor and corrector picked by torch.where
    ("dpmpp_2m", {}),  # first order at the first and last call
    ("dpmpp_2m", {"karras": True}),
    ("ddim", {}),
    ("ddim", {"eta": 0.7}),  # ε per call
    ("ddpm", {}),  # ε at every call but the last (t = 0)
]
KW = dict(prompt=["a red fox in snow", "a cat"], negative_prompt="blurry", steps=4, height=24, width=16, num_images=2,
          output_type="latent", progress=False)  # fmt: skip


GRAPH_LOOP = GraphLoop()  # one for the module's pipeline: later calls reuse its buffers, refilled


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.float32)


def both_loops(pipe, **settings) -> tuple[torch.Tensor, torch.Tensor]:
    pipe.fast_loop = None
    eager = generate(pipe, **settings)
    pipe.fast_loop = GRAPH_LOOP
    try:
        return eager, generate(pipe, **settings)
    finally:
        pipe.fast_loop = None


@pytest.mark.parametrize("sampler,extra", CASES, ids=[f"{s}-{'-'.join(e) or 'plain'}" for s, e in CASES])
def test_graph_ready_loop_equals_eager_loop(pipe, sampler, extra):
    for seed in (3, 4):  # the second call reuses the loop's buffers, refilled
        eager, graphed = both_loops(pipe, **{**KW, "scheduler": sampler, "seed": seed, **extra})
        assert torch.equal(graphed, eager), max_diff(graphed, eager)


def test_graph_ready_loop_equals_eager_loop_img2img(pipe):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 16, 3), dtype=np.uint8))
    eager, graphed = both_loops(pipe, **{**KW, "scheduler": "euler_a", "seed": 1, "init_image": init, "strength": 0.6})
    assert torch.equal(graphed, eager), max_diff(graphed, eager)


def test_eager_loop_keeps_prompt_editing_and_callbacks(pipe):
    """Prompt editing (two contexts over the steps) and callbacks take the eager loop even with the graph loop on."""
    calls = []
    settings = {**KW, "prompt": "a [fox:cat:2] in snow", "scheduler": "euler", "seed": 2}
    eager, graphed = both_loops(pipe, **settings)
    assert torch.equal(graphed, eager)
    pipe.fast_loop = GRAPH_LOOP
    try:
        generate(pipe, **settings, callback=calls.append)
    finally:
        pipe.fast_loop = None
    assert len(calls) == KW["steps"]


# One shape for the compiled UNet (dynamic=False: another shape would compile again): batch 1 with CFG, 24x16.
COMPILED = dict(prompt="a red fox in snow", negative_prompt="blurry", steps=3, height=24, width=16, seed=5)


@pytest.mark.slow
def test_compiled_unet_matches_eager(tiny_model_dir, pipe):
    eager = generate(pipe, **COMPILED, scheduler="euler_a", output_type="np", progress=False)
    fast = speed_up(load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.float32), cuda_graph=True)
    got = generate(fast, **COMPILED, scheduler="euler_a", output_type="np", progress=False)
    assert_images_close(got, eager, atol=1e-4)


@pytest.mark.slow
def test_cli_compile_runs(tiny_model_dir, tmp_path, capsys):
    size = ["--height", str(COMPILED["height"]), "--width", str(COMPILED["width"])]
    common = ["--model", str(tiny_model_dir), "--device", "cpu", "--prompt", COMPILED["prompt"], "--negative-prompt",
              COMPILED["negative_prompt"], "--steps", "3", "--seed", "5", "--quiet", *size]  # fmt: skip
    assert main([*common, "--output", str(tmp_path / "eager.png")]) == 0
    assert main([*common, "--compile", "--output", str(tmp_path / "compiled.png")]) == 0
    eager, compiled = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("eager", "compiled"))
    assert np.abs(eager - compiled).max() <= 1  # 8-bit images: a 1e-4 difference may round the other way


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs CUDA")
@pytest.mark.parametrize("sampler", ["euler_a", "heun", "dpmpp_2m", "ddpm"])
def test_cuda_graph_loop_matches_eager_and_never_syncs(tiny_model_dir, sampler):
    gpu = load_pipeline(str(tiny_model_dir), device="cuda", dtype=torch.float32)
    settings = {**KW, "scheduler": sampler, "seed": 7}
    eager = generate(gpu, **settings)
    speed_up(gpu, compile=False)  # on CUDA: the captured loop
    got = generate(gpu, **settings)
    torch.testing.assert_close(got, eager, atol=1e-4, rtol=0, msg=lambda m: f"{m}\n{max_diff(got, eager)}")
    check_loop_never_syncs(gpu)
