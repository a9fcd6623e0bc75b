"""The SD 1.5 autoencoder: images <-> latents 8x smaller per side (Rombach et al. 2022, arXiv:2112.10752, Sec. 3.1).

A KL-regularised VAE: the encoder maps an image x in [-1, 1] to a diagonal Gaussian over latents (mean and
log-variance); the decoder maps a latent z back to an image. Generation only needs the decoder; img2img also
encodes. Both halves are ResNet blocks (the UNet's, without a time embedding) around a middle block with one
single-head self-attention. Parameter names equal the Diffusers checkpoint keys, so loading is one strict
`load_state_dict` (`models.loading` does it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.configs import MAX_LAYERS, MAX_WIDTH, check, integer, number, widths
from models.unet import Downsample, ResnetBlock2D, Upsample

EPS = 1e-6  # every GroupNorm of the VAE (Diffusers' Encoder/Decoder hard-code it; the UNet uses 1e-5)
TILE_OVERLAP = 0.25  # tiled encode/decode: the share of a tile's side its neighbour also covers (Diffusers' value)


@dataclass(frozen=True)
class VAEConfig:
    """Field names are the keys of the Diffusers `vae/config.json`; defaults are SD 1.5's."""

    in_channels: int = 3  # RGB
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # one resolution level each, full size first
    layers_per_block: int = 2  # ResNets per encoder level; the decoder has one more per level
    norm_num_groups: int = 32
    # Latents are multiplied by this before diffusion and divided by it before decoding, so they have roughly unit
    # variance. Source: LDM configs/stable-diffusion/v1-inference.yaml `scale_factor: 0.18215`; the official SD 1.5
    # vae/config.json has no such key and Diffusers' AutoencoderKL defaults it to the same value.
    scaling_factor: float = 0.18215
    # Tiled encode/decode (`AutoencoderKL.decode(z, tiled=True)`) cuts images into tiles of this side in pixels,
    # latents into tiles of sample_size / downsample_factor: the size the VAE was trained at.
    sample_size: int = 512

    # Keys SD 1.5's VAE fixes, each with the one value implemented here (Diffusers' default); read_config refuses any
    # other, an absent key is fine. `force_upcast` is not here: it only says to decode in float32, which the pipeline
    # decides for itself (min_pipeline.decode). shift_factor and latents_mean/std rescale latents in later models.
    FIXED: ClassVar[dict[str, object]] = {
        "act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
        "shift_factor": None, "latents_mean": None, "latents_std": None,
    }  # fmt: skip

    def __post_init__(self) -> None:
        chs, groups = self.block_out_channels, self.norm_num_groups
        check("VAE", self, {
            "in_channels": (self.in_channels == 3 and type(self.in_channels) is int, "3 (RGB images)"),
            "out_channels": (self.out_channels == 3 and type(self.out_channels) is int, "3 (RGB images)"),
            "latent_channels": integer(self.latent_channels, 1, MAX_WIDTH),
            "block_out_channels": widths(chs),
            "layers_per_block": integer(self.layers_per_block, 1, MAX_LAYERS),
            "norm_num_groups": integer(groups, 1, MAX_WIDTH),
            "scaling_factor": number(self.scaling_factor, 0, 100),
        })  # fmt: skip
        divides, f = all(c % groups == 0 for c in chs), 2 ** (len(chs) - 1)
        # a whole number of latents per tile and >= 4 of them, so tiles advance and their blends are >= 1 wide
        tile_ok = integer(self.sample_size, 4 * f, 64 * MAX_WIDTH)[0] and self.sample_size % f == 0
        check("VAE", self, {
            "norm_num_groups": (divides, f"a divisor of every width in {chs}"),
            "sample_size": (tile_ok, f"a multiple of {f} in [{4 * f}, {64 * MAX_WIDTH}]"),
        })  # fmt: skip


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a GroupNorm in front and a residual around it (LDM's
    `AttnBlock`; not the UNet's multi-head `Attention`)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # a list only because the checkpoint says `.0`

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        q, k, v = (proj(t)[:, None] for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C): one head, hd = C
        t = F.scaled_dot_product_attention(q, k, v)[:, 0]  # softmax(q k^T / sqrt(C)) v
        t = self.to_out[0](t).transpose(1, 2).reshape(b, c, h, w)  # (B, HW, C) -> (B, C, H, W)
        return x + t


class MidBlock(nn.Module):
    """ResNet -> attention -> ResNet at the lowest resolution, where attention over all positions is affordable."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, None, groups, EPS) for _ in range(2)])
        self.attentions = nn.ModuleList([AttnBlock(channels, groups)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    """One encoder level: ResNets (the first changes the width), then an optional down-sampler."""

    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(c_in if i == 0 else c_out, c_out, None, groups, EPS) for i in range(layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample(c_out, padding=0)] if downsample else [])

    def forward(self, x: Tensor) -> Tensor:
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class UpBlock(nn.Module):
    """One decoder level: ResNets (the first changes the width), then an optional up-sampler."""

    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(c_in if i == 0 else c_out, c_out, None, groups, EPS) for i in range(layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample(c_out)] if upsample else [])

    def forward(self, x: Tensor) -> Tensor:
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class Encoder(nn.Module):
    """Image (B, 3, 8H, 8W) -> mean and log-variance stacked on channels (B, 2 * latent_channels, H, W)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [DownBlock(chs[max(i - 1, 0)], chs[i], cfg.layers_per_block, g, i < n - 1) for i in range(n)]
        )
        self.mid_block = MidBlock(chs[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, chs[-1], eps=EPS)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent (B, latent_channels, H, W) -> image (B, 3, 8H, 8W): the encoder mirrored, widest level first."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[0], 3, padding=1)
        self.mid_block = MidBlock(chs[0], g)
        self.up_blocks = nn.ModuleList(
            [UpBlock(chs[max(i - 1, 0)], chs[i], cfg.layers_per_block + 1, g, i < n - 1) for i in range(n)]
        )
        self.conv_norm_out = nn.GroupNorm(g, chs[-1], eps=EPS)
        self.conv_out = nn.Conv2d(chs[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def blend(a: Tensor, b: Tensor, extent: int, dim: int) -> Tensor:
    """Tile `b` with its first `extent` rows (dim 2) or columns (dim 3) cross-faded from the last ones of `a`, its
    neighbour above or to the left: weight k/extent on b's own k-th line, 1 - k/extent on a's (Diffusers' blend_v/h)."""
    n = min(a.shape[dim], b.shape[dim], extent)
    w = (torch.arange(n, device=b.device) / n).view((-1, 1) if dim == 2 else (-1,))  # float32 ramp 0 .. (n-1)/n
    head = a.narrow(dim, a.shape[dim] - n, n) * (1 - w) + b.narrow(dim, 0, n) * w
    return torch.cat([head.to(b.dtype), b.narrow(dim, n, b.shape[dim] - n)], dim=dim)


def run_tiled(fn: Callable[[Tensor], Tensor], x: Tensor, tile_in: int, tile_out: int) -> Tensor:
    """fn(x) computed tile by tile, to bound the memory of large images; Diffusers' AutoencoderKL tiling.

    Tiles of side `tile_in` start every (1 - TILE_OVERLAP) * tile_in along H and W (edge tiles are smaller). Each
    output tile (side up to `tile_out`) has its first TILE_OVERLAP * tile_out rows and columns cross-faded from the
    already blended tiles above and to its left, then its first tile_out - that rows and columns are kept. Not
    equal to the untiled result: a tile sees only its own pixels (attention and GroupNorm statistics included).
    """
    stride, extent = int(tile_in * (1 - TILE_OVERLAP)), int(tile_out * TILE_OVERLAP)
    keep = tile_out - extent
    grid = [
        [fn(x[:, :, i : i + tile_in, j : j + tile_in]) for j in range(0, x.shape[3], stride)]
        for i in range(0, x.shape[2], stride)
    ]
    for i, row in enumerate(grid):  # raster order: the neighbours a tile blends with are already blended themselves
        for j in range(len(row)):
            if i > 0:
                row[j] = blend(grid[i - 1][j], row[j], extent, dim=2)
            if j > 0:
                row[j] = blend(row[j - 1], row[j], extent, dim=3)
    return torch.cat([torch.cat([t[:, :, :keep, :keep] for t in row], dim=3) for row in grid], dim=2)


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # 1x1 convs between the (de)coder and the latent space: leftovers of LDM's quantised variants, kept as is.
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side (8 for SD 1.5): one halving per level but the last.

        Not to be confused with `config.scaling_factor`, which scales latent VALUES.
        """
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def latent_tile(self) -> int:
        """The side, in latents, of the tiles a tiled decode cuts a latent into: config.sample_size pixels."""
        return self.config.sample_size // self.downsample_factor

    def needs_tiling(self, height: int, width: int) -> bool:
        """Does a tiled encode/decode of an image this size (pixels) split it? Only if a side exceeds a tile."""
        return max(height, width) > self.config.sample_size

    def encode(self, x: Tensor, tiled: bool = False) -> tuple[Tensor, Tensor]:
        """Image in [-1, 1] (B, 3, 8H, 8W) -> (mean, logvar) of the latent posterior, each (B, 4, H, W).

        Unscaled: multiply a latent by `config.scaling_factor` before diffusion. The mode is the mean. `tiled`: as
        Diffusers after `vae.enable_tiling()`: if `needs_tiling`, in tiles of config.sample_size pixels.
        """
        if tiled and self.needs_tiling(*x.shape[-2:]):  # per tile as Diffusers: quant_conv, then blend the moments
            h = run_tiled(lambda t: self.quant_conv(self.encoder(t)), x, self.config.sample_size, self.latent_tile)
        else:
            h = self.quant_conv(self.encoder(x))
        mean, logvar = h.chunk(2, dim=1)
        # Bound the log-variance as LDM's DiagonalGaussianDistribution (and Diffusers') does, so exp() stays finite.
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor, tiled: bool = False) -> Tensor:
        """Latent (B, 4, H, W), already divided by `config.scaling_factor` -> image (B, 3, 8H, 8W), about [-1, 1].

        `tiled`: as Diffusers after `vae.enable_tiling()`: if `needs_tiling`, in tiles of `latent_tile` latents.
        """
        if tiled and self.needs_tiling(*(s * self.downsample_factor for s in z.shape[-2:])):
            decode = lambda t: self.decoder(self.post_quant_conv(t))  # noqa: E731 (per tile, as Diffusers)
            return run_tiled(decode, z, self.latent_tile, self.config.sample_size)
        return self.decoder(self.post_quant_conv(z))


def sample_latent(mean: Tensor, logvar: Tensor, noise: Tensor) -> Tensor:
    """z = mean + std * eps with eps = `noise` ~ N(0, I): a draw from the encoder's posterior (the reparameterisation
    trick). Draw eps as Diffusers' `latent_dist.sample(generator)` does (shape and dtype of the mean, on the
    generator's device, then moved to the mean's) and the same seeded generator gives the same z."""
    return mean + torch.exp(0.5 * logvar) * noise
