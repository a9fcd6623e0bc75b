"""--dtype auto (resources.auto_dtype) and bfloat16 on the CPU against Diffusers in bfloat16.

auto: float16 on CUDA, bfloat16 on a CPU with AMX, float32 elsewhere; the suite's other tests pin float32 (conftest's
float32_by_default), so these patch resources.cpu_has_amx themselves. bfloat16 has 8 mantissa bits: ours and Diffusers
round differently inside the networks (other op order, fused attention), so the comparison is at a stated tolerance,
not to round-off: one UNet call relative to the output's scale, and whole images in 8-bit levels.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import resources
from cli.main import main
from conftest import max_diff, run_both
from min_pipeline import generate, load_pipeline

ONEDNN_BF16 = pytest.mark.skipif(not resources.onednn_runs_bfloat16(), reason="oneDNN cannot run bf16 on this CPU")


@pytest.mark.parametrize("amx,want", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_picks_bfloat16_only_on_a_cpu_with_amx(monkeypatch, tiny_model_dir, amx, want):
    monkeypatch.setattr(resources, "cpu_has_amx", lambda: amx)
    assert resources.auto_dtype(torch.device("cpu"))[0] == want
    assert resources.auto_dtype(torch.device("cuda"))[0] == torch.float16  # whatever the CPU
    assert load_pipeline(str(tiny_model_dir), device="cpu").dtype == want
    assert load_pipeline(str(tiny_model_dir), device="cpu", dtype="auto").dtype == want


def test_cli_says_what_auto_picked(monkeypatch, tiny_model_dir, tmp_path, capsys):
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--quiet", "--prompt", "a fox", "--steps", "1"]
    args += ["--height", "16", "--width", "16", "--output", str(tmp_path / "o.png")]
    monkeypatch.setattr(resources, "cpu_has_amx", lambda: True)
    assert main(args) == 0
    assert "--dtype auto: bfloat16 (this CPU has AMX)" in capsys.readouterr().err
    monkeypatch.setattr(resources, "cpu_has_amx", lambda: False)
    assert main(args) == 0
    assert "--dtype auto" not in capsys.readouterr().err  # the float32 reference goes without saying


@pytest.fixture(scope="module")
def bf16_pair(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16, safety_checker=None,
                                                  requires_safety_checker=False)  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    return load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.bfloat16), ref


def test_bfloat16_unet_call_close_to_diffusers_bfloat16(bf16_pair):
    """One CFG-batch UNet call, same bf16 weights and inputs: within 2% of the output's largest magnitude (measured
    on the tiny model on an AMX Xeon: 1.4% with the fused linear layers, 0.97% before them; without
    channels_last and the fused layers, 0: the same bits)."""
    ours, ref = bf16_pair
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 12, 20, generator=g).bfloat16()
    context = torch.randn(2, 77, ours.unet.config.cross_attention_dim, generator=g).bfloat16()
    with torch.inference_mode():
        got = ours.unet(x, torch.tensor(500.0), context).float()
        want = ref.unet(x, torch.tensor(500.0), encoder_hidden_states=context).sample.float()
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, atol=0.02 * scale, rtol=0, msg=lambda m: f"{m}\n{max_diff(got, want)}")


def test_bfloat16_images_close_to_diffusers_bfloat16(bf16_pair):
    """Whole images, 4 Euler steps at 24x40: the mean 8-bit difference under 2 levels and none over 16 levels
    (measured on the tiny model on an AMX Xeon: mean 1.17, max 6.5; without channels_last and the fused linear
    layers 0.34 and 2)."""
    ours, ref = bf16_pair
    got, want = run_both(ours, ref, "a red fox in snow", "blurry", steps=4, height=24, width=40, seed=3)
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64)) * 255
    assert diff.mean() < 2.0 and diff.max() < 16, (diff.mean(), diff.max())


def page_flags(t: torch.Tensor) -> np.ndarray:
    """/proc/self/pagemap's top 3 bits (present, swapped, file page) for each page of `t`'s storage."""
    page, s = 4096, t.untyped_storage()
    first, last = s.data_ptr() // page, -(-(s.data_ptr() + s.nbytes()) // page)
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        entries = os.pread(f.fileno(), 8 * (last - first), 8 * first)
    return np.frombuffer(entries, dtype=np.uint64) >> np.uint64(61)


@pytest.mark.skipif(not os.access("/proc/self/pagemap", os.R_OK), reason="needs Linux's /proc/self/pagemap")
def test_bfloat16_weights_come_from_a_converted_copy_that_leaves_rss(tiny_model_dir, tmp_path, monkeypatch):
    """bf16 from float32 files: the first load writes a bf16 copy per file, later loads map it. The weights are then
    file pages (release_pages takes them out of RSS, as for float32: the peak of a 512x512 bf16 run fell from 3.56
    to 2.52 GB, bench/README.md), equal bit for bit to converting in memory (MINSD_CACHE=off), conv weights
    channels_last, and the images are the same."""
    monkeypatch.setenv("MINSD_CACHE", "off")
    plain = load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.bfloat16)
    monkeypatch.setenv("MINSD_CACHE", str(tmp_path / "cache"))
    first = load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.bfloat16)
    copies = sorted((tmp_path / "cache").iterdir())
    assert [p.name.split("-")[:2] for p in copies] == [["diffusion_pytorch_model", "bfloat16"]] * 2 + [
        ["model", "bfloat16"]
    ]
    stamps = [p.stat().st_mtime_ns for p in copies]
    second = load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.bfloat16)
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "cache").iterdir())] == stamps  # mapped, not rewritten
    for net in ("text_encoder", "unet", "vae"):
        want = getattr(plain, net).state_dict()
        for pipe in (first, second):
            got = getattr(pipe, net).state_dict()
            assert all(torch.equal(got[k], want[k]) and got[k].stride() == want[k].stride() for k in want), net
    assert second.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    kwargs = dict(steps=2, height=24, width=40, seed=3, progress=False, output_type="np")
    images = [generate(p, "a red fox", "blurry", **kwargs) for p in (plain, first, second)]
    assert np.array_equal(images[0], images[1]) and np.array_equal(images[0], images[2])
    params = list(second.unet.parameters())
    resources.release_pages(second.unet)  # after generate() read every weight
    assert all(((page_flags(p) == 0b101) | (page_flags(p) <= 0b001)).all() for p in params)  # file pages only
    assert all((page_flags(p) >> np.uint64(2) == 0).all() for p in params)  # and none left in RSS


def test_an_unwritable_cache_converts_in_memory_with_a_warning(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MINSD_CACHE", str(tmp_path / "file"))  # not a folder: mkdir fails
    with pytest.warns(UserWarning, match="cannot keep a bfloat16 copy of .* converting it at each load"):
        pipe = load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.bfloat16)
    assert pipe.unet.conv_in.weight.dtype == torch.bfloat16
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


@ONEDNN_BF16
def test_prepacked_convolutions_give_the_plain_convolutions_bits(tiny_model_dir):
    """load_pipeline packs the bf16 UNet's conv weights for oneDNN once (resources.prepack_for_onednn): the same
    output bit for bit; a weight replaced by another tensor (as a LoRA merge does) is packed again; release_pages
    drops the packed copies and the next call makes them again."""
    pipe = load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.bfloat16)
    convs = [m for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(isinstance(m.__dict__.get("forward"), resources.PackedConv) for m in convs)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 12, 20, generator=g).bfloat16()
    context = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g).bfloat16()

    def call(packed: bool) -> torch.Tensor:
        saved = {m: m.__dict__.pop("forward") for m in convs} if not packed else {}
        with torch.inference_mode():
            out = pipe.unet(x, torch.tensor(500.0), context)
        for m, forward in saved.items():
            m.forward = forward
        return out

    torch.testing.assert_close(call(True), call(False), atol=0, rtol=0)
    assert all(m.forward.packed is not None for m in convs)
    conv = pipe.unet.conv_in
    conv.weight.data = (conv.weight.float() * 1.5).bfloat16().contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(call(True), call(False), atol=0, rtol=0)
    resources.release_pages(pipe.unet)
    assert all(m.forward.packed is None for m in convs)
    torch.testing.assert_close(call(True), call(False), atol=0, rtol=0)


@ONEDNN_BF16
def test_packed_linear_layers_round_like_bfloat16_and_follow_their_weights(tiny_model_dir):
    """load_pipeline runs the bf16 UNet's linear layers through oneDNN with prepacked weights, the bias and GEGLU's
    GELU and product fused (resources.PackedLinear, PackedGEGLU). Each layer against the same layer in float32: within
    bfloat16 rounding (rtol 2^-7), as close as the plain bf16 layer is; a replaced weight (a LoRA merge) is packed
    again; release_pages drops the packed copies."""
    pipe = load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.bfloat16)
    layers = [m for m in pipe.unet.modules() if isinstance(m.__dict__.get("forward"), resources.Packed)]
    linears = [m for m in layers if isinstance(m.forward, resources.PackedLinear)]
    gegelus = [m for m in layers if isinstance(m.forward, resources.PackedGEGLU)]
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in pipe.unet.modules())
    assert gegelus and len(linears) + len(gegelus) == n_linear  # every Linear, GEGLU's proj inside its GEGLU
    g = torch.Generator().manual_seed(0)

    def check(layer: torch.nn.Module) -> None:
        fused, plain = layer.forward, type(layer).forward
        x = torch.randn(2, 7, layer.proj.in_features if hasattr(layer, "proj") else layer.in_features, generator=g)
        with torch.inference_mode():
            got, eager = fused(x.bfloat16()).float(), plain(layer, x.bfloat16()).float()
            saved = {k: v.data for k, v in layer.named_parameters()}
            for v in layer.parameters():
                v.data = v.data.float()
            want = plain(layer, x.bfloat16().float())  # the same bf16 weights and input, in float32
            for k, v in layer.named_parameters():
                v.data = saved[k]
        scale = want.abs().max().item()
        tol = dict(rtol=2**-7, atol=2**-7 * scale, msg=lambda m: f"{m}\n{max_diff(got, want)}")
        torch.testing.assert_close(got, want, **tol)
        assert (got - want).abs().max() <= 2 * (eager - want).abs().max() + 1e-6 * scale

    for layer in linears[:4] + gegelus:
        check(layer)
    layer = gegelus[0]
    old = layer.forward.packed
    layer.proj.weight.data = (layer.proj.weight.float() * 1.5).bfloat16()  # replaced, as a LoRA merge does
    check(layer)
    assert layer.forward.packed is not old
    resources.release_pages(pipe.unet)
    assert all(m.forward.packed is None for m in layers)
    check(layer)


def test_no_packing_where_onednn_cannot_run_bfloat16(tiny_model_dir, monkeypatch):
    """On a CPU where oneDNN refuses bfloat16 (AVX2 only: its ops raise there), load_pipeline installs no packed
    layers and the bf16 UNet runs PyTorch's own ops: the output equals the same model's with the packs taken out."""
    monkeypatch.setattr(resources, "onednn_runs_bfloat16", lambda: False)
    pipe = load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.bfloat16)
    assert not any(isinstance(m.__dict__.get("forward"), resources.Packed) for m in pipe.unet.modules())
    monkeypatch.undo()
    packed = load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.bfloat16)
    for m in packed.unet.modules():
        m.__dict__.pop("forward", None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 12, 20, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    context = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g).bfloat16()
    with torch.inference_mode():
        got, want = pipe.unet(x, torch.tensor(500.0), context), packed.unet(x, torch.tensor(500.0), context)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
