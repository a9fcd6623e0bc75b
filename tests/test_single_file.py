"""Original single-file LDM checkpoints (`v1-5-pruned-emaonly.safetensors` layout): loaded by `models.loading`, keys
renamed by `models.ldm`, equal to the Diffusers-layout folder they were written from, and equal to what Diffusers'
own `from_single_file` makes of the same file.

No real checkpoint is available, so the tests write one: `ldm_state` below renames the random-weight folders of
conftest into LDM's key names. It is the inverse of `models/ldm.py`'s tables, derived independently (LDM's block
counters walked the way its UNet constructor appends blocks), so a wrong index on either side makes the tests fail;
Diffusers accepting the file and giving the folder's image is the check that the writer itself is right.
"""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cli.main import main
from conftest import DIFFUSERS_SCHEDULERS, assert_images_close, max_diff, with_scheduler
from min_pipeline import generate, load_pipeline
from models import ldm
from models.loading import WeightsError, load_component, load_model, load_safetensors, load_single_file, read_config
from models.unet import UNetConfig
from models.vae import VAEConfig
from scheduler import SchedulerConfig

diffusers = pytest.importorskip("diffusers")

PROMPT, NEGATIVE = "a red fox in snow", "blurry"

# ----------------------------------------------------------------------------- Diffusers -> LDM, the writer

RESNET_UNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
RESNET_VAE = {"conv_shortcut": "nin_shortcut"}
ATTENTION_VAE = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# The noise schedule and EMA counters that LDM's DDPM wrapper saves next to the networks (values irrelevant).
EXTRAS = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
          "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
          "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
          "posterior_mean_coef2"]  # fmt: skip


def count(state: dict, prefix: str) -> int:
    """How many numbered modules `prefix.0`, `prefix.1`, ... the state dict has."""
    return len({k.removeprefix(prefix + ".").split(".")[0] for k in state if k.startswith(prefix + ".")})


def unet_to_ldm(state: dict) -> dict[str, tuple[str, dict]]:
    """Diffusers UNet module -> (LDM module, renames inside it), numbering LDM's flat block lists with counters as
    openaimodel.UNetModel appends them; a level has attentions iff the state has any."""
    levels = count(state, "down_blocks")
    table = {"time_embedding.linear_1": ("time_embed.0", {}), "time_embedding.linear_2": ("time_embed.2", {}),
             "conv_in": ("input_blocks.0.0", {}), "conv_norm_out": ("out.0", {}), "conv_out": ("out.2", {}),
             "mid_block.resnets.0": ("middle_block.0", RESNET_UNET), "mid_block.attentions.0": ("middle_block.1", {}),
             "mid_block.resnets.1": ("middle_block.2", RESNET_UNET)}  # fmt: skip
    block = 1
    for i in range(levels):
        for j in range(count(state, f"down_blocks.{i}.resnets")):
            table[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{block}.0", RESNET_UNET)
            table[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{block}.1", {})
            block += 1
        if any(k.startswith(f"down_blocks.{i}.downsamplers.") for k in state):
            table[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{block}.0.op", {})
            block += 1
    block = 0
    for i in range(levels):
        for j in range(count(state, f"up_blocks.{i}.resnets")):
            table[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{block}.0", RESNET_UNET)
            table[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{block}.1", {})
            block += 1
        has_attention = any(k.startswith(f"up_blocks.{i}.attentions.") for k in state)
        table[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{block - 1}.{2 if has_attention else 1}.conv", {})
    return table


def vae_to_ldm(state: dict) -> dict[str, tuple[str, dict]]:
    """Diffusers VAE module -> (LDM module, renames inside it). LDM's decoder.up.0 is the full-size level."""
    levels = count(state, "encoder.down_blocks")
    table = {"quant_conv": ("quant_conv", {}), "post_quant_conv": ("post_quant_conv", {})}
    for part in ("encoder", "decoder"):
        for name in ("conv_in", "conv_out"):
            table[f"{part}.{name}"] = (f"{part}.{name}", {})
        table[f"{part}.conv_norm_out"] = (f"{part}.norm_out", {})
        table[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", RESNET_VAE)
        table[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", RESNET_VAE)
        table[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", ATTENTION_VAE)
    for i in range(levels):
        ldm_up = levels - 1 - i
        for j in range(count(state, f"encoder.down_blocks.{i}.resnets")):
            table[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", RESNET_VAE)
        for j in range(count(state, f"decoder.up_blocks.{i}.resnets")):
            table[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{ldm_up}.block.{j}", RESNET_VAE)
        table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", {})
        table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{ldm_up}.upsample.conv", {})
    return table


def rename_all(state: dict, table: dict) -> dict:
    out = {}
    for key, v in state.items():
        module = max((m for m in table if key.startswith(m + ".")), key=len)  # the innermost listed module
        ldm_module, inner = table[module]
        rest = key[len(module) + 1 :]
        for ours, theirs in inner.items():
            if rest.startswith(ours + "."):
                rest = theirs + rest[len(ours) :]
        if inner is ATTENTION_VAE and v.ndim == 2:
            v = v[:, :, None, None]  # LDM's VAE attention uses 1x1 convs: Linear (C, C) -> (C, C, 1, 1)
        out[f"{ldm_module}.{rest}"] = v
    return out


def ldm_state(folder, text_model_prefix: bool = True, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """One LDM-layout state dict from a Diffusers-layout folder, with the schedule buffers and EMA counters."""
    text = load_safetensors(folder / "text_encoder" / "model.safetensors")  # `text_model.*` keys + position_ids
    if not text_model_prefix:
        text = {k.removeprefix("text_model."): v for k, v in text.items()}
    unet = load_safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors")  # memory-mapped, no copy
    vae = load_safetensors(folder / "vae" / "diffusion_pytorch_model.safetensors")
    state = {"cond_stage_model.transformer." + k: v for k, v in text.items()}
    state |= {"model.diffusion_model." + k: v for k, v in rename_all(unet, unet_to_ldm(unet)).items()}
    state |= {"first_stage_model." + k: v for k, v in rename_all(vae, vae_to_ldm(vae)).items()}
    assert len(state) == len(text) + len(unet) + len(vae), "the writer mapped two keys onto one"
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    state |= {name: torch.linspace(1e-4, 1.0, 1000, dtype=torch.float64) for name in EXTRAS}
    state |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(123, dtype=torch.int32)}
    return state


def write(state: dict, path):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_file(tiny_model_dir, tmp_path_factory):
    return write(ldm_state(tiny_model_dir), tmp_path_factory.mktemp("ldm") / "tiny-ldm.safetensors")


@pytest.fixture(scope="module")
def sd15_file(sd15_model_dir, tmp_path_factory):
    """The full-size single file (~4 GB), written once per module."""
    return write(ldm_state(sd15_model_dir), tmp_path_factory.mktemp("ldm") / "sd15-ldm.safetensors")


def diffusers_from_single_file(path, folder):
    """Diffusers' own loader on our file: the configs from the local folder, nothing from the network."""
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- components


def assert_same_state(got: torch.nn.Module, want: torch.nn.Module, what: str, cast=None) -> None:
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(a.keys() ^ b.keys())[:5]}"
    for k in a:
        ref = b[k] if cast is None else b[k].to(cast).to(b[k].dtype)
        assert a[k].dtype == ref.dtype and torch.equal(a[k], ref), f"{what} {k}: {max_diff(a[k], ref)}"


def load_folder(folder):
    return tuple(load_component(folder, name) for name in ("text_encoder", "unet", "vae"))


@pytest.mark.parametrize("text_model_prefix", [True, False])
def test_tiny_single_file_equals_folder(tiny_model_dir, tmp_path, text_model_prefix):
    """Every tensor of every network, loaded from the single file, is the folder's (text encoder keys with and
    without `text_model.`; schedule buffers and model_ema.* ignored)."""
    path = write(ldm_state(tiny_model_dir, text_model_prefix), tmp_path / "m.safetensors")
    for name, got, want in zip(("text", "unet", "vae"), load_single_file(path, config=tiny_model_dir),
                               load_folder(tiny_model_dir), strict=True):  # fmt: skip
        assert_same_state(got, want, name)


def test_vae_attention_is_written_as_1x1_convs(tiny_file):
    """The file under test has LDM's conv-shaped VAE attention, which the loader turns into Linear weights."""
    state = load_file(tiny_file)
    assert state["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert state["first_stage_model.encoder.mid.attn_1.proj_out.weight"].ndim == 4


def test_load_model_reads_a_single_file_with_the_folders_configs(tiny_file, tiny_model_dir):
    model = load_model(tiny_file, torch.float32, torch.device("cpu"), config=tiny_model_dir)
    for name, want in zip(("text_encoder", "unet", "vae"), load_folder(tiny_model_dir), strict=True):
        assert_same_state(getattr(model, name), want, name)
    assert model.scheduler_config == read_config(
        SchedulerConfig, tiny_model_dir / "scheduler" / "scheduler_config.json"
    )


@pytest.mark.parametrize("file_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_load_into_any_dtype(tiny_model_dir, tmp_path, file_dtype):
    path = write(ldm_state(tiny_model_dir, dtype=file_dtype), tmp_path / "half.safetensors")
    loaded = load_single_file(path, torch.float32, "cpu", tiny_model_dir)
    for got, want in zip(loaded, load_folder(tiny_model_dir), strict=True):
        assert_same_state(got, want, f"{file_dtype} file as float32", cast=file_dtype)
    text, unet, vae = load_single_file(path, config=tiny_model_dir)  # no dtype: the file's own
    assert {p.dtype for m in (text, unet, vae) for p in m.parameters()} == {file_dtype}
    _, unet, _ = load_single_file(path, torch.bfloat16, config=tiny_model_dir)
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}


# ----------------------------------------------------------------------------- clear errors


def edited(tiny_model_dir, tmp_path, edit) -> str:
    state = ldm_state(tiny_model_dir)
    edit(state)
    return write(state, tmp_path / "edited.safetensors")


@pytest.mark.parametrize(
    ("key", "match"),
    [
        ("foo.weight", r"unexpected key foo\.weight"),
        ("model.diffusion_model.input_blocks.99.0.weight", r"unexpected key model\.diffusion_model\.input_blocks\.99"),
        ("first_stage_model.encoder.mid.attn_2.q.weight", r"unexpected key first_stage_model\.encoder\.mid\.attn_2"),
        ("model.diffusion_model.input_blocks.1.0.extra.weight", r"unexpected key.*down_blocks\.0\.resnets\.0\.extra"),
        ("cond_stage_model.transformer.text_model.extra", r"unexpected key.*extra"),
    ],
)
def test_unknown_key_is_named(tiny_model_dir, tmp_path, key, match):
    path = edited(tiny_model_dir, tmp_path, lambda s: s.update({key: torch.zeros(2)}))
    with pytest.raises(WeightsError, match=match) as e:
        load_single_file(path, config=tiny_model_dir)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "key",
    [
        "foo.weight",
        "model.diffusion_model.input_blocks.12.0.weight",  # SD 1.5 has input_blocks 0..11
        "model.diffusion_model.output_blocks.0.1.norm.weight",  # the lowest level has no attention
        "first_stage_model.decoder.up.4.block.0.conv1.weight",  # 4 levels: up.0 .. up.3
        "first_stage_model.encoder.down.3.downsample.conv.weight",  # the lowest level does not downsample
    ],
)
def test_ldm_renaming_refuses_a_key_it_cannot_place(key):
    """Pure renaming, no file: a key in no network or no block of the config is a ValueError naming it."""
    with pytest.raises(ValueError, match=rf"^unexpected key {re.escape(key)} \(not part of an SD 1\.5 checkpoint\)$"):
        ldm.split_single_file({key: torch.zeros(1)}, UNetConfig(), VAEConfig())


def test_missing_key_is_named(tiny_model_dir, tmp_path):
    path = edited(tiny_model_dir, tmp_path, lambda s: s.pop("model.diffusion_model.out.0.bias"))
    with pytest.raises(WeightsError, match=r"model\.diffusion_model\.\*\] does not fit UNet: 1 missing key\(s\), "
                                           r"e\.g\. conv_norm_out\.bias"):  # fmt: skip
        load_single_file(path, config=tiny_model_dir)


def test_wrong_shape_is_named(tiny_model_dir, tmp_path):
    key = "first_stage_model.decoder.up.0.block.0.conv1.weight"
    path = edited(tiny_model_dir, tmp_path, lambda s: s.update({key: s[key][:, :3]}))
    with pytest.raises(WeightsError, match=r"decoder\.up_blocks\.1\.resnets\.0\.conv1\.weight has shape"):
        load_single_file(path, config=tiny_model_dir)


def test_sd15_configs_reject_a_tiny_file(tiny_file):
    with pytest.raises(WeightsError, match="does not fit CLIPTextModel"):
        load_single_file(tiny_file)


def test_truncated_file_gives_clear_error(tiny_file, tmp_path):
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(tiny_file.read_bytes()[:100_000])
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        load_single_file(path, config=None)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickles_are_refused_without_unpickling(tmp_path, suffix):
    """A pickle whose unpickling would create a file: refused by its name, and never unpickled."""
    canary = tmp_path / "pwned"
    path = tmp_path / f"v1-5-pruned-emaonly{suffix}"
    path.write_bytes(pickle.dumps(Exploit(str(canary))))
    for load in (lambda: load_single_file(path), lambda: load_pipeline(str(path), device="cpu")):
        with pytest.raises(WeightsError, match=r"pickles, which can run arbitrary code.*\.safetensors"):
            load()
    renamed = path.rename(tmp_path / "renamed.safetensors")  # a pickle in disguise is not safetensors either
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        load_single_file(renamed)
    assert not canary.exists()


class Exploit:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ----------------------------------------------------------------------------- against Diffusers' from_single_file


def reference_image(pipe, sampler: str, steps: int, height: int, width: int, seed: int) -> np.ndarray:
    with_scheduler(pipe, sampler)
    return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, height=height, width=width,
                generator=torch.Generator().manual_seed(seed), output_type="np").images  # fmt: skip


@pytest.fixture(scope="module")
def tiny_reference(tiny_file, tiny_model_dir):
    return diffusers_from_single_file(tiny_file, tiny_model_dir)


def test_diffusers_reads_the_written_file_as_the_folder(tiny_file, tiny_model_dir, tiny_reference):
    """The writer is right: Diffusers' own single-file loader turns the file back into the folder's networks."""
    folder = diffusers.StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    for name in ("text_encoder", "unet", "vae"):
        assert_same_state(getattr(tiny_reference, name), getattr(folder, name), f"diffusers {name}")
    folder.set_progress_bar_config(disable=True)
    assert_images_close(reference_image(tiny_reference, "euler", 4, 40, 24, 0),
                        reference_image(folder, "euler", 4, 40, 24, 0), atol=0)  # fmt: skip


@pytest.mark.parametrize("sampler", list(DIFFUSERS_SCHEDULERS))
def test_tiny_pipeline_on_single_file_matches_diffusers(tiny_file, tiny_model_dir, tiny_reference, sampler):
    ours = load_pipeline(str(tiny_file), device="cpu", dtype=torch.float32, config=str(tiny_model_dir))
    got = generate(ours, PROMPT, NEGATIVE, scheduler=sampler, steps=4, height=40, width=24, seed=7,
                   output_type="np", progress=False)  # fmt: skip
    assert_images_close(got, reference_image(tiny_reference, sampler, 4, 40, 24, 7), atol=1e-4)


@pytest.mark.slow
def test_sd15_single_file_matches_folder_and_diffusers(sd15_file, sd15_model_dir):
    """Full size, SD 1.5 configs built in (no config folder): each network equals the folder's, and a 256x256
    4-step euler image equals Diffusers' from the same file. atol 1e-4 on [0, 1] pixels, as test_pipeline's
    full-size run."""
    ours = load_pipeline(str(sd15_file), device="cpu", dtype=torch.float32)
    folder = load_folder(sd15_model_dir)
    for name, want in zip(("text_encoder", "unet", "vae"), folder, strict=True):
        assert_same_state(getattr(ours, name), want, name)
    del folder, want
    got = generate(ours, PROMPT, NEGATIVE, steps=4, height=256, width=256, seed=0, output_type="np", progress=False)
    del ours
    want = reference_image(diffusers_from_single_file(sd15_file, sd15_model_dir), "euler", 4, 256, 256, 0)
    assert_images_close(got, want, atol=1e-4)


@pytest.mark.slow
def test_cli_runs_a_single_file(sd15_file, tmp_path, capsys):
    """`--model file.safetensors` with no config anywhere: SD 1.5 configs and the tokenizer/ vocabulary built in."""
    out = tmp_path / "fox.png"
    assert main(["--prompt", PROMPT, "--model", str(sd15_file), "--steps", "1", "--height", "64", "--width", "64",
                 "--device", "cpu", "--output", str(out), "--quiet"]) == 0  # fmt: skip
    assert out.is_file(), capsys.readouterr()
