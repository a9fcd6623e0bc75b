r"""AUTOMATIC1111's prompt syntax, written from stable-diffusion-webui's observed behaviour (none of its code).

  (word) [word] (word:1.5)  weight x1.1, x(1/1.1), x1.5 on the words' tokens;  \( \) \[ \] \\ are literal
  [from:to:when]            prompt editing: `from` up to step `when`, `to` after; also [to:when], [from::when]
  [a|b|c]                   alternation: a, b, c, a, ... one per step
  BREAK                     the words after it start a new 75-token CLIP window

prompt_schedules() turns a prompt into a text per range of steps; parse_prompt_attention() cuts each text into
weighted pieces; chunk_prompt() tokenizes those into 77-id windows with a weight per id.
"""

import re
from collections.abc import Callable
from itertools import groupby
from operator import itemgetter

# ------------------------------------------------------------------------------------------------ attention
CLOSER = {"(": ")", "[": "]"}
FACTOR = {")": 1.1, "]": 1 / 1.1}  # A1111 multiplies by 1/1.1 (not divides by 1.1): floats differ in the last bit
# Tried in this order: an escape (a lone '\' escapes nothing and vanishes), an opening bracket, ':weight)'
# closing a round bracket, a closing bracket, a run of text, a ':' that is just text.
ATTENTION = re.compile(r"\\(?P<esc>[()\[\]\\]?)|(?P<open>[(\[])|:\s*(?P<weight>[+-]?[.\d]+)\s*\)|(?P<close>[)\]])"
                       r"|[^\\()\[\]:]+|:")  # fmt: skip
BREAK = re.compile(r"\s*\bBREAK\b\s*")  # a whole word, spaces around it dropped
MAX_WEIGHT = 65504.0  # float16's largest: the weights multiply the text encoder's output in its dtype


LORA_TAG = re.compile(r"<lora:([^:<>]+)(?::([^:<>]*))?[^<>]*>")  # A1111's <lora:NAME:WEIGHT> (more fields ignored)


def lora_tags(text: str) -> tuple[list[tuple[str, str]], str]:
    """A1111's extra-network tags: the prompt's [(NAME, WEIGHT or "")] and the prompt without them (the CLI merges
    the files NAME.safetensors at WEIGHT, default 1; CLIP never sees the tags)."""
    return LORA_TAG.findall(text), LORA_TAG.sub("", text)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """[(text, weight)], adjacent equal weights merged, ('BREAK', -1.0) for each BREAK. Brackets still open at
    the end apply to the rest of the prompt; a closing bracket with none open is text."""
    pieces: list[list] = []  # [text, weight]; a closing bracket multiplies every piece since its opening
    opened: dict[str, list[int]] = {")": [], "]": []}  # per closer, a stack of the piece index at each opening

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in ATTENTION.finditer(text):
        if m["esc"] is not None:
            pieces.append([m["esc"], 1.0])
        elif m["open"]:
            opened[CLOSER[m["open"]]].append(len(pieces))
        elif m["weight"] is not None and opened[")"]:
            scale(opened[")"].pop(), float(m["weight"]))  # '(x:1.2.3)' raises ValueError, as in A1111
        elif m["close"] and opened[m["close"]]:
            scale(opened[m["close"]].pop(), FACTOR[m["close"]])
        else:
            for k, part in enumerate(BREAK.split(m[0])):
                pieces += [["BREAK", -1.0], [part, 1.0]] if k else [[part, 1.0]]
    for closer, starts in opened.items():  # unclosed: all round brackets (outermost first), then all square
        for start in starts:
            scale(start, FACTOR[closer])
    if not all(abs(w) <= MAX_WEIGHT for _, w in pieces):  # (x:9999...9) or ((x:1e200):1e200): inf, then NaN
        raise ValueError(f"an emphasis weight overflows: beyond {MAX_WEIGHT:g}, float16's largest number")
    # merge runs of equal weight; groupby compares each weight with its run's first, as A1111 does
    return [("".join(part for part, _ in run), w) for w, run in groupby(pieces or [["", 1.0]], key=itemgetter(1))]


# ---------------------------------------------------------------------------------- editing and alternation
# A1111 parses these with a lark grammar; this recursive descent accepts the same prompts. A part is a str or a
# (when, bodies) tuple: when=None alternates over bodies, else bodies = [before, after]. Inside a group every
# '(' '[' must open a valid group, ':' '|' separate bodies. At the top level a bracket or ':' that opens no valid
# group is text, and a '|' outside [a|b] or a '\' ending a line leaves the whole prompt as typed for every step.
PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")  # text; '\x' pairs stay as typed for parse_prompt_attention
WHEN = re.compile(r"\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*\]")  # lark's SIGNED_NUMBER


def _prompt(text: str, i: int, steps: int, top: bool = False) -> tuple[list, int]:
    """The parts from text[i] up to the first character that cannot go on, and its index."""
    parts = []
    while i < len(text):
        if m := PLAIN.match(text, i):
            parts, i = [*parts, m[0]], m.end()
        elif text[i] in "[(" and (group := _group(text, i, steps)):
            parts, i = parts + group[0], group[1]
        elif top and text[i] in "[]():":  # only the top level may hold a stray bracket or colon
            parts, i = [*parts, text[i]], i + 1
        else:
            break
    return parts, i


def _group(text: str, i: int, steps: int) -> tuple[list, int] | None:
    """The parts of the bracket group opening at text[i] and where it ends; None if it is not a valid group."""
    opener, close = text[i], ")" if text[i] == "(" else "]"
    bodies, seps = [], ""
    while True:
        body, i = _prompt(text, i + 1, steps)
        bodies.append(body)
        if text[i : i + 1] == ":" and close == "]" and seps in ("", ":") and (m := WHEN.match(text, i + 1)):
            # A1111's default (no hires pass, use_old_scheduling off): a number with a '.' is a fraction of the
            # steps ('1.0' is the last step), else a step; truncated to an int, capped at the steps.
            when = float(m[1]) * steps if "." in m[1] else float(m[1])
            return [(min(steps, int(when)), [[], body] if seps == "" else bodies)], m.end()  # [to:when]: from ''
        if text[i : i + 1] not in (":", "|"):
            break
        seps += text[i]
    if text[i : i + 1] != close:
        return None
    if close == "]" and seps and set(seps) == {"|"}:
        return [(None, bodies)], i + 1
    if seps == "" or (close == ")" and seps == ":"):  # emphasis: kept as typed, with any groups inside it
        return [opener, *(p for body, sep in zip(bodies, seps + close, strict=True) for p in [*body, sep])], i + 1
    return None


def _text_at(parts: list, step: int) -> str:
    def pick(when: int | None, bodies: list) -> list:  # bodies[step > when]: before up to `when`, then after
        return bodies[(step - 1) % len(bodies)] if when is None else bodies[step > when]

    return "".join(part if isinstance(part, str) else _text_at(pick(*part), step) for part in parts)


def _switch_steps(parts: list, steps: int):
    """The steps after which the text changes: every step where there is an alternation."""
    for when, bodies in (part for part in parts if not isinstance(part, str)):
        yield from range(1, steps + 1) if when is None else [when] * (when >= 1)
        for body in bodies:
            yield from _switch_steps(body, steps)


def prompt_schedules(prompts: list[str], steps: int) -> list[list[tuple[int, str]]]:
    """For each prompt, [(last step this text is used, text)] covering steps 1..steps, as A1111's
    get_learned_conditioning_prompt_schedules. Emphasis such as '(x:1.2)' stays in the texts."""
    schedules = []
    for prompt in prompts:
        try:
            parts, end = _prompt(prompt, 0, steps, top=True)
        except RecursionError:  # brackets ~500 deep (A1111 parses them, in ~30 s): treated as unparseable
            parts, end = [], -1
        parts = parts if end == len(prompt) else [prompt]  # a '|' or '\' the syntax cannot place: as typed
        schedules.append([(s, _text_at(parts, s)) for s in sorted({steps, *_switch_steps(parts, steps)})])
    return schedules


# ------------------------------------------------------------------------------------------------- chunking
CHUNK = 75  # prompt tokens per CLIP window: 77 positions less BOS and EOS
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default


def chunk_prompt(
    parsed: list[tuple[str, float]], encode: Callable[[str], list[int]], bos: int, eos: int, comma: int,
    spans: dict[int, int] | None = None,
) -> list[tuple[list[int], list[float]]]:  # fmt: skip
    """(77 ids, 77 weights) per CLIP window for a parse_prompt_attention() result, as A1111's tokenize_line.
    `encode` is CLIPTokenizer.encode (text -> [BOS, ..., EOS]), called per piece. A window holds 75 tokens
    between BOS and EOS, padded with EOS (SD 1.5's padding id); BOS, EOS and padding weigh 1.0. `spans`: id -> the
    number of ids from it on that stay together (a multi-vector embedding, CLIPTokenizer.spans()): one that does
    not fit in the open window starts the next, whole."""
    windows = []
    ids, weights, last_comma = [], [], -1  # the open window; last_comma: index of its latest comma

    def close(n: int = CHUNK) -> None:  # emit the window's first n ids; the rest open the next window
        nonlocal ids, weights, last_comma
        pad = CHUNK - min(n, len(ids))
        windows.append(([bos, *ids[:n], *[eos] * pad, eos], [1.0, *weights[:n], *[1.0] * pad, 1.0]))
        ids, weights, last_comma = ids[n:], weights[n:], -1

    def place(group: list[int], weight: float) -> None:
        """Append ids that must share a window: one token, or a textual-inversion embedding's n ids."""
        nonlocal ids, weights, last_comma
        if len(ids) == CHUNK and group != [comma] and last_comma >= CHUNK - COMMA_BACKTRACK:
            close(last_comma + 1)  # a full window with a comma in its last 20 tokens: the words after it move on
        if len(ids) + len(group) > CHUNK:
            close()
        if group == [comma]:
            last_comma = len(ids)
        ids, weights = ids + group, weights + [weight] * len(group)

    for text, weight in parsed:
        if (text, weight) == ("BREAK", -1.0):
            close()  # even an empty window: 'BREAK BREAK' gives an all-padding one
            continue
        tokens, i = encode(text)[1:-1], 0
        while i < len(tokens):
            n = (spans or {}).get(tokens[i], 1)
            place(tokens[i : i + n], weight)
            i += n
    if ids or not windows:  # the last window, or the only one of an empty prompt; none after an exact fill
        close()
    return windows
