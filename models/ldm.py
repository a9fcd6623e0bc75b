"""Original single-file checkpoints (`v1-5-pruned-emaonly.safetensors` and fine-tunes shaped like it).

The CompVis latent-diffusion code saved the whole `LatentDiffusion` module as one state dict: the UNet under
`model.diffusion_model.`, the VAE under `first_stage_model.`, the CLIP text encoder under
`cond_stage_model.transformer.` (Transformers' names, with or without `text_model.`), next to the DDPM noise
schedule buffers and, in some files, EMA bookkeeping. Our modules carry Diffusers' names, so this file renames:
the tables below map each LDM block (`input_blocks.4.0`, `decoder.up.3.block.1`) onto a Diffusers block
(`down_blocks.1.resnets.0`, `decoder.up_blocks.0.resnets.1`), then a parameter's name inside its block.
The block indices follow from the config (layers per level, number of levels), so small test configs map too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.clip import CLIPTextConfig, CLIPTextModel
from models.loading import WeightsError, build, load_safetensors, read_config
from models.unet import UNet, UNetConfig
from models.vae import AutoencoderKL, VAEConfig

# Tensors of LDM's DDPM wrapper, not of any network, skipped by name: the noise schedule (scheduler.py recomputes
# it), the per-timestep loss log-variance `logvar`, and the EMA bookkeeping.
SCHEDULE_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
}  # fmt: skip
EMA_PREFIX = "model_ema."  # full-EMA files keep a second copy of the UNet here; the emaonly files only counters
TEXT, UNET, VAE = "cond_stage_model.transformer.", "model.diffusion_model.", "first_stage_model."

# Parameter names inside a block: LDM's name -> ours (unlisted names are the same in both).
UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}  # fmt: skip
VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
SAME: dict[str, str] = {}  # the SpatialTransformer, convs and norms: LDM's names are Diffusers' names


def unet_blocks(cfg: UNetConfig) -> dict[str, tuple[str, dict[str, str]]]:
    """LDM UNet block -> (our block, names inside it). LDM numbers its blocks in one flat list per direction:
    `input_blocks.0` is conv_in, then each level has n = layers_per_block blocks of [ResBlock, SpatialTransformer]
    and, but for the lowest, one downsampler; `output_blocks` has n + 1 per level, the upsampler riding in the
    last one (after its ResBlock, and its SpatialTransformer if the level has them)."""
    n, levels = cfg.layers_per_block, len(cfg.block_out_channels)
    m = {
        "time_embed.0": ("time_embedding.linear_1", SAME),
        "time_embed.2": ("time_embedding.linear_2", SAME),
        "input_blocks.0.0": ("conv_in", SAME),
        "middle_block.0": ("mid_block.resnets.0", UNET_RESNET),
        "middle_block.1": ("mid_block.attentions.0", SAME),
        "middle_block.2": ("mid_block.resnets.1", UNET_RESNET),
        "out.0": ("conv_norm_out", SAME),
        "out.2": ("conv_out", SAME),
    }
    for i in range(levels):
        down_attn = cfg.down_block_types[i].startswith("CrossAttn")
        up_attn = cfg.up_block_types[i].startswith("CrossAttn")
        for j in range(n):
            b = 1 + i * (n + 1) + j
            m[f"input_blocks.{b}.0"] = (f"down_blocks.{i}.resnets.{j}", UNET_RESNET)
            if down_attn:
                m[f"input_blocks.{b}.1"] = (f"down_blocks.{i}.attentions.{j}", SAME)
        for j in range(n + 1):
            b = i * (n + 1) + j
            m[f"output_blocks.{b}.0"] = (f"up_blocks.{i}.resnets.{j}", UNET_RESNET)
            if up_attn:
                m[f"output_blocks.{b}.1"] = (f"up_blocks.{i}.attentions.{j}", SAME)
        if i < levels - 1:
            m[f"input_blocks.{(i + 1) * (n + 1)}.0.op"] = (f"down_blocks.{i}.downsamplers.0.conv", SAME)
            upsampler = f"output_blocks.{i * (n + 1) + n}.{2 if up_attn else 1}.conv"  # after ResBlock (+ attention)
            m[upsampler] = (f"up_blocks.{i}.upsamplers.0.conv", SAME)
    return m


def vae_blocks(cfg: VAEConfig) -> dict[str, tuple[str, dict[str, str]]]:
    """LDM VAE block -> (our block, names inside it). LDM's decoder numbers its levels from the full-size one
    (`decoder.up.0` runs last); ours in the order they run."""
    n, levels = cfg.layers_per_block, len(cfg.block_out_channels)
    m = {name: (name, SAME) for name in ("quant_conv", "post_quant_conv")}
    for part in ("encoder", "decoder"):
        m |= {
            f"{part}.conv_in": (f"{part}.conv_in", SAME),
            f"{part}.mid.block_1": (f"{part}.mid_block.resnets.0", VAE_RESNET),
            f"{part}.mid.attn_1": (f"{part}.mid_block.attentions.0", VAE_ATTENTION),
            f"{part}.mid.block_2": (f"{part}.mid_block.resnets.1", VAE_RESNET),
            f"{part}.norm_out": (f"{part}.conv_norm_out", SAME),
            f"{part}.conv_out": (f"{part}.conv_out", SAME),
        }
    for i in range(levels):
        up = levels - 1 - i
        m |= {f"encoder.down.{i}.block.{j}": (f"encoder.down_blocks.{i}.resnets.{j}", VAE_RESNET) for j in range(n)}
        m |= {f"decoder.up.{up}.block.{j}": (f"decoder.up_blocks.{i}.resnets.{j}", VAE_RESNET) for j in range(n + 1)}
        if i < levels - 1:
            m[f"encoder.down.{i}.downsample.conv"] = (f"encoder.down_blocks.{i}.downsamplers.0.conv", SAME)
            m[f"decoder.up.{up}.upsample.conv"] = (f"decoder.up_blocks.{i}.upsamplers.0.conv", SAME)
    return m


def rename(state: dict[str, torch.Tensor], blocks: dict, prefix: str, source: str) -> dict[str, torch.Tensor]:
    """Map every `block.param_path` key through `blocks`; a key in no known block is an error naming it."""
    out = {}
    for key, v in state.items():
        parts = key.split(".")
        # The longest leading run of parts that names a block (`input_blocks.3.0.op` before `input_blocks.3.0`).
        heads = (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
        head = next((h for h in heads if h in blocks), None)
        if head is None:
            raise WeightsError(f"{source}: unexpected key {prefix}{key} (not part of an SD 1.5 checkpoint)")
        block, names = blocks[head]
        module, _, param = key[len(head) + 1 :].rpartition(".")  # ("in_layers.0", "weight"); ("", "bias")
        if names is VAE_ATTENTION and v.ndim == 4:
            v = v.flatten(1)  # LDM's VAE attention projects with 1x1 convs: (C, C, 1, 1) -> Linear (C, C)
        out[".".join(filter(None, (block, names.get(module, module), param)))] = v
    return out


def load_single_file(
    path: Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None, config: Path | None = None
) -> tuple[CLIPTextModel, UNet, AutoencoderKL]:
    """Text encoder, UNet and VAE from one LDM-layout safetensors file. The configs are SD 1.5's (our dataclass
    defaults), or those of the Diffusers-layout folder `config` (`text_encoder/`, `unet/`, `vae/config.json`)."""
    path = Path(path)
    state = load_safetensors(path)  # refuses pickles (.ckpt, ...): they can run code when loaded
    if config is None:
        text_cfg, unet_cfg, vae_cfg = CLIPTextConfig(), UNetConfig(), VAEConfig()
    else:
        text_cfg = read_config(CLIPTextConfig, Path(config) / "text_encoder" / "config.json")
        unet_cfg = read_config(UNetConfig, Path(config) / "unet" / "config.json")
        vae_cfg = read_config(VAEConfig, Path(config) / "vae" / "config.json")

    parts: dict[str, dict[str, torch.Tensor]] = {TEXT: {}, UNET: {}, VAE: {}}
    for key, v in state.items():
        if key in SCHEDULE_BUFFERS or key.startswith(EMA_PREFIX):
            continue
        prefix = next((p for p in parts if key.startswith(p)), None)
        if prefix is None:
            raise WeightsError(f"{path}: unexpected key {key} (not part of an SD 1.5 checkpoint)")
        parts[prefix][key.removeprefix(prefix)] = v

    def source(prefix: str) -> str:
        return f"{path} [{prefix}*]"

    unet_state = rename(parts[UNET], unet_blocks(unet_cfg), UNET, str(path))
    vae_state = rename(parts[VAE], vae_blocks(vae_cfg), VAE, str(path))
    return (
        build(CLIPTextModel, text_cfg, parts[TEXT], source(TEXT), dtype, device),  # build strips `text_model.`
        build(UNet, unet_cfg, unet_state, source(UNET), dtype, device),
        build(AutoencoderKL, vae_cfg, vae_state, source(VAE), dtype, device),
    )
