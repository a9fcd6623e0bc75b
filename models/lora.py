"""LoRA: low-rank updates of the UNet's and text encoder's weights, merged in place (Hu et al. 2021, arXiv:2106.09685).

A LoRA file holds, for some Linear or Conv2d layers with weight W (out, in[, kh, kw]), a pair `down` = A (r, in[, kh,
kw]) and `up` = B (out, r[, 1, 1]), and perhaps `alpha`. Applying it at strength w is W <- W + w (alpha / r) B A
(the paper's eq. 3 with its sec. 4.1 scaling; no alpha means alpha = r). It is merged once, so sampling costs nothing
extra, and `remove_loras` puts the original tensors back. A conv pair ("LoCon") is A as the layer's kxk conv, then
B as a 1x1 conv: their product is a kxk weight. LoCon's Tucker form (LyCORIS, Yeh et al. 2023, arXiv:2309.14859)
puts a core `mid` (r, r, kh, kw) between a 1x1 A and B.

The formats, all read through the key spellings below:
- Kohya / A1111: `lora_unet_<layer>` and `lora_te_text_model_<layer>`, dots written as underscores, the UNet layer
  named as in Diffusers (`down_blocks_0_attentions_0_..._to_q`) or as in LDM (`input_blocks_1_1_..._to_q`, through
  `models.ldm`'s block table), with `.lora_down.weight`, `.lora_up.weight`, `.alpha` and (Tucker) `.lora_mid.weight`.
- Diffusers / PEFT: `unet.<layer>` and `text_encoder.text_model.<layer>` with `.lora_A.weight`, `.lora_B.weight`;
  alphas in the header's `lora_adapter_metadata` (a PEFT LoraConfig per network), else alpha = r. Older Diffusers
  wrote `.lora.down.weight`, `.lora_linear_layer.down.weight` or attention processors (`attn1.processor.to_q_lora`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from models.ldm import unet_blocks
from models.loading import WeightsError, load_safetensors

# Key suffix -> the tensor's role in its layer's update; the rest of the key names the layer.
ROLES = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid", ".alpha": "alpha",  # Kohya
    ".lora_A.weight": "down", ".lora_B.weight": "up",  # PEFT (Diffusers >= 0.22)
    ".lora.down.weight": "down", ".lora.up.weight": "up",  # Diffusers' LoRACompatibleLinear / Conv
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",  # Diffusers' old text encoder
    "_lora.down.weight": "down", "_lora.up.weight": "up",  # Diffusers' attention processors: `to_q_lora`
}  # fmt: skip
# Diffusers' attention processors named the projection they adapt their own way: regex -> our layer name.
PROCESSOR_NAMES = {
    r"(.*)\.processor\.to_(q|k|v)": r"\1.to_\2", r"(.*)\.processor\.to_out": r"\1.to_out.0",
    r"(.*\.self_attn)\.to_(q|k|v)": r"\1.\2_proj", r"(.*\.self_attn)\.to_out": r"\1.out_proj",
}  # fmt: skip
# Layer name prefixes per network: (Kohya's, Diffusers'). Our text encoder drops CLIP's `text_model.` (ldm.QUIRKS).
PREFIXES = {"unet": ("lora_unet_", "unet."), "text_encoder": ("lora_te_text_model_", "text_encoder.text_model.")}
# What a file we cannot apply is, from a fragment of its keys (first match wins), or from the width of the text
# states its cross-attention `to_k` reads (SD 1.5: 768).
LOOKS_LIKE = {
    "lora_te1_": "an SDXL LoRA (two text encoders)", "lora_te2_": "an SDXL LoRA (two text encoders)",
    "text_encoder_2.": "an SDXL LoRA (two text encoders)", "hada_w": "a LyCORIS LoHa (Hadamard product), not a LoRA",
    "lokr_w": "a LyCORIS LoKr (Kronecker product), not a LoRA", "dora_scale": "a DoRA LoRA",
    "lora_magnitude_vector": "a DoRA LoRA",
}  # fmt: skip
CROSS_ATTENTION_WIDTH = {1024: "an SD 2.x LoRA", 2048: "an SDXL LoRA"}


def ldm_name(layer: str, blocks: dict[str, tuple[str, dict[str, str]]]) -> str | None:
    """Our UNet layer name in LDM's terms (`down_blocks.0.resnets.1.conv1` -> `input_blocks.2.0.in_layers.2`)."""
    for theirs, (block, inside) in blocks.items():
        if layer == block:
            return theirs
        if layer.startswith(block + "."):
            rest = layer[len(block) + 1 :]
            return f"{theirs}.{next((k for k, v in inside.items() if v == rest), rest)}"
    return None


def layer_spellings(networks: dict[str, nn.Module]) -> dict[str, tuple[str, str]]:
    """Every way the files spell a Linear or Conv2d layer of ours -> (network, our layer name)."""
    blocks = unet_blocks(networks["unet"].config)
    names = {}
    for net, module in networks.items():
        kohya, diffusers = PREFIXES[net]
        for layer, m in module.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                spelled = [diffusers + layer, kohya + layer.replace(".", "_")]
                if net == "unet" and (theirs := ldm_name(layer, blocks)):
                    spelled.append(kohya + theirs.replace(".", "_"))
                names |= dict.fromkeys(spelled, (net, layer))
    return names


def factors(parts: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(B (out, r), A (r, in kh kw)) in float32, so that dW = B A. Tucker's core folds into A: A'[a, i, y, x] =
    sum_b mid[a, b, y, x] A[b, i]."""
    a, b = parts["down"].float().flatten(1), parts["up"].float().flatten(1)
    if "mid" in parts:
        a = torch.einsum("ab...,bi->ai...", parts["mid"].float(), a).flatten(1)
    return b, a


def update_shape(parts: dict[str, Tensor]) -> tuple[int, ...] | None:
    """The weight shape (out, in[, kh, kw]) B A makes, or None where the sizes do not chain (no compute)."""
    down, up, mid = parts["down"], parts["up"], parts.get("mid")
    if down.ndim < 2 or up.ndim < 2 or up.shape[2:].numel() != 1:
        return None
    if mid is None:
        return (up.shape[0], *down.shape[1:]) if up.shape[1] == down.shape[0] else None
    chains = mid.ndim == 4 and mid.shape[:2] == (up.shape[1], down.shape[0]) and down.shape[2:].numel() == 1
    return (up.shape[0], down.shape[1], *mid.shape[2:]) if chains else None


def fits(parts: dict[str, Tensor], shape: torch.Size) -> bool:
    """Whether B A makes an update of a weight's shape; a 1x1 kernel and none are the same."""
    got, one = update_shape(parts), ((), (1, 1))
    return got is not None and (got == shape or (got[:2] == shape[:2] and got[2:] in one and shape[2:] in one))


def looks_like(state: dict[str, Tensor]) -> str:
    """What a file we cannot apply seems to be: by its key names, else by the text width its attn2.to_k reads."""
    for fragment, kind in LOOKS_LIKE.items():
        if any(fragment in key for key in state):
            return kind
    widths = [v.shape[-1] for k, v in state.items() if re.search(r"attn2.to.k.*(down|lora_A)", k) and v.ndim == 2]
    return CROSS_ATTENTION_WIDTH.get(widths[0] if widths else 0, "a LoRA for other layers or another model")


def peft_alpha(metadata: dict, net: str, layer: str) -> float | None:
    """A layer's alpha in Diffusers' `lora_adapter_metadata`: `<network>.alpha_pattern` (PEFT's rule: a pattern
    matches the end of a layer name) before `<network>.lora_alpha`."""
    patterns = metadata.get(f"{net}.alpha_pattern") or {}
    hits = [a for pattern, a in patterns.items() if re.fullmatch(rf"(.*\.)?({pattern})", layer)]
    return hits[0] if hits else metadata.get(f"{net}.lora_alpha")


def read_lora(path: Path, networks: dict[str, nn.Module]) -> list[tuple[str, str, dict[str, Tensor], float]]:
    """The file's updates as (network, layer, {role: tensor}, alpha / r), every key matched and every shape checked
    first; a file that does not fit raises one WeightsError naming its first misfits and what it looks like."""
    state = load_safetensors(path)  # refuses pickles
    with safe_open(path, framework="pt") as f:
        metadata = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    names, groups, misfits = layer_spellings(networks), {}, []
    for key, tensor in state.items():
        suffix = next((s for s in ROLES if key.endswith(s)), None)
        layer = key.removesuffix(suffix) if suffix else key
        for pattern, ours in PROCESSOR_NAMES.items():
            layer = re.sub(f"^{pattern}$", ours, layer)
        if suffix is None or layer not in names:
            misfits.append(key)
        else:
            groups.setdefault(layer, {})[ROLES[suffix]] = tensor
    updates = []
    for spelled, parts in groups.items():
        net, layer = names[spelled]
        weight = networks[net].get_submodule(layer).weight
        if missing := [role for role in ("down", "up") if role not in parts]:
            misfits.append(f"{spelled} (no {missing[0]} weight)")
            continue
        if parts.get("alpha", torch.ones(())).numel() != 1 or not fits(parts, weight.shape):
            shapes = ", ".join(f"{role} {tuple(t.shape)}" for role, t in parts.items())
            misfits.append(f"{spelled} ({shapes}; {layer}.weight is {tuple(weight.shape)})")
            continue
        rank = parts["down"].shape[0]
        alpha = parts["alpha"].item() if "alpha" in parts else peft_alpha(metadata, net, spelled.split(".", 1)[-1])
        updates.append((net, layer, parts, (rank if alpha is None else alpha) / rank))
    if misfits or not updates:
        first = ", ".join(misfits[:3]) or "no LoRA tensors at all"
        raise WeightsError(
            f"{path} does not fit this SD 1.5 model, nothing applied: it looks like {looks_like(state)}; "
            f"{len(misfits)} misfit(s) among its {len(state)} tensors: {first}"
        )
    return updates


def originals(network: nn.Module) -> dict[str, Tensor]:
    """The tensors LoRA merges replaced in a network, by parameter name (kept on the network itself)."""
    if not hasattr(network, "lora_originals"):
        network.lora_originals = {}
    return network.lora_originals


def apply_lora(pipe, path: str | Path, weight: float = 1.0) -> int:
    """Merge the LoRA file `path` at strength `weight` into `pipe.unet` and `pipe.text_encoder` (W += weight * alpha
    / r * B A); several stack. Returns the number of layers changed. The file is checked whole before any weight
    changes."""
    if not math.isfinite(weight):
        raise ValueError(f"LoRA weight must be a finite number, got {weight}")
    networks = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    updates = read_lora(Path(path), networks)
    for net, layer, parts, scale in updates:
        p = networks[net].get_submodule(layer).weight
        originals(networks[net]).setdefault(f"{layer}.weight", p.data)
        b, a = factors({role: t.to(p.device) for role, t in parts.items()})
        # W + s B A in one float32 op (addmm: no separate B A tensor), rounded once into the model's dtype, as a new
        # tensor: never written in place, the loaded one may be a read-only memory map of the model file.
        p.data = torch.addmm(p.data.float().flatten(1), b, a, alpha=scale * weight).reshape(p.shape).to(p.dtype)
    return len(updates)


def remove_loras(pipe) -> None:
    """Undo every apply_lora: the exact original tensors go back."""
    for network in (pipe.unet, pipe.text_encoder):
        for name, tensor in originals(network).items():
            network.get_parameter(name).data = tensor
        network.lora_originals = {}
