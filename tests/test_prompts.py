"""Prompts as A1111 reads them: the conditioning of long, weighted, BREAK and edited prompts against a reference
built here from Transformers' CLIPTokenizer and CLIPTextModel by A1111's rules, and end to end against Diffusers
fed those embeddings. (The parser itself is tested against A1111's tables in test_prompt_syntax.py.)"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_images_close, max_diff, with_scheduler
from min_pipeline import generate, load_pipeline
from prompts import conditioning, encode_a1111
from tokenizer import parse_prompt_attention

LONG = ", ".join(f"a {w} fox in the snow with (bright:1.3) eyes" for w in ("red", "grey", "small", "old", "wild") * 4)
PROMPTS = {
    "short": "a red fox in snow",
    "long": LONG,  # 160 words: several windows
    "weighted": "a ((red)) fox, [blurry] snow, (golden hour:1.4)",
    "break": "a red fox BREAK in the snow",
    "comma-edge": "fox " * 60 + ", " + "owl " * 30,  # a comma 60 tokens in: the words after it move on
    "empty": "",
}


def reference_windows(tokenizer, text: str) -> list[tuple[list[int], list[float]]]:
    """A1111's rules written out once more: 75 tokens per window between BOS and EOS, EOS padding; a full window
    with a comma in its last 20 tokens hands what follows the comma to the next; BREAK closes a window."""
    bos, eos, comma = (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer(",", add_special_tokens=False).input_ids[0],
    )
    windows, ids, weights = [], [], []

    def close(n=75):
        nonlocal ids, weights
        windows.append(
            ([bos, *ids[:n], *[eos] * (76 - len(ids[:n]))], [1.0, *weights[:n], *[1.0] * (76 - len(ids[:n]))])
        )
        ids, weights = ids[n:], weights[n:]

    for piece, weight in parse_prompt_attention(text):
        if (piece, weight) == ("BREAK", -1.0):
            close()
            continue
        for token in tokenizer(piece, add_special_tokens=False).input_ids:
            if len(ids) == 75:
                commas = [k for k in range(55, 75) if ids[k] == comma]
                close(commas[-1] + 1 if commas and token != comma else 75)
            ids.append(token)
            weights.append(weight)
    if ids or not windows:
        close()
    return windows


def reference_conditioning(ref, text: str, clip_skip: int | None = None) -> torch.Tensor:
    out = []
    for ids, weights in reference_windows(ref.tokenizer, text):
        with torch.no_grad():
            hidden = ref.text_encoder(torch.tensor([ids]), output_hidden_states=True).hidden_states
            z = ref.text_encoder.final_layer_norm(hidden[-1 - (clip_skip or 0)])
        w = torch.tensor(weights)[None, :, None]
        out.append(z * w * (z.mean() / (z * w).mean()))  # A1111's "Original" emphasis, per window
    return torch.cat(out, dim=1)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.float32), ref


@pytest.mark.parametrize("clip_skip", [None, 1])
@pytest.mark.parametrize("name", list(PROMPTS))
def test_conditioning_matches_the_a1111_rules(tiny, name, clip_skip):
    ours, ref = tiny
    got = encode_a1111(ours, [PROMPTS[name]], clip_skip)[0]
    want = reference_conditioning(ref, PROMPTS[name], clip_skip)
    assert got.shape == want.shape, (got.shape, want.shape)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=lambda m: f"{m}\n{max_diff(got, want)}")


@pytest.mark.slow
def test_sd15_conditioning_matches_the_a1111_rules(sd15_model_dir):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(sd15_model_dir, safety_checker=None, requires_safety_checker=False)
    ours = load_pipeline(str(sd15_model_dir), device="cpu", dtype=torch.float32)
    for text in (LONG, PROMPTS["weighted"]):
        got, want = encode_a1111(ours, [text], None)[0], reference_conditioning(ref, text)
        diff = max_diff(got, want)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, diff=diff: f"{m}\n{diff}")


def test_plain_prompt_conditioning_is_unchanged(tiny):
    ours, _ = tiny
    from settings import Settings

    s = Settings(steps=4)
    [(_, a1111)] = conditioning(ours, ["a red fox", "an owl"], ["", "blurry"], s, True, "a1111")
    [(_, plain)] = conditioning(ours, ["a red fox", "an owl"], ["", "blurry"], s, True, "plain")
    assert torch.equal(a1111, plain)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_long_weighted_prompt_and_negative_of_another_length_match_diffusers(tiny, sampler):
    ours, ref = tiny
    negative = "blurry, (low quality:1.2)"
    got = generate(ours, LONG, negative, scheduler=sampler, steps=4, height=24, width=16, seed=2, output_type="np",
                   progress=False)  # fmt: skip
    cond, uncond = reference_conditioning(ref, LONG), reference_conditioning(ref, negative)
    empty = reference_conditioning(ref, "")
    uncond = torch.cat([uncond, *[empty] * ((cond.shape[1] - uncond.shape[1]) // 77)], dim=1)
    with_scheduler(ref, sampler)
    want = ref(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=4, height=24, width=16,
               generator=torch.Generator().manual_seed(2), output_type="np").images  # fmt: skip
    assert_images_close(got, want, atol=1e-4)


def test_prompt_editing_matches_diffusers_swapping_embeddings(tiny):
    """[a red fox:an owl:2] with 5 steps: the fox for steps 0-2, the owl from step 3 (A1111 counts from 0 and
    switches after step `when`); Diffusers' callback swaps prompt_embeds after its step 2."""
    ours, ref = tiny
    got = generate(ours, "[a red fox:an owl:2]", steps=5, height=24, width=16, seed=1, output_type="np", progress=False)
    fox, owl, empty = (reference_conditioning(ref, t) for t in ("a red fox", "an owl", ""))

    def swap(pipe, i, t, kwargs):
        return {"prompt_embeds": torch.cat([empty, owl])} if i == 2 else {}

    with_scheduler(ref, "euler")
    want = ref(prompt_embeds=fox, negative_prompt_embeds=empty, num_inference_steps=5, height=24, width=16,
               generator=torch.Generator().manual_seed(1), output_type="np", callback_on_step_end=swap,
               callback_on_step_end_tensor_inputs=["prompt_embeds"]).images  # fmt: skip
    assert_images_close(got, want, atol=1e-4)


# ----------------------------------------------------------------------------- A1111's batches (issue 24 item 11)


def reference_batch(ref, texts: list[str]) -> torch.Tensor:
    """A1111's FrozenCLIPEmbedderWithCustomWordsBase.forward(texts), written out: the texts' i-th windows are one
    batch (a text with fewer windows gets an empty one: BOS, then EOS to the end, weights 1), and EmphasisOriginal
    restores the mean of the whole (B, 77, D) batch. Returns (B, 77 k, D)."""
    windows = [reference_windows(ref.tokenizer, t) for t in texts]
    empty = ([ref.tokenizer.bos_token_id] + [ref.tokenizer.eos_token_id] * 76, [1.0] * 77)
    zs = []
    for i in range(max(len(w) for w in windows)):
        chunk = [w[i] if i < len(w) else empty for w in windows]
        with torch.no_grad():
            z = ref.text_encoder(torch.tensor([ids for ids, _ in chunk])).last_hidden_state
        multipliers = torch.tensor([weights for _, weights in chunk])
        original_mean = z.mean()
        z = z * multipliers[:, :, None]
        zs.append(z * (original_mean / z.mean()))
    return torch.cat(zs, dim=1)


EDITING = {  # prompt, negative prompt and their A1111 schedules at 3 steps: [(last step, text)], repeats included
    "edit-and-alternate": ("a (red:1.5) [cat:dog:2]", "[(blurry:1.3)|low quality]",
                           [(2, "a (red:1.5) cat"), (3, "a (red:1.5) dog")],
                           [(1, "(blurry:1.3)"), (2, "low quality"), (3, "(blurry:1.3)")]),
    "texts-of-different-lengths": (f"(red:1.5) [{LONG}:a dog:1]", "",
                                   [(1, f"(red:1.5) {LONG}"), (3, "(red:1.5) a dog")], [(3, "")]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(EDITING))
def test_a_prompts_edited_texts_share_one_emphasis_mean_as_in_a1111(tiny, name):
    """A1111 encodes one prompt's schedule texts in one forward (prompt_parser.get_learned_conditioning) and the
    negative prompt's in another; the tiny text encoder's final LayerNorm has a random bias, so the mean matters."""
    from settings import Settings

    ours, ref = tiny
    prompt, negative, prompt_schedule, negative_schedule = EDITING[name]
    got = conditioning(ours, [prompt], [negative], Settings(steps=3), True, "a1111")
    cond = reference_batch(ref, [t for _, t in prompt_schedule])
    uncond = reference_batch(ref, [t for _, t in negative_schedule])
    empty = reference_batch(ref, [""])
    assert [end for end, _ in got] == sorted({e for e, _ in prompt_schedule + negative_schedule})
    for end, context in got:
        rows = [batch[next(j for j, (e, _) in enumerate(schedule) if e >= end)][None]
                for batch, schedule in ((uncond, negative_schedule), (cond, prompt_schedule))]  # fmt: skip
        length = max(r.shape[1] for r in rows)
        want = torch.cat([torch.cat([r, *[empty] * ((length - r.shape[1]) // 77)], dim=1) for r in rows])
        assert context.shape == want.shape, (end, context.shape, want.shape)
        diff = f"step {end}: {max_diff(context, want)}"
        torch.testing.assert_close(context, want, atol=1e-5, rtol=0, msg=lambda m, diff=diff: f"{m}\n{diff}")


# ----------------------------------------------------------------------------- the mean restoration's 0 (item 9)


def test_a_mean_restoration_dividing_by_zero_is_named_not_called_broken_weights(tiny_model_dir):
    """With a final LayerNorm of weight 0 and bias 0 the text encoder's output is all zeros: finite, but A1111's
    mean restoration computes 0 / 0 for any weighted prompt (random-weight models with bias 0 come close: a mean of
    ~1e-8). The error says so; unweighted prompts still run."""
    from settings import NonFiniteError

    pipe = load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.float32)
    norm = pipe.text_encoder.final_layer_norm
    norm.weight, norm.bias = (
        torch.nn.Parameter(torch.zeros_like(norm.weight)),
        torch.nn.Parameter(torch.zeros_like(norm.bias)),
    )
    run = dict(steps=1, height=16, width=16, output_type="np", progress=False)
    with pytest.raises(NonFiniteError, match="emphasis mean restoration") as e:
        generate(pipe, "a (red:1.5) fox", **run)
    assert "broken weights" not in str(e.value) and "\n" not in str(e.value)
    assert generate(pipe, "a red fox", **run).shape == (1, 16, 16, 3)


# ----------------------------------------------------------------------------- prompt size (issue 23 item 7)


def test_the_text_encoder_sees_at_most_64_windows_a_call(tiny, monkeypatch):
    ours, ref = tiny
    text = " BREAK ".join(f"a (fox:1.1) number {i}" for i in range(100))  # 100 distinct windows
    sizes, forward = [], ours.text_encoder.forward
    monkeypatch.setattr(ours.text_encoder, "forward", lambda ids, **kw: sizes.append(len(ids)) or forward(ids, **kw))
    got = encode_a1111(ours, [text], None)[0]
    assert sizes == [64, 36]
    want = reference_conditioning(ref, text)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=lambda m: f"{m}\n{max_diff(got, want)}")


def test_a_prompt_of_too_many_windows_is_refused_before_the_text_encoder_runs(tiny, monkeypatch):
    """[w0|...|w199] and 60 BREAKs at 200 steps: 200 texts of 60 windows, 12,000 windows in one A1111 batch (and
    one for the empty negative prompt)."""
    from settings import UserError

    ours, _ = tiny

    def never(*args, **kwargs):
        raise AssertionError("the text encoder ran")

    monkeypatch.setattr(ours.text_encoder, "forward", never)
    prompt = "[" + "|".join(f"w{i}" for i in range(200)) + "]" + " BREAK" * 60
    with pytest.raises(UserError, match="12001 CLIP windows.*2048") as e:
        generate(ours, prompt, steps=200, height=16, width=16, output_type="np", progress=False)
    assert "\n" not in str(e.value)
