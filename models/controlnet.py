"""ControlNet for SD 1.5 (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models",
arXiv:2302.05543): a trainable copy of the UNet's first half that sees a control image (edges, depth, pose...) and
steers the locked UNet through zero convolutions.

Sec. 3.1, Eq. 2 (arXiv v3): y_c = F(x; Θ) + Z(F(x + Z(c; Θz1); Θc); Θz2), with F the locked block, its copy under
Θc and Z a 1x1 convolution initialised to zero. For SD (Sec. 3.2, Fig. 3) the copy is the UNet's encoder: the time
embedding, `conv_in`, the 12 down-path blocks and the mid block (models.unet.UNetEncoder, reused here, parameter names
and all). The control image c_i is first brought to the latent size by a small conv net, c_f = E(c_i) (Sec. 3.2; the
released models use 3x3 convs with SiLU, not the paper's 4x4 ReLU ones), and added to conv_in's output, the role of
Z(c; Θz1). One zero conv per skip (`controlnet_down_blocks`) and one for the mid block (`controlnet_mid_block`) give
the residuals that UNet.forward adds to its skips and its mid-block output: Z(...; Θz2). Several ControlNets' residuals
are summed (Sec. 3.4, composing multiple ControlNets; controls.py).

Parameter names equal the Diffusers checkpoint's (`ControlNetModel`), so loading is one strict `load_state_dict`;
models/ldm.py maps A1111's single files (`input_hint_block`, `zero_convs`, `middle_block_out`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.configs import MAX_WIDTH, check, integer, widths
from models.unet import UNetConfig, UNetEncoder


@dataclass(frozen=True)
class ControlNetConfig(UNetConfig):
    """A ControlNet's `config.json`: the UNet fields it copies (field names are its keys), plus the control image's
    encoder. A ControlNet has no up path: `up_block_types` mirrors the down path, only for UNetConfig's checks."""

    up_block_types: tuple[str, ...] | None = None
    conditioning_channels: int = 3  # the control image's channels (RGB)
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)  # the hint encoder's widths
    global_pool_conditions: bool = False  # shuffle: residuals averaged over H, W (and guess mode, as Diffusers)

    FIXED: ClassVar[dict[str, object]] = {**UNetConfig.FIXED, "controlnet_conditioning_channel_order": "rgb"}

    def __post_init__(self) -> None:
        if self.up_block_types is None:
            up = tuple(t.replace("Down", "Up") for t in reversed(self.down_block_types))
            object.__setattr__(self, "up_block_types", up)
        super().__post_init__()
        check("ControlNet", self, {
            "conditioning_channels": integer(self.conditioning_channels, 1, MAX_WIDTH),
            "conditioning_embedding_out_channels": widths(self.conditioning_embedding_out_channels),
            "global_pool_conditions": (type(self.global_pool_conditions) is bool, "true or false"),
        })  # fmt: skip

    @property
    def hint_factor(self) -> int:
        """Pixels of the control image per latent: each hint-encoder level but the first halves H and W."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)


class HintEncoder(nn.Module):
    """E(c_i): the control image (B, 3, 8H, 8W) in [0, 1] -> (B, C0, H, W), added to conv_in's output. A 3x3 conv
    per width, then per level a 3x3 conv and a stride-2 3x3 conv, each followed by SiLU; `conv_out` (zero-initialised
    in training) maps to the UNet's first width. Diffusers' ControlNetConditioningEmbedding, LDM's input_hint_block."""

    def __init__(self, channels: int, widths: tuple[int, ...], out: int):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c, c_next in zip(widths[:-1], widths[1:], strict=True):
            self.blocks.append(nn.Conv2d(c, c, 3, padding=1))
            self.blocks.append(nn.Conv2d(c, c_next, 3, padding=1, stride=2))  # (B, c, H, W) -> (B, c', H/2, W/2)
        self.conv_out = nn.Conv2d(widths[-1], out, 3, padding=1)

    def forward(self, hint: Tensor) -> Tensor:
        x = F.silu(self.conv_in(hint))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


class ControlNet(UNetEncoder):
    def __init__(self, cfg: ControlNetConfig):
        super().__init__(cfg)
        c0, c_mid = cfg.block_out_channels[0], cfg.block_out_channels[-1]
        self.controlnet_cond_embedding = HintEncoder(cfg.conditioning_channels,
                                                     cfg.conditioning_embedding_out_channels, c0)  # fmt: skip
        self.controlnet_down_blocks = nn.ModuleList([nn.Conv2d(c, c, 1) for c in self.skip_channels])  # Z(.; Θz2)
        self.controlnet_mid_block = nn.Conv2d(c_mid, c_mid, 1)

    def forward(self, latents: Tensor, timestep: Tensor | float, context: Tensor, hint: Tensor, scale: float = 1.0,
                guess_mode: bool = False) -> tuple[list[Tensor], Tensor]:  # fmt: skip
        """The residuals for UNet.forward(down_residuals=, mid_residual=): one per skip, and the mid block's, times
        `scale`. `hint`: the control image, (B, 3, H * hint_factor, W * hint_factor) in [0, 1]. Guess mode (as
        Diffusers' ControlNetModel) weights the residuals from 0.1 (conv_in's skip) to 1 (the mid block)
        geometrically, so the deep, semantic residuals dominate."""
        return self.steer(latents, timestep, context, self.controlnet_cond_embedding(hint), scale, guess_mode)

    def steer(self, latents: Tensor, timestep: Tensor | float, context: Tensor, embedded_hint: Tensor,
              scale: float = 1.0, guess_mode: bool = False) -> tuple[list[Tensor], Tensor]:  # fmt: skip
        """forward() with the control image already through the hint encoder (controlnet_cond_embedding): it does
        not change during a run, so the sampling loop encodes it once (controls.Controls.read)."""
        temb = self.embed_time(timestep, latents)
        x = self.conv_in(latents) + embedded_hint  # x + Z(c; Θz1), (B, C0, H, W)
        x, skips = self.encode(x, temb, context)
        down = [zero_conv(s) for zero_conv, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        mid = self.controlnet_mid_block(x)
        if guess_mode and not self.config.global_pool_conditions:
            scales = torch.logspace(-1, 0, len(down) + 1, device=x.device) * scale  # 0.1 (conv_in) ... 1 (mid)
            down, mid = [r * s for r, s in zip(down, scales, strict=False)], mid * scales[-1]
        else:
            down, mid = [r * scale for r in down], mid * scale
        if self.config.global_pool_conditions:  # one value per channel: the control's content, not its layout
            down, mid = [r.mean(dim=(2, 3), keepdim=True) for r in down], mid.mean(dim=(2, 3), keepdim=True)
        return down, mid


def fit_problem(cfg: ControlNetConfig, unet: UNetConfig, latent_channels: int, factor: int, text_width: int) -> str:
    """Why a ControlNet cannot steer this UNet ("" if it can): its residuals must have the UNet's skip widths and
    sizes, its input the VAE's latents, its hint encoder the VAE's factor, its cross-attention the text's width."""
    if cfg.cross_attention_dim != text_width:
        return f"its cross_attention_dim is {cfg.cross_attention_dim}, the text encoder's width {text_width}"
    if cfg.in_channels != latent_channels:
        return f"it takes {cfg.in_channels} latent channels, the VAE makes {latent_channels}"
    for key in ("block_out_channels", "layers_per_block", "down_block_types"):
        if getattr(cfg, key) != getattr(unet, key):
            return f"its {key} {getattr(cfg, key)} differs from the UNet's {getattr(unet, key)}"
    if cfg.hint_factor != factor:
        return f"its control image encoder downsamples {cfg.hint_factor}x, the VAE {factor}x"
    return ""
