"""Our CLIPTokenizer gives transformers.CLIPTokenizer's ids on ordinary prompts, and OpenAI CLIP's where they differ.

The reference is built from vocab.json + merges.txt that the test writes from the shipped BPE file (the hub
repo's format). Transformers 5.x's CLIPTokenizer is the `tokenizers`-backed one: NFC, whitespace collapse,
per-character lowercase, CLIP's regex (case-sensitive), byte-level BPE; no ftfy, no html.unescape.
"""

import html
import json
import random

import ftfy
import pytest
import regex
import torch
import transformers
from tokenizers import pre_tokenizers

from conftest import write_tokenizer_files
from tokenizer import CLIPTokenizer, clip_tokenizer

BOS, EOS, L = 49406, 49407, 77


@pytest.fixture(scope="module")
def ours() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip-tokenizer")
    write_tokenizer_files(folder)
    tok = transformers.CLIPTokenizer.from_pretrained(folder)
    assert type(tok).__name__ == "CLIPTokenizer" and tok.is_fast  # the `tokenizers`-backed reference
    return tok


# ---------------------------------------------------------------------------------------------- corpus
# Kept compact by hand: one string per line would make the corpus ~250 lines long.
# fmt: off
NASTY = [
    # whitespace and empty
    "", " ", "   ", "\t\n", " leading space", "trailing space ", "  both  ", "a\tb\nc\r\nd", "many     spaces",
    "tab\tseparated\tvalues", "line\nbreaks\n\n\nhere", "a\u00a0b", "a\u2003b\u3000c", "a\u200bb", "\u200d",
    # case, commas, numbers (one token per digit), contractions
    "a photo of a cat", "A PHOTO OF A CAT", "cat,dog", "cat,", ",cat", "cat, ,dog", "1024", "1024x768", "8k",
    "4K UHD", "3.14159", "1,000,000", "-5", "v1.5", "sd-v1-5.ckpt", "it's", "don't", "we're", "I've", "I'm",
    "you'll", "he'd", "IT'S", "WE'RE", "'s", "''", "'", "rock'n'roll", "o'clock", "x's'", "'ll'd've", "can't've",
    # punctuation runs, prompt syntax, URLs
    "state-of-the-art", "black/white", "a/b/c", "http://example.com/x?y=1&z=2", "user@example.com", "#hashtag",
    "@mention", "$100", "100%", "c++", "C#", "f(x)=x^2", "(((masterpiece)))", "[[bad hands]]", "{blue|red} hair",
    "<lora:add_detail:0.8>", "(word:1.2)", "((word:1.2))", "(word:.5)", "word::2", "a BREAK b", "cat AND dog",
    "a|b", "!!!", "...", "?!?!", "—", "–", "…", "~*~", "`code`", "\\", '"quoted"', "«guillemets»", "¿qué?",
    # special-token strings typed by a user
    "<|startoftext|>", "<|endoftext|>", "a <|endoftext|> b", "<|startoftext|>a cat<|endoftext|>", "a<|endoftext|>b",
    "<|endoftext|><|endoftext|>", "<|endoftext|>!", "< |endoftext| >", "<|endoftext", "endoftext|>", "<|>", "<<>>",
    # repeats and long words or prompts
    "aaaaaaaaaaaaaaaaaaaaa", "zzzzzzzzzzzzz", "!!!!!!!!!!!!!!!!!!!", "hahahahahahaha", "Supercalifragilistic",
    "pneumonoultramicroscopicsilicovolcanoconiosis", "x" * 300, "cat " * 100, "ab" * 200, "😀" * 80,
    # accented Latin, other scripts
    "café", "Cafe\u0301 (decomposed)", "naïve façade", "crème brûlée", "Ærøskøbing", "Zürich", "São Paulo",
    "Łódź", "İstanbul", "Dvořák", "fjord", "东京的夜景", "桜の木の下で", "서울의 밤", "Москва зимой",
    "Ёлка", "القاهرة ليلا", "שלום עולם", "हिन्दी", "ภาษาไทย", "Ελλάδα", "ελληνικός", "ქართული", "Հայերեն",
    # emoji (ZWJ sequences, flags, skin tones), symbols, combining marks, math letters
    "🐱", "👩‍🚀", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "🇯🇵🇫🇷", "👍🏽", "cat🐱dog", "🔥🔥🔥 fire", "²³ ½ ⅓ Ⅻ ① ٣ ৫", "x²",
    "°C", "±5%", "→ ← ↑", "©®™", "∑∫√∞", "\u0301", "e\u0301\u0302\u0303", "🄰🄱", "ℍ𝕖𝕝𝕝𝕠", "𝐛𝐨𝐥𝐝",
]
SUBJECTS = [
    "a photograph of an astronaut riding a horse", "portrait of a woman", "a cat sitting on a windowsill",
    "cyberpunk city at night", "an old man with a beard", "a castle on a hill", "the eiffel tower",
    "a bowl of ramen", "a dragon", "mountain landscape", "a robot's hand", "a fox in the snow",
    "1girl, solo, long hair", "still life with fruit", "an owl", "a red sports car",
]
MODIFIERS = [
    "highly detailed", "8k", "4k uhd", "trending on artstation", "by greg rutkowski", "octane render",
    "unreal engine 5", "sharp focus", "bokeh", "f/1.8", "85mm", "golden hour", "volumetric lighting",
    "concept art", "oil on canvas", "photorealistic", "hdr", "masterpiece", "best quality", "studio ghibli style",
    "black-and-white", "sci-fi", "award-winning", "it's raining", "they're smiling", "we've arrived",
    "i'm lost", "you'll see", "she'd know", "don't look", "1024x1024", "16:9", "art nouveau", "ukiyo-e",
    "café terrace", "crème", "東京", "桜", "москва", "القمر", "🌙", "🐉", "👩‍🎨", "🌸🌸", "ß", "øre",
]
SEPARATORS = [", ", ",", " , ", " ", "\n", "\t", "  ", " | ", "; ", ". "]
# fmt: on


def generated_prompts(n: int = 320, seed: int = 0) -> list[str]:
    """SD-style prompts: subject + modifiers, weights `(x:1.2)`, brackets, odd separators and case, some long."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        words = [rng.choice(SUBJECTS)] + rng.sample(MODIFIERS, k=rng.randint(0, 8))
        if i % 10 == 0:  # every tenth is far over 77 tokens
            words += rng.choices(MODIFIERS, k=rng.randint(30, 60))
        for j, word in enumerate(words):
            r = rng.random()
            if r < 0.15:
                words[j] = f"({word}:{rng.choice(['1.1', '1.2', '0.8', '1.35', '2'])})"
            elif r < 0.22:
                words[j] = rng.choice(["((", "[", "{"]) + word + rng.choice(["))", "]", "}"])
            elif r < 0.3 and word.isascii():  # ASCII only: upper-cased Greek meets the final-sigma rule
                words[j] = rng.choice([str.upper, str.title])(word)
        prompt = rng.choice(SEPARATORS).join(words)
        prompts.append(rng.choice(["", " ", "  "]) + prompt + rng.choice(["", " ", "\n", "."]))
    return prompts


CORPUS = NASTY + generated_prompts()


def first_mismatch(texts: list[str], ours: list, theirs: list) -> str:
    for text, a, b in zip(texts, ours, theirs, strict=True):
        if a != b:
            return f"first differing string {text!r}:\n  ours         {a}\n  transformers {b}"
    return ""


# ------------------------------------------------------------------------------------------- parity
def test_corpus_is_large_and_has_long_prompts(ours):
    assert len(CORPUS) >= 300
    assert sum(len(ours.encode(t)) > L for t in CORPUS) >= 30


def test_encode_matches_transformers(ours, hf):
    theirs = hf(CORPUS).input_ids
    mine = [ours.encode(t) for t in CORPUS]
    assert mine == theirs, first_mismatch(CORPUS, mine, theirs)


def test_padded_truncated_batch_matches_transformers(ours, hf):
    theirs = hf(CORPUS, padding="max_length", max_length=L, truncation=True, return_tensors="pt").input_ids
    mine = ours(CORPUS)
    assert mine.dtype == torch.long and mine.shape == (len(CORPUS), L)
    assert torch.equal(mine, theirs), first_mismatch(CORPUS, mine.tolist(), theirs.tolist())
    assert torch.equal(ours(CORPUS[5]), theirs[5:6])  # a single string is a batch of one


def test_long_prompt_keeps_eos_last_and_reports_dropped_text(ours):
    prompt = "cat " * 100  # 100 tokens + BOS + EOS: 75 fit, 25 are dropped
    ids = ours(prompt)[0]
    assert ids[0] == BOS and ids[-1] == EOS and (ids[1:-1] == 2368).all()
    assert ours.truncated(prompt) == " ".join(["cat"] * 25)
    assert ours.truncated("a photo of a cat") == ""
    assert ours.truncated("x " * 75) == ""  # exactly 77 tokens: nothing lost


def test_decode_matches_transformers(ours, hf):
    for text in CORPUS:
        ids = ours.encode(text)
        theirs = hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert ours.decode(ids) == theirs, f"first differing string {text!r}"
        cut = ids[L - 1 : -1]  # what diffusers reports as truncated
        assert ours.truncated(text) == hf.decode(cut, clean_up_tokenization_spaces=False), text
    assert ours.decode(ours("A Photo of a Cat!")[0]) == "a photo of a cat !"


# ------------------------------------------------------------------------------------------- long words
class CountingRanks(dict):
    """The merge ranks, counting every look-up: the work BPE does, measured without a clock."""

    lookups = 0

    def get(self, key, default=None):
        self.lookups += 1
        return super().get(key, default)

    def __getitem__(self, key):
        self.lookups += 1
        return super().__getitem__(key)

    def __contains__(self, key):
        self.lookups += 1
        return super().__contains__(key)


@pytest.mark.parametrize("alphabet", ["x", "ab", "abcdefghijklmnopqrstuvwxyz", "😀é中"])
def test_bpe_work_grows_linearly_with_the_words_length(alphabet):
    """Hostile input (issue 23): a word of n bytes costs at most 6n merge-rank look-ups (n - 1 pairs queued; each merge
    checks the pair it pops and queues two; every queued pair is popped once), not the n^2 / 2 of rescanning every
    pair after each merge, which took 21 s for one 16,000-letter word. Counted, not timed."""
    rng = random.Random(0)
    word = "".join(rng.choice(alphabet) for _ in range(2000))
    tok = CLIPTokenizer()
    tok.ranks = CountingRanks(tok.ranks)
    assert len(tok.encode(word)) > 2
    assert tok.ranks.lookups <= 6 * len(word.encode()), tok.ranks.lookups


def test_a_100000_letter_word_matches_transformers(ours, hf):
    """The fast merge loop is exact, on words far longer than any prompt's (about a second each)."""
    rng = random.Random(0)
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(100_000))
    for text in (word, "a photo of " + "x" * 100_000 + " cat"):
        assert ours.encode(text) == hf(text).input_ids


# ------------------------------------------------------------------- where OpenAI and transformers differ
def openai_clean(text: str) -> str:
    """OpenAI CLIP's text cleanup (simple_tokenizer.py: basic_clean, whitespace_clean, lower)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


# (text, why transformers sees other text). Ours must equal transformers on the cleaned text.
CLEANUP_CASES = [
    ("cafÃ© crÃ¨me", "mojibake (UTF-8 read as Windows-1252): ftfy repairs it to 'café crème'"),
    ("it’s a dog’s life", 'curly apostrophe: ftfy uncurls it, so "\'s" is one contraction token'),
    ("“quoted” ‘single’", "curly quotes -> straight quotes (ftfy)"),
    ("ﬁne ﬂowers, ﬀ", "Latin ligatures ﬁ ﬂ ﬀ -> fi fl ff (ftfy)"),
    ("ＦＵＬＬ－ＷＩＤＴＨ ｔｅｘｔ １２３", "full-width letters and digits -> ASCII (ftfy)"),
    ("ｶﾀｶﾅ", "half-width katakana -> full-width (ftfy)"),
    ("rock &amp; roll &lt;3 &quot;hi&quot;", "HTML entities (ftfy + html.unescape)"),
    ("<b>fish &amp;amp; chips</b>", "ftfy leaves entities in text with '<' alone; OpenAI unescapes twice"),
    ("a&nbsp;b&#39;s", "numeric and named entities: NBSP becomes whitespace, &#39; an apostrophe"),
    ("bell\x07 nul\x00 del\x7f", "C0 control characters are removed (ftfy)"),
    ("\x93smart\x94 \x85", "C1 controls are read as Windows-1252 quotes and ellipsis (ftfy)"),
    ("\ufeffbyte order mark", "U+FEFF and other format characters are removed (ftfy)"),
    ("ŉ ĳ ǆ", "compatibility letters are split: ŉ -> 'n, ĳ -> ij, ǆ -> dž (ftfy)"),
    ("ΟΔΟΣ ΚΑΙ ΣΟΦΙΑ", "final sigma: Python lowercases a word-final Σ to ς, tokenizers always to σ"),
    ("<|ENDOFTEXT|> <|StartOfText|>", "typed special tokens: OpenAI lowercases first, transformers matches case"),
]

# (text, OpenAI's words, why). Transformers splits these differently even after OpenAI's cleanup; the expected ids
# are transformers' own BPE applied to OpenAI's words.
SPLIT_CASES = [
    ("a\u0345b", ["a", "b"], "U+0345 case-folds to a letter, so the IGNORECASE regex matches nothing and skips it"),
    ("odo'ſ", ["odo", "'ſ"], "IGNORECASE: the contraction 's also matches 'ſ (long s folds to s)"),
    ("be'ﬅ", ["be", "'ſ", "t"], "ftfy turns ﬅ into ſt, then 'ſ is a contraction as above"),
    ("x<<|endoftext|>", ["x", "<<|", "endoftext", "|>"], "transformers cuts typed specials out before splitting"),
    ("(<|startoftext|>)", ["(<|", "startoftext", "|>)"], "same: OpenAI's punctuation run swallows the '<|'"),
    # ftfy's NFC runs before html.unescape, so the entity's accent stays a mark; transformers' NFC makes 'é'
    ("<i>e&#769;</i>", ["<", "i", ">", "e", "\u0301</", "i", ">"], "html.unescape after NFC: a lone accent"),
]


def bpe_ids(hf, word: str) -> list[int]:
    """transformers' BPE model on one word (its byte-level mapping, then merges), bypassing its splitter."""
    if word in ("<|startoftext|>", "<|endoftext|>"):
        return [hf.convert_tokens_to_ids(word)]
    (chars, _), *_ = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(word)
    return [token.id for token in hf.backend_tokenizer.model.tokenize(chars)]


@pytest.mark.parametrize("text, reason", CLEANUP_CASES, ids=[c[1][:40] for c in CLEANUP_CASES])
def test_follows_openai_cleanup_where_transformers_differs(ours, hf, text, reason):
    mine = ours.encode(text)
    assert mine != hf(text).input_ids, f"no longer a difference, move {text!r} to the corpus"
    assert mine == hf(openai_clean(text)).input_ids, f"{text!r} ({reason})"


@pytest.mark.parametrize("text, words, reason", SPLIT_CASES, ids=[repr(c[0]) for c in SPLIT_CASES])
def test_follows_openai_split_where_transformers_differs(ours, hf, text, words, reason):
    mine = ours.encode(text)
    assert mine != hf(openai_clean(text)).input_ids, f"no longer a difference, move {text!r} to the corpus"
    assert mine == [BOS] + [i for w in words for i in bpe_ids(hf, w)] + [EOS], f"{text!r} ({reason})"


# ---------------------------------------------------------------------------------------- vocabulary files
def test_vocab_derived_from_merges_equals_vocab_json(ours, tmp_path):
    write_tokenizer_files(tmp_path)  # the hub repo's tokenizer/ folder format
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert len(ours.encoder) == len(vocab) == 49408
    assert ours.encoder == vocab, next(t for t in vocab if ours.encoder.get(t) != vocab[t])
    # ids anyone can check against SD 1.5: "a photo of a cat"
    assert ours.encode("a photo of a cat") == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert (ours.BOS, ours.EOS, ours.MAX_LENGTH) == (BOS, EOS, L)


def test_from_folder_reads_merges_and_vocab_json(hf, tmp_path, monkeypatch):
    folder = tmp_path / "tokenizer"
    write_tokenizer_files(folder)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    vocab["cat</w>"], vocab["dog</w>"] = vocab["dog</w>"], vocab["cat</w>"]  # only vocab.json can tell
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    monkeypatch.setattr(clip_tokenizer, "BPE_GZ", tmp_path / "missing.gz")  # the shipped file must not be read
    tok = CLIPTokenizer.from_folder(tmp_path)
    swapped = transformers.CLIPTokenizer.from_pretrained(folder)
    for text in ["a cat and a dog", *CORPUS[:50]]:
        assert tok.encode(text) == swapped(text).input_ids, f"first differing string {text!r}"
    assert tok.encode("cat") == [BOS, 1929, EOS]  # dog's id


def test_from_folder_without_tokenizer_files_uses_shipped_vocabulary(ours, tmp_path):
    assert CLIPTokenizer.from_folder(tmp_path).encoder == ours.encoder
