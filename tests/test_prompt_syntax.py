r"""A1111's prompt syntax: attention weights, prompt editing/alternation, and 75-token CLIP windows.

Expected values are A1111's doctests (copied as data from stable-diffusion-webui's modules/prompt_parser.py)
and cases worked out by hand from its documented rules, never produced by our code. The windows are spelled
out from the tokenizer's ids of single words and the rules: 75 tokens between BOS and EOS, EOS padding, a full
window moves the words after a comma among its last 20 tokens on, BREAK closes a window.
"""

import pytest

from tokenizer import CLIPTokenizer, chunk_prompt, parse_prompt_attention, prompt_schedules

# ------------------------------------------------------------------------------------------------ attention
ATTENTION_DOCTESTS = [  # parse_prompt_attention's doctests in A1111
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    (r"\(literal\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
]  # fmt: skip
R, S = 1.1, 1 / 1.1  # A1111 multiplies by these when a ( or [ closes, innermost first, in float arithmetic
ATTENTION_NASTY = [
    ("", [("", 1.0)]),
    ("((x))", [("x", 1.0 * R * R)]),  # 1.2100000000000002
    ("[(x:1.3)]", [("x", 1.1818181818181819)]),  # 1.3 * (1/1.1); 1.3 / 1.1 is ...817
    ("a ([x]) b", [("a x b", 1.0)]),  # 1/1.1 * 1.1 is exactly 1.0 again, so all three pieces merge
    ("(x: 1.5 )", [("x", 1.5)]),  # spaces around the weight
    ("(a:-1) (b:0)", [("a", -1.0), (" ", 1.0), ("b", 0.0)]),
    ("x:1.5)", [("x:1.5)", 1.0)]),  # ':1.5)' with no '(' open is text
    ("(a:1.5", [("a:1.5", R)]),  # no ')': ':' and '1.5' are text, the '(' still open applies 1.1
    (")a]", [(")a]", 1.0)]),  # closers with nothing open are text
    ("((a", [("a", 1.0 * R * R)]),  # unclosed brackets apply to the end
    ("(a[b", [("a", R), ("b", 1.0 * R * S)]),  # at the end all round brackets first, then the square ones
    ("(a[(b:1.3)", [("a", R), ("b", 1.3 * R * S)]),  # = 1.3; square first would give 1.3000000000000003
    ("(a[b)c]d", [("a", R), ("b", 1.0 * R * S), ("c", S), ("d", 1.0)]),  # interleaved: each closes its own kind
    ("a\\b", [("ab", 1.0)]),  # a backslash that escapes nothing vanishes
    ("\\\\(x)", [("\\", 1.0), ("x", R)]),  # an escaped backslash, then a real group
    ("\\(a:2)", [("(a:2)", 1.0)]),  # escaped '(' opens nothing, so ':2)' is text
    ("(a:\u0661.\u0665)", [("a", 1.5)]),  # Arabic-Indic digits: A1111's regex \d and float() both take them
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),  # spaces around BREAK go
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("aBREAK BREAKs break", [("aBREAK BREAKs break", 1.0)]),  # only the whole, upper-case word
    ("(a BREAK b)", [("a", R), ("BREAK", -1.0 * R), ("b", R)]),  # brackets scale the marker too
    ("(BREAK:0)", [("BREAK", 0.0)]),  # 0.0 == -0.0: marker and its empty neighbours merge into text 'BREAK'
]


@pytest.mark.parametrize("text, expected", ATTENTION_DOCTESTS + ATTENTION_NASTY)
def test_parse_prompt_attention_matches_a1111(text, expected):
    got = parse_prompt_attention(text)
    assert got == [tuple(pair) for pair in expected]
    assert all(type(w) is float for _, w in got)


def test_parse_prompt_attention_bad_weight_raises_like_a1111():
    with pytest.raises(ValueError):  # '1.2.3' matches A1111's weight pattern, then float() fails
        parse_prompt_attention("(x:1.2.3)")


# ---------------------------------------------------------------------------------- editing and alternation
SCHEDULE_DOCTESTS = [  # get_learned_conditioning_prompt_schedules([p], 10)[0] doctests in A1111
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    # The docstring says [[5, 'a  c'], [10, 'a {b|d{ c']] ("not handling this right now"), but A1111's grammar
    # has no '|' outside [a|b], the parse fails and the function returns the prompt as typed.
    ("a [{b|d{:.5] c", [[10, "a [{b|d{:.5] c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", [[1, "a"], [2, "(b:1.1)"], [3, "a"], [4, "(b:1.1)"], [5, "a"], [6, "(b:1.1)"], [7, "a"],
                     [8, "(b:1.1)"], [9, "a"], [10, "(b:1.1)"]]),
    ("[fe|]male", [[1, "female"], [2, "male"], [3, "female"], [4, "male"], [5, "female"], [6, "male"],
                   [7, "female"], [8, "male"], [9, "female"], [10, "male"]]),
    ("[fe|||]male", [[1, "female"], [2, "male"], [3, "male"], [4, "male"], [5, "female"], [6, "male"], [7, "male"],
                     [8, "male"], [9, "female"], [10, "male"]]),
    # the hires-fix doctests (base 10 + hires 10 steps) are left out: we follow the default, no hires pass
]  # fmt: skip
SCHEDULE_NASTY = [  # (prompt, steps, expected), worked out from A1111's default rule: a '.' makes a fraction
    ("a [b:1.5] c", 10, [[10, "a  c"]]),  # 1.5 * 10 = 15, capped at 10: 'b' never shows (old scheduling: step 1)
    ("[a:b:1.0]", 10, [[10, "a"]]),  # '1.0' is the whole run, '1' is step 1
    ("[a:b:1]", 10, [[1, "a"], [10, "b"]]),
    ("[a:b:0.27]", 10, [[2, "a"], [10, "b"]]),  # 2.7 truncated, not rounded
    ("[a:b:0]", 10, [[10, "b"]]),
    ("[a:b:-3]", 10, [[10, "b"]]),
    ("[a:b:0.05]", 10, [[10, "b"]]),  # 0.5 truncates to step 0: 'b' from the start
    ("[a:b:2e0]", 10, [[2, "a"], [10, "b"]]),  # an exponent without '.' is a step
    ("[a:b: 3 ]", 10, [[3, "a"], [10, "b"]]),
    ("[a:\n1\n]", 10, [[1, ""], [10, "a"]]),
    ("[a::2] x", 4, [[2, "a x"], [4, " x"]]),  # [from::when]
    ("[a:b]", 10, [[10, "[a:b]"]]),  # no number: plain text
    ("[a:\u0661]", 10, [[10, "[a:\u0661]"]]),  # the number must be ASCII digits
    ("[a:b:1][c:d:2]", 10, [[1, "ac"], [2, "bc"], [10, "bd"]]),
    ("[a|b|c] [d:e:0.5]", 4, [[1, "a d"], [2, "b d"], [3, "c e"], [4, "a e"]]),
    ("[[a|b]:3]", 6, [[1, ""], [2, ""], [3, ""], [4, "b"], [5, "a"], [6, "b"]]),  # step 4 is the 2nd option
    ("(a [b:c:2]:1.2)", 4, [[2, "(a b:1.2)"], [4, "(a c:1.2)"]]),  # editing inside emphasis, emphasis kept
    ("[a\\|b:2]", 10, [[2, ""], [10, "a\\|b"]]),  # an escaped '|' is text, the escape is kept for emphasis
    ("\\[a:2]", 10, [[10, "\\[a:2]"]]),  # an escaped '[' opens nothing
    # a '|' outside [a|b], or a '\' ending the prompt, fails A1111's grammar: the whole prompt, as typed
    ("a|b [c:2]", 10, [[10, "a|b [c:2]"]]),
    ("[a:2] \\", 10, [[10, "[a:2] \\"]]),
    ("(a|b) [c:2]", 10, [[10, "(a|b) [c:2]"]]),
    ("[a|b:c]", 10, [[10, "[a|b:c]"]]),
    ("[a:(b:3]", 10, [[10, "[a:(b:3]"]]),  # the '(' inside never closes: no group, all text
    # A stray bracket next to a group: A1111's lark grammar can read '[a:2]' as a group or as text, and which
    # one it returns depends on PYTHONHASHSEED (lark 1.1.2). We always read a valid group as a group.
    ("[a:2]] x", 10, [[2, "] x"], [10, "a] x"]]),
    ("[a:2][(", 10, [[2, "[("], [10, "a[("]]),
]


@pytest.mark.parametrize("prompt, expected", SCHEDULE_DOCTESTS)
def test_prompt_schedules_match_a1111_doctests(prompt, expected):
    assert prompt_schedules([prompt], 10) == [[tuple(step) for step in expected]]


@pytest.mark.parametrize("prompt, steps, expected", SCHEDULE_NASTY)
def test_prompt_schedules_nasty(prompt, steps, expected):
    assert prompt_schedules([prompt], steps) == [[tuple(step) for step in expected]]


def test_prompt_schedules_survive_deep_brackets():  # no group closes, so A1111 too returns the text as typed
    assert prompt_schedules(["[" * 2000 + "a"], 10) == [[(10, "[" * 2000 + "a")]]


def test_prompt_schedules_one_list_per_prompt():
    assert prompt_schedules(["a", "[b:c:1]", "a"], 2) == [[(2, "a")], [(1, "b"), (2, "c")], [(2, "a")]]


# ------------------------------------------------------------------------------------------------- chunking
@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer()


def one_id(tok, word: str) -> int:
    ids = tok.encode(word)[1:-1]
    assert len(ids) == 1, f"{word!r} is not a single token"
    return ids[0]


def window(ids: list[int], weights: list[float] | None = None) -> tuple[list[int], list[float]]:
    """The spec of one window: BOS, up to 75 tokens, EOS padding to 76, EOS; BOS/EOS/padding weigh 1.0."""
    weights = [1.0] * len(ids) if weights is None else weights
    pad = 75 - len(ids)
    return [49406, *ids, *[49407] * pad, 49407], [1.0, *weights, *[1.0] * pad, 1.0]


def chunks(tok, text: str):
    got = chunk_prompt(parse_prompt_attention(text), tok.encode, tok.BOS, tok.EOS, one_id(tok, ","))
    assert all(len(ids) == len(weights) == 77 for ids, weights in got)
    return got


def test_empty_prompt_is_one_padding_window(tok):
    assert chunks(tok, "") == [window([])]


def test_160_words_fill_75_75_10(tok):
    words = "a photo of a red cat sitting on the old wooden table".split()
    text = " ".join(words[i % len(words)] for i in range(160))
    ids = [one_id(tok, words[i % len(words)]) for i in range(160)]
    assert chunks(tok, text) == [window(ids[:75]), window(ids[75:150]), window(ids[150:])]


def test_exactly_75_tokens_is_one_window_76_is_two(tok):
    cat = one_id(tok, "cat")
    assert chunks(tok, "cat " * 75) == [window([cat] * 75)]  # no trailing empty window
    assert chunks(tok, "cat " * 76) == [window([cat] * 75), window([cat])]
    assert chunks(tok, "cat " * 75 + "BREAK") == [window([cat] * 75)]


@pytest.mark.parametrize("before, moves", [(70, True), (55, True), (54, False), (50, False), (74, True)])
def test_comma_in_last_20_tokens_moves_the_words_after_it(tok, before, moves):
    """`before` cats, a comma (token index `before`), then (dog:1.3) until the prompt has 85 tokens. When the 76th
    token arrives, the window moves on from the comma if it sits at index 55..74 (75 - index <= 20)."""
    cat, comma, dog = one_id(tok, "cat"), one_id(tok, ","), one_id(tok, "dog")
    n_dogs = 85 - before - 1
    text = "cat " * before + ", " + "(dog:1.3) " * n_dogs
    if moves:  # the first window ends at the comma; the dogs after it open the second one, weights and all
        expected = [window([cat] * before + [comma]), window([dog] * n_dogs, [1.3] * n_dogs)]
    else:  # plain cut at 75 tokens
        first = 75 - before - 1
        expected = [window([cat] * before + [comma] + [dog] * first, [1.0] * (before + 1) + [1.3] * first),
                    window([dog] * (n_dogs - first), [1.3] * (n_dogs - first))]  # fmt: skip
    assert chunks(tok, text) == expected


def test_comma_arriving_at_a_full_window_starts_the_next(tok):
    cat, comma, dog = one_id(tok, "cat"), one_id(tok, ","), one_id(tok, "dog")
    assert chunks(tok, "cat " * 75 + ", dog") == [window([cat] * 75), window([comma, dog])]


def test_break_closes_the_window(tok):
    a, cat, dog = one_id(tok, "a"), one_id(tok, "cat"), one_id(tok, "dog")
    assert chunks(tok, "a cat BREAK a dog") == [window([a, cat]), window([a, dog])]
    assert chunks(tok, "BREAK a") == [window([]), window([a])]
    assert chunks(tok, "a BREAK") == [window([a])]
    assert chunks(tok, "a BREAK BREAK dog") == [window([a]), window([]), window([dog])]
    assert chunks(tok, "a breaks") == [window([a, one_id(tok, "breaks")])]  # not the keyword


def test_weighted_pieces_are_tokenized_apart(tok):
    a, red, cat, ca, t = (one_id(tok, w) for w in ["a", "red", "cat", "ca", "t"])
    assert chunks(tok, "a (red) cat") == [window([a, red, cat], [1.0, 1.1, 1.0])]
    assert chunks(tok, "(ca)t") == [window([ca, t], [1.1, 1.0])]  # 'ca' + 't', not 'cat'


@pytest.mark.parametrize("prompt", ["(x:" + "9" * 400 + ")", "((x:" + "9" * 200 + "):" + "9" * 200 + ")", "(x:70000)",
                                    "((x:-300):300)"])  # fmt: skip
def test_an_emphasis_weight_that_overflows_is_an_error(prompt):
    """Issue 23 item 20: a weight float() reads as inf (or a product of two that overflows), or one beyond float16's
    range, would make the context inf or NaN. float16's largest, 65504, is still a weight."""
    with pytest.raises(ValueError, match="emphasis weight overflows: beyond 65504"):
        parse_prompt_attention(prompt)
    assert parse_prompt_attention("(x:65504)") == [("x", 65504.0)]
