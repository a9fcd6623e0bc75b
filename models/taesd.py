"""TAESD, the Tiny AutoEncoder for Stable Diffusion (Bohan 2023, github.com/madebyollin/taesd): 1.2M parameters each
way, a stand-in for the SD VAE (34M encoder, 49M decoder), distilled to map the same latents to and from nearly the
same pictures at about an eighth of the decode time on a CPU (bench/bench_preview.py): fast previews of every step,
or a cheap decoder where the last bit of detail does not matter.

Plain convolutions, ReLUs and residual blocks, nothing else: no normalisation, no attention, no posterior (the encoder
gives the latent itself, so encoding draws no noise). The decoder first softly bounds latents to (-3, 3) with
3 tanh(z / 3). Pictures are in [0, 1] inside the network; `encode` and `decode` speak the SD VAE's [-1, 1]. Its
latents are the SD VAE's *scaled* ones (scaling_factor 1.0), as Diffusers' `AutoencoderTiny` uses them.
Parameter names equal the Diffusers checkpoint's (`encoder.layers.3.conv.2.weight`); madebyollin's original files
(taesd_encoder.safetensors, taesd_decoder.safetensors) number the same Sequential, the decoder's one place later
(its index 0 is the clamp): `original_keys` renames them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from models.configs import MAX_LAYERS, MAX_WIDTH, check, integer, number, widths


@dataclass(frozen=True)
class TinyAutoencoderConfig:
    """Field names are the keys of the Diffusers `AutoencoderTiny` config.json (madebyollin/taesd); defaults are
    TAESD's for SD 1.x."""

    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)  # one level each; levels after the first halve
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)  # one level each; levels before the last double
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)  # residual blocks per level
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2
    scaling_factor: float = 1.0  # TAESD reads and writes the UNet's latents directly

    # The values implemented here (Diffusers' defaults and TAESD's); read_config refuses others.
    # latent_magnitude / latent_shift only map latents to [0, 1] to store them as images: not used to generate.
    FIXED: ClassVar[dict[str, object]] = {"act_fn": "relu", "upsample_fn": "nearest", "shift_factor": 0.0}

    def __post_init__(self) -> None:
        blocks = lambda xs: (type(xs) is tuple and all(integer(n, 0, MAX_LAYERS)[0] for n in xs), "block counts")  # noqa: E731
        check("TAESD", self, {
            "in_channels": (self.in_channels == 3 and type(self.in_channels) is int, "3 (RGB images)"),
            "out_channels": (self.out_channels == 3 and type(self.out_channels) is int, "3 (RGB images)"),
            "encoder_block_out_channels": widths(self.encoder_block_out_channels),
            "decoder_block_out_channels": widths(self.decoder_block_out_channels),
            "num_encoder_blocks": blocks(self.num_encoder_blocks),
            "num_decoder_blocks": blocks(self.num_decoder_blocks),
            "latent_channels": integer(self.latent_channels, 1, MAX_WIDTH),
            "upsampling_scaling_factor": (self.upsampling_scaling_factor == 2, "2"),
            "scaling_factor": number(self.scaling_factor, 0, 100),
        })  # fmt: skip
        same = len(self.num_encoder_blocks) == len(self.encoder_block_out_channels) and len(
            self.num_decoder_blocks) == len(self.decoder_block_out_channels)  # fmt: skip
        check("TAESD", self, {"num_encoder_blocks": (same, "one count per level of block_out_channels")})

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        """The decoder's widths: what resources.vae_bytes sizes a decode by (Diffusers registers the same)."""
        return self.decoder_block_out_channels


def conv(c_in: int, c_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class Block(nn.Module):
    """relu(conv(relu(conv(relu(conv(x))))) + skip(x)): three 3x3 convs around a residual connection."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Sequential(conv(c_in, c_out), nn.ReLU(), conv(c_out, c_out), nn.ReLU(), conv(c_out, c_out))
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.conv(x) + self.skip(x))


def encoder_layers(cfg: TinyAutoencoderConfig) -> list[nn.Module]:
    """Picture (B, 3, 8H, 8W) in [0, 1] -> latent (B, 4, H, W): per level a conv (stride 2 after the first level:
    the halving), then its blocks; a last conv to the latent channels."""
    layers, chs = [], cfg.encoder_block_out_channels
    for i, (c, n) in enumerate(zip(chs, cfg.num_encoder_blocks, strict=True)):
        layers.append(conv(cfg.in_channels, c) if i == 0 else conv(chs[i - 1], c, stride=2, bias=False))
        layers += [Block(c, c) for _ in range(n)]
    return [*layers, conv(chs[-1], cfg.latent_channels)]


def decoder_layers(cfg: TinyAutoencoderConfig) -> list[nn.Module]:
    """Latent (B, 4, H, W), bounded -> picture (B, 3, 8H, 8W) in about [0, 1]: a conv and ReLU in, then per level its
    blocks, a nearest-neighbour doubling (but after the last level) and a conv (to RGB, with a bias, after the last)."""
    chs = cfg.decoder_block_out_channels
    layers = [conv(cfg.latent_channels, chs[0]), nn.ReLU()]
    for i, (c, n) in enumerate(zip(chs, cfg.num_decoder_blocks, strict=True)):
        last = i == len(chs) - 1
        layers += [Block(c, c) for _ in range(n)]
        layers += [] if last else [nn.Upsample(scale_factor=cfg.upsampling_scaling_factor, mode="nearest")]
        layers.append(conv(c, cfg.out_channels if last else chs[i + 1], bias=last))
    return layers


class Coder(nn.Module):
    """A Sequential under the name `layers`, as the Diffusers checkpoint names it."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class TinyAutoencoder(nn.Module):
    """TAESD with the interface of models.vae.AutoencoderKL, so that the pipeline takes either as its `vae`."""

    def __init__(self, config: TinyAutoencoderConfig, with_encoder: bool = True):
        super().__init__()
        self.config = config
        self.encoder = Coder(encoder_layers(config)) if with_encoder else None
        self.decoder = Coder(decoder_layers(config))

    @property
    def downsample_factor(self) -> int:
        return self.config.upsampling_scaling_factor ** (len(self.config.decoder_block_out_channels) - 1)

    def needs_tiling(self, height: int, width: int) -> bool:
        return False  # a few 64-channel activations at full size: never tiled (Diffusers' tiling is opt-in)

    def encode(self, x: Tensor, tiled: bool = False) -> tuple[Tensor, None]:
        """Image in [-1, 1] (B, 3, 8H, 8W) -> (latent, None): no posterior, so no random draw (Diffusers'
        AutoencoderTiny returns `latents`, not a `latent_dist`)."""
        if self.encoder is None:
            raise ValueError("this TAESD has no encoder (only taesd_decoder.safetensors was given): put "
                             "taesd_encoder.safetensors beside it to encode images")  # fmt: skip
        return self.encoder((x + 1) / 2), None

    def decode(self, z: Tensor, tiled: bool = False) -> Tensor:
        """Latent (B, 4, H, W) -> image (B, 3, 8H, 8W) in about [-1, 1]."""
        return (
            self.decoder(torch.tanh(z / 3) * 3) * 2 - 1
        )  # the soft clamp of latents to (-3, 3), then [0, 1] -> [-1, 1]


class TinyDecoder(TinyAutoencoder):
    """TAESD without its encoder (a taesd_decoder.safetensors alone): enough to decode and to preview."""

    def __init__(self, config: TinyAutoencoderConfig):
        super().__init__(config, with_encoder=False)


def original_keys(state: dict[str, Tensor], part: str) -> dict[str, Tensor]:
    """madebyollin's taesd_encoder / taesd_decoder file (a bare nn.Sequential's state dict) -> our names. The
    original decoder starts with its parameter-free Clamp at index 0, so its layer k is Diffusers' layer k - 1."""
    shift = 1 if part == "decoder" else 0
    out = {}
    for key, v in state.items():
        index, _, rest = key.partition(".")
        if not index.isdigit() or int(index) < shift:
            raise ValueError(f"unexpected key {key} in a TAESD {part} file")
        out[f"{part}.layers.{int(index) - shift}.{rest}"] = v
    return out
