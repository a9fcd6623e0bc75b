"""Weight loading: local folders, the hub path (offline: pre-filled cache, clear error without one), and the
readable errors for broken or unsafe files."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import resources
from models import ldm, loading
from models.clip import CLIPTextConfig
from models.loading import Model, WeightsError, load_component, load_model, load_safetensors, read_config, resolve_model
from models.unet import UNetConfig
from models.vae import VAEConfig
from scheduler import SD15_SCHEDULER_CONFIG
from tokenizer import CLIPTokenizer

ROOT = Path(__file__).resolve().parent.parent
REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def copy_text_encoder(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "text_encoder", dst / "text_encoder")
    return dst / "text_encoder" / "model.safetensors"


def test_missing_key_is_named(tiny_model_dir, tmp_path):
    path = copy_text_encoder(tiny_model_dir, tmp_path)
    state = load_file(path)
    del state["text_model.final_layer_norm.bias"]
    save_file(state, path)
    with pytest.raises(WeightsError, match=r"1 missing key\(s\), e\.g\. final_layer_norm\.bias") as e:
        load_component(tmp_path, "text_encoder")
    assert str(path) in str(e.value)


def test_unexpected_key_is_named(tiny_model_dir, tmp_path):
    path = copy_text_encoder(tiny_model_dir, tmp_path)
    state = load_file(path)
    state["text_model.extra.weight"] = torch.zeros(3)
    save_file(state, path)
    with pytest.raises(WeightsError, match=r"1 unexpected key\(s\), e\.g\. extra\.weight"):
        load_component(tmp_path, "text_encoder")


def test_wrong_shape_is_named(tiny_model_dir, tmp_path):
    path = copy_text_encoder(tiny_model_dir, tmp_path)
    state = load_file(path)
    state["text_model.final_layer_norm.weight"] = torch.zeros(31)
    save_file(state, path)
    with pytest.raises(WeightsError, match=r"final_layer_norm\.weight has shape \(31,\).*\(32,\)"):
        load_component(tmp_path, "text_encoder")


def test_truncated_file_gives_clear_error(tiny_model_dir, tmp_path):
    path = copy_text_encoder(tiny_model_dir, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        load_component(tmp_path, "text_encoder")


def test_garbage_file_gives_clear_error(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x00" * 3)
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        load_safetensors(path)


def test_missing_files_are_named(tiny_model_dir, tmp_path):
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(WeightsError, match=r"missing config file .*text_encoder/config\.json"):
        load_component(tmp_path, "text_encoder")
    shutil.copy(tiny_model_dir / "text_encoder" / "config.json", tmp_path / "text_encoder")
    (tmp_path / "text_encoder" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(WeightsError, match=r"missing weights file .*model\.safetensors.*pytorch_model\.bin"):
        load_component(tmp_path, "text_encoder")


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt"])
def test_pickles_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04 pretend pickle")
    with pytest.raises(WeightsError, match="pickles, which can run arbitrary code"):
        resolve_model(str(path))


def test_missing_local_folder(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))


def test_fp16_variant_preferred_for_half(tiny_model_dir, tmp_path):
    path = copy_text_encoder(tiny_model_dir, tmp_path)
    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}
    state["text_model.final_layer_norm.weight"].fill_(2.0)  # marks which file was read
    save_file(state, path.with_name("model.fp16.safetensors"))
    weight = load_component(tmp_path, "text_encoder", dtype=torch.float16).final_layer_norm.weight
    assert weight.dtype == torch.float16 and bool((weight == 2.0).all())
    for dtype in (torch.bfloat16, torch.float32, None):  # bf16 reads the fp32 file: no double rounding via fp16
        weight = load_component(tmp_path, "text_encoder", dtype=dtype).final_layer_norm.weight
        assert not bool((weight == 2.0).any()) and weight.dtype == (dtype or torch.float32)
    # An fp16 file also loads into fp32 (and the plain file is used when not running in half precision).
    half_only = tmp_path / "half"
    (half_only / "text_encoder").mkdir(parents=True)
    shutil.copy(path.with_name("model.fp16.safetensors"), half_only / "text_encoder" / "model.safetensors")
    shutil.copy(path.with_name("config.json"), half_only / "text_encoder")
    model = load_component(half_only, "text_encoder", dtype=torch.float32)
    assert model.final_layer_norm.weight.dtype == torch.float32


def test_checkpoint_quirks_map_onto_our_names():
    """The quirks table on one key of each kind: dropped (None), renamed, or left alone (the key itself)."""
    cases = {
        "text_model.embeddings.position_ids": None,  # CLIP's constant buffer, in a folder and in a single file
        "cond_stage_model.transformer.text_model.embeddings.position_ids": None,
        "text_model.final_layer_norm.bias": "final_layer_norm.bias",
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (
            "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight"
        ),
        "final_layer_norm.bias": "final_layer_norm.bias",  # Transformers 5 spelling: already ours
        "decoder.mid_block.attentions.0.query.weight": "decoder.mid_block.attentions.0.to_q.weight",
        "encoder.mid_block.attentions.0.key.bias": "encoder.mid_block.attentions.0.to_k.bias",
        "encoder.mid_block.attentions.0.value.weight": "encoder.mid_block.attentions.0.to_v.weight",
        "decoder.mid_block.attentions.0.proj_attn.bias": "decoder.mid_block.attentions.0.to_out.0.bias",
        "decoder.mid_block.attentions.0.to_q.weight": "decoder.mid_block.attentions.0.to_q.weight",
        "betas": None,  # LDM's schedule buffers and EMA bookkeeping
        "posterior_mean_coef2": None,
        "logvar": None,
        "model_ema.decay": None,
        "model_ema.diffusion_modelinput_blocks00weight": None,
        "first_stage_model.decoder.mid.attn_1.q.weight": "first_stage_model.decoder.mid.attn_1.q.weight",
        "model.diffusion_model.betas": "model.diffusion_model.betas",  # only whole keys match
    }
    got = ldm.fix_keys({key: torch.tensor(i) for i, key in enumerate(cases)})
    want = {new: i for i, new in enumerate(cases.values()) if new is not None}
    assert {k: int(v) for k, v in got.items()} == want


# ----------------------------------------------------------------------------- load_model


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_load_model_returns_the_five_parts_with_the_folders_configs(tiny_model_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    edit_json(folder / "scheduler" / "scheduler_config.json", timestep_spacing="trailing")
    model = load_model(folder, torch.bfloat16, torch.device("cpu"))
    assert isinstance(model, Model) and len(model) == 5
    tokenizer, text_encoder, unet, vae, scheduler_config = model
    assert isinstance(tokenizer, CLIPTokenizer)
    assert (
        text_encoder.config == read_config(CLIPTextConfig, folder / "text_encoder" / "config.json") != CLIPTextConfig()
    )
    assert unet.config == read_config(UNetConfig, folder / "unet" / "config.json") != UNetConfig()
    assert vae.config == read_config(VAEConfig, folder / "vae" / "config.json") != VAEConfig()
    assert scheduler_config == dataclasses.replace(SD15_SCHEDULER_CONFIG, timestep_spacing="trailing")
    file = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(unet.conv_in.weight, file["conv_in.weight"].bfloat16())
    params = [p for m in (text_encoder, unet, vae) for p in m.parameters()]
    assert {(p.dtype, p.device.type) for p in params} == {(torch.bfloat16, "cpu")}


def test_load_model_reads_the_folders_tokenizer(tiny_model_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "tokenizer" / "vocab.json").write_text("{not json")
    with pytest.raises(WeightsError, match=r"cannot read the tokenizer files in .*tokenizer"):
        load_model(folder, torch.float32, torch.device("cpu"))


def test_bad_scheduler_config_is_refused_before_any_weights_are_read(tiny_model_dir, tmp_path, monkeypatch):
    """A v-prediction folder whose UNet file is also missing: the scheduler config is the error, and no weights
    file was opened on the way."""
    folder = tmp_path / "vpred"
    shutil.copytree(tiny_model_dir, folder)
    edit_json(folder / "scheduler" / "scheduler_config.json", prediction_type="v_prediction")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()

    def refuse(path):
        raise AssertionError(f"{path} was read before the scheduler config was checked")

    monkeypatch.setattr(loading, "load_safetensors", refuse)
    with pytest.raises(WeightsError, match=r"unsupported scheduler/scheduler_config\.json in .*prediction_type") as e:
        load_model(folder, torch.float32, torch.device("cpu"))
    assert "\n" not in str(e.value)


@dataclasses.dataclass(frozen=True)
class NeedsWidth:
    width: int

    def __post_init__(self):
        if self.width <= 0:
            raise ValueError(f"width must be > 0, got {self.width}")


@pytest.mark.parametrize(("values", "match"), [({}, "missing 1 required"), ({"width": -1}, "width must be > 0")])
def test_config_the_dataclass_refuses_is_a_one_line_error_naming_the_file(tmp_path, values, match):
    path = tmp_path / "part" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps({**values, "unknown_key": 1}))
    with pytest.raises(WeightsError, match=rf"^unsupported part/config\.json in {re.escape(str(tmp_path))}: .*{match}"):
        read_config(NeedsWidth, path)
    path.write_text(json.dumps({"width": 3, "unknown_key": 1}))
    assert read_config(NeedsWidth, path) == NeedsWidth(3)


def run_resolve(cache: Path, **env) -> subprocess.CompletedProcess:
    code = f"from models.loading import resolve_model; print(resolve_model({REPO!r}))"
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    full_env = {**inherited, "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120)


def fill_cache(cache: Path, src: Path) -> Path:
    """The huggingface_hub cache layout: models--org--name/refs/main -> snapshots/<commit>/<files>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / ("models--" + REPO.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(src, snapshot)
    return snapshot


def test_hub_offline_without_cache_says_so(tmp_path):
    result = run_resolve(tmp_path / "cache", HF_HUB_OFFLINE="1")
    assert result.returncode != 0
    assert "no network connection (or HF_HUB_OFFLINE=1) and no cached copy" in result.stderr
    assert "--model /path/to" in result.stderr


def test_hub_unreachable_without_cache_says_so(tmp_path):
    # An endpoint that refuses connections stands in for "no network".
    result = run_resolve(tmp_path / "cache", HF_ENDPOINT="http://127.0.0.1:9")
    assert "no network connection" in result.stderr


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_hub_uses_prefilled_cache(tiny_model_dir, tmp_path, env):
    snapshot = fill_cache(tmp_path / "cache", tiny_model_dir)
    result = run_resolve(tmp_path / "cache", **env)
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip())
    assert folder == snapshot
    assert load_component(folder, "text_encoder").config.hidden_size == 32


# ----------------------------------------------------------------------------- release_pages (memory-mapped weights)


def rss_file_mib() -> float:
    """This process's resident pages of mapped files (/proc/self/status RssFile), in MiB."""
    line = next(line for line in open("/proc/self/status") if line.startswith("RssFile:"))
    return int(line.split()[1]) / 1024


def mapped_module(path: Path, values: torch.Tensor) -> torch.nn.Module:
    """A module whose one parameter is the memory-mapped tensor of a safetensors file, as the loader leaves it."""
    save_file({"w": values, "small": torch.arange(3.0)}, path)
    module, state = torch.nn.Module(), load_safetensors(path)
    module.w = torch.nn.Parameter(state["w"], requires_grad=False)
    module.register_buffer("small", state["small"])  # shares the mapping's first page with w
    return module


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")
def test_release_pages_drops_mapped_weights_and_they_come_back_unchanged(tmp_path):
    values = torch.randn(16 << 20)  # 64 MiB
    module = mapped_module(tmp_path / "w.safetensors", values)
    assert torch.equal(module.w, values)  # reads every page: all resident
    before = rss_file_mib()
    resources.release_pages(module)
    released = before - rss_file_mib()
    assert released > 60, f"RssFile fell by {released:.1f} MiB, expected the 64 MiB tensor's pages"
    assert torch.equal(module.w, values), "the released pages came back different"
    assert torch.equal(module.small, torch.arange(3.0))
    assert rss_file_mib() - (before - released) > 60  # read again: resident again


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")
def test_release_pages_keeps_a_mapped_tensor_that_was_written_to(tmp_path):
    """A write to a mapped weight makes a private copy of its page; MADV_DONTNEED would throw it away and the old
    value would come back from the file. Such a tensor is left alone."""
    values = torch.randn(16 << 20)
    module = mapped_module(tmp_path / "w.safetensors", values)
    assert torch.equal(module.w, values)  # every page resident
    module.w[-1] = 7.0  # one page of 16384 written (an in-place edit a user might make)
    resources.release_pages(module)
    assert module.w[-1].item() == 7.0
    torch.testing.assert_close(module.w[:-1], values[:-1], rtol=0, atol=0)


def test_release_pages_leaves_ordinary_memory_alone():
    module = torch.nn.Linear(4096, 4096)  # 64 MiB in ordinary (anonymous) memory
    copy = module.weight.detach().clone()
    resources.release_pages(module)
    torch.testing.assert_close(module.weight.detach(), copy, rtol=0, atol=0)
