"""Checkpoint key names -> ours (= Diffusers'): pure functions from state dict to state dict, no file I/O.

Diffusers-layout folders already use our names, but for a few quirks of older writers (the table QUIRKS). Original
single-file checkpoints (`v1-5-pruned-emaonly.safetensors` and fine-tunes shaped like it) are the whole CompVis
`LatentDiffusion` module as one state dict: the UNet under `model.diffusion_model.`, the VAE under
`first_stage_model.`, the CLIP text encoder under `cond_stage_model.transformer.` (Transformers' names, with or
without `text_model.`), next to the DDPM noise schedule buffers and, in some files, EMA bookkeeping. The block tables
below map each LDM block (`input_blocks.4.0`, `decoder.up.3.block.1`) onto a Diffusers block (`down_blocks.1.resnets.0`,
`decoder.up_blocks.0.resnets.1`), then a parameter's name inside its block. The block indices follow from the config
(layers per level, number of levels), so small test configs map too. A1111's ControlNet files (ControlNet's cldm.py
layout, `control_model.` or no prefix) reuse the UNet's table for the encoder they copy (controlnet_blocks).

A key that fits nowhere raises ValueError naming it; `models.loading` adds the file's name.
"""

from __future__ import annotations

import re

import torch

from models.controlnet import ControlNetConfig
from models.unet import UNetConfig
from models.vae import VAEConfig

# ----------------------------------------------------------------------------- checkpoint quirks

# Every key quirk of the files we read, in one table: a regex matching a whole key -> the key it becomes (`\1` is the
# first group), or None: the tensor belongs to no network we run and is dropped. The rows apply in order.
QUIRKS: dict[str, str | None] = {
    # CLIP: the official file (Transformers 4.22) stores the constant buffer `position_ids` = arange(77) and prefixes
    # every key with `text_model.` (in a single file, after `cond_stage_model.transformer.`); Transformers 5 writes
    # neither. We keep neither.
    r".*embeddings\.position_ids": None,
    r"(cond_stage_model\.transformer\.)?text_model\.(.*)": r"\1\2",
    # VAE: files written before Diffusers 0.14 (the official SD 1.5 VAE among them) name the mid-block attention
    # projections like this; Diffusers 0.42 still renames them on load.
    r"(.*\.attentions\.\d+)\.query\.(weight|bias)": r"\1.to_q.\2",
    r"(.*\.attentions\.\d+)\.key\.(weight|bias)": r"\1.to_k.\2",
    r"(.*\.attentions\.\d+)\.value\.(weight|bias)": r"\1.to_v.\2",
    r"(.*\.attentions\.\d+)\.proj_attn\.(weight|bias)": r"\1.to_out.0.\2",
    # LDM single files: tensors of the DDPM wrapper, not of a network. The noise schedule (scheduler.py recomputes
    # it), the per-timestep loss log-variance `logvar`, and the EMA bookkeeping (full-EMA files keep a second copy of
    # the UNet under `model_ema.`, the emaonly files only its counters).
    r"betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
    r"log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance|"
    r"posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar": None,
    r"model_ema\..*": None,
}
_QUIRKS = [(re.compile(pattern), new) for pattern, new in QUIRKS.items()]


def fix_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A file's state dict with QUIRKS applied to every key."""
    out = {}
    for key, v in state.items():
        for pattern, new in _QUIRKS:
            if m := pattern.fullmatch(key):
                if new is None:
                    break
                key = m.expand(new)
        else:
            out[key] = v
    return out


# ----------------------------------------------------------------------------- single files

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


def rename(state: dict[str, torch.Tensor], blocks: dict, prefix: str) -> dict[str, torch.Tensor]:
    """Map every `block.param_path` key through `blocks`; a key in no known block is an error naming it."""
    out = {}
    for key, v in state.items():
        parts = key.split(".")
        # The longest leading run of parts that names a block (`input_blocks.3.0.op` before `input_blocks.3.0`).
        heads = (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
        head = next((h for h in heads if h in blocks), None)
        if head is None:
            raise ValueError(f"unexpected key {prefix}{key} (not part of an SD 1.5 checkpoint)")
        block, names = blocks[head]
        module, _, param = key[len(head) + 1 :].rpartition(".")  # ("in_layers.0", "weight"); ("", "bias")
        if names is VAE_ATTENTION and v.ndim == 4:
            v = v.flatten(1)  # LDM's VAE attention projects with 1x1 convs: (C, C, 1, 1) -> Linear (C, C)
        out[".".join(filter(None, (block, names.get(module, module), param)))] = v
    return out


def split_single_file(
    state: dict[str, torch.Tensor], unet_cfg: UNetConfig, vae_cfg: VAEConfig
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One LDM-layout state dict -> the text encoder's, UNet's and VAE's state dicts, in our names."""
    parts: dict[str, dict[str, torch.Tensor]] = {TEXT: {}, UNET: {}, VAE: {}}
    for key, v in fix_keys(state).items():
        prefix = next((p for p in parts if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"unexpected key {key} (not part of an SD 1.5 checkpoint)")
        parts[prefix][key.removeprefix(prefix)] = v
    return parts[TEXT], rename(parts[UNET], unet_blocks(unet_cfg), UNET), rename(parts[VAE], vae_blocks(vae_cfg), VAE)


# ----------------------------------------------------------------------------- ControlNet single files

CONTROLNET = "control_model."  # A1111's ControlNet files (ControlNet's cldm.py); some are saved without the prefix


def controlnet_blocks(cfg: ControlNetConfig) -> dict[str, tuple[str, dict[str, str]]]:
    """LDM ControlNet block -> (our block, names inside it). cldm.py's ControlNet copies the UNet's `time_embed`,
    `input_blocks` and `middle_block` (the UNet's LDM names, mapped as unet_blocks does) and adds `input_hint_block`,
    one Sequential whose convs sit at the even indices (a SiLU after each), one `zero_convs.i.0` per skip and
    `middle_block_out.0`."""
    m = {k: v for k, v in unet_blocks(cfg).items() if k.startswith(("time_embed.", "input_blocks.", "middle_block."))}
    convs = 2 * (len(cfg.conditioning_embedding_out_channels) - 1)  # between the hint encoder's conv_in and conv_out
    m["input_hint_block.0"] = ("controlnet_cond_embedding.conv_in", SAME)
    m |= {f"input_hint_block.{2 * (k + 1)}": (f"controlnet_cond_embedding.blocks.{k}", SAME) for k in range(convs)}
    m[f"input_hint_block.{2 * (convs + 1)}"] = ("controlnet_cond_embedding.conv_out", SAME)
    levels = len(cfg.block_out_channels)
    skips = 1 + levels * cfg.layers_per_block + levels - 1  # conv_in, each ResNet (+ transformer), each downsampler
    m |= {f"zero_convs.{i}.0": (f"controlnet_down_blocks.{i}", SAME) for i in range(skips)}
    m["middle_block_out.0"] = ("controlnet_mid_block", SAME)
    return m


def controlnet_single_file(state: dict[str, torch.Tensor], cfg: ControlNetConfig) -> dict[str, torch.Tensor]:
    """An A1111 ControlNet state dict (with or without `control_model.`) -> ours."""
    state = {k.removeprefix(CONTROLNET): v for k, v in state.items()}
    return rename(state, controlnet_blocks(cfg), "")
