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

A file is data from strangers: its names and metadata never reach `re` (no crafted pattern can make matching slow),
names are at most MAX_NAME characters, and whatever is not a LoRA (rank 0, integer weights, a non-numeric or
non-finite alpha, weights that the merge would overflow) is one WeightsError naming the file, before any weight changes.
"""

from __future__ import annotations

import json
import math
import re
import sys
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
# The longest tensor or alpha_pattern name read (SD 1.5's longest LoRA key has ~100 characters): longer ones are
# refused, so that no name matching in this file costs more than a linear pass over the file's header.
MAX_NAME = 1000
INTEGERS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)  # an alpha may be stored as one
PLAIN_NAME = re.compile(r"[A-Za-z0-9_.]+")  # an alpha_pattern key we read: a layer name, not a regular expression


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


def reads_text_states(key: str) -> bool:
    """Whether a key is the down weight of a cross-attention's to_k (`attn2.to.k.*(down|lora_A)`, without the
    backtracking `.*` that makes re.search quadratic in the key's length)."""
    found = re.search(r"attn2.to.k", key)  # fixed length: linear
    return found is not None and ("down" in key[found.end() :] or "lora_A" in key[found.end() :])


def looks_like(state: dict[str, Tensor]) -> str:
    """What a file we cannot apply seems to be: by its key names, else by the text width its attn2.to_k reads."""
    for fragment, kind in LOOKS_LIKE.items():
        if any(fragment in key for key in state):
            return kind
    widths = [v.shape[-1] for k, v in state.items() if reads_text_states(k) and v.ndim == 2]
    return CROSS_ATTENTION_WIDTH.get(widths[0] if widths else 0, "a LoRA for other layers or another model")


def is_number(x: object) -> bool:
    """A finite int or float (not a bool, a string or a JSON null); ints too big for a float are not."""
    return type(x) in (int, float) and abs(x) <= sys.float_info.max


def peft_alphas(path: Path, header: dict[str, str]) -> dict[str, tuple[float | None, dict[str, tuple[int, float]]]]:
    """Per network, `lora_alpha` and `alpha_pattern` ({layer name: (position in the file, alpha)}) from Diffusers'
    `lora_adapter_metadata` (a PEFT LoraConfig per network), checked. PEFT reads pattern keys as regular
    expressions; we read plain layer names only and refuse the rest. Ranks come from the tensors (no `rank_pattern`)."""
    try:
        metadata = json.loads(header.get("lora_adapter_metadata", "{}"))
    except (ValueError, RecursionError) as e:
        raise WeightsError(f"{path}: its lora_adapter_metadata is not valid JSON ({str(e)[:100]})") from None
    if not isinstance(metadata, dict):
        raise WeightsError(f"{path}: its lora_adapter_metadata is a JSON {type(metadata).__name__}, not an object")
    alphas = {}
    for net in PREFIXES:
        alpha, patterns = metadata.get(f"{net}.lora_alpha"), metadata.get(f"{net}.alpha_pattern") or {}
        where = f"{path}: lora_adapter_metadata's {net}"
        if not isinstance(patterns, dict):
            raise WeightsError(f"{where}.alpha_pattern is not a JSON object")
        if bad := next((k for k in patterns if len(k) > MAX_NAME or not PLAIN_NAME.fullmatch(k)), None):
            raise WeightsError(f"{where}.alpha_pattern key {bad!r:.80} is not a layer name (patterns are matched as "
                               "plain names, never as regular expressions)")  # fmt: skip
        if not (alpha is None or is_number(alpha)):
            raise WeightsError(f"{where}.lora_alpha is {alpha!r:.60}, not a finite number")
        if bad := next((k for k, a in patterns.items() if not is_number(a)), None):
            raise WeightsError(f"{where}.alpha_pattern {bad} is {patterns[bad]!r:.60}, not a finite number")
        alphas[net] = (alpha, {k: (i, a) for i, (k, a) in enumerate(patterns.items())})
    return alphas


def peft_alpha(alphas: dict, net: str, layer: str) -> float | None:
    """A layer's alpha from peft_alphas: PEFT's rule (peft.utils.other.get_pattern_key) is the first alpha_pattern key,
    in the file's order, that is the layer's name or its end after a dot; else the network's lora_alpha."""
    default, patterns = alphas[net]
    ends = [layer] + [layer[i + 1 :] for i, c in enumerate(layer) if c == "."]  # a dict lookup each: any number of keys
    hits = [patterns[end] for end in ends if end in patterns]
    return min(hits)[1] if hits else default


def read_lora(path: Path, networks: dict[str, nn.Module]) -> list[tuple[str, str, dict[str, Tensor], float]]:
    """The file's updates as (network, layer, {role: tensor}, alpha / r), every key matched and every shape checked
    first; a file that does not fit raises one WeightsError naming its first misfits and what it looks like."""
    state = load_safetensors(path)  # refuses pickles
    if long := next((k for k in state if len(k) > MAX_NAME), None):
        raise WeightsError(f"{path}: a tensor name of {len(long)} characters ({long[:40]!r}...), not a LoRA file")
    with safe_open(path, framework="pt") as f:
        alphas = peft_alphas(path, f.metadata() or {})
    names, groups, misfits = layer_spellings(networks), {}, []
    for key, tensor in state.items():
        suffix = next((s for s in ROLES if key.endswith(s)), None)
        layer = key.removesuffix(suffix) if suffix else key
        for pattern, ours in PROCESSOR_NAMES.items():
            layer = re.sub(f"^{pattern}$", ours, layer)
        if suffix is None or layer not in names:
            misfits.append(key)
        elif not tensor.is_floating_point() and not (ROLES[suffix] == "alpha" and tensor.dtype in INTEGERS):
            raise WeightsError(f"{path}: tensor {key} is {str(tensor.dtype).removeprefix('torch.')}; LoRA weights "
                               "are floating point (an alpha may be an integer)")  # fmt: skip
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
        if (rank := parts["down"].shape[0]) == 0:
            raise WeightsError(f"{path}: {spelled} has rank 0 (empty down and up weights), not a LoRA")
        alpha = parts["alpha"].item() if "alpha" in parts else peft_alpha(alphas, net, spelled.split(".", 1)[-1])
        if not (alpha is None or is_number(alpha)):
            raise WeightsError(f"{path}: {spelled} has alpha {alpha}, not a finite number")
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


def merge(w: Tensor, parts: dict[str, Tensor], s: float) -> Tensor | None:
    """W + s B A in one float32 op (addmm: no separate B A tensor), rounded once into W's dtype, as a new tensor: never
    written in place, the loaded one may be a read-only memory map of the model file. None where not finite."""
    if not abs(s) <= torch.finfo(torch.float32).max:  # addmm's factor is a float32
        return None
    b, a = factors({role: t.to(w.device) for role, t in parts.items()})
    merged = torch.addmm(w.float().flatten(1), b, a, alpha=s).reshape(w.shape).to(w.dtype)
    lo, hi = torch.aminmax(merged)  # NaN or inf anywhere shows here (one pass, ~8x faster than isfinite().all())
    return merged if math.isfinite(lo) and math.isfinite(hi) else None


def apply_lora(unet: nn.Module, text_encoder: nn.Module, path: str | Path, weight: float = 1.0) -> int:
    """Merge the LoRA file `path` at strength `weight` into the UNet and text encoder (W += weight * alpha / r * B A);
    several stack. Returns the number of layers changed. The file, and every merged weight, is checked before any
    weight changes: a file whose merge overflows the weights' dtype (or holds NaN) is refused whole."""
    if not math.isfinite(weight):
        raise ValueError(f"LoRA weight must be a finite number, got {weight}")
    networks = {"unet": unet, "text_encoder": text_encoder}
    new: dict[tuple[str, str], Tensor | None] = {}  # all new weights first (they are all kept anyway), then the swap
    for net, layer, parts, scale in read_lora(Path(path), networks):
        w = new.get((net, layer), networks[net].get_submodule(layer).weight.data)  # a layer spelled twice: both
        new[net, layer] = merge(w, parts, scale * weight)
        if new[net, layer] is None:
            raise WeightsError(
                f"{path}: merged at strength {weight}, {net}.{layer} gets non-finite weights (NaN or inf in the file, "
                f"or an update too large: alpha / rank = {scale:.3g}): nothing applied"
            )
    for (net, layer), w in new.items():
        p = networks[net].get_submodule(layer).weight
        originals(networks[net]).setdefault(f"{layer}.weight", p.data)
        p.data = w
    return len(new)


def remove_loras(unet: nn.Module, text_encoder: nn.Module) -> None:
    """Undo every apply_lora: the exact original tensors go back."""
    for network in (unet, text_encoder):
        for name, tensor in originals(network).items():
            network.get_parameter(name).data = tensor
        network.lora_originals = {}
