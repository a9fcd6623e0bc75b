"""Time to tokenize a prompt: ours vs transformers.CLIPTokenizer, after warm-up.

    uv run python bench/bench_tokenizer.py

Both read the same vocabulary (vocab.json + merges.txt written from the shipped BPE file). Rows: `encode` of
one prompt (list of ids), one prompt to a (1, 77) tensor, a batch of 8 to (8, 77), and a prompt seen for the
first time (our word cache is cleared before each call, transformers' BPE cache too).
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import transformers  # noqa: E402

from conftest import write_tokenizer_files  # noqa: E402
from tokenizer import CLIPTokenizer  # noqa: E402

PROMPT = (
    "a photograph of an astronaut riding a horse on mars, (masterpiece:1.2), highly detailed, 8k, "
    "sharp focus, golden hour lighting, trending on artstation"
)
BATCH = [PROMPT, "a cat", "portrait of a woman, oil painting", "", "cyberpunk city at night, neon, rain"] + [PROMPT] * 3


def median_us(fn, repeat: int = 2000, setup=None) -> float:
    """Median microseconds per call of fn() after warm-up calls."""
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeat):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    folder = Path(tempfile.mkdtemp())
    write_tokenizer_files(folder)
    t0 = time.perf_counter()
    ours = CLIPTokenizer()
    load_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf = transformers.CLIPTokenizer.from_pretrained(folder)
    load_hf = time.perf_counter() - t0
    hf_kwargs = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")

    def clear_caches() -> None:
        ours.cache = {k: v for k, v in ours.cache.items() if k.startswith("<|")}
        hf.backend_tokenizer.model._clear_cache()

    rows = [
        ("encode(prompt) -> list", lambda: ours.encode(PROMPT), lambda: hf(PROMPT).input_ids, None),
        ("prompt -> (1, 77) tensor", lambda: ours(PROMPT), lambda: hf(PROMPT, **hf_kwargs).input_ids, None),
        ("8 prompts -> (8, 77) tensor", lambda: ours(BATCH), lambda: hf(BATCH, **hf_kwargs).input_ids, None),
        ("new prompt (caches cleared)", lambda: ours(PROMPT), lambda: hf(PROMPT, **hf_kwargs).input_ids, clear_caches),
    ]
    print(f"prompt: {len(ours.encode(PROMPT))} tokens; load: ours {load_ours:.2f} s, transformers {load_hf:.2f} s")
    print(f"{'median per call':<30}{'ours (us)':>12}{'transformers (us)':>20}")
    for name, fn_ours, fn_hf, setup in rows:
        print(f"{name:<30}{median_us(fn_ours, setup=setup):>12.1f}{median_us(fn_hf, setup=setup):>20.1f}")


if __name__ == "__main__":
    main()
