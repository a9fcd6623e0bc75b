"""Weight loading: local folders, the hub path (offline: pre-filled cache, clear error without one), and the
readable errors for broken or unsafe files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.clip import load_text_encoder
from models.loading import WeightsError, load_safetensors, resolve_model

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
        load_text_encoder(tmp_path)
    assert str(path) in str(e.value)


def test_unexpected_key_is_named(tiny_model_dir, tmp_path):
    path = copy_text_encoder(tiny_model_dir, tmp_path)
    state = load_file(path)
    state["text_model.extra.weight"] = torch.zeros(3)
    save_file(state, path)
    with pytest.raises(WeightsError, match=r"1 unexpected key\(s\), e\.g\. extra\.weight"):
        load_text_encoder(tmp_path)


def test_wrong_shape_is_named(tiny_model_dir, tmp_path):
    path = copy_text_encoder(tiny_model_dir, tmp_path)
    state = load_file(path)
    state["text_model.final_layer_norm.weight"] = torch.zeros(31)
    save_file(state, path)
    with pytest.raises(WeightsError, match=r"final_layer_norm\.weight has shape \(31,\).*\(32,\)"):
        load_text_encoder(tmp_path)


def test_truncated_file_gives_clear_error(tiny_model_dir, tmp_path):
    path = copy_text_encoder(tiny_model_dir, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        load_text_encoder(tmp_path)


def test_garbage_file_gives_clear_error(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x00" * 3)
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        load_safetensors(path)


def test_missing_files_are_named(tiny_model_dir, tmp_path):
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(WeightsError, match=r"missing config file .*text_encoder/config\.json"):
        load_text_encoder(tmp_path)
    shutil.copy(tiny_model_dir / "text_encoder" / "config.json", tmp_path / "text_encoder")
    (tmp_path / "text_encoder" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(WeightsError, match=r"missing weights file .*model\.safetensors.*pytorch_model\.bin"):
        load_text_encoder(tmp_path)


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
    weight = load_text_encoder(tmp_path, dtype=torch.float16).final_layer_norm.weight
    assert weight.dtype == torch.float16 and bool((weight == 2.0).all())
    for dtype in (torch.bfloat16, torch.float32, None):  # bf16 reads the fp32 file: no double rounding via fp16
        weight = load_text_encoder(tmp_path, dtype=dtype).final_layer_norm.weight
        assert not bool((weight == 2.0).any()) and weight.dtype == (dtype or torch.float32)
    # An fp16 file also loads into fp32 (and the plain file is used when not running in half precision).
    half_only = tmp_path / "half"
    (half_only / "text_encoder").mkdir(parents=True)
    shutil.copy(path.with_name("model.fp16.safetensors"), half_only / "text_encoder" / "model.safetensors")
    shutil.copy(path.with_name("config.json"), half_only / "text_encoder")
    model = load_text_encoder(half_only, dtype=torch.float32)
    assert model.final_layer_norm.weight.dtype == torch.float32


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
    assert load_text_encoder(folder).config.hidden_size == 32
