"""Textual inversion: new words for the text encoder, learned as token vectors (Gal et al. 2022, arXiv:2208.01618).

An embedding file holds n vectors of the text encoder's width (SD 1.5: 768). Loading one adds a word to the tokenizer
that stands for n new token ids, `token`, `token_1`, ..., `token_{n-1}` (Diffusers' names; `tokenizer.slot_names`),
and appends the n vectors to the text encoder's token embedding table, so that a prompt's `token` becomes those n
tokens in order. Nothing else in the networks changes. Two safetensors layouts:
- A1111: the vectors (n, D) under the key `emb_params`;
- Diffusers (`learned_embeds.safetensors`): one key, the token it was trained for, holding (n, D) or (D,).
Pickled embeddings (`.pt`, `.bin`) are refused, as every pickle (models.loading.load_safetensors).
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import torch
from torch import Tensor, nn

from models.loading import WeightsError, load_safetensors
from tokenizer.clip_tokenizer import CLIPTokenizer, slot_names
from tokenizer.prompt_syntax import CHUNK

# What an embedding of another width is for: its text encoder's token width.
OTHER_WIDTHS = {768: "an SD 1.x embedding", 1024: "an SD 2.x embedding (OpenCLIP ViT-H)", 1280: "an SDXL embedding"}


def read_vectors(path: Path) -> Tensor:
    """The (n, D) vectors of an A1111 or Diffusers embedding file; any other file raises a one-line WeightsError."""
    state = load_safetensors(path)  # refuses pickles
    if {"clip_l", "clip_g"} <= state.keys():
        raise WeightsError(f"{path} is an SDXL embedding (vectors for two text encoders, clip_l and clip_g)")
    if "emb_params" in state:
        vectors = state["emb_params"]  # A1111
    elif len(state) == 1:
        vectors = next(iter(state.values()))  # Diffusers: {token: vectors}
    else:
        raise WeightsError(f"{path} is not an embedding: no `emb_params` and {len(state)} tensors, not one")
    vectors = torch.atleast_2d(vectors)  # Diffusers' single vector may be stored as (D,)
    if vectors.ndim != 2 or vectors.shape[0] == 0 or not vectors.is_floating_point():
        raise WeightsError(f"{path} holds a {vectors.dtype} tensor of shape {tuple(vectors.shape)}, not (n, D) vectors")
    return vectors


def load_embedding(
    tokenizer: CLIPTokenizer, text_encoder: nn.Module, path: str | Path, token: str | None = None
) -> list[str]:
    """Add the textual-inversion embedding in `path` (a .safetensors file) to `tokenizer` and `text_encoder` as the
    word `token` (default: the file's name without suffix), matched case-insensitively in prompts. Returns the n
    token names added, `token` first. The file and the name are checked before anything changes: a width other than
    the text encoder's or a token the tokenizer already has raises."""
    path = Path(path)
    token = path.stem if token is None else token
    vectors = read_vectors(path)
    table = text_encoder.embeddings.token_embedding
    (rows, width), (n, got) = table.weight.shape, vectors.shape
    if got != width:
        kind = OTHER_WIDTHS.get(got, "an embedding for another model")
        raise WeightsError(f"{path} holds {n} vector(s) {got} wide, this text encoder's are {width}: {kind}")
    if n > CHUNK:  # its ids must share one CLIP window (A1111 fails on such a file too: a window of 77+ tokens)
        raise WeightsError(f"{path} holds {n} vectors: more than the {CHUNK} tokens of a CLIP window")
    if len(tokenizer) != rows:  # a new id must be its vector's row
        raise WeightsError(f"the tokenizer has {len(tokenizer)} ids but the text encoder {rows} token vectors")
    names = list(islice(slot_names(token), n))
    tokenizer.add_tokens(names)  # raises ValueError (nothing added) for a name it has already
    # A new table, never written in place: the loaded one may be a read-only memory map of the model file.
    weight = torch.cat([table.weight.detach(), vectors.to(table.weight.device, table.weight.dtype)])
    text_encoder.embeddings.token_embedding = nn.Embedding(rows + n, width, _weight=weight, _freeze=True)
    return names
