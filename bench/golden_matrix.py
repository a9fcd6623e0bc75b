"""Golden outputs of generate(): a fixed matrix of 27 cases on tiny random-weight models, saved tensor by tensor, so
that a refactor of min_pipeline.py can be checked to be bit-identical to the code before it.

    uv run python bench/golden_matrix.py run --model-dir /tmp/golden_models --out /tmp/golden_after
    uv run python bench/golden_matrix.py compare /tmp/golden_before /tmp/golden_after   # exit 1 unless identical

`run` builds in --model-dir what is missing (the tests' tiny model, its 9-channel inpainting twin, a Kohya LoRA),
then writes <case>.safetensors per case: the output (np / latent, as a tensor) and, for the callback case, every
call's StepInfo.x0 and latents. Everything runs on the CPU with a fixed thread count. Only `load_pipeline`,
`generate` and models.lora's apply_lora / remove_loras (either signature, see call_lora) are used, so the script
runs unchanged on the code before and after a refactor; it imports the repository it lives in.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import min_pipeline  # noqa: E402
from min_pipeline import generate, load_pipeline  # noqa: E402
from models import lora  # noqa: E402

RANK = 4
INIT = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
MASK = Image.new("RGB", (64, 64))
ImageDraw.Draw(MASK).rectangle((9, 13, 41, 47), fill="white")  # edges between latent pixels (odd coordinates)
LONG = " ".join(["a red fox standing in deep snow at golden hour, pine trees, mountains,"] * 8)  # > 75 tokens

# name -> generate() keyword arguments over BASE; `pipe`: which pipeline (default "tiny"), `lora`: a LoRA weight,
# `callback`: record every StepInfo. Two cases carry two checks each: nocfg_dpmpp_2m_latent (guidance off + the
# latent output) and karras_heun_callback (Karras sigmas + the callback's x0 on Heun's two calls per step).
BASE = dict(prompt="a red fox in snow", negative_prompt="blurry", steps=3, height=64, width=64, seed=7)
CASES: dict[str, dict] = {
    **{f"cfg_{s}": dict(scheduler=s) for s in ("euler", "euler_a", "heun", "dpmpp_2m", "ddim", "ddpm")},
    "nocfg_euler": dict(guidance_scale=1.0),
    "nocfg_dpmpp_2m_latent": dict(scheduler="dpmpp_2m", guidance_scale=1.0, output_type="latent"),
    "img2img_euler": dict(init_image=INIT, strength=0.7),
    "img2img_ddim": dict(scheduler="ddim", init_image=INIT, strength=0.7, steps=4),
    "inpaint_4ch_euler": dict(init_image=INIT, mask_image=MASK, mask_blur=2, mask_keep_pixels=True),
    "inpaint_9ch_ddim": dict(
        pipe="inpaint", scheduler="ddim", init_image=INIT, mask_image=MASK, strength=0.75, steps=4
    ),
    "karras_euler": dict(karras=True),
    "karras_heun_callback": dict(scheduler="heun", karras=True, callback=True),
    "karras_dpmpp_2m": dict(scheduler="dpmpp_2m", karras=True),
    "ddim_eta0.5": dict(scheduler="ddim", eta=0.5),
    "clip_skip1": dict(clip_skip=1),
    "dtype_float16": dict(pipe="float16", steps=2),
    "dtype_bfloat16": dict(pipe="bfloat16", steps=2),
    "a1111_emphasis": dict(prompt="a (red:1.3) fox, ((snow)), [forest]", negative_prompt="(blurry:1.2)"),
    "a1111_editing": dict(prompt="a [cat:dog:0.5] in snow", steps=4),
    "a1111_alternation": dict(prompt="a [cat|dog] in snow"),
    "a1111_break": dict(prompt="a red fox BREAK snowy pine forest"),
    "a1111_long": dict(prompt=LONG),
    "plain_syntax": dict(prompt="a (red:1.3) fox [cat:dog:0.5] BREAK snow", prompt_syntax="plain"),
    "two_prompts_two_images": dict(
        prompt=["a red fox", "a blue bird"], negative_prompt=["blurry", "dark"], num_images=2
    ),
    "lora": dict(lora=0.8),
}
assert len(CASES) == 27
PIPES = {"tiny": ("tiny", "float32"), "inpaint": ("inpaint", "float32"), "float16": ("tiny", "float16"),
         "bfloat16": ("tiny", "bfloat16")}  # fmt: skip


def build_models(model_dir: Path) -> None:
    """The tests' tiny model and its 9-channel inpainting twin (tests/conftest.py's builder) and a LoRA file."""
    missing = [name for name in ("tiny", "inpaint") if not (model_dir / name / "model_index.json").exists()]
    if missing:  # model_index.json is written last by build_model_folder; conftest is imported only when needed
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import TINY_TEXT_ENCODER, TINY_UNET, TINY_VAE, build_model_folder

        for name in missing:
            print(f"building {model_dir / name}", flush=True)
            unet = {**TINY_UNET, "in_channels": 9} if name == "inpaint" else TINY_UNET
            build_model_folder(model_dir / name, TINY_TEXT_ENCODER, unet, TINY_VAE)
    if not (model_dir / "lora.safetensors").exists():
        write_lora(model_dir / "tiny", model_dir / "lora.safetensors")


def write_lora(model: Path, path: Path) -> None:
    """Kohya format, rank 4, alpha 2, on every attention projection of the UNet and the text encoder (the layer
    names and shapes read from the model's files, not from our code)."""
    g, state = torch.Generator().manual_seed(0), {}
    files = {"lora_unet_": "unet/diffusion_pytorch_model.safetensors", "lora_te_": "text_encoder/model.safetensors"}
    for prefix, file in files.items():
        for key, w in sorted(load_file(model / file).items()):
            if w.ndim == 2 and re.search(r"(to_[qkv]|to_out\.0|[qkv]_proj|out_proj)\.weight$", key):
                name = prefix + key.removesuffix(".weight").replace(".", "_")
                state[f"{name}.lora_down.weight"] = torch.randn(RANK, w.shape[1], generator=g) / w.shape[1] ** 0.5
                state[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], RANK, generator=g) * 0.1
                state[f"{name}.alpha"] = torch.tensor(RANK / 2)
    save_file(state, str(path))


def fingerprint(model_dir: Path) -> str:
    """sha256 of the model files: outputs are comparable only when made from the same weights."""
    h = hashlib.sha256()
    for f in sorted(model_dir.rglob("*.safetensors")):
        h.update(f.relative_to(model_dir).as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:16]


def call_lora(fn, pipe, *args):
    """apply_lora / remove_loras with whatever they take for the networks: the pipeline (`pipe`) or the networks
    (`unet`, `text_encoder`, or a `networks` dict); `args` (path, weight) fill the remaining parameters in order."""
    nets = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    given, rest, positional, keywords = {"pipe": pipe, "pipeline": pipe, "networks": nets, **nets}, iter(args), [], {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        value = given[p.name] if p.name in given else next(rest, p.default)
        if value is p.empty:
            raise TypeError(f"{fn.__name__}: no value for parameter {p.name!r}")
        if p.kind is p.KEYWORD_ONLY:
            keywords[p.name] = value
        else:
            positional.append(value)
    return fn(*positional, **keywords)


def run_case(pipe, kwargs: dict, lora_file: Path) -> dict[str, torch.Tensor]:
    steps, weight = [], kwargs.pop("lora", None)
    if kwargs.pop("callback", False):
        kwargs["callback"] = steps.append
    if weight is not None:
        call_lora(lora.apply_lora, pipe, str(lora_file), weight)
    try:
        out = generate(pipe, **{**BASE, "output_type": "np", "progress": False, **kwargs})
    finally:
        if weight is not None:
            call_lora(lora.remove_loras, pipe)
    tensors = {"output": out if isinstance(out, torch.Tensor) else torch.from_numpy(np.asarray(out))}
    for info in steps:
        tensors[f"x0.{info.i:03d}"], tensors[f"latents.{info.i:03d}"] = info.x0, info.latents
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)  # CPU reductions may split by thread count: fix it for bit-identical runs
    model_dir, out = Path(args.model_dir), Path(args.out)
    build_models(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"min_pipeline: {min_pipeline.__file__}", flush=True)
    meta, pipes, start = {"models": fingerprint(model_dir)}, {}, time.perf_counter()
    names = [name for name in CASES if not args.only or name in args.only]
    for name in names:
        case = CASES[name]
        kwargs = dict(case)
        which = kwargs.pop("pipe", "tiny")
        if which not in pipes:
            folder, dtype = PIPES[which]
            with warnings.catch_warnings():  # half precision on a CPU warns that it is slow
                warnings.simplefilter("ignore")
                pipes[which] = load_pipeline(str(model_dir / folder), device="cpu", dtype=dtype)
        t = time.perf_counter()
        tensors = run_case(pipes[which], kwargs, model_dir / "lora.safetensors")
        save_file(tensors, str(out / f"{name}.safetensors"), metadata=meta)
        print(f"{name:28s} {time.perf_counter() - t:6.1f} s  {len(tensors)} tensor(s)", flush=True)
    print(f"{len(names)} cases in {time.perf_counter() - start:.1f} s -> {out}")
    return 0


def compare(args: argparse.Namespace) -> int:
    a, b = Path(args.a), Path(args.b)
    names = sorted(set(CASES) | {f.stem for d in (a, b) for f in d.glob("*.safetensors")})
    bad, models = 0, set()
    for name in names:
        files = [d / f"{name}.safetensors" for d in (a, b)]
        if not all(f.exists() for f in files):
            bad += 1
            print(f"{name:28s} MISSING in {', '.join(str(f.parent) for f in files if not f.exists())}")
            continue
        (ta, tb), diffs = [load_file(f) for f in files], []
        models |= {json.dumps(safe_open(str(f), "pt").metadata()) for f in files}
        for key in sorted(set(ta) | set(tb)):
            x, y = ta.get(key), tb.get(key)
            if x is None or y is None or x.shape != y.shape or x.dtype != y.dtype:
                diffs.append(f"{key}: only in one, or shape/dtype differ")
            elif not torch.equal(x, y):
                diffs.append(f"{key}: max abs diff {(x.double() - y.double()).abs().max().item():.3g}")
        bad += bool(diffs)
        print(f"{name:28s} {'DIFFERS  ' + '; '.join(diffs[:3]) if diffs else 'identical'}")
    if len(models) > 1:
        print(f"warning: made from different model files: {sorted(models)}")
    print(f"{len(names) - bad} of {len(names)} cases bit-identical")
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the matrix, one .safetensors file per case")
    r.add_argument("--model-dir", required=True, help="tiny models and LoRA (built here when missing)")
    r.add_argument("--out", required=True, help="folder for the results")
    r.add_argument("--threads", type=int, default=2, help="torch CPU threads (keep equal across compared runs)")
    r.add_argument("--only", nargs="+", choices=CASES, metavar="CASE", help="run these cases only")
    c = sub.add_parser("compare", help="bit-identical check of two result folders; exit 1 on any difference")
    c.add_argument("a")
    c.add_argument("b")
    args = p.parse_args()
    return run(args) if args.command == "run" else compare(args)


if __name__ == "__main__":
    sys.exit(main())
