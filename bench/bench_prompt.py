"""What A1111-style prompt reading costs: encoding a 300-token weighted prompt (parse, 5 CLIP windows, emphasis)
with the full-size SD 1.5 text encoder, against one CFG UNet call at 512x512 (64x64 latent, batch 2), both with
random weights, in one process.

    uv run python bench/bench_prompt.py [--threads 2]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402

from conftest import official_config, save_text_encoder  # noqa: E402
from models.loading import load_component  # noqa: E402
from models.unet import UNet, UNetConfig  # noqa: E402
from prompts import encode_a1111, encode_prompts  # noqa: E402
from tokenizer import CLIPTokenizer, chunk_prompt, parse_prompt_attention  # noqa: E402

WORDS = "(masterpiece:1.2), a ((red)) fox in [deep] snow, golden hour, sharp focus, BREAK detailed fur, 8k, "


def seconds(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = CLIPTokenizer()
    prompt = WORDS
    while len(tok.encode(prompt)) < 302:  # 300 tokens between BOS and EOS
        prompt += WORDS
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        cfg = official_config("text_encoder")
        save_text_encoder(Path(tmp) / "text_encoder", CLIPTextModel(CLIPTextConfig(**cfg)), cfg)
        pipe = SimpleNamespace(tokenizer=tok, text_encoder=load_component(Path(tmp), "text_encoder"), device="cpu")
        comma = tok.encode(",")[1]
        parse = seconds(lambda: chunk_prompt(parse_prompt_attention(prompt), tok.encode, tok.BOS, tok.EOS, comma), 20)
        a1111 = seconds(lambda: encode_a1111(pipe, [prompt, "blurry, (low quality:1.3)"], None), 5)
        plain = seconds(lambda: encode_prompts(pipe, ["a red fox in snow", ""], None), 5)
        with torch.device("meta"):
            unet = UNet(UNetConfig())
        unet = unet.to_empty(device="cpu").eval()
        for t in unet.parameters():
            torch.nn.init.normal_(t, std=0.02)
        x, context = torch.randn(2, 4, 64, 64), torch.randn(2, 77 * 5, 768)
        step = seconds(lambda: unet(x, torch.tensor(500.0), context), 1)
    n = len(tok.encode(prompt)) - 2
    print(f"{args.threads} threads, {torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()}")
    print(f"parsing + tokenizing + chunking the prompt: {parse * 1000:.2f} ms ({parse / step * 100:.3f} % of a step)")
    print(f"A1111 reading, {n}-token weighted prompt + negative (5 + 1 windows): {a1111 * 1000:.0f} ms")
    print(f"plain reading, a short prompt + the empty negative (2 windows): {plain * 1000:.0f} ms")
    print(f"one CFG UNet call at 512x512 (context of 385 tokens): {step:.2f} s")
    print(f"encoding / one step: {a1111 / step * 100:.1f} %")


if __name__ == "__main__":
    main()
