"""The CLIP ViT-L/14 text transformer that turns SD 1.5 prompts into the UNet's context (B, 77, 768).

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision" (arXiv:2103.00020),
Sec. 2.4: a GPT-2 style pre-LayerNorm transformer with a causal mask. SD 1.5 conditions on the last hidden
state, after the final LayerNorm (Rombach et al. 2022, arXiv:2112.10752, Sec. 3.3). Parameter names equal the
checkpoint's (minus its `text_model.` prefix, which `models.ldm.QUIRKS` strips).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.configs import MAX_LAYERS, MAX_WIDTH, check, integer, number


@dataclass(frozen=True)
class CLIPTextConfig:
    """Field names are the keys of `text_encoder/config.json`; defaults are SD 1.5's text encoder."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self) -> None:
        d, nh = self.hidden_size, self.num_attention_heads
        check("CLIP text", self, {
            "vocab_size": integer(self.vocab_size, 1, 1 << 20),
            "hidden_size": integer(d, 1, MAX_WIDTH),
            "intermediate_size": integer(self.intermediate_size, 1, 4 * MAX_WIDTH),
            "num_hidden_layers": integer(self.num_hidden_layers, 1, MAX_LAYERS),
            "num_attention_heads": integer(nh, 1, MAX_WIDTH),
            # the tokenizer always gives 77 positions (CLIPTokenizer.MAX_LENGTH)
            "max_position_embeddings": integer(self.max_position_embeddings, 77, MAX_WIDTH),
            "layer_norm_eps": number(self.layer_norm_eps, 0, 1),
            "hidden_act": (self.hidden_act in ("quick_gelu", "gelu"), "'quick_gelu' (SD 1.5) or 'gelu'"),
        })  # fmt: skip
        check("CLIP text", self, {"num_attention_heads": (d % nh == 0, f"a divisor of hidden_size={d}")})


def quick_gelu(x: Tensor) -> Tensor:
    # The sigmoid approximation of GELU that OpenAI trained CLIP with (Hendrycks & Gimpel 2016, arXiv:1606.08415,
    # Sec. 2): x * sigmoid(1.702 x). Using exact GELU here changes the outputs noticeably.
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.nh = cfg.num_attention_heads
        d = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(b, n, self.nh, d // self.nh).transpose(1, 2)  # (B, L, D) -> (B, nh, L, hd)

        # Causal: token i only sees tokens <= i (the padding after EOS is not masked; SD 1.5 was trained so).
        y = F.scaled_dot_product_attention(
            heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), is_causal=True
        )
        return self.out_proj(y.transpose(1, 2).reshape(b, n, d))  # (B, nh, L, hd) -> (B, L, D)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = quick_gelu if cfg.hidden_act == "quick_gelu" else F.gelu

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN residual block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        # `_weight` skips nn.Embedding's random init: even on the meta device its init.normal_ imports torch._dynamo,
        # ~5 s per process here; the weights always come from the checkpoint.
        v, n, d = cfg.vocab_size, cfg.max_position_embeddings, cfg.hidden_size
        self.token_embedding = nn.Embedding(v, d, _weight=torch.empty(v, d))
        self.position_embedding = nn.Embedding(n, d, _weight=torch.empty(n, d))

    def forward(self, ids: Tensor) -> Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]  # (B, L) -> (B, L, D)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: Tensor, clip_skip: int | None = None) -> Tensor:
        """Token ids (B, L) -> hidden states (B, L, D) after the final LayerNorm.

        `clip_skip=k` stops k layers before the last (Diffusers' numbering: k=1 is the penultimate layer, what
        A1111 calls "clip skip 2"); the final LayerNorm is still applied, as Diffusers and A1111 do.
        """
        skip = clip_skip or 0
        if not 0 <= skip < len(self.encoder.layers):
            raise ValueError(f"clip_skip must be in [0, {len(self.encoder.layers) - 1}], got {clip_skip}")
        x = self.embeddings(ids)
        for layer in self.encoder.layers[: len(self.encoder.layers) - skip]:
            x = layer(x)
        return self.final_layer_norm(x)
