"""The SD 1.5 denoiser: a UNet that predicts the noise eps in a latent (Rombach et al. 2022, arXiv:2112.10752).

The network, top to bottom: a sinusoidal embedding of the timestep and its MLP; `conv_in`; four down levels, each
two ResNet blocks (in the upper three each followed by a spatial transformer that cross-attends to the text) and,
but for the lowest, a stride-2 conv; a mid block; four up levels that concatenate the matching down-path activation
(the "skip") before each of their three ResNet blocks, then upsample; `conv_out`. The blocks follow the LDM code
(Rombach et al.) that Diffusers' `UNet2DConditionModel` re-implements.

Parameter names equal the Diffusers checkpoint keys, so loading is one strict `load_state_dict`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.configs import MAX_LAYERS, MAX_WIDTH, check, integer, names, number, widths

TRANSFORMER_NORM_EPS = 1e-6  # GroupNorm before each spatial transformer (LDM's Normalize(); hard-coded in Diffusers)
MAX_PERIOD = 10_000  # sinusoidal embedding: wavelengths from 2*pi to 2*pi*10000 (Vaswani et al. 2017, sec. 3.5)
DOWN_BLOCKS, UP_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")  # see Level


@dataclass(frozen=True)
class UNetConfig:
    """SD 1.5's `unet/config.json`; field names are its keys."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_head_dim: int = 8  # a legacy misnomer: SD 1.5 uses it as the number of HEADS (head dims 40/80/160)
    cross_attention_dim: int = 768  # width D of the text encoder's states
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    flip_sin_to_cos: bool = True  # the timestep embedding is [cos, sin], not [sin, cos]
    freq_shift: int = 0
    downsample_padding: int = 1

    # Keys of the file that SD 1.5's architecture fixes, each with the one value this UNet implements (Diffusers'
    # default): `models.loading.read_config` refuses any other value; a key absent from the file is fine. The file's
    # keys that are neither fields nor here (sample_size, dropout, ...) do not change inference.
    FIXED: ClassVar[dict[str, object]] = {
        "act_fn": "silu", "center_input_sample": False, "use_linear_projection": False, "upcast_attention": False,
        "class_embed_type": None, "addition_embed_type": None, "time_embedding_type": "positional",
        "resnet_time_scale_shift": "default", "mid_block_type": "UNetMidBlock2DCrossAttn", "conv_in_kernel": 3,
        "conv_out_kernel": 3, "dual_cross_attention": False, "only_cross_attention": False, "num_class_embeds": None,
        "encoder_hid_dim": None, "transformer_layers_per_block": 1, "time_cond_proj_dim": None,
        "num_attention_heads": None, "mid_block_scale_factor": 1, "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False, "time_embedding_act_fn": None, "time_embedding_dim": None,
        "timestep_post_act": None, "cross_attention_norm": None, "attention_type": "default",
    }  # fmt: skip

    def __post_init__(self) -> None:
        chs, heads, groups = self.block_out_channels, self.attention_head_dim, self.norm_num_groups
        check("UNet", self, {
            "in_channels": integer(self.in_channels, 1, MAX_WIDTH),
            "out_channels": integer(self.out_channels, 1, MAX_WIDTH),
            "block_out_channels": widths(chs),
            "layers_per_block": integer(self.layers_per_block, 1, MAX_LAYERS),
            "attention_head_dim": integer(heads, 1, MAX_WIDTH),
            "cross_attention_dim": integer(self.cross_attention_dim, 1, MAX_WIDTH),
            "norm_num_groups": integer(groups, 1, MAX_WIDTH),
            "norm_eps": number(self.norm_eps, 0, 1),
            "down_block_types": names(self.down_block_types, DOWN_BLOCKS),
            "up_block_types": names(self.up_block_types, UP_BLOCKS),
            "flip_sin_to_cos": (type(self.flip_sin_to_cos) is bool, "true or false"),
            "freq_shift": integer(self.freq_shift, 0, MAX_WIDTH),
            "downsample_padding": integer(self.downsample_padding, 0, 1),
        })  # fmt: skip
        levels = f"{len(chs)} block types (one per block_out_channels entry)"
        check("UNet", self, {
            "down_block_types": (len(self.down_block_types) == len(chs), f"a list of {levels}"),
            "up_block_types": (len(self.up_block_types) == len(chs), f"a list of {levels}"),
            "norm_num_groups": (all(c % groups == 0 for c in chs), f"a divisor of every width in {chs}"),
            # the timestep sinusoid has C0 / 2 frequencies, each divided by C0 / 2 - freq_shift
            "block_out_channels": (chs[0] % 2 == 0, "a list whose first width is even"),
            "freq_shift": (self.freq_shift < chs[0] // 2, f"an integer in [0, {chs[0] // 2 - 1}]"),
        })  # fmt: skip
        # The widths that have attention (the mid block always does) must split into `heads` heads.
        attended = {chs[-1]} | {c for c, t in zip(chs, self.down_block_types, strict=True) if _with_attention(t)}
        attended |= {c for c, t in zip(chs[::-1], self.up_block_types, strict=True) if _with_attention(t)}
        ok = all(c % heads == 0 for c in attended)
        check("UNet", self, {"attention_head_dim": (ok, f"a divisor of the attended widths {sorted(attended)}")})


# ----------------------------------------------------------------------------- building blocks


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv, plus a per-channel time-embedding bias, twice; 1x1 shortcut if C changes.

    The VAE uses the same block without a time embedding (`temb_channels=None`).
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Multi-head attention of `x` over `context` (or itself): self-attention `attn1`, cross-attention `attn2`."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # Diffusers' to_out.1 is a dropout: nothing to load

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        b, n, d = x.shape
        # (B, L, D) -> (B, nh, L, hd): each head attends over its own hd = D / nh slice of the features
        q, k, v = (
            t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
            for t in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(hd)) v
        return self.to_out[0](x.transpose(1, 2).reshape(b, n, d))  # (B, nh, L, hd) -> (B, L, D)


class GEGLU(nn.Module):
    """Half of the projection, through GELU, gates the other half (Shazeer 2020, arXiv:2002.05202, eq. 6)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # Index 1 is Diffusers' dropout (no weights); keeping the slot keeps the checkpoint key `ff.net.2`.
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm transformer layer: self-attention, cross-attention to the text, feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """A transformer over the H*W positions of a feature map (LDM's SpatialTransformer, Diffusers'
    Transformer2DModel): GroupNorm, 1x1 conv in, one TransformerBlock, 1x1 conv out, residual."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=TRANSFORMER_NORM_EPS)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, heads, context_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        h_ = self.proj_in(self.norm(x))
        h_ = h_.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, C, H, W) -> (B, HW, C)
        for block in self.transformer_blocks:
            h_ = block(h_, context)
        h_ = h_.reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, HW, C) -> (B, C, H, W)
        return x + self.proj_out(h_)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv (odd sizes round up: 9 -> 5). The VAE encoder uses it with
    padding 0."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:  # configs with padding 0 pad only right and bottom (as LDM's Downsample)
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)  # (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to `size` (default: twice H and W), then a 3x3 conv. The VAE decoder uses it
    too."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: torch.Size | None = None) -> Tensor:
        # `size` is the next skip's H, W: twice x's when the latent size is a multiple of 8 (2^downsamplers), else
        # the size the down path rounded up from (9 -> 5 -> 3 -> 2 comes back 2 -> 3 -> 5 -> 9). Diffusers passes this
        # `upsample_size` only for such latents and scale_factor=2 otherwise: the same thing.
        size = size or (2 * x.shape[-2], 2 * x.shape[-1])
        return self.conv(F.interpolate(x, size=size, mode="nearest"))  # (B, C, H, W) -> (B, C, ~2H, ~2W)


def _with_attention(block_type: str) -> bool:
    """SD 1.5 has two kinds of block per direction (DOWN_BLOCKS, UP_BLOCKS): ResNets each followed by a
    SpatialTransformer, or ResNets only."""
    return block_type.startswith("CrossAttn")


class Level(nn.Module):
    """The modules of one resolution level (Diffusers' down_blocks.N, mid_block, up_blocks.N): ResNet j takes
    `resnet_in[j]` channels, the first `transformers` of them are each followed by a SpatialTransformer. The UNet
    adds the resampler (`downsamplers.0` / `upsamplers.0`) and runs the modules itself, to keep the skips in view."""

    def __init__(self, cfg: UNetConfig, resnet_in: list[int], out: int, transformers: int):
        super().__init__()
        temb, groups, eps = 4 * cfg.block_out_channels[0], cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList([ResnetBlock2D(c, out, temb, groups, eps) for c in resnet_in])
        self.attentions = nn.ModuleList(
            [
                SpatialTransformer(out, cfg.attention_head_dim, cfg.cross_attention_dim, groups)
                for _ in range(transformers)
            ]
        )


# ----------------------------------------------------------------------------- the UNet


class UNetEncoder(nn.Module):
    """The UNet's first half: the timestep embedding, `conv_in`, the down path and the mid block. `UNet` adds the up
    path; a ControlNet (models/controlnet.py) is a trainable copy of this half (Zhang et al. 2023, arXiv:2302.05543)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        c0, n = cfg.block_out_channels[0], cfg.layers_per_block
        self.time_embedding = nn.Module()  # Diffusers' TimestepEmbedding: the MLP over the sinusoid
        self.time_embedding.linear_1 = nn.Linear(c0, 4 * c0)
        self.time_embedding.linear_2 = nn.Linear(4 * c0, 4 * c0)
        self.conv_in = nn.Conv2d(cfg.in_channels, c0, 3, padding=1)

        # Down path. `skip_channels` follows the widths of the skips the forward will push, so that each up-path
        # ResNet knows the width of the skip it concatenates (and each ControlNet zero conv the width of its skip).
        self.down_blocks = nn.ModuleList()
        self.skip_channels, c = [c0], c0
        for i, (out, block_type) in enumerate(zip(cfg.block_out_channels, cfg.down_block_types, strict=True)):
            level = Level(cfg, [c] + [out] * (n - 1), out, n if _with_attention(block_type) else 0)
            self.skip_channels += [out] * n
            if i < len(cfg.block_out_channels) - 1:  # all but the lowest level end by halving H and W
                level.downsamplers = nn.ModuleList([Downsample(out, cfg.downsample_padding)])
                self.skip_channels.append(out)
            self.down_blocks.append(level)
            c = out

        self.mid_block = Level(cfg, [c, c], c, transformers=1)

    def timestep_embedding(self, t: Tensor) -> Tensor:
        """(B,) timesteps, possibly fractional -> (B, C0) sinusoids [cos(t f_k), sin(t f_k)], f_k = 10000^(-k/half)
        (Vaswani et al. 2017, sec. 3.5, as in DDPM, Ho et al. 2020, arXiv:2006.11239). Always float32: t reaches 999.
        """
        half = self.config.block_out_channels[0] // 2
        k = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(MAX_PERIOD) * k / (half - self.config.freq_shift))
        args = t.float()[:, None] * freqs[None, :]  # (B,) -> (B, half)
        sin_cos = (args.cos(), args.sin()) if self.config.flip_sin_to_cos else (args.sin(), args.cos())
        return torch.cat(sin_cos, dim=-1)  # (B, half) -> (B, C0)

    def embed_time(self, timestep: Tensor | float, latents: Tensor) -> Tensor:
        """A number, a 0-dim tensor or one timestep per sample -> the (B, 4 C0) embedding every ResNet adds."""
        t = torch.as_tensor(timestep, device=latents.device).reshape(-1).expand(latents.shape[0])  # -> (B,)
        # The sinusoid is made in float32 and then cast to the model's dtype, as Diffusers does.
        temb = self.timestep_embedding(t).to(latents.dtype)
        return self.time_embedding.linear_2(F.silu(self.time_embedding.linear_1(temb)))  # (B, C0) -> (B, 4 C0)

    def encode(self, x: Tensor, temb: Tensor, context: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The down path and the mid block from `conv_in`'s output x: the mid block's output and the skips, the
        activations the up path concatenates (conv_in's, each ResNet's or transformer's, each downsampler's)."""
        skips = [x]
        for level in self.down_blocks:
            for j, resnet in enumerate(level.resnets):
                x = resnet(x, temb)
                if level.attentions:
                    x = level.attentions[j](x, context)
                skips.append(x)
            if hasattr(level, "downsamplers"):
                x = level.downsamplers[0](x)
                skips.append(x)

        x = self.mid_block.resnets[0](x, temb)
        x = self.mid_block.attentions[0](x, context)
        x = self.mid_block.resnets[1](x, temb)
        return x, skips


class UNet(UNetEncoder):
    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg)
        c0, n, c = cfg.block_out_channels[0], cfg.layers_per_block, cfg.block_out_channels[-1]

        # Up path: n + 1 ResNets per level, one per skip popped: its down level's n ResNet outputs, then the output of
        # the downsampler (or conv_in) that entered that level.
        self.up_blocks = nn.ModuleList()
        skip_channels = list(self.skip_channels)
        for i, (out, block_type) in enumerate(zip(reversed(cfg.block_out_channels), cfg.up_block_types, strict=True)):
            resnet_in = [prev + skip_channels.pop() for prev in [c] + [out] * n]
            level = Level(cfg, resnet_in, out, n + 1 if _with_attention(block_type) else 0)
            if i < len(cfg.block_out_channels) - 1:  # all but the top level end by doubling H and W
                level.upsamplers = nn.ModuleList([Upsample(out)])
            self.up_blocks.append(level)
            c = out

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, c0, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(c0, cfg.out_channels, 3, padding=1)

    def forward(self, latents: Tensor, timestep: Tensor | float, context: Tensor,
                down_residuals: list[Tensor] | None = None, mid_residual: Tensor | None = None) -> Tensor:  # fmt: skip
        """Predict the noise in `latents` (B, 4, H, W) at `timestep` (a number, a 0-dim tensor, or one per sample
        (B,)), conditioned on the text states `context` (B, L, D). Pass timesteps as tensors under torch.compile:
        a Python number is a constant there, and each new value would recompile. `down_residuals` (one per skip) and
        `mid_residual`: what ControlNets add (models/controlnet.py), or None."""
        temb = self.embed_time(timestep, latents)
        x, skips = self.encode(self.conv_in(latents), temb, context)  # (B, 4, H, W) -> (B, C0, H, W) -> ...
        if down_residuals is not None:  # ControlNet: its zero convs' outputs join the locked UNet where the skips
            skips = [s + r for s, r in zip(skips, down_residuals, strict=True)]  # leave for the up path and after
            x = x + mid_residual  # the middle block (Zhang et al. 2023, arXiv:2302.05543, Sec. 3.2, Fig. 3)

        for level in self.up_blocks:
            for j, resnet in enumerate(level.resnets):
                x = torch.cat([x, skips.pop()], dim=1)  # (B, C, H, W) -> (B, C + C_skip, H, W)
                x = resnet(x, temb)
                if level.attentions:
                    x = level.attentions[j](x, context)
            if hasattr(level, "upsamplers"):
                x = level.upsamplers[0](x, size=skips[-1].shape[-2:])  # to the size of the next skip

        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, C0, H, W) -> (B, 4, H, W)
