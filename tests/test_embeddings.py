"""Textual-inversion embeddings (models/embeddings.py, CLIPTokenizer.add_tokens): the conditioning equals Diffusers'
after `load_textual_inversion` (its tokenizer's added tokens + `maybe_convert_prompt`), for 1 and 4 vectors in the
A1111 and Diffusers file formats, and images with the embedding in the negative prompt equal the Diffusers pipeline's.
Files we cannot use (another width, a pickle, a token the tokenizer has) are refused before anything changes.

No embedding files are at hand, so each test writes random vectors of the tiny text encoder's width (32).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY_TEXT_ENCODER, assert_images_close, max_diff, run_both
from min_pipeline import generate, load_pipeline
from models.embeddings import load_embedding
from models.loading import WeightsError
from prompts import encode_prompt, encode_prompts

WIDTH = TINY_TEXT_ENCODER["hidden_size"]
PROMPT = "a photo of <tok> on a beach, <tok> at night"


def ours(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_pipeline(str(folder), device="cpu", dtype=torch.float32)


def reference(folder):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


def write(path, n: int, fmt: str, width: int = WIDTH, seed: int = 0):
    """n random vectors in the A1111 (`emb_params`) or Diffusers (`{token: vectors}`) layout."""
    vectors = torch.randn(n, width, generator=torch.Generator().manual_seed(seed))
    save_file({"emb_params": vectors} if fmt == "a1111" else {"<trained>": vectors}, str(path))
    return path


@pytest.mark.parametrize("fmt", ["a1111", "diffusers"])
@pytest.mark.parametrize("n", [1, 4])
def test_conditioning_equals_diffusers_load_textual_inversion(tiny_model_dir, tmp_path, fmt, n):
    pipe, ref = ours(tiny_model_dir), reference(tiny_model_dir)
    file = write(tmp_path / f"emb-{fmt}.safetensors", n, fmt)
    plain = pipe.tokenizer(PROMPT)
    names = load_embedding(pipe.tokenizer, pipe.text_encoder, file, token="<tok>")
    assert names == ["<tok>"] + [f"<tok>_{i}" for i in range(1, n)]
    ref.load_textual_inversion(str(file), token="<tok>")
    # the ids: `<tok>` expands in place to its n new ids, twice; the rest of the prompt is as before
    got = pipe.tokenizer(PROMPT)
    converted = ref.maybe_convert_prompt(PROMPT, ref.tokenizer)
    want = ref.tokenizer(converted, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert got.tolist() == want.input_ids.tolist(), (converted, got, want.input_ids)
    new = list(range(49408, 49408 + n))
    assert got[0, 4 : 4 + n].tolist() == new and got.flatten().tolist().count(49408) == 2
    assert not torch.equal(got, plain)
    # the conditioning: both text encoders with the vectors appended
    with torch.no_grad():
        c = encode_prompts(pipe, [PROMPT], None)
        c_ref = ref.encode_prompt(PROMPT, "cpu", 1, False)[0]
    torch.testing.assert_close(c, c_ref, atol=1e-5, rtol=0, msg=lambda m: f"{m}\n{max_diff(c, c_ref)}")


def test_token_defaults_to_file_stem_and_matches_case_insensitively(tiny_model_dir, tmp_path):
    pipe = ours(tiny_model_dir)
    file = write(tmp_path / "MyStyle.safetensors", 2, "diffusers")
    assert load_embedding(pipe.tokenizer, pipe.text_encoder, file) == ["MyStyle", "MyStyle_1"]
    for prompt in ("a cat, MyStyle", "a cat, mystyle", "a cat, MYSTYLE"):
        assert pipe.tokenizer.encode(prompt) == [49406, 320, 2368, 267, 49408, 49409, 49407], prompt
    # whole words only: a longer word that contains the name is plain text
    assert 49408 not in pipe.tokenizer.encode("mystyles mystyle2 amystyle")
    assert pipe.tokenizer.decode(pipe.tokenizer.encode("a MyStyle cat")) == "a mystyle mystyle_1 cat"


def test_vectors_appended_as_a_new_table_in_the_text_encoder_dtype(tiny_model_dir, tmp_path):
    pipe = ours(tiny_model_dir)
    pipe.text_encoder.to(torch.float16)
    old = pipe.text_encoder.embeddings.token_embedding.weight
    before = old.clone()
    file = write(tmp_path / "<x>.safetensors", 3, "a1111", seed=3)
    load_embedding(pipe.tokenizer, pipe.text_encoder, file)
    new = pipe.text_encoder.embeddings.token_embedding.weight
    assert new.shape == (49408 + 3, WIDTH) and new.dtype == torch.float16 and not new.requires_grad
    assert torch.equal(old, before) and old.shape == before.shape  # the loaded tensor was not written to
    torch.testing.assert_close(new[:49408], before, atol=0, rtol=0)
    expected = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(3)).half()
    torch.testing.assert_close(new[49408:], expected, atol=0, rtol=0)


def test_negative_prompt_embedding_images_equal_diffusers(tiny_model_dir, tmp_path):
    pipe, ref = ours(tiny_model_dir), reference(tiny_model_dir)
    file = write(tmp_path / "bad.safetensors", 4, "a1111", seed=1)
    load_embedding(pipe.tokenizer, pipe.text_encoder, file, token="<bad>")
    ref.load_textual_inversion(str(file), token="<bad>")
    settings = dict(height=40, width=24, steps=4, seed=7, scheduler="euler")
    got, want = run_both(pipe, ref, "a red fox in snow", "<bad>, blurry", **settings)
    assert_images_close(got, want, atol=1e-4)
    plain = generate(ours(tiny_model_dir), "a red fox in snow", "<bad>, blurry", output_type="np", progress=False,
                     **settings)  # fmt: skip
    assert abs(got - plain).max() > 1e-3  # the embedding changes the image


@pytest.mark.parametrize("before", [71, 73, 74])
def test_an_embedding_at_a_window_edge_moves_whole_to_the_next_window(tiny_model_dir, tmp_path, before):
    """A1111 (tokenize_line): a multi-vector embedding that does not fit in the rest of a 75-token window starts
    the next one. The windows written out here from Diffusers' tokenizer after load_textual_inversion, encoded by
    its text encoder, weighted as A1111's "Original" emphasis."""
    pipe, ref = ours(tiny_model_dir), reference(tiny_model_dir)
    file = write(tmp_path / "emb.safetensors", 4, "a1111")
    load_embedding(pipe.tokenizer, pipe.text_encoder, file, token="<tok>")
    ref.load_textual_inversion(str(file), token="<tok>")
    prompt = "fox " * before + "(<tok>:1.2) owl"
    fox, owl = (ref.tokenizer(w, add_special_tokens=False).input_ids for w in ("fox", "owl"))
    emb = ref.tokenizer(ref.maybe_convert_prompt("<tok>", ref.tokenizer), add_special_tokens=False).input_ids
    assert len(fox) == len(owl) == 1 and len(emb) == 4
    bos, eos = ref.tokenizer.bos_token_id, ref.tokenizer.eos_token_id
    fits = before + 4 <= 75
    first = fox * before + (emb if fits else [])
    second = ([] if fits else emb) + owl
    windows, weights = [], []
    for ids, weighted in ((first, range(before, before + 4) if fits else ()), (second, () if fits else range(4))):
        windows.append([bos, *ids, *[eos] * (76 - len(ids))])
        weights.append([1.2 if k - 1 in weighted else 1.0 for k in range(77)])
    with torch.no_grad():
        z = ref.text_encoder(torch.tensor(windows)).last_hidden_state
    w = torch.tensor(weights)[..., None]
    want = torch.cat(list(z * w * (z.mean(dim=(1, 2), keepdim=True) / (z * w).mean(dim=(1, 2), keepdim=True))))[None]
    got = encode_prompt(pipe, prompt)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=lambda m: f"{m}\n{max_diff(got, want)}")


def unchanged(pipe):
    """The tokenizer's and text encoder's token counts, to check that a refusal changed nothing."""
    return len(pipe.tokenizer), pipe.text_encoder.embeddings.token_embedding.weight.shape[0]


@pytest.mark.parametrize(
    "width, message", [(1280, "1280 wide.*SDXL"), (1024, "1024 wide.*SD 2"), (768, "768 wide.*SD 1"), (31, "31 wide")]
)
def test_refuses_an_embedding_of_another_width(tiny_model_dir, tmp_path, width, message):
    pipe = ours(tiny_model_dir)
    before = unchanged(pipe)
    with pytest.raises(WeightsError, match=message):
        load_embedding(pipe.tokenizer, pipe.text_encoder, write(tmp_path / "wide.safetensors", 2, "a1111", width=width))
    assert unchanged(pipe) == before


def test_refuses_an_sdxl_embedding_file(tiny_model_dir, tmp_path):
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(WeightsError, match="SDXL"):
        pipe = ours(tiny_model_dir)
        load_embedding(pipe.tokenizer, pipe.text_encoder, tmp_path / "xl.safetensors")


def test_refuses_a_pickle(tiny_model_dir, tmp_path):
    torch.save({"string_to_param": {"*": torch.zeros(1, WIDTH)}}, tmp_path / "emb.pt")
    pipe = ours(tiny_model_dir)
    before = unchanged(pipe)
    with pytest.raises(WeightsError, match="pickle"):
        load_embedding(pipe.tokenizer, pipe.text_encoder, tmp_path / "emb.pt")
    assert unchanged(pipe) == before


@pytest.mark.parametrize("token", ["cat", "Cat", "<|endoftext|>", "xy", ""])
def test_refuses_a_token_already_in_the_vocabulary(tiny_model_dir, tmp_path, token):
    pipe = ours(tiny_model_dir)
    before = unchanged(pipe)
    with pytest.raises(ValueError, match="vocabulary|empty"):
        load_embedding(pipe.tokenizer, pipe.text_encoder, write(tmp_path / "e.safetensors", 1, "a1111"), token=token)
    assert unchanged(pipe) == before


def test_refuses_a_token_already_loaded(tiny_model_dir, tmp_path):
    pipe = ours(tiny_model_dir)
    for token in ("<a>", "<b>_1"):
        load_embedding(pipe.tokenizer, pipe.text_encoder, write(tmp_path / "a.safetensors", 1, "a1111"), token=token)
    before = unchanged(pipe)
    # the same word in other case; a 3-vector `<b>` whose second slot `<b>_1` is taken
    for token, n in (("<A>", 1), ("<b>", 3)):
        with pytest.raises(ValueError, match="already added"):
            file = write(tmp_path / "d.safetensors", n, "a1111")
            load_embedding(pipe.tokenizer, pipe.text_encoder, file, token=token)
        assert unchanged(pipe) == before
    assert pipe.tokenizer.encode("<a> <b>_1 <b>") == [49406, 49408, 49409, 283, 321, 285, 49407]


def test_cli_embeddings_dir_and_emphasis(tiny_model_dir, tmp_path):
    """--embeddings-dir makes every file there usable by its name, with emphasis, as A1111's embeddings folder."""
    import numpy as np
    from PIL import Image

    from cli.main import main
    from min_pipeline import generate

    (tmp_path / "emb").mkdir()
    write(tmp_path / "emb" / "badhands.safetensors", 2, "a1111")
    pipe = ours(tiny_model_dir)
    load_embedding(pipe.tokenizer, pipe.text_encoder, tmp_path / "emb" / "badhands.safetensors")
    want = generate(pipe, "a fox", "(badhands:1.2)", steps=2, height=16, width=16, progress=False)[0]
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--quiet", "--steps", "2", "--height", "16"]
    args += ["--seed", "0", "--width", "16", "--prompt", "a fox", "--negative-prompt", "(badhands:1.2)"]
    args += ["--embeddings-dir"]
    assert main([*args, str(tmp_path / "emb"), "--output", str(tmp_path / "o.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o.png")), np.asarray(want))


def test_refuses_an_embedding_longer_than_a_clip_window(tiny_model_dir, tmp_path):
    """Issue 23 item 16: an embedding's vectors share one window of 75 tokens; 76 would be split across windows (and
    beyond 150 the prompt after it was cut), so it is refused, as A1111 cannot use it either. 75 fit."""
    pipe = ours(tiny_model_dir)
    before = unchanged(pipe)
    with pytest.raises(WeightsError, match="holds 76 vectors: more than the 75 tokens of a CLIP window"):
        load_embedding(pipe.tokenizer, pipe.text_encoder, write(tmp_path / "long.safetensors", 76, "a1111"))
    assert unchanged(pipe) == before
    load_embedding(pipe.tokenizer, pipe.text_encoder, write(tmp_path / "fullwin.safetensors", 75, "a1111"))
    assert encode_prompt(pipe, "a fullwin b").shape[1] == 3 * 77  # a, then a window of the embedding alone, then b
