"""CLIP text encoder: equal to transformers.CLIPTextModel on the same official-layout files (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from conftest import max_diff
from models.loading import load_component

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    "masterpiece, best quality, (red fox:1.2) in snow, 8k, highly detailed, trending on artstation",
    "a cat, a dog, " * 30,  # longer than 77 tokens: truncated, EOS kept last
]


def reference(folder):
    from transformers import CLIPTextModel, CLIPTokenizer

    model = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return model, ids


def reference_hidden(model, ids, clip_skip):
    """Diffusers' rule: hidden_states[-(k + 1)] then the final LayerNorm (k = 0: the last hidden state)."""
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        if not clip_skip:
            return out.last_hidden_state
        return model.final_layer_norm(out.hidden_states[-(clip_skip + 1)])


@pytest.mark.parametrize("clip_skip", [None, 1, 2])
def test_tiny_text_encoder_matches_transformers(tiny_model_dir, clip_skip):
    ref_model, ids = reference(tiny_model_dir)
    ours = load_component(tiny_model_dir, "text_encoder")
    with torch.no_grad():
        got = ours(ids, clip_skip=clip_skip)
    want = reference_hidden(ref_model, ids, clip_skip)
    assert got.shape == (len(PROMPTS), 77, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=lambda m: f"{m}\n{max_diff(got, want)}")


@pytest.mark.slow
@pytest.mark.parametrize("clip_skip", [None, 1])
def test_sd15_text_encoder_matches_transformers(sd15_model_dir, clip_skip):
    ref_model, ids = reference(sd15_model_dir)
    ours = load_component(sd15_model_dir, "text_encoder")
    with torch.no_grad():
        got = ours(ids, clip_skip=clip_skip)
    want = reference_hidden(ref_model, ids, clip_skip)
    assert got.shape == (len(PROMPTS), 77, 768)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=lambda m: f"{m}\n{max_diff(got, want)}")


def test_text_encoder_loads_without_prefix_and_buffer(tiny_model_dir, tmp_path):
    """Transformers 5 writes keys without `text_model.` and without `position_ids`: load that spelling too."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir / "text_encoder", folder / "text_encoder")
    path = folder / "text_encoder" / "model.safetensors"
    state = load_file(path)
    assert "text_model.embeddings.position_ids" in state  # the fixture writes the official spelling
    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    save_file(state, path)
    ref_model, ids = reference(tiny_model_dir)
    with torch.no_grad():
        got = load_component(folder, "text_encoder")(ids)
    want = reference_hidden(ref_model, ids, None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
