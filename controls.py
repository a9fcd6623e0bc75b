"""ControlNets in a run (generate()'s `controlnet=`, `control_image=`, ...): the inputs checked, the control images
prepared, and the residuals of each UNet call, ControlNet's one seam into the sampling loop. Equal to Diffusers'
StableDiffusionControlNetPipeline (and its img2img and inpainting siblings) for one or several ControlNets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from images import open_image
from models import loading
from models.controlnet import ControlNet, fit_problem
from resources import pick_device, prepack_for_onednn, resolve_dtype
from settings import UserError, as_type


def load_controlnet(model: str, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = None) -> ControlNet:  # fmt: skip
    """A ControlNet for generate(controlnet=...) from a Diffusers-layout folder, a hub repo id
    (`lllyasviel/control_v11p_sd15_canny`) or an A1111 single file (`control_v11p_sd15_canny.safetensors`). Give it
    the pipeline's device and dtype; the defaults choose as load_pipeline's do."""
    dev = pick_device(str(device) if device is not None else None)
    dtype = resolve_dtype(dtype, dev)
    net = loading.load_controlnet(model, dtype, dev)
    if dev.type == "cpu" and dtype == torch.bfloat16:  # as load_pipeline treats the UNet whose encoder it copies
        net.to(memory_format=torch.channels_last)
        prepack_for_onednn(net)
    return net


def control_image_to_tensor(image: Image.Image | str, width: int, height: int) -> Tensor:
    """A control image -> (1, 3, H, W) in [0, 1], as Diffusers' control image processor (VaeImageProcessor with
    do_normalize=False) makes it: resized to the output size (Lanczos, in the image's own mode), then RGB."""
    image = open_image(image, "control image").resize((width, height), resample=Image.LANCZOS).convert("RGB")
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def per_net(name: str, value: object, count: int) -> list[float]:
    """A number for every ControlNet, or one number each."""
    values = list(value) if isinstance(value, list | tuple) else [value] * count
    if len(values) != count:
        raise UserError(f"{name} has {len(values)} values for {count} ControlNets; give one, or one per ControlNet")
    values = [as_type(name, v, float) for v in values]
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"{name} must be finite numbers, got {values}")
    return values


@dataclass(frozen=True)
class Control:
    """One ControlNet in a run: its control image at the batch size (twice it under CFG unless in guess mode), through
    the net's hint encoder once for the whole run, its weight, and the part of the run it acts in, as fractions of the
    UNet calls."""

    net: ControlNet
    embedded_hint: Tensor
    scale: float
    start: float
    end: float


@dataclass(frozen=True)
class Controls:
    controls: tuple[Control, ...]
    guess_mode: bool  # the ControlNets see only the conditional half of the CFG batch, the other half gets none
    cfg: bool

    @classmethod
    def read(cls, pipe, controlnet, control_image, scale, start, end, guess_mode: bool, size: tuple[int, int],
             n: int, cfg: bool) -> Controls | None:  # fmt: skip
        """generate()'s ControlNet arguments checked against the pipeline (each mistake a one-line UserError, before
        any network runs), the control images read and resized to `size` = (H, W), for `n` images."""
        if controlnet is None:
            if control_image is not None or guess_mode:
                raise UserError("control_image and guess_mode need a ControlNet (controlnet=load_controlnet(...))")
            return None
        nets = list(controlnet) if isinstance(controlnet, list | tuple) else [controlnet]
        if not nets or not all(isinstance(net, ControlNet) for net in nets):
            raise TypeError(f"controlnet must be a ControlNet (load_controlnet) or a list, got {controlnet!r:.60}")
        images = list(control_image) if isinstance(control_image, list | tuple) else [control_image]
        if control_image is None or len(images) != len(nets):
            given = 0 if control_image is None else len(images)
            raise UserError(f"{len(nets)} ControlNet(s) need one control image each, got {given}")
        scales, starts, ends = (per_net(name, v, len(nets)) for name, v in
                                (("control_scale", scale), ("control_start", start), ("control_end", end)))  # fmt: skip
        for s, e in zip(starts, ends, strict=True):
            if not 0 <= s < e <= 1:
                raise UserError(f"control start {s:g} and end {e:g} must satisfy 0 <= start < end <= 1")
        unet, vae = pipe.unet.config, pipe.vae.config
        for k, net in enumerate(nets):
            why = fit_problem(net.config, unet, vae.latent_channels, pipe.vae.downsample_factor,
                              pipe.text_encoder.config.hidden_size)  # fmt: skip
            if why:
                raise UserError(f"ControlNet {k} does not fit this model: {why} (a ControlNet for another base?)")
            weight = net.conv_in.weight
            if (weight.dtype, weight.device.type) != (pipe.dtype, pipe.device.type):
                raise UserError(f"ControlNet {k} is {weight.dtype} on {weight.device.type}, the pipeline {pipe.dtype}"
                                f" on {pipe.device.type}: load_controlnet(path, pipe.device, pipe.dtype)")  # fmt: skip
        # As Diffusers: the first ControlNet's global_pool_conditions (shuffle) switches guess mode on for all.
        guess_mode = bool(guess_mode) or nets[0].config.global_pool_conditions
        controls = []
        for net, image, *span in zip(nets, images, scales, starts, ends, strict=True):
            hint = control_image_to_tensor(image, size[1], size[0]).repeat_interleave(n, dim=0)
            hint = torch.cat([hint, hint]) if cfg and not guess_mode else hint  # the CFG batch's two halves
            controls.append(Control(net, net.controlnet_cond_embedding(hint.to(pipe.device, pipe.dtype)), *span))
        return cls(tuple(controls), guess_mode, cfg)

    def residuals(self, i: int, calls: int, x_in: Tensor, t: Tensor,
                  context: Tensor) -> tuple[list[Tensor] | None, Tensor | None]:  # fmt: skip
        """The summed residuals of the ControlNets active at UNet call i of `calls` (UNet calls, not steps, as
        Diffusers' controlnet_keep counts them: Heun's second calls too), for the UNet's input x_in and context (the
        CFG batch). A ControlNet acts while i / calls >= start and (i + 1) / calls <= end; (None, None) when none
        does (adding Diffusers' zeroed residuals changes nothing)."""
        half = self.guess_mode and self.cfg  # the conditional half (the second) only; zeros for the unconditional
        x, context = (x_in.chunk(2)[1], context.chunk(2)[1]) if half else (x_in, context)
        down = mid = None
        for c in self.controls:
            if i / calls < c.start or (i + 1) / calls > c.end:
                continue
            d, m = c.net.steer(x, t, context, c.embedded_hint, c.scale, self.guess_mode)
            down, mid = (d, m) if down is None else ([a + b for a, b in zip(down, d, strict=True)], mid + m)
        if down is not None and half:
            down, mid = [torch.cat([torch.zeros_like(r), r]) for r in down], torch.cat([torch.zeros_like(mid), mid])
        return down, mid
