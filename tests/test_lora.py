"""LoRA files (models/lora.py): merged weights equal Diffusers' `load_lora_weights` + `fuse_lora` (PEFT) format by
format, equal the LoRA forward pass they replace (A1111's `up(down(x)) * scale`), and images equal the fused Diffusers
pipeline's.

No LoRA files are at hand, so each test writes random ones in the real key formats (the writers below): Kohya/A1111
with Diffusers-style and LDM-style UNet names (the LDM writer is test_single_file's independent one), LoCon convs and
their Tucker form, Diffusers/PEFT with its header metadata, and the older Diffusers names.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_single_file import rename_all, unet_to_ldm
from torch import nn

from conftest import assert_images_close, max_diff, run_both, with_scheduler
from min_pipeline import load_pipeline
from models import ldm
from models.loading import WeightsError
from models.lora import MAX_NAME, apply_lora, ldm_name, remove_loras

pytest.importorskip("peft")
RANK = 4
NETS = ("unet", "text_encoder")
# Diffusers' Kohya converter (lora_conversion_utils._maybe_map_sgm_blocks_to_diffusers) takes the LDM upsampler of a
# level without attention, `output_blocks.N.1.conv`, for an attention: those layers are checked against the formula.
DIFFUSERS_MISNAMES = {"up_blocks.0.upsamplers.0.conv"}


def ours(folder, dtype=torch.float32):
    with warnings.catch_warnings():  # half precision on a CPU warns that it is slow
        warnings.simplefilter("ignore")
        return load_pipeline(str(folder), device="cpu", dtype=dtype)


def reference(folder):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


def weights(pipe) -> dict[str, torch.Tensor]:
    """Every parameter of our UNet and text encoder, as `unet.<name>` / `text_encoder.<name>`."""
    return {f"{n}.{k}": v for n in NETS for k, v in getattr(pipe, n).state_dict().items()}


def reference_weights(ref) -> dict[str, torch.Tensor]:
    te = {"text_encoder." + k.removeprefix("text_model."): v for k, v in ref.text_encoder.state_dict().items()}
    return {"unet." + k: v for k, v in ref.unet.state_dict().items()} | te


def layers(pipe, kinds=(nn.Linear, nn.Conv2d), only: str = "") -> list[tuple[str, str]]:
    """(network, layer) for every layer of `kinds` whose name contains `only`."""
    return [
        (n, name) for n in NETS for name, m in getattr(pipe, n).named_modules() if isinstance(m, kinds) and only in name
    ]


def random_lora(pipe, targets, seed: int, varied: bool = True, tucker: bool = False, flat_1x1: bool = False) -> dict:
    """(network, layer) -> {"down", "up", ["mid"], ["alpha"]}. `varied`: two ranks, alphas given, missing or odd;
    else rank RANK and alpha RANK / 2 everywhere (what Diffusers' Kohya loader gets right: it drops per-layer alphas).
    LoCon shapes: down (r, in, kh, kw), up (out, r, 1, 1); Tucker: down (r, in, 1, 1), mid (r, r, kh, kw);
    `flat_1x1`: 1x1 convs with 2-D pairs, as some trainers save them."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for i, (net, layer) in enumerate(targets):
        out, inp, *kernel = getattr(pipe, net).get_submodule(layer).weight.shape
        r = RANK if i % 3 or not varied else RANK // 2
        ones = [1] * len(kernel)
        if flat_1x1 and kernel == [1, 1]:
            kernel = ones = []
        parts = {
            "down": torch.randn(r, inp, *kernel, generator=g) / inp**0.5,
            "up": torch.randn(out, r, *ones, generator=g),
        }
        if tucker and kernel not in ([], [1, 1]):
            parts |= {
                "down": torch.randn(r, inp, 1, 1, generator=g) / inp**0.5,
                "mid": torch.randn(r, r, *kernel, generator=g) / r,
            }
        if not varied:
            parts["alpha"] = torch.tensor(RANK / 2)
        elif i % 4:
            parts["alpha"] = torch.tensor(float(r * (i % 4)) / 2)  # alpha missing = r
        lora[net, layer] = parts
    return lora


# ----------------------------------------------------------------------------- the formats (writers)


def kohya(lora: dict, ldm_names: dict | None = None) -> dict:
    """`lora_unet_<layer>` / `lora_te_text_model_<layer>`, dots as underscores; UNet layers in LDM's names if given."""
    state = {}
    for (net, layer), parts in lora.items():
        name = (ldm_names or {}).get(layer, layer) if net == "unet" else "text_model." + layer
        prefix = "lora_unet_" if net == "unet" else "lora_te_"
        roles = {"down": "lora_down.weight", "up": "lora_up.weight", "mid": "lora_mid.weight", "alpha": "alpha"}
        state |= {f"{prefix}{name.replace('.', '_')}.{roles[k]}": v for k, v in parts.items()}
    return state


def ldm_layer_names(folder) -> dict[str, str]:
    """Our UNet layer -> its LDM name, through test_single_file's writer of LDM checkpoints."""
    from models.loading import load_safetensors

    state = load_safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors")
    weights = [k for k in state if k.endswith(".weight")]
    return {
        k.removesuffix(".weight"): v.removesuffix(".weight")
        for k, v in zip(weights, rename_all({k: None for k in weights}, unet_to_ldm(state)), strict=True)
    }


def peft(lora: dict) -> tuple[dict, dict]:
    """Diffusers >= 0.22: `unet.<layer>.lora_A.weight`, `text_encoder.text_model.<layer>.lora_B.weight`; ranks and
    alphas in the header metadata as Diffusers' save_lora_weights writes it (PEFT LoraConfig fields per network)."""
    state, metadata = {}, {}
    for net in NETS:
        mine = {
            ("text_model." if net == "text_encoder" else "") + layer: p for (n, layer), p in lora.items() if n == net
        }
        for layer, parts in mine.items():
            state |= {f"{net}.{layer}.lora_A.weight": parts["down"], f"{net}.{layer}.lora_B.weight": parts["up"]}
        ranks = {layer: p["down"].shape[0] for layer, p in mine.items()}
        alphas = {layer: float(p["alpha"]) if "alpha" in p else ranks[layer] for layer, p in mine.items()}
        r, alpha = (Counter(values.values()).most_common(1)[0][0] for values in (ranks, alphas))
        metadata |= {f"{net}.r": r, f"{net}.lora_alpha": alpha,
                     f"{net}.target_modules": [layer.removeprefix("text_model.") for layer in mine],
                     f"{net}.rank_pattern": {k: v for k, v in ranks.items() if v != r},
                     f"{net}.alpha_pattern": {k: v for k, v in alphas.items() if v != alpha}}  # fmt: skip
    return state, {"lora_adapter_metadata": json.dumps(metadata)}


def old_diffusers(lora: dict) -> dict:
    """Diffusers 0.14-0.21: attention processors (`attn1.processor.to_q_lora.down.weight`, the text encoder's
    `self_attn.to_q_lora`), `lora_linear_layer` for the text encoder's MLP, `.lora.down` for other UNet layers; no
    alphas."""
    state = {}
    for (net, layer), parts in lora.items():
        head, _, last = layer.removesuffix(".0").rpartition(".")
        if net == "unet" and ".attn" in head and last.startswith("to_"):
            name = f"unet.{head}.processor.{last}_lora."
        elif net == "unet":
            name = f"unet.{layer}.lora."
        elif head.endswith("self_attn"):
            name = f"text_encoder.text_model.{head}.to_{last.removesuffix('_proj')}_lora."
        else:
            name = f"text_encoder.text_model.{layer}.lora_linear_layer."
        state |= {name + "down.weight": parts["down"], name + "up.weight": parts["up"]}
    return state


def write(path, state: dict, metadata: dict | None = None):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def no_alpha(lora: dict) -> dict:
    return {k: {r: t for r, t in p.items() if r != "alpha"} for k, p in lora.items()}


# ----------------------------------------------------------------------------- the checks


def lora_forward(module: nn.Module, parts: dict, x: torch.Tensor) -> torch.Tensor:
    """The unmerged LoRA branch, B(A(x)) (A1111's network_lora: down as the layer's conv, up as a 1x1 conv; Tucker:
    1x1 down, mid as the layer's conv, 1x1 up), float64."""
    if isinstance(module, nn.Linear):
        return x @ parts["down"].double().T @ parts["up"].double().T
    conv = dict(stride=module.stride, padding=module.padding)
    down, up = parts["down"].double(), parts["up"].double()
    down, up = down.reshape(*down.shape[:2], *down.shape[2:] or (1, 1)), up.reshape(*up.shape[:2], 1, 1)
    if "mid" in parts:
        return F.conv2d(F.conv2d(F.conv2d(x, down), parts["mid"].double(), **conv), up)
    return F.conv2d(F.conv2d(x, down, **conv), up)


def assert_merged_like_forward(pipe, before: dict, lora: dict, strength: float) -> None:
    """For each layer, (W' - W) x = strength * alpha / r * B(A(x)) on a random input: the merge is the forward it
    replaces. Every other parameter is untouched."""
    after = weights(pipe)
    touched = {f"{net}.{layer}.weight" for net, layer in lora}
    assert all(torch.equal(after[k], before[k]) for k in before if k not in touched)
    for (net, layer), parts in lora.items():
        module = getattr(pipe, net).get_submodule(layer)
        dw = after[f"{net}.{layer}.weight"].double() - before[f"{net}.{layer}.weight"].double()
        x = torch.randn(2, dw.shape[1], *([9, 9] if dw.ndim == 4 else []), dtype=torch.float64)
        got = x @ dw.T if dw.ndim == 2 else F.conv2d(x, dw, stride=module.stride, padding=module.padding)
        r = parts["down"].shape[0]
        want = strength * float(parts.get("alpha", r)) / r * lora_forward(module, parts, x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=lambda m, k=layer: f"{k}: {m}")


def assert_weights_equal_reference(pipe, ref, atol: float = 1e-6) -> None:
    got, want = weights(pipe), reference_weights(ref)
    assert got.keys() == want.keys()
    bad = {k: max_diff(got[k], want[k]) for k in got if not torch.allclose(got[k], want[k], atol=atol, rtol=2e-6)}
    assert not bad, f"{len(bad)} tensors differ from Diffusers', e.g. {list(bad.items())[:3]}"


def fused_reference(folder, files: list, strengths: list[float]):
    """Diffusers with each LoRA loaded, fused at its strength and unloaded in turn (the fused weights stay)."""
    ref = reference(folder)
    for file, strength in zip(files, strengths, strict=True):
        ref.load_lora_weights(str(file))
        ref.fuse_lora(lora_scale=strength)
        ref.unload_lora_weights()
    return ref


# ----------------------------------------------------------------------------- merged weights, format by format

FORMATS = ["kohya", "kohya-ldm", "peft", "old-diffusers"]


def write_format(fmt: str, folder, pipe, lora: dict, path):
    if fmt == "kohya":
        return write(path, kohya(lora))
    if fmt == "kohya-ldm":
        return write(path, kohya(lora, ldm_layer_names(folder)))
    if fmt == "peft":
        return write(path, *peft(lora))
    return write(path, old_diffusers(lora))


def format_lora(fmt: str, pipe, seed: int, for_diffusers: bool = False) -> dict:
    """A LoRA on every Linear and Conv2d layer (Kohya with LoCon, PEFT), or on those the old Diffusers format had.
    Ranks and alphas vary from layer to layer but where Diffusers gets that wrong: Kohya files (its converter keeps
    one alpha) and the text encoder's PEFT `alpha_pattern` (its keys name Transformers 4's `text_model.`)."""
    if fmt == "old-diffusers":
        return no_alpha(random_lora(pipe, layers(pipe, nn.Linear), seed))
    if fmt == "peft":
        unet, text = ([t for t in layers(pipe) if t[0] == net] for net in NETS)
        return random_lora(pipe, unet, seed) | random_lora(pipe, text, seed + 1, varied=not for_diffusers)
    return random_lora(pipe, layers(pipe), seed, varied=not for_diffusers)


@pytest.mark.parametrize("fmt", FORMATS)
def test_merged_weights_equal_the_lora_forward(tiny_model_dir, tmp_path, fmt):
    pipe = ours(tiny_model_dir)
    lora = format_lora(fmt, pipe, seed=1)
    before = {k: v.clone() for k, v in weights(pipe).items()}
    file = write_format(fmt, tiny_model_dir, pipe, lora, tmp_path / "x.safetensors")
    assert apply_lora(pipe.unet, pipe.text_encoder, file, 0.8) == len(lora)
    assert_merged_like_forward(pipe, before, lora, 0.8)


@pytest.mark.parametrize("fmt", FORMATS)
def test_merged_weights_equal_diffusers_fuse_lora(tiny_model_dir, tmp_path, fmt):
    pipe = ours(tiny_model_dir)
    lora = format_lora(fmt, pipe, seed=2, for_diffusers=True)
    if fmt == "kohya-ldm":
        lora = {k: v for k, v in lora.items() if k[1] not in DIFFUSERS_MISNAMES}
    file = write_format(fmt, tiny_model_dir, pipe, lora, tmp_path / "x.safetensors")
    apply_lora(pipe.unet, pipe.text_encoder, file, 0.8)
    if fmt == "kohya-ldm":  # Diffusers' SD 1.5 loader never maps LDM names; its SDXL loader's mapper does
        from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers
        from safetensors.torch import load_file

        state = _maybe_map_sgm_blocks_to_diffusers(load_file(file), reference(tiny_model_dir).unet.config)
        file = write(tmp_path / "mapped.safetensors", state)
    assert_weights_equal_reference(pipe, fused_reference(tiny_model_dir, [file], [0.8]))


def test_locon_tucker_and_flat_1x1_equal_the_lora_forward(tiny_model_dir, tmp_path):
    """Diffusers cannot load `lora_mid` (LoCon's Tucker form) at all: checked against the forward pass only."""
    pipe = ours(tiny_model_dir)
    lora = random_lora(pipe, layers(pipe, nn.Conv2d), seed=3, tucker=True, flat_1x1=True)
    assert any("mid" in p for p in lora.values()) and any(p["down"].ndim == 2 for p in lora.values())
    before = {k: v.clone() for k, v in weights(pipe).items()}
    file = write(tmp_path / "x.safetensors", kohya(lora, ldm_layer_names(tiny_model_dir)))
    apply_lora(pipe.unet, pipe.text_encoder, file, -1.3)
    assert_merged_like_forward(pipe, before, lora, -1.3)


def test_ldm_names_of_tricky_layers(tiny_model_dir):
    """LDM names written out by hand for the tiny UNet (3 levels of 2 layers; no attention in down level 2 and up
    level 0), among them the upsampler Diffusers' Kohya converter misplaces."""
    blocks = ldm.unet_blocks(ours(tiny_model_dir).unet.config)
    assert {name: ldm_name(name, blocks) for name in [
        "up_blocks.0.upsamplers.0.conv", "up_blocks.1.upsamplers.0.conv", "down_blocks.1.downsamplers.0.conv",
        "down_blocks.2.resnets.1.conv2", "up_blocks.1.resnets.0.conv_shortcut", "mid_block.resnets.1.time_emb_proj",
        "up_blocks.2.attentions.2.transformer_blocks.0.ff.net.2", "time_embedding.linear_2", "conv_out",
    ]} == {
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
        "down_blocks.2.resnets.1.conv2": "input_blocks.8.0.out_layers.3",
        "up_blocks.1.resnets.0.conv_shortcut": "output_blocks.3.0.skip_connection",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "up_blocks.2.attentions.2.transformer_blocks.0.ff.net.2": "output_blocks.8.1.transformer_blocks.0.ff.net.2",
        "time_embedding.linear_2": "time_embed.2", "conv_out": "out.2",
    }  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rounds_once(tiny_model_dir, tmp_path, dtype):
    """In float16/bfloat16 the update is computed in float32 and the sum rounded once into the weight's dtype: each
    weight is the exact W + w alpha / r B A to within half a unit in the last place (rounding the update to the
    dtype first, then the sum, is off by up to a whole one)."""
    pipe = ours(tiny_model_dir, dtype)
    lora = random_lora(pipe, layers(pipe, only="attn"), seed=4)
    before = weights(pipe)
    file = write(tmp_path / "x.safetensors", {k: v.half() for k, v in kohya(lora).items()})
    apply_lora(pipe.unet, pipe.text_encoder, file, 0.6)
    after = weights(pipe)
    half_ulp = torch.finfo(dtype).eps / 2 * (1 + 1e-3)  # (1 + 1e-3): float32's own rounding of the sum
    for (net, layer), parts in lora.items():
        down, up = parts["down"].half().double(), parts["up"].half().double()
        alpha = float(parts["alpha"].half()) if "alpha" in parts else down.shape[0]
        key = f"{net}.{layer}.weight"
        exact = before[key].double() + up @ down * (alpha / down.shape[0] * 0.6)
        error = (after[key].double() - exact).abs()
        assert after[key].dtype == dtype and (error <= half_ulp * exact.abs() + 1e-7).all(), (key, error.max())


# ----------------------------------------------------------------------------- images, stacking, removal


def test_images_equal_fused_diffusers(tiny_model_dir, tmp_path):
    pipe = ours(tiny_model_dir)
    file = write(tmp_path / "x.safetensors", kohya(random_lora(pipe, layers(pipe), seed=5, varied=False)))
    apply_lora(pipe.unet, pipe.text_encoder, file, 0.9)
    got, want = run_both(pipe, fused_reference(tiny_model_dir, [file], [0.9]), "a red fox in snow", "blurry",
                         height=40, width=24, steps=4, seed=7, scheduler="euler")  # fmt: skip
    assert_images_close(got, want, atol=1e-4)
    base, _ = run_both(ours(tiny_model_dir), reference(tiny_model_dir), "a red fox in snow", "blurry",
                       height=40, width=24, steps=4, seed=7, scheduler="euler")  # fmt: skip
    assert abs(got - base).max() > 0.05  # the LoRA changes the image


def test_two_loras_stack(tiny_model_dir, tmp_path):
    pipe = ours(tiny_model_dir)
    first = write(tmp_path / "a.safetensors", kohya(random_lora(pipe, layers(pipe), seed=6, varied=False)))
    second = write(tmp_path / "b.safetensors", *peft(format_lora("peft", pipe, 7, for_diffusers=True)))
    apply_lora(pipe.unet, pipe.text_encoder, first, 0.7)
    apply_lora(pipe.unet, pipe.text_encoder, second, -0.4)
    assert_weights_equal_reference(pipe, fused_reference(tiny_model_dir, [first, second], [0.7, -0.4]))


def test_remove_loras_gives_back_the_exact_weights(tiny_model_dir, tmp_path):
    pipe = ours(tiny_model_dir)
    before = {k: v.clone() for k, v in weights(pipe).items()}
    tensors = {k: v.data_ptr() for k, v in weights(pipe).items()}
    for seed, strength in [(8, 0.7), (9, -0.4)]:
        file = write(tmp_path / f"{seed}.safetensors", kohya(random_lora(pipe, layers(pipe), seed)))
        apply_lora(pipe.unet, pipe.text_encoder, file, strength)
    assert sum(not torch.equal(v, before[k]) for k, v in weights(pipe).items()) > 100
    remove_loras(pipe.unet, pipe.text_encoder)
    after = weights(pipe)
    assert all(torch.equal(after[k], before[k]) for k in before)  # bit for bit
    assert {k: v.data_ptr() for k, v in after.items()} == tensors  # the loaded tensors themselves, no copies kept
    assert not pipe.unet.lora_originals and not pipe.text_encoder.lora_originals
    remove_loras(pipe.unet, pipe.text_encoder)  # nothing applied: nothing to do


# ----------------------------------------------------------------------------- refusals


def refused_file(pipe, case: str) -> tuple[dict, str]:
    """A file for another model, or broken, and what the one-line error says about it."""

    def pair(layer: str, out: int, inp: int) -> dict:
        return {f"{layer}.lora_down.weight": torch.zeros(RANK, inp), f"{layer}.lora_up.weight": torch.zeros(out, RANK)}

    fine = kohya(random_lora(pipe, layers(pipe, only="to_q"), 0))  # a LoRA on every `to_q`, valid
    attn = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_"
    files = {
        # SDXL: two text encoders, 10-layer transformers, 2048-wide text states
        "sdxl": (pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 64, 2048)
                 | pair("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q", 64, 64)
                 | pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 32, 32)
                 | pair("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280), "an SDXL LoRA"),
        "sd2": (fine | pair(attn + "attn2_to_k", 32, 1024), "looks like an SD 2.x LoRA"),  # 1024-wide text states
        "loha": (fine | {"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.zeros(RANK, 64)}, "LyCORIS LoHa"),
        "unknown layer": (fine | pair(attn + "attn1_to_z", 32, 32), "attn1_to_z.lora_down.weight"),
        "no up": ({k: v for k, v in fine.items() if k != attn + "attn1_to_q.lora_up.weight"}, "to_q (no up weight)"),
        "empty": ({}, "among its 0 tensors: no LoRA tensors at all"),
    }  # fmt: skip
    return files[case]


@pytest.mark.parametrize("case", ["sdxl", "sd2", "loha", "unknown layer", "no up", "empty"])
def test_a_file_for_another_model_is_refused_whole(tiny_model_dir, tmp_path, case):
    pipe = ours(tiny_model_dir)
    state, message = refused_file(pipe, case)
    before = {k: v.clone() for k, v in weights(pipe).items()}
    with pytest.raises(WeightsError, match="does not fit this SD 1.5 model, nothing applied") as error:
        apply_lora(pipe.unet, pipe.text_encoder, write(tmp_path / "x.safetensors", state), 1.0)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert all(torch.equal(v, before[k]) for k, v in weights(pipe).items())  # nothing half applied


def test_a_pickle_is_refused(tiny_model_dir, tmp_path):
    pipe = ours(tiny_model_dir)
    torch.save(kohya(random_lora(pipe, layers(pipe, only="to_q"), 0)), tmp_path / "x.pt")
    with pytest.raises(WeightsError, match="pickles, which can run arbitrary code"):
        apply_lora(pipe.unet, pipe.text_encoder, tmp_path / "x.pt")


class GuardedRe:
    """`re` for models.lora that fails the test where a file's crafted text reaches it as a pattern, or a name longer
    than MAX_NAME as the string searched: a catastrophic or quadratic match would hang the test instead."""

    def __init__(self, crafted: list[str]):
        self.crafted = crafted

    def __getattr__(self, name: str):
        def guarded(pattern, *args, **kwargs):
            assert not any(c in str(pattern) for c in self.crafted), f"re.{name} got the file's {pattern!r:.80}"
            assert all(len(a) <= MAX_NAME for a in args if isinstance(a, str)), f"re.{name} got a long name"
            return getattr(re, name)(pattern, *args, **kwargs)

        return guarded


def queries(pipe) -> list[tuple[str, str]]:
    return [(net, layer) for net, layer in layers(pipe) if layer.endswith(("to_q", "q_proj"))]


CATASTROPHIC = ["(a+)+$", "([\\w.]+)+z"]  # exponential backtracking against a long (layer) name


def hostile_file(pipe, case: str) -> tuple[dict, dict, str]:
    """A crafted PEFT file on every query projection (issue 23): (tensors, header metadata, what the one-line error
    says)."""
    state, metadata = peft(no_alpha(random_lora(pipe, queries(pipe), 0)))  # alphas in the header

    def header(**changes) -> dict:  # the PEFT metadata with some entries replaced
        return {"lora_adapter_metadata": json.dumps(json.loads(metadata["lora_adapter_metadata"]) | changes)}

    down = next(k for k in state if k.endswith(".lora_A.weight"))
    up = down.replace("lora_A", "lora_B")
    long_name = "attn2_to_k" * 100_000 + ".lora_A.weight"
    cases = {
        "catastrophic alpha_pattern": (state, header(**{"unet.alpha_pattern": dict.fromkeys(CATASTROPHIC, 2)}),
                                       "alpha_pattern key '(a+)+$' is not a layer name"),
        "alpha_pattern re.error": (state, header(**{"text_encoder.alpha_pattern": {"(": 3}}),
                                   "text_encoder.alpha_pattern key '(' is not a layer name"),
        "1 MB tensor name": (state | {long_name: torch.zeros(1, 1)}, metadata, "a tensor name of 1000014 characters"),
        "rank 0": (state | {down: torch.zeros(0, state[down].shape[1]), up: torch.zeros(state[up].shape[0], 0)},
                   metadata, "has rank 0"),
        "metadata a JSON list": (state, {"lora_adapter_metadata": "[1, 2]"}, "metadata is a JSON list, not an object"),
        "metadata not JSON": (state, {"lora_adapter_metadata": "{'r': 4"}, "metadata is not valid JSON"),
        "metadata nested 100,000 deep": (state, {"lora_adapter_metadata": "[" * 100_000 + "]" * 100_000},
                                         "metadata is not valid JSON"),
        "lora_alpha a string": (state, header(**{"unet.lora_alpha": "abc"}), "unet.lora_alpha is 'abc', not a finite"),
        "lora_alpha a bool": (state, header(**{"text_encoder.lora_alpha": True}), "lora_alpha is True, not a finite"),
        "lora_alpha NaN": (state, header(**{"unet.lora_alpha": float("nan")}), "unet.lora_alpha is nan, not a finite"),
        "alpha_pattern value null": (state, header(**{"unet.alpha_pattern": {"to_q": None}}), "to_q is None, not a"),
        "lora_alpha 1e308": (state, header(**{"unet.lora_alpha": 1e308}), "gets non-finite weights"),
        "Kohya alpha inf": (kohya(random_lora(pipe, queries(pipe), 0, varied=False)) | {
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(float("inf"))}, {},
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj has alpha inf, not a finite number"),
        "NaN weights": (state | {down: torch.full_like(state[down], float("nan"))}, metadata, "non-finite weights"),
        "int64 weights": (state | {down: state[down].to(torch.int64)}, metadata, f"{down} is int64; LoRA weights"),
        "bool weights": (state | {up: state[up] > 0}, metadata, f"{up} is bool; LoRA weights are floating point"),
    }  # fmt: skip
    return cases[case]


@pytest.mark.parametrize("case", [
    "catastrophic alpha_pattern", "alpha_pattern re.error", "1 MB tensor name", "rank 0", "metadata a JSON list",
    "metadata not JSON", "metadata nested 100,000 deep", "lora_alpha a string", "lora_alpha a bool", "lora_alpha NaN",
    "alpha_pattern value null", "lora_alpha 1e308", "Kohya alpha inf", "NaN weights", "int64 weights", "bool weights",
])  # fmt: skip
def test_a_crafted_file_is_one_line_error_not_a_hang_or_traceback(tiny_model_dir, tmp_path, monkeypatch, case):
    """Issue 23: hostile LoRA files (header patterns, names, ranks, alphas and dtypes) are refused whole with a
    WeightsError naming the file; no pattern from a file and no over-long name ever reaches `re`."""
    pipe = ours(tiny_model_dir)
    state, metadata, message = hostile_file(pipe, case)
    path = write(tmp_path / "crafted.safetensors", state, metadata)
    before = {k: v.clone() for k, v in weights(pipe).items()}
    monkeypatch.setattr("models.lora.re", GuardedRe(CATASTROPHIC))
    with pytest.raises(WeightsError) as error:
        apply_lora(pipe.unet, pipe.text_encoder, path, 0.8)
    text = str(error.value)
    assert message in text and str(path) in text and "\n" not in text and len(text) < 400, text
    assert all(torch.equal(v, before[k]) for k, v in weights(pipe).items())  # nothing half applied


def test_peft_alpha_pattern_matches_as_peft_does(tiny_model_dir, tmp_path):
    """PEFT's get_pattern_key, read as plain names: a key is the layer's name or its end after a dot (`to_q` fits
    `...attn1.to_q`, not `...attn1.xto_q`), and the first such key in the file's order wins."""
    pipe = ours(tiny_model_dir)
    lora = no_alpha(random_lora(pipe, queries(pipe), 0))
    state, metadata = peft(lora)
    layer = next(layer for net, layer in lora if net == "unet" and "attn2" in layer)
    patterns = {"o_q": 100.0, "attn2.to_q": 3.0, "to_q": 5.0, layer: 7.0}  # `o_q` is no name's end after a dot
    config = json.loads(metadata["lora_adapter_metadata"]) | {"unet.lora_alpha": 1.0, "unet.alpha_pattern": patterns}
    for (net, name), parts in lora.items():
        if net == "unet":  # the text encoder's layers keep the writer's alphas: their ranks
            parts["alpha"] = torch.tensor(3.0 if "attn2" in name else 5.0)
    before = {k: v.clone() for k, v in weights(pipe).items()}
    metadata = {"lora_adapter_metadata": json.dumps(config)}
    apply_lora(pipe.unet, pipe.text_encoder, write(tmp_path / "x.safetensors", state, metadata), 0.8)
    assert_merged_like_forward(pipe, before, lora, 0.8)


# ----------------------------------------------------------------------------- true size


SD15_PICKS = [
    "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k", "down_blocks.3.resnets.1.conv2",
    "mid_block.attentions.0.proj_in", "up_blocks.1.upsamplers.0.conv", "up_blocks.0.resnets.0.conv_shortcut",
    "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj", "encoder.layers.11.mlp.fc2",
    "encoder.layers.0.self_attn.out_proj",
]  # fmt: skip
SD15_NAMES = {f"{'text_encoder' if layer.startswith('encoder') else 'unet'}.{layer}" for layer in SD15_PICKS}


@pytest.mark.slow
def test_sd15_size_formats_equal_diffusers_fuse_lora(sd15_model_dir, tmp_path):
    """SD 1.5's real shapes (head dims 40-160, 1280-wide levels, 12 text layers), one layer of each kind per level,
    in every format, against one Diffusers pipeline: each file is loaded, fused, compared (the Kohya one's images too,
    256x256, 2 steps) and the fused layers put back before the next."""
    pipe, ref = ours(sd15_model_dir), reference(sd15_model_dir)
    originals = {k: v.clone() for k, v in reference_weights(ref).items() if k.removesuffix(".weight") in SD15_NAMES}
    for i, fmt in enumerate(FORMATS):
        kinds = nn.Linear if fmt == "old-diffusers" else (nn.Linear, nn.Conv2d)
        targets = [(n, layer) for n, layer in layers(pipe, kinds) if layer in SD15_PICKS]
        lora = random_lora(pipe, targets, seed=10 + i, varied=False)  # Diffusers keeps one alpha per Kohya file
        if fmt == "peft":  # ranks and alphas vary, but in the text encoder (format_lora says why)
            lora |= random_lora(pipe, [t for t in targets if t[0] == "unet"], seed=20 + i)
        lora = no_alpha(lora) if fmt == "old-diffusers" else lora
        file = write_format(fmt, sd15_model_dir, pipe, lora, tmp_path / f"{fmt}.safetensors")
        apply_lora(pipe.unet, pipe.text_encoder, file, 0.75)
        got = {k: v.clone() for k, v in weights(pipe).items() if k in originals}
        assert sum(not torch.equal(v, originals[k]) for k, v in got.items()) == len(lora)
        if fmt == "kohya-ldm":  # Diffusers' SD 1.5 loader never maps LDM names; its SDXL loader's mapper does
            from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers
            from safetensors.torch import load_file

            file = write(
                tmp_path / "mapped.safetensors", _maybe_map_sgm_blocks_to_diffusers(load_file(file), ref.unet.config)
            )
        ref.load_lora_weights(str(file))
        ref.fuse_lora(lora_scale=0.75)
        ref.unload_lora_weights()
        want = reference_weights(ref)
        for k, v in got.items():
            torch.testing.assert_close(v, want[k], atol=1e-6, rtol=2e-6, msg=lambda m, k=k, f=fmt: f"{f} {k}: {m}")
        if fmt == "kohya":  # and the image: a Civitai-style file changes it as Diffusers' fused pipeline does
            images = run_both(pipe, ref, "a red fox in snow", "blurry", height=256, width=256, steps=2, seed=3)
            assert_images_close(*images, atol=1e-4)
        remove_loras(pipe.unet, pipe.text_encoder)
        for k, v in originals.items():
            want[k].copy_(v)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["kohya-ldm", "peft", "old-diffusers"])
def test_sd15_size_formats_merge_like_the_lora_forward(sd15_model_dir, tmp_path, fmt):
    """The other formats at SD 1.5's real shapes, against the LoRA forward (the Diffusers comparison of each format
    runs on the tiny model; at full size it would load the 4 GB reference once per format)."""
    pipe = ours(sd15_model_dir)
    kinds = nn.Linear if fmt == "old-diffusers" else (nn.Linear, nn.Conv2d)
    lora = random_lora(pipe, [(n, layer) for n, layer in layers(pipe, kinds) if layer in SD15_PICKS], seed=11)
    lora = no_alpha(lora) if fmt == "old-diffusers" else lora  # that format stores no alpha
    touched = {f"{net}.{layer}.weight": getattr(pipe, net).get_submodule(layer).weight.clone() for net, layer in lora}
    file = write_format(fmt, sd15_model_dir, pipe, lora, tmp_path / "x.safetensors")
    apply_lora(pipe.unet, pipe.text_encoder, file, 0.6)
    assert_merged_like_forward(pipe, {**weights(pipe), **touched}, lora, 0.6)


def test_cli_lora_option_and_prompt_tag(tiny_model_dir, tmp_path, capsys):
    """--lora FILE:WEIGHT and A1111's <lora:NAME:WEIGHT> tag (found in --lora-dir, removed from the text that is
    encoded, kept in the PNG) both merge the file: the image equals apply_lora + generate through the API."""
    from PIL import Image

    from cli.main import main
    from cli.png_info import read_parameters
    from min_pipeline import generate

    pipe = ours(tiny_model_dir)
    (tmp_path / "loras").mkdir()
    path = tmp_path / "loras" / "fox.safetensors"
    write_format("kohya", tiny_model_dir, pipe, format_lora("kohya", pipe, seed=5), path)
    apply_lora(pipe.unet, pipe.text_encoder, path, 0.7)
    want = np.asarray(generate(pipe, "a fox", steps=2, height=16, width=16, progress=False)[0])
    base = ["--model", str(tiny_model_dir), *"--device cpu --quiet --steps 2 --height 16 --width 16 --seed 0".split()]
    runs = {"option": ["--prompt", "a fox", "--lora", f"{path}:0.7"],
            "tag": ["--prompt", "a fox<lora:fox:0.7>", "--lora-dir", str(tmp_path / "loras")]}  # fmt: skip
    for name, args in runs.items():
        out = tmp_path / f"{name}.png"
        assert main([*base, *args, "--output", str(out)]) == 0
        assert np.array_equal(np.asarray(Image.open(out)), want), name
    assert read_parameters(Image.open(tmp_path / "tag.png").text["parameters"])["prompt"] == "a fox<lora:fox:0.7>"
    assert main([*base, "--prompt", "x <lora:owl:1>", "--lora-dir", str(tmp_path / "loras")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("min_pipeline.py: error: <lora:owl> in the prompt: no owl.safetensors in ") and "\n" not in err
    )


def test_civitai_lora_tag_and_negative_embedding_change_the_image_as_diffusers(tiny_model_dir, tmp_path):
    """The issue's "done when": a Kohya LoRA named by an A1111 prompt tag and a negative embedding from the
    embeddings folder, through the CLI, against Diffusers' fused pipeline with the same file and
    load_textual_inversion; the PNG equals Diffusers' 8-bit image (a level apart at most, where the float images
    round differently) and differs from the image without them."""
    from PIL import Image

    from cli.main import main

    pipe = ours(tiny_model_dir)
    for folder in ("loras", "embeddings"):
        (tmp_path / folder).mkdir()
    lora = tmp_path / "loras" / "style.safetensors"
    write(lora, kohya(random_lora(pipe, layers(pipe), seed=8, varied=False)))
    negative = tmp_path / "embeddings" / "EasyNegative.safetensors"
    write(negative, {"emb_params": torch.randn(3, pipe.text_encoder.config.hidden_size)})
    ref = fused_reference(tiny_model_dir, [lora], [0.8])
    ref.load_textual_inversion(str(negative), token="EasyNegative")
    ref = with_scheduler(ref, "euler")
    settings = dict(num_inference_steps=4, guidance_scale=7.5, height=40, width=24)
    # Diffusers' maybe_convert_prompt never expands a mixed-case token (it looks for the lower-cased words among its
    # added tokens, which keep their case) and would use one vector of three: its prompt names all three.
    spelled_out = "EasyNegative EasyNegative_1 EasyNegative_2, blurry"
    want = ref("a red fox in snow", negative_prompt=spelled_out, generator=torch.Generator().manual_seed(7),
               **settings).images[0]  # fmt: skip
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--quiet", "--steps", "4", "--height", "40"]
    args += ["--width", "24", "--seed", "7", "--scheduler", "euler", "--lora-dir", str(tmp_path / "loras")]
    args += ["--embeddings-dir", str(tmp_path / "embeddings"), "--negative-prompt", "EasyNegative, blurry"]
    for prompt, out in (("a red fox in snow <lora:style:0.8>", "with.png"), ("a red fox in snow", "without.png")):
        assert main([*args, "--prompt", prompt, "--output", str(tmp_path / out)]) == 0
    got = np.asarray(Image.open(tmp_path / "with.png")).astype(int)
    diff = np.abs(got - np.asarray(want).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert np.abs(got - np.asarray(Image.open(tmp_path / "without.png")).astype(int)).max() > 10
