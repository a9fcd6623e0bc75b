"""Prompts -> the UNet's context: Diffusers' plain reading (77 tokens) and A1111's (any length in 75-token CLIP
windows, emphasis, prompt editing and alternation as a context per range of steps).

`pipe` is min_pipeline's Pipeline (its tokenizer, text encoder and device are used).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from settings import NonFiniteError, Settings, UserError
from tokenizer.prompt_syntax import chunk_prompt, parse_prompt_attention, prompt_schedules

if TYPE_CHECKING:  # the driver imports this module: no import at run time
    from min_pipeline import Pipeline


def encode_prompts(pipe: Pipeline, prompts: list[str], clip_skip: int | None) -> torch.Tensor:
    """Prompts as plain text (Diffusers' reading: brackets are text, cut at CLIP's 77 tokens) -> context (B, 77, D).
    Clip skip applies to every prompt, negative ones included (as A1111)."""
    for p in prompts:
        if dropped := pipe.tokenizer.truncated(p):
            warnings.warn(f"the prompt is longer than CLIP's 77 tokens; dropped: {dropped!r}", stacklevel=3)
    ids = pipe.tokenizer(prompts).to(pipe.device)
    return pipe.text_encoder(ids, clip_skip=clip_skip)


ENCODER_BATCH = 64  # CLIP windows per text-encoder call: bounds its activations (SD 1.5: ~1 MB a window)
MAX_WINDOWS = 2048  # CLIP windows a run may encode, over all schedule texts: ~0.5 GB of SD 1.5 contexts


def prompt_windows(pipe: Pipeline, text: str) -> list[tuple[list[int], list[float]]]:
    """One text as A1111 reads it: parse_prompt_attention finds the (emphasis:1.2) weights and BREAKs, chunk_prompt
    cuts the tokens into CLIP windows of (BOS + 75 + EOS ids, a weight per id)."""
    tok = pipe.tokenizer
    return chunk_prompt(parse_prompt_attention(text), tok.encode, tok.BOS, tok.EOS, tok.encode(",")[1], tok.spans())


def encode_a1111(pipe: Pipeline, texts: list[str], clip_skip: int | None,
                 windows: dict[str, list] | None = None) -> list[torch.Tensor]:  # fmt: skip
    """One prompt's texts (its schedule, repeats included) as A1111 encodes them, in one batch (sd_hijack_clip.py) ->
    a context (1, 77 k, D) each, k the most windows of any text (the others padded with empty windows). Emphasis is
    A1111's "Original" (sd_emphasis.py): each token's vector times its weight, then the i-th windows of all the texts
    (B, 77, D) rescaled together to their mean before. `windows`: prompt_windows() of the texts, if made already.
    Plain text of <= 75 tokens is exactly Diffusers' conditioning."""
    windows = windows or {t: prompt_windows(pipe, t) for t in texts}
    k, empty = max(len(windows[t]) for t in texts), prompt_windows(pipe, "")[0]
    rows = [windows[t] + [empty] * (k - len(windows[t])) for t in texts]
    slot: dict[tuple, int] = {}  # each distinct window is encoded once, ENCODER_BATCH windows a call at most
    index = torch.tensor([[slot.setdefault(tuple(ids), len(slot)) for ids, _ in row] for row in rows])  # (B, k)
    ids = torch.tensor(list(slot), device=pipe.device)
    z = torch.cat([pipe.text_encoder(batch, clip_skip=clip_skip) for batch in ids.split(ENCODER_BATCH)])
    weights = torch.tensor([[w for _, w in row] for row in rows], device=pipe.device, dtype=z.dtype)  # (B, k, 77)
    out = []
    for i in range(k):
        zi, w = z[index[:, i]], weights[:, i, :, None]  # window i of every text: (B, 77, D)
        if (w != 1).any():
            mean, zi = zi.mean(), zi * w
            zi = zi * (mean / zi.mean())
        out.append(zi)
    context = torch.cat(out, dim=1)
    if not context.isfinite().all() and z.isfinite().all():  # the network's output was finite: the restoration
        raise NonFiniteError("the text encoder's output is finite, but A1111's emphasis mean restoration (weighted "
                             "windows rescaled to their unweighted mean) divided by a weighted mean of about 0, as "
                             "random-weight models give; nothing written. Drop the (word:weight) emphasis, or use "
                             "the plain prompt syntax")  # fmt: skip
    return list(context[:, None])


def encode_prompt(pipe: Pipeline, text: str, clip_skip: int | None = None) -> torch.Tensor:
    """One prompt as A1111 reads it -> its context (1, 77 k, D), k CLIP windows (see encode_a1111)."""
    return encode_a1111(pipe, [text], clip_skip)[0]


def conditioning(pipe: Pipeline, prompts: list[str], negatives: list[str], s: Settings, use_cfg: bool,
                 syntax: str) -> list[tuple[int, torch.Tensor]]:  # fmt: skip
    """The UNet's context for every step, as [(last step it is used, context (2B or B, L, D))], computed before the
    loop. Plain syntax: one entry. A1111 syntax: prompt editing [from:to:when] and [a|b] alternation switch the text
    at some steps (prompt_schedules). Each prompt's texts are encoded together, the negative prompt's apart, as one
    A1111 batch (encode_a1111). At each switch the prompts and negative prompts, of any number of windows, are padded
    to the same length with the empty prompt's encoding (A1111's "pad prompt/negative prompt to be the same length"),
    so the UNet still runs one batched CFG call."""
    groups = [negatives, prompts] if use_cfg else [prompts]  # the unconditional half first
    if syntax == "plain":
        context = torch.cat([encode_prompts(pipe, group, s.clip_skip) for group in groups])
        return [(s.steps, context.repeat_interleave(s.num_images, dim=0))]
    try:  # A1111 raises on a few malformed weights too: (x:1.2.3), [a:1e999]
        schedules = [prompt_schedules(group, s.steps) for group in groups]
        [parse_prompt_attention(t) for group in schedules for sched in group for _, t in sched]
    except (ValueError, OverflowError) as e:
        raise UserError(f"cannot read the prompt's A1111 syntax ({e}); fix it, or pass --plain-prompt") from None
    batches = dict.fromkeys(tuple(t for _, t in sched) for group in schedules for sched in group)
    windows = {t: prompt_windows(pipe, t) for batch in batches for t in batch}
    if (n := sum(len(b) * max(len(windows[t]) for t in b) for b in batches)) > MAX_WINDOWS:  # before any encoding
        raise UserError(f"the prompts make {n} CLIP windows of 75 tokens (counted per prompt-editing text), over "
                        f"the {MAX_WINDOWS} allowed; shorten them or use fewer steps or [a|b] choices")  # fmt: skip
    encoded = {b: encode_a1111(pipe, list(b), s.clip_skip, windows) for b in batches}
    empty = encoded[("",)][0] if ("",) in encoded else encode_a1111(pipe, [""], s.clip_skip)[0]
    out = []
    for end in sorted({e for group in schedules for sched in group for e, _ in sched}):
        rows = [encoded[tuple(t for _, t in sched)][next(j for j, (e, _) in enumerate(sched) if e >= end)]
                for group in schedules for sched in group]  # fmt: skip
        length = max(r.shape[1] for r in rows)
        rows = [torch.cat([r, *[empty] * ((length - r.shape[1]) // empty.shape[1])], dim=1) for r in rows]
        out.append((end, torch.cat(rows).repeat_interleave(s.num_images, dim=0)))
    return out
