"""Shared fixtures: complete SD 1.5-style model folders with random weights, built by Diffusers/Transformers.

No real SD weights exist here, so every parity test builds the reference networks under a fixed seed, saves
them in the OFFICIAL layout (the file names, config keys and tensor names of the hub repo, not whatever the
installed library would write), loads them with our code, and diffs. Two sizes:
- `tiny_model_dir`: small configs of the same family (seconds to build, used by most tests);
- `sd15_model_dir`: the true SD 1.5 configs with random weights (the real sizes, head dims and memory).
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
SD15_CONFIGS = Path(__file__).resolve().parent / "sd15_configs"  # copies of the official config files
BPE_FILE = ROOT / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz"

# Small members of the SD 1.5 family: same block types and code paths, other sizes (and head counts, norm
# groups, widths that differ from SD 1.5, so a config value read wrongly shows up as a mismatch).
TINY_TEXT_ENCODER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4)
TINY_UNET = dict(
    block_out_channels=[32, 64, 64],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=2,
    cross_attention_dim=32,
    norm_num_groups=8,
    sample_size=16,
)
TINY_VAE = dict(
    block_out_channels=[32, 64],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=32,
)

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": [None, None],
    "safety_checker": [None, None],
    "requires_safety_checker": False,
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def official_config(component: str, **overrides) -> dict:
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return {**json.loads((SD15_CONFIGS / component / name).read_text()), **overrides}


def write_tokenizer_files(folder: Path) -> None:
    """vocab.json + merges.txt (as in the hub repo) derived from OpenAI's BPE file, plus the official configs.

    CLIP's vocabulary is a function of its merges: 256 byte symbols, the same with `</w>`, one token per merge
    (the first 49152 - 256 - 2 lines after the header), then the two special tokens.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(BPE_FILE, "rt", encoding="utf-8").read().split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    symbols = [chr(c) for c in cs]
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(SD15_CONFIGS / "tokenizer" / name, folder / name)


def save_component(folder: Path, config: dict, config_name: str, weights_name: str, state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / config_name).write_text(json.dumps(config, indent=2))
    state = {k: v.detach().contiguous() for k, v in state.items()}
    save_file(state, str(folder / weights_name), metadata={"format": "pt"})


def save_text_encoder(folder: Path, model, config: dict) -> None:
    """Official layout: every key prefixed `text_model.`, plus the int64 `position_ids` buffer (Transformers
    4.22 wrote both; Transformers 5 writes neither, so its save_pretrained would not look like the hub file)."""
    state = {"text_model." + k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(config["max_position_embeddings"])[None]
    save_component(folder, config, "config.json", "model.safetensors", state)


def build_model_folder(folder: Path, text: dict, unet: dict, vae: dict, seed: int = 0) -> Path:
    """Random-weight Transformers/Diffusers models with the given config overrides, saved like the hub repo."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    def public(cfg: dict) -> dict:
        return {k: v for k, v in cfg.items() if not k.startswith("_")}

    torch.manual_seed(seed)
    text_cfg = official_config("text_encoder", **text)
    model = randomize_norms(CLIPTextModel(CLIPTextConfig(**text_cfg)))
    save_text_encoder(folder / "text_encoder", model, text_cfg)
    unet_cfg = official_config("unet", **unet)
    model = randomize_norms(UNet2DConditionModel(**public(unet_cfg)))
    save_component(folder / "unet", unet_cfg, "config.json", "diffusion_pytorch_model.safetensors", model.state_dict())
    del model
    vae_cfg = official_config("vae", **vae)
    model = randomize_norms(AutoencoderKL(**public(vae_cfg)))
    save_component(folder / "vae", vae_cfg, "config.json", "diffusion_pytorch_model.safetensors", model.state_dict())
    write_tokenizer_files(folder / "tokenizer")
    (folder / "scheduler").mkdir(exist_ok=True)
    shutil.copy(SD15_CONFIGS / "scheduler" / "scheduler_config.json", folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return folder


def randomize_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Diffusers initialises norm layers to weight 1, bias 0, and some output convs to zero; random values
    make a parity test see a swapped or missing norm affine."""
    for m in model.modules():
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_model_folder(tmp_path_factory.mktemp("tiny-sd"), TINY_TEXT_ENCODER, TINY_UNET, TINY_VAE)


@pytest.fixture(scope="session")
def sd15_model_dir(tmp_path_factory) -> Iterator[Path]:
    """The true SD 1.5 configs with random weights: about 4 GB written to the temporary directory, so built once per
    test run and shared by every test file (session scope), and removed when the run ends, pass or fail. Tests that
    use it are marked `slow` (`uv run pytest -m "not slow"` skips them)."""
    folder = build_model_folder(tmp_path_factory.mktemp("sd15"), {}, {}, {})
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items) -> None:
    """A test that needs a full-size folder is `slow` even where its mark was forgotten, so `-m "not slow"` never
    builds one."""
    for item in items:
        if "sd15_model_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"max abs diff {(a.double() - b.double()).abs().max().item():.3g}"


def check_loop_never_syncs(pipe) -> None:
    """Runs the CUDA-graph loop that generate() captured on `pipe` (speed_up) once uncaptured, then replays its graph,
    under torch.cuda.set_sync_debug_mode("error"): any host sync in the loop's step raises. Used by the CUDA test and
    bench/gpu_bench.py."""
    ((_, step, graph),) = pipe.fast_loop.graphs.values()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():  # the buffers were made by generate(), in inference mode
            step()
            graph.replay()
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ----------------------------------------------------------------------------- Diffusers pipelines as the reference

DIFFUSERS_SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
}
MORE_SCHEDULERS = {  # tests/test_samplers_more.py's samplers: the class and the options that make it ours
    "pndm": ("PNDMScheduler", {}),  # skip_prk_steps comes from SD 1.5's scheduler_config.json
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


def with_scheduler(ref, name: str, karras: bool = False):
    """The common Diffusers idiom: <Class>.from_config(pipe.scheduler.config) on a pipeline as loaded. Always from
    the config as loaded (kept in `ref.loaded_scheduler_config`), never chained through other classes' configs."""
    import diffusers

    if not hasattr(ref, "loaded_scheduler_config"):
        ref.loaded_scheduler_config = ref.scheduler.config  # the PNDM config as loaded
    cls, options = MORE_SCHEDULERS[name] if name in MORE_SCHEDULERS else (DIFFUSERS_SCHEDULERS[name], {})
    cls, options = getattr(diffusers, cls), {**options, **({"use_karras_sigmas": True} if karras else {})}
    ref.scheduler = cls.from_config(ref.loaded_scheduler_config, **options)
    return ref


def assert_images_close(got, want, atol: float) -> None:
    """Two float32 (N, H, W, 3) arrays in [0, 1] (output_type="np"), whole, at an absolute tolerance."""
    assert got.shape == want.shape and got.dtype == want.dtype == np.float32, (got.shape, want.shape, got.dtype)
    g, w = torch.from_numpy(got), torch.from_numpy(want)
    torch.testing.assert_close(g, w, atol=atol, rtol=0, msg=lambda m: f"{m}\n{max_diff(g, w)}")


def run_both(ours, ref, prompt, negative_prompt="", *, init_image=None, reference_embeds=None, **settings):
    """generate() and the Diffusers pipeline `ref` on the same prompt(s), init image and settings, both as float32
    (N, H, W, 3) arrays. Settings use our names (settings.Settings) and are translated for Diffusers, which gets
    every one explicitly (its defaults differ: 50 steps, the UNet's sample size) and the img2img pipeline when there
    is an init image. `reference_embeds` = (prompt_embeds, negative_prompt_embeds) replaces the reference's text."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from min_pipeline import generate
    from settings import Settings

    s = Settings(**settings)
    got = generate(ours, prompt, negative_prompt, init_image=init_image, output_type="np", progress=False, **asdict(s))
    ref = with_scheduler(ref, s.scheduler, s.karras)
    prompts = [prompt] if isinstance(prompt, str) else prompt
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
    text = dict(prompt=prompts, negative_prompt=negatives)
    if reference_embeds is not None:
        text = dict(prompt_embeds=reference_embeds[0], negative_prompt_embeds=reference_embeds[1])
    kwargs = dict(num_inference_steps=s.steps, guidance_scale=s.guidance_scale, num_images_per_prompt=s.num_images,
                  eta=s.eta, generator=torch.Generator().manual_seed(s.seed), output_type="np")  # fmt: skip
    if init_image is None:
        kwargs |= dict(height=s.height, width=s.width)
    else:
        ref = StableDiffusionImg2ImgPipeline(**ref.components)
        ref.set_progress_bar_config(disable=True)
        kwargs |= dict(image=init_image, strength=s.strength)
    return got, ref(**text, **kwargs).images


@pytest.fixture(scope="session", autouse=True)
def converted_weights_in_tmp(tmp_path_factory):
    """bfloat16 runs on the CPU keep a converted copy of the weights (models.loading.read_weights): in a temporary
    folder, never in the user's cache (subprocesses inherit it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINSD_CACHE", str(tmp_path_factory.mktemp("minsd-cache")))
        yield


@pytest.fixture(autouse=True)
def float32_by_default(monkeypatch):
    """The suite's references are float32: in-process, --dtype auto and load_pipeline(dtype=None) pick float32 on
    every CPU, AMX or not, so a test means the same on every machine (tests/test_dtype.py checks the AMX choice)."""
    import resources

    monkeypatch.setattr(resources, "cpu_has_amx", lambda: False)
