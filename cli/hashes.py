"""A1111's short hashes of the files that made an image, for the PNG's `Model hash`, `Lora hashes` and `TI hashes`.

Image sites (Civitai) and A1111 itself find the checkpoint, LoRAs and embeddings of a shared image by these hashes:
- Model hash: the first 10 hex digits of the SHA-256 of the whole checkpoint file (A1111's `shorthash`; before
  A1111 1.0 it was another, 8-digit hash, which we never write). A Diffusers folder has no checkpoint file, and a
  hash of one of its files would match no checkpoint anywhere, so a folder or hub repo gets no Model hash.
- Lora hashes: the first 12 hex digits of the SHA-256 of a .safetensors file *after its header* (the tensor data
  only, so that editing the metadata keeps the hash: kohya-ss' "addnet" hash, which A1111 uses for LoRAs).
- TI hashes: the first 12 hex digits of the SHA-256 of the whole embedding file.
Hashing reads the whole file (a 4 GB checkpoint: a few seconds, see README), so each hash is computed once per
process and kept by (path, size, modification time).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tokenizer.clip_tokenizer import CLIPTokenizer, clean

MODEL_DIGITS, NETWORK_DIGITS = 10, 12  # A1111: checkpoint shorthash [0:10], Lora and embedding shorthash [0:12]
_cache: dict[tuple[str, int, int, bool], str] = {}  # (real path, size, mtime in ns, after header) -> sha256 hex


def sha256(path: str | Path, after_header: bool = False) -> str:
    """The SHA-256 (hex) of a file, or with `after_header` of a .safetensors file's bytes after its header (an
    8-byte little-endian length n, then n bytes of JSON): computed once per file version, then cached."""
    path = Path(os.path.realpath(path))
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, after_header)
    if key not in _cache:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            if after_header:
                f.seek(8 + int.from_bytes(f.read(8), "little"))  # past the end of a broken file: no bytes
            while chunk := f.read(2**20):
                digest.update(chunk)
        _cache[key] = digest.hexdigest()
    return _cache[key]


def model_hash(model: str) -> str | None:
    """A1111's Model hash of a single-file checkpoint; None for a Diffusers folder or a hub repo id."""
    path = Path(model).expanduser()
    return sha256(path)[:MODEL_DIGITS] if path.is_file() else None


def network_name(name: str) -> str:
    """A LoRA's or embedding's name as A1111 lists it in the hash fields: without the field separators , and :."""
    return name.replace(":", "").replace(",", "")


def hash_fields(model: str, loras: list[tuple[str, Path]], embeddings: list[tuple[str, Path]]) -> dict[str, str]:
    """The PNG fields naming what made an image: `Model hash` (a single file only), `Lora hashes` for the LoRAs
    as [(name, file)] (a .safetensors file's tensor data; another file whole, as A1111) and `TI hashes` for the
    embeddings used, each "name: hash, name2: hash2" as A1111 writes them. Fields with nothing to list are left out."""
    fields = {"Model hash": model_hash(model)}
    lora = [f"{network_name(n)}: {sha256(p, p.suffix == '.safetensors')[:NETWORK_DIGITS]}" for n, p in loras]
    ti = [f"{network_name(n)}: {sha256(p)[:NETWORK_DIGITS]}" for n, p in embeddings]
    fields |= {"Lora hashes": ", ".join(dict.fromkeys(lora)), "TI hashes": ", ".join(ti)}  # a tag used twice: once
    return {k: v for k, v in fields.items() if v}


def embeddings_in(tokenizer: CLIPTokenizer, files: list[Path], texts: list[str]) -> list[tuple[str, Path]]:
    """The embedding files (loaded under their names, models.embeddings) that the texts use: their name found as
    the tokenizer finds it (cleaned, case-insensitive, not inside a word), as A1111 lists the embeddings it used."""
    found = {word for text in texts for word in tokenizer.added_words.findall(clean(text))}
    return [(path.stem, path) for path in files if clean(path.stem) in found]
