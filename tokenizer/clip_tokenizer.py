"""CLIP's byte-level BPE tokenizer, written to give the ids of OpenAI CLIP's `SimpleTokenizer`.

One prompt goes through five steps:
  clean  ftfy.fix_text, html.unescape twice, whitespace runs -> ' ', strip, lowercase
  split  CLIP's regex cuts words: special-token strings, contractions, letter runs, single digits, punctuation runs
  bytes  each word's UTF-8 bytes become printable stand-in characters, the last one gets the word end '</w>'
  merge  repeatedly join the adjacent pair with the best (lowest) merge rank (BPE, Sennrich et al. 2016)
  ids    symbols -> vocabulary ids, wrapped as <|startoftext|> ... <|endoftext|>

Where transformers.CLIPTokenizer (5.x, `tokenizers`-backed) differs, we follow OpenAI: SD 1.5's text encoder
was trained on OpenAI's ids. Transformers has no ftfy/html step (mojibake 'cafÃ©', entities '&amp;', curly
quotes, ligatures 'ﬁ', full-width 'Ａ' stay as typed); lowercases per character (final 'Σ' -> 'σ', not 'ς');
finds typed special tokens before lowercasing and before splitting (OpenAI reads 'x<<|endoftext|>' as 'x',
'<<|', 'endoftext', '|>'); has a case-sensitive regex (OpenAI's IGNORECASE makes "'ſ" a contraction and skips
U+0345); and applies NFC after html.unescape, OpenAI only before. tests/test_tokenizer.py lists each case.
"""

import gzip
import heapq
import html
import json
from collections.abc import Iterator
from itertools import count, pairwise, takewhile
from pathlib import Path

import ftfy
import regex
import torch

BPE_GZ = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")  # OpenAI's merges (MIT)
N_MERGES = 49152 - 256 - 2  # CLIP keeps 48894 of the gz's 262k: 512 byte symbols + merges + 2 specials = 49408
SPECIALS = ["<|startoftext|>", "<|endoftext|>"]
# CLIP's word splitter. IGNORECASE is OpenAI's (text is lowercased already; it only matters for case folds).
WORDS = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
WHITESPACE = regex.compile(r"\s+")


def byte_chars() -> dict[int, str]:
    """Byte -> stand-in character (GPT-2's table), in vocabulary order. Printable Latin-1 bytes stand for
    themselves; the other 68 (controls, space, NBSP, soft hyphen) move to U+0100.., so that no symbol is
    whitespace and merges.txt can be split on spaces."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {b: chr(b) for b in kept} | {b: chr(256 + i) for i, b in enumerate(moved)}


def read_merges(path: str | Path | None) -> list[tuple[str, str]]:
    if path is None:
        with gzip.open(BPE_GZ, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1 : N_MERGES + 1]  # after a header line
    else:  # a model folder's merges.txt: a '#version: 0.2' header, then exactly the merges in use
        lines = Path(path).read_text(encoding="utf-8").split("\n")
        lines = lines[1:] if lines[0].startswith("#version") else lines  # '#' alone is a byte symbol
    return [tuple(line.split(" ")) for line in lines if line]


def clean(text: str) -> str:
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))  # twice, as OpenAI: '&amp;amp;' from scraped captions -> '&'
    # OpenAI strips, collapses, strips again; collapse-then-strip gives the same string.
    return WHITESPACE.sub(" ", text).strip().lower()


def slot_names(name: str) -> Iterator[str]:
    """name, name_1, name_2, ...: the tokens of a multi-vector embedding, as Diffusers names them."""
    return (f"{name}_{n}" if n else name for n in count())


class CLIPTokenizer:
    """Prompt(s) -> (B, 77) ids for SD 1.5's CLIP text encoder.

    tok = CLIPTokenizer()                  # shipped OpenAI vocabulary
    tok = CLIPTokenizer.from_folder(repo)  # or a model folder's tokenizer/merges.txt + vocab.json
    tok.encode("a cat")                    # [49406, 320, 2368, 49407]: any length, no padding
    tok(["a cat", "a dog"])                # LongTensor (2, 77): cut to 77 (EOS kept last), padded with EOS
    tok.truncated(prompt)                  # the text that tok(prompt) drops, '' if the prompt fits
    tok.decode(ids)                        # text; BOS/EOS/padding left out
    tok.add_tokens(["<x>", "<x>_1"])       # [49408, 49409]: new whole words (embeddings); "<x>" -> both ids
    """

    BOS, EOS, MAX_LENGTH = 49406, 49407, 77  # <|startoftext|>, <|endoftext|> (also the padding), CLIP context

    def __init__(self, merges_path: str | Path | None = None, vocab_path: str | Path | None = None):
        merges = read_merges(merges_path)
        self.byte_char = byte_chars()
        self.char_byte = {c: b for b, c in self.byte_char.items()}
        if vocab_path is None:  # as OpenAI: the vocabulary follows from the merges
            symbols = list(self.byte_char.values())
            tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + SPECIALS
            self.encoder = {t: i for i, t in enumerate(tokens)}
        else:
            self.encoder = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
        if not isinstance(self.encoder, dict) or not all(type(i) is int and i >= 0 for i in self.encoder.values()):
            raise ValueError(f"{vocab_path} is not a vocabulary (a JSON object of token: id)")
        if [self.encoder.get(s) for s in SPECIALS] != [self.BOS, self.EOS]:
            raise ValueError(f"{vocab_path or merges_path} is not CLIP's vocabulary (special tokens differ)")
        # Every symbol bpe() can end with needs an id: each byte alone and word-final, and each merge's result.
        needed = [*self.byte_char.values(), *(c + "</w>" for c in self.byte_char.values()), *map("".join, merges)]
        if missing := [t for t in needed if t not in self.encoder]:
            raise ValueError(f"{vocab_path} lacks {len(missing)} token(s) that merges.txt makes, e.g. {missing[0]!r}: "
                             "vocab.json and merges.txt do not belong together")  # fmt: skip
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        # word -> ids: prompts reuse a small set of words, so after warm-up most words skip the merge loop
        self.cache = {s: [self.encoder[s]] for s in SPECIALS}
        self.added: dict[str, int] = {}  # add_tokens' words (cleaned) -> id
        self.added_words = regex.compile("(?!)")  # the regex that finds them; until then one that matches nothing

    def __len__(self) -> int:
        return max(self.decoder) + 1  # ids in use, added tokens included

    def add_tokens(self, names: list[str]) -> list[int]:
        """Register words as new tokens (textual-inversion embeddings) with the next free ids, and return those.
        They are found in the cleaned, so lower-cased, prompt before the word split (case-insensitive, as
        Transformers' added tokens), where no letter or digit continues them. A typed `name` gives its id, then
        those of `name_1`, `name_2`, ... while registered (`slot_names`)."""
        keys = [clean(name) for name in names]
        for name, key in zip(names, keys, strict=True):
            taken = key in self.encoder or key + "</w>" in self.encoder  # would hide a word CLIP knows
            if not key or taken or key in self.added or keys.count(key) > 1:
                why = "empty" if not key else "in CLIP's vocabulary" if taken else "already added"
                raise ValueError(f"cannot add token {name!r}: {why} (tokens match case-insensitively)")
        ids = list(range(len(self), len(self) + len(keys)))
        for key, i in zip(keys, ids, strict=True):
            self.added[key] = i
            self.decoder[i] = "".join(self.byte_char[b] for b in key.encode("utf-8")) + "</w>"
        words = "|".join(map(regex.escape, sorted(self.added, key=len, reverse=True)))  # longest first: x_1 before x
        self.added_words = regex.compile(rf"(?<![\p{{L}}\p{{N}}])({words})(?![\p{{L}}\p{{N}}])")
        return ids

    def spans(self) -> dict[int, int]:
        """Added id -> how many ids a typed word gives from it on (its further slots), where more than one."""
        sizes = {i: sum(1 for _ in takewhile(self.added.__contains__, slot_names(k))) for k, i in self.added.items()}
        return {i: n for i, n in sizes.items() if n > 1}

    @classmethod
    def from_folder(cls, path: str | Path) -> "CLIPTokenizer":
        """From a diffusers model folder (or its tokenizer/ folder) holding merges.txt (+ vocab.json);
        the shipped OpenAI vocabulary when there is none."""
        for folder in (Path(path) / "tokenizer", Path(path)):
            if (folder / "merges.txt").is_file():
                vocab = folder / "vocab.json"
                return cls(folder / "merges.txt", vocab if vocab.is_file() else None)
        return cls()

    def bpe(self, word: str) -> list[int]:
        if word in self.cache:
            return self.cache[word]
        symbols: list[str | None] = [self.byte_char[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        # Join the best-ranked adjacent pair until no pair is a merge. One occurrence at a time, leftmost first,
        # gives OpenAI's result (it joins all occurrences per round): a pair that contains the new symbol was
        # learned later, so it ranks worse and cannot jump the queue. The pairs wait in a heap of (rank, position)
        # and the symbols form a linked list, so a word of n bytes costs O(n log n), as in Hugging Face `tokenizers`
        # (rescanning every pair after each merge, as OpenAI does, is O(n^2): a 16,000-letter word took 21 s).
        n = len(symbols)
        after, before = list(range(1, n + 1)), list(range(-1, n - 1))  # position -> next / previous live one
        heap = [(r, i) for i, pair in enumerate(pairwise(symbols)) if (r := self.ranks.get(pair)) is not None]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = after[i]
            if symbols[i] is None or j == n or self.ranks.get((symbols[i], symbols[j])) != rank:
                continue  # queued before a merge changed this pair
            symbols[i], symbols[j], after[i] = symbols[i] + symbols[j], None, after[j]
            if after[i] < n:
                before[after[i]] = i
            for k in (before[i], i):  # the new symbol's two pairs
                if k >= 0 and after[k] < n and (r := self.ranks.get((symbols[k], symbols[after[k]]))) is not None:
                    heapq.heappush(heap, (r, k))
        self.cache[word] = [self.encoder[s] for s in symbols if s is not None]
        return self.cache[word]

    def encode(self, text: str) -> list[int]:
        """[BOS, ..., EOS] for one prompt, not truncated and not padded."""
        ids, text = [self.BOS], clean(text)
        for i, piece in enumerate(self.added_words.split(text)):  # plain text, added token, plain text, ...
            if i % 2 == 0:
                ids += [t for word in WORDS.findall(piece) for t in self.bpe(word)]
            else:  # an added token, then its further vectors if it has some: piece, piece_1, piece_2, ...
                ids += [self.added[s] for s in takewhile(self.added.__contains__, slot_names(piece))]
        return ids + [self.EOS]

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """(B, 77) int64 ids. A prompt over 77 tokens keeps its first 76 and ends with EOS, as the text
        encoder was trained; `truncated()` says what was lost. Shorter ones are padded with EOS."""
        rows = []
        for prompt in [prompts] if isinstance(prompts, str) else prompts:
            ids = self.encode(prompt)
            if len(ids) > self.MAX_LENGTH:
                ids = ids[: self.MAX_LENGTH - 1] + [self.EOS]
            rows.append(ids + [self.EOS] * (self.MAX_LENGTH - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def truncated(self, text: str) -> str:
        """The part of `text` that `__call__` cuts off (the tokens after the first 75, decoded), '' if none."""
        return self.decode(self.encode(text)[self.MAX_LENGTH - 1 : -1])

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of token ids: word ends become spaces; BOS/EOS (and so padding) are left out."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        text = "".join(self.decoder[i] for i in ids if i not in (self.BOS, self.EOS))
        data = bytes(self.char_byte[c] for c in text.replace("</w>", self.byte_char[ord(" ")]))
        # a cut can fall inside a character's UTF-8 bytes; show the broken piece as U+FFFD, as OpenAI does
        return data.decode("utf-8", errors="replace").strip()
