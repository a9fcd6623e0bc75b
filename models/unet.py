"""The SD 1.5 denoiser: a UNet that predicts the noise eps in a latent (Rombach et al. 2022, arXiv:2112.10752).

Parameter names equal the Diffusers checkpoint keys, so loading is one strict `load_state_dict`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


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
