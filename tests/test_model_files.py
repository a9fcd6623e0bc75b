"""Broken, foreign or mistyped model files: each is ONE line (a WeightsError; the CLI's `min_pipeline.py: error: ...`,
exit 2) naming the file, the key and the value and how to fix it, raised before any weights are read where the
configs already tell. Every test corrupts a copy of the tiny model folder."""

from __future__ import annotations

import inspect
import json
import pickle
import re
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli.main import main
from conftest import SD15_CONFIGS, TINY_TEXT_ENCODER, TINY_UNET, TINY_VAE, official_config
from models import loading
from models.clip import CLIPTextConfig
from models.loading import DEFAULT_MODEL, WeightsError, load_model, read_config, resolve_model
from models.unet import UNet, UNetConfig
from models.vae import VAEConfig
from tokenizer import CLIPTokenizer

CPU = torch.device("cpu")
CONFIGS = {"text_encoder": CLIPTextConfig, "unet": UNetConfig, "vae": VAEConfig}
UNET_FILE = Path("unet") / "diffusion_pytorch_model.safetensors"


@pytest.fixture
def model(tiny_model_dir, tmp_path) -> Path:
    """A copy of the tiny model folder, to corrupt."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))


@pytest.fixture
def no_weights(monkeypatch):
    """Reading any weights file fails the test: the error must come from the configs alone (nothing loaded half)."""

    def refuse(path):
        raise AssertionError(f"{path} was read before the configs were checked")

    monkeypatch.setattr(loading, "load_safetensors", refuse)


def config_path(folder: Path, component: str) -> Path:
    return folder / component / ("scheduler_config.json" if component == "scheduler" else "config.json")


def edit_config(folder: Path, component: str, **changes) -> Path:
    path = config_path(folder, component)
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return path


def load_error(model: Path | str, *message: str) -> str:
    """load_model's WeightsError: one line, holding every piece of `message`."""
    with pytest.raises(WeightsError) as e:
        load_model(model, torch.float32, CPU)
    text = str(e.value)
    assert "\n" not in text, text
    for part in message:
        assert part in text, f"{part!r} not in {text!r}"
    return text


def cli(model: str, tmp_path: Path, capsys) -> tuple[int, list[str]]:
    """main() in-process on `--model model`: the exit code and the non-empty stderr lines."""
    out = tmp_path / "out.png"
    args = ["--prompt", "x", "--steps", "1", "--height", "16", "--width", "16", "--device", "cpu", "--quiet"]
    code = main([*args, "--output", str(out), "--model", model])
    assert not out.exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- 1. config values: types and ranges

BAD_VALUES = [  # (component, key, value, what the message says to use)
    ("unet", "layers_per_block", "2", "an integer in [1, 64]"),
    ("unet", "layers_per_block", True, "an integer in [1, 64]"),
    ("unet", "layers_per_block", 1000, "an integer in [1, 64]"),
    ("unet", "norm_num_groups", 0, "an integer in [1, 8192]"),
    ("unet", "norm_num_groups", 7, "a divisor of every width in (32, 64, 64)"),
    ("unet", "block_out_channels", [32, -64, 64], "a list of 1 to 8 integers in [1, 8192]"),
    ("unet", "block_out_channels", [32, 64, 100000], "a list of 1 to 8 integers in [1, 8192]"),
    ("unet", "attention_head_dim", 3, "a divisor of the attended widths [32, 64]"),
    ("unet", "norm_eps", "1e-5", "a number in (0, 1)"),
    ("unet", "down_block_types", ["CrossAttnDownBlock2D", "DownBlock2D"], "a list of 3 block types"),
    ("unet", "down_block_types", ["AttnDownBlock2D"] * 3, "a list of 'CrossAttnDownBlock2D' or 'DownBlock2D' entries"),
    ("unet", "freq_shift", 16, "an integer in [0, 15]"),
    ("unet", "flip_sin_to_cos", 1, "true or false"),
    ("vae", "scaling_factor", "0.18", "a number in (0, 100)"),
    ("vae", "scaling_factor", 0, "a number in (0, 100)"),
    ("vae", "norm_num_groups", 3, "a divisor of every width in (32, 64)"),
    ("vae", "in_channels", 4, "3 (RGB images)"),
    ("vae", "layers_per_block", -1, "an integer in [1, 64]"),
    ("text_encoder", "num_hidden_layers", 2_000_000, "an integer in [1, 64]"),
    ("text_encoder", "num_attention_heads", 5, "a divisor of hidden_size=32"),
    ("text_encoder", "max_position_embeddings", 16, "an integer in [77, 8192]"),
    ("text_encoder", "layer_norm_eps", 0, "a number in (0, 1)"),
    ("text_encoder", "vocab_size", 49408.0, "an integer in [1, 1048576]"),
]


@pytest.mark.parametrize(("component", "key", "value", "use"), BAD_VALUES, ids=lambda v: str(v)[:20])
def test_config_value_is_checked_before_any_weights(model, no_weights, component, key, value, use):
    edit_config(model, component, **{key: value})
    value = tuple(value) if isinstance(value, list) else value
    load_error(model, f"unsupported {component}/config.json in {model}: ", f"{key}={value!r}", f"use {use}")


@pytest.mark.parametrize(("changes", "message"), [
    ({"in_channels": 7}, "unet in_channels=7 and out_channels=4 must be vae latent_channels=4 (in_channels 9 for "
                         "inpainting)"),
    ({"cross_attention_dim": 64}, "unet cross_attention_dim=64 must equal text_encoder hidden_size=32"),
])  # fmt: skip
def test_configs_that_do_not_fit_together(model, no_weights, changes, message):
    edit_config(model, "unet", **changes)
    load_error(model, f"the configs in {model} do not fit together: {message}")


def test_any_failure_to_build_is_a_weights_error(model, monkeypatch):
    def broken(self, cfg):
        raise RuntimeError("a check the configs missed\nsecond line")

    monkeypatch.setattr(UNet, "__init__", broken)
    load_error(model, f"{model / UNET_FILE}: cannot build UNet from UNetConfig(", "RuntimeError: a check the configs")


def test_json_that_is_not_an_object(model, no_weights):
    config_path(model, "unet").write_text("[1, 2]")
    load_error(model, f"unsupported unet/config.json in {model}: a JSON list, not an object")


# ----------------------------------------------------------------------------- 2. keys SD 1.5's architecture fixes

FIXED_VALUES = [  # (component, key, value, the one implemented value)
    ("unet", "act_fn", "gelu", "'silu'"),
    ("unet", "center_input_sample", True, "False"),
    ("unet", "mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "'UNetMidBlock2DCrossAttn'"),
    ("unet", "upcast_attention", True, "False"),
    ("unet", "class_embed_type", "timestep", "None"),
    ("unet", "transformer_layers_per_block", True, "1"),  # true == 1 in Python, but not in a config
    ("unet", "conv_in_kernel", 1, "3"),
    ("vae", "act_fn", "relu", "'silu'"),
    ("vae", "use_quant_conv", False, "True"),
    ("vae", "mid_block_add_attention", False, "True"),
    ("vae", "shift_factor", 0.0609, "None"),
]


@pytest.mark.parametrize(("component", "key", "value", "only"), FIXED_VALUES, ids=lambda v: str(v)[:20])
def test_value_we_do_not_implement_is_refused(model, no_weights, component, key, value, only):
    edit_config(model, component, **{key: value})
    load_error(model, f"unsupported {component}/config.json in {model}: {key}={value!r} is not supported; "
                      f"minsd implements only {only}")  # fmt: skip


def test_clip_activation_other_than_the_two_implemented(model, no_weights):
    edit_config(model, "text_encoder", hidden_act="relu")
    load_error(
        model, "text_encoder/config.json", "hidden_act='relu' is not supported; use 'quick_gelu' (SD 1.5) or 'gelu'"
    )
    for act in ("quick_gelu", "gelu"):
        edit_config(model, "text_encoder", hidden_act=act)
        assert read_config(CLIPTextConfig, config_path(model, "text_encoder")).hidden_act == act


@pytest.mark.parametrize(("cls", "reference"), [(UNetConfig, "UNet2DConditionModel"), (VAEConfig, "AutoencoderKL")])
def test_fixed_tables_name_diffusers_keys_with_their_defaults(cls, reference):
    """Each key of a FIXED table is a constructor argument of the Diffusers class, and its one value the default."""
    diffusers = pytest.importorskip("diffusers")
    params = inspect.signature(getattr(diffusers, reference).__init__).parameters
    assert {k: params[k].default for k in cls.FIXED if k in params} == cls.FIXED


def test_configs_as_diffusers_and_transformers_write_them_are_accepted(tiny_model_dir, tmp_path):
    """save_pretrained writes every constructor argument, defaults included: none of them may be refused."""
    diffusers = pytest.importorskip("diffusers")
    import transformers

    def public(cfg: dict) -> dict:
        return {k: v for k, v in cfg.items() if not k.startswith("_")}

    text_config = official_config("text_encoder", **TINY_TEXT_ENCODER)
    with torch.device("meta"):
        written = {
            "unet": dict(diffusers.UNet2DConditionModel(**public(official_config("unet", **TINY_UNET))).config),
            "vae": dict(diffusers.AutoencoderKL(**public(official_config("vae", **TINY_VAE))).config),
            "text_encoder": transformers.CLIPTextConfig(**text_config).to_dict(),
        }
    for name, values in written.items():
        path = tmp_path / name / "config.json"
        path.parent.mkdir()
        path.write_text(json.dumps(values, default=str))
        assert read_config(CONFIGS[name], path) == read_config(CONFIGS[name], tiny_model_dir / name / "config.json")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_official_sd15_configs_are_the_defaults(name):
    assert read_config(CONFIGS[name], SD15_CONFIGS / name / "config.json") == CONFIGS[name]()


# ----------------------------------------------------------------------------- 3. Stable Diffusion 2.x

SD2_UNET = {"use_linear_projection": True, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024}


@pytest.mark.parametrize(("component", "changes", "named"), [
    ("unet", SD2_UNET, "use_linear_projection=True, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024"),
    ("unet", {"use_linear_projection": True}, "use_linear_projection=True"),
    ("scheduler", {"prediction_type": "v_prediction"}, "prediction_type='v_prediction'"),
    ("text_encoder", {"hidden_size": 1024, "hidden_act": "gelu"}, "hidden_size=1024"),
])  # fmt: skip
def test_sd2_config_is_named_as_such(model, no_weights, component, changes, named):
    path = edit_config(model, component, **changes)
    load_error(model, f"unsupported {component}/{path.name} in {model}: {named} looks like Stable Diffusion 2.x; "
                      "minsd runs SD 1.x models only")  # fmt: skip


def test_sdxl_unet_config_is_named_as_such(model, no_weights):
    edit_config(model, "unet", addition_embed_type="text_time", **SD2_UNET)
    load_error(model, "unet/config.json", "addition_embed_type='text_time', use_linear_projection=True, ",
               "looks like Stable Diffusion XL; minsd runs SD 1.x models only")  # fmt: skip


def test_scheduler_is_checked_first(model, no_weights):
    edit_config(model, "unet", **SD2_UNET)
    edit_config(model, "scheduler", prediction_type="v_prediction")
    load_error(model, "scheduler/scheduler_config.json", "prediction_type='v_prediction' looks like Stable Diffusion 2")


# ----------------------------------------------------------------------------- 4. tokenizer files


def edit_vocab(folder: Path, edit) -> None:
    path = folder / "tokenizer" / "vocab.json"
    vocab = json.loads(path.read_text(encoding="utf-8"))
    edit(vocab)
    path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")


def test_vocab_without_a_token_a_merge_makes(model, no_weights):
    last_merge = (model / "tokenizer" / "merges.txt").read_text(encoding="utf-8").splitlines()[-1]
    token = last_merge.replace(" ", "")
    edit_vocab(model, lambda vocab: vocab.pop(token))
    expected = f"lacks 1 token(s) that merges.txt makes, e.g. {token!r}: vocab.json and merges.txt do not belong"
    with pytest.raises(ValueError, match="^" + re.escape(str(model / "tokenizer" / "vocab.json"))) as e:
        CLIPTokenizer.from_folder(model)
    assert expected in str(e.value)
    load_error(model, f"cannot read the tokenizer files in {model / 'tokenizer'}: ", expected)


def test_vocab_that_is_not_an_object(model, no_weights):
    (model / "tokenizer" / "vocab.json").write_text('["<|startoftext|>", "<|endoftext|>"]')
    load_error(
        model, "cannot read the tokenizer files in", "vocab.json is not a vocabulary (a JSON object of token: id)"
    )


def test_token_id_beyond_the_text_encoders_vocabulary(model, no_weights):
    edit_vocab(model, lambda vocab: vocab.update({"cat</w>": 60000}))
    message = "the tokenizer's vocab.json has token id 60000, but the text encoder's config.json says vocab_size=49408"
    load_error(model, message, f"the tokenizer and text encoder in {model} do not belong together")


# ----------------------------------------------------------------------------- 5. tensor dtypes


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.float8_e4m3fn, torch.float64])
def test_unsupported_tensor_dtype_is_named(model, dtype):
    path = model / UNET_FILE
    state = load_file(path)
    state["conv_in.weight"] = state["conv_in.weight"].to(dtype)
    save_file(state, path)
    name = str(dtype).removeprefix("torch.")
    load_error(
        model, f"{path}: tensor conv_in.weight is {name}; minsd loads float32, float16 and bfloat16 weights only"
    )


def test_bfloat16_file_loads(model):
    path = model / UNET_FILE
    save_file({k: v.bfloat16() for k, v in load_file(path).items()}, path)
    assert load_model(model, torch.float32, CPU).unet.conv_in.weight.dtype == torch.float32


# ----------------------------------------------------------------------------- 6. a pickle renamed to .safetensors

PICKLED = (
    "not a valid safetensors file but a PyTorch pickle/zip checkpoint under a .safetensors name, which is never loaded"
)


@pytest.mark.parametrize("kind", ["torch.save zip", "pickle protocol 2", "pickle protocol 5"])
def test_renamed_pickle_is_recognised(model, tmp_path, kind):
    path = model / UNET_FILE
    if kind == "torch.save zip":
        torch.save({"conv_in.weight": torch.zeros(2)}, path)
    else:
        path.write_bytes(pickle.dumps({"conv_in.weight": [0.0]}, protocol=int(kind[-1])))
    load_error(model, f"cannot read {path}: {PICKLED}", "download the .safetensors version")
    single = tmp_path / "v1-5.safetensors"
    shutil.copy(path, single)
    load_error(single, f"cannot read {single}: {PICKLED}")


def test_cut_safetensors_file_is_not_taken_for_a_pickle(tmp_path):
    """A safetensors header 640 bytes long starts with b'\\x80\\x02', as a pickle does; the `{` after it tells."""
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(struct.pack("<Q", 640) + header.ljust(640) + b"\0" * 4)  # 4 of the 16 data bytes
    assert path.read_bytes()[:2] == b"\x80\x02"
    with pytest.raises(WeightsError, match="not a valid safetensors file .*; re-download it"):
        loading.load_safetensors(path)


# ----------------------------------------------------------------------------- 7. a part of a model folder


@pytest.mark.parametrize("part", ["unet", "tokenizer", str(UNET_FILE), "text_encoder/model.safetensors"])
def test_part_of_a_model_folder_points_at_the_folder(model, tmp_path, capsys, part):
    code, lines = cli(str(model / part), tmp_path, capsys)
    assert code == 2 and lines == [
        f"min_pipeline.py: error: {model / part} is part of the model folder {model}, not a model; pass --model {model}"
    ]


def test_model_folder_and_a_single_file_kept_in_one_are_not_parts(model):
    assert resolve_model(str(model)) == model
    single = model / "v1-5.safetensors"  # a single file inside a model folder is not part of it
    single.write_bytes(b"")
    assert resolve_model(str(single)) == single


# ----------------------------------------------------------------------------- 8. missing local paths vs hub repo ids


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and an empty cache, also for a huggingface_hub that was imported already (it reads both
    variables at import)."""
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("model", ["m/sd15-tny", "./sd15", "../nope/sd15", "~/nope-minsd/sd15", "a/b/c", "sd15 tiny"])
def test_missing_local_path_is_not_sent_to_the_hub(offline_hub, tmp_path, monkeypatch, capsys, model):
    (tmp_path / "m").mkdir()  # `m/` exists here, so `m/sd15-tny` is a mistyped local path, not owner/name

    def refuse(repo_id, half):
        raise AssertionError(f"{repo_id} was sent to the hub")

    monkeypatch.setattr(loading, "_download", refuse)
    code, lines = cli(model, tmp_path, capsys)
    assert code == 2 and lines == [
        f"min_pipeline.py: error: model folder {model} does not exist; pass --model with a Diffusers-layout folder"
    ]


def test_repo_id_warns_before_trying_the_hub(offline_hub, tmp_path, capsys):
    code, lines = cli("someone/sd15-tny", tmp_path, capsys)
    assert code == 2 and len(lines) == 2, lines
    assert lines[0] == "min_pipeline.py: warning: someone/sd15-tny is not a local path; trying the hub"
    assert lines[1].startswith("min_pipeline.py: error: cannot download someone/sd15-tny: no network connection")
    assert "(or HF_HUB_OFFLINE=1) and no cached copy" in lines[1]


def test_default_model_goes_to_the_hub_without_a_warning(offline_hub):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(WeightsError, match="no network connection"):
            resolve_model(DEFAULT_MODEL)


# ----------------------------------------------------------------------------- the CLI: one line, exit 2


@pytest.mark.parametrize(("case", "message"), [
    ("layers", "error: unsupported unet/config.json in {m}: UNet config layers_per_block='2' is not supported; "
               "use an integer in [1, 64]"),
    ("act_fn", "error: unsupported unet/config.json in {m}: act_fn='gelu' is not supported; minsd implements only "
               "'silu'"),
    ("sd2", "error: unsupported unet/config.json in {m}: use_linear_projection=True, attention_head_dim=[5, 10, 20, "
            "20], cross_attention_dim=1024 looks like Stable Diffusion 2.x; minsd runs SD 1.x models only"),
    ("int8", "error: {m}/unet/diffusion_pytorch_model.safetensors: tensor conv_in.weight is int8; minsd loads"),
    ("vocab", "error: the tokenizer's vocab.json has token id 60000"),
])  # fmt: skip
def test_cli_prints_one_line_and_exits_2(model, tmp_path, capsys, case, message):
    if case == "layers":
        edit_config(model, "unet", layers_per_block="2")
    elif case == "act_fn":
        edit_config(model, "unet", act_fn="gelu")
    elif case == "sd2":
        edit_config(model, "unet", **SD2_UNET)
    elif case == "int8":
        state = load_file(model / UNET_FILE)
        save_file({**state, "conv_in.weight": state["conv_in.weight"].to(torch.int8)}, model / UNET_FILE)
    else:
        edit_vocab(model, lambda vocab: vocab.update({"cat</w>": 60000}))
    code, lines = cli(str(model), tmp_path, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("min_pipeline.py: error: "), lines
    assert message.format(m=model) in lines[0]
