"""The command line, a client of min_pipeline.generate(): `uv run min_pipeline.py --prompt "..."`.

Options are built from settings.Settings (one per field, with its default and help) plus the CLI's own: inputs,
LoRAs and embeddings, the model, outputs, prompt files. Every check that needs no model runs before the model loads;
bad input is one line on stderr and exit code 2, a NaN/inf stage exit code 1, Ctrl-C exit code 130.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from cli.outputs import Output
from cli.png_info import check_metadata_text, parameters_text
from cli.prompt_files import prompt_file_jobs
from cli.trajectory import Watcher
from fast_path import speed_up
from images import open_image
from min_pipeline import DTYPES, Pipeline, generate, load_pipeline
from models.embeddings import load_embedding
from models.loading import DEFAULT_MODEL, WeightsError
from models.lora import apply_lora, remove_loras
from resources import pick_device, tune_malloc
from settings import NonFiniteError, Settings, UserError
from tokenizer.prompt_syntax import lora_tags


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like our other errors (argparse adds the usage block)
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, "") or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="min_pipeline.py",
        description="Stable Diffusion 1.5 text-to-image / image-to-image in plain PyTorch.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--prompt", help="what to draw (A1111 syntax: (word:1.2), [from:to:when], BREAK, <lora:NAME:W>)")
    p.add_argument("--from-file", metavar="FILE", help="one generation per line: 'prompt --seed 3 --steps 20 ...'")
    p.add_argument("--shard", metavar="K/N", help="--from-file: run lines with number %% N == K; auto: RANK/WORLD_SIZE")
    p.add_argument("--skip-existing", action="store_true", help="--from-file: skip lines whose output exists")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (replaces the empty prompt in CFG)")
    for f in fields(Settings):  # --steps, --guidance-scale, ...: one option per setting
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.metadata["type"] is bool:
            p.add_argument(flag, action="store_true", help=help)
        else:
            p.add_argument(flag, type=f.metadata["type"], default=f.default, help=help)
    p.add_argument("--plain-prompt", action="store_true",
                   help="read prompts as literal text cut at 77 tokens (Diffusers), not A1111's syntax")  # fmt: skip
    p.add_argument("--init-image", default=None, help="image-to-image: start from this picture (sets the size)")
    p.add_argument("--mask-image", default=None, help="inpainting: repaint the white part of --init-image")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="merge a LoRA .safetensors file at WEIGHT (default 1); repeatable")  # fmt: skip
    p.add_argument(
        "--lora-dir", default="loras", help="where the prompt's <lora:NAME:WEIGHT> tags find NAME.safetensors"
    )
    p.add_argument("--embedding", action="append", default=[], metavar="FILE",
                   help="a textual-inversion .safetensors; its file name in a prompt means it; repeatable")  # fmt: skip
    p.add_argument(
        "--embeddings-dir", help="every .safetensors here becomes usable by name (A1111's embeddings folder)"
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub repo id, Diffusers folder or .safetensors single file")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available, in that order)")
    p.add_argument("--dtype", choices=list(DTYPES), help="weights/activations (default: float16 on CUDA, else float32)")
    p.add_argument("--compile", action="store_true", help="the fast path (speed_up): torch.compile the UNet (the "
                   "first image waits minutes for it, then steps are faster); on CUDA the loop replays as a CUDA "
                   "graph")  # fmt: skip
    p.add_argument("--output", default="out.png", help="PNG file, or a folder (created if missing); several images "
                   "get numbered names")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--trajectory", help="also write the x0 prediction after every step: FILE.gif (animated) or FILE.png"
    )
    p.add_argument("--trajectory-decoder", choices=("cheap", "vae"), default="cheap",
                   help="cheap: a linear latent-to-RGB map (free); vae: the real decoder at every step")  # fmt: skip
    p.add_argument("--trajectory-noisy", action="store_true", help="show the noisy latent beside each x0 prediction")
    p.add_argument("--preview-every", type=int, metavar="N", help="rewrite <output>.preview.png every N steps")
    p.add_argument("--keep-preview", action="store_true", help="keep the preview file after the run")
    return p.parse_args(argv)


def job_settings(args: argparse.Namespace) -> Settings:
    """A job's Settings from the CLI's options (a prompt file's line gives some of them as text), ready to run:
    checked against SD 1.5's shapes before any model loads, the strength's default and a random seed filled in."""
    values = {}
    for f in fields(Settings):
        value = getattr(args, f.name)
        if isinstance(value, str) and f.metadata["type"] is not str:
            try:
                value = f.metadata["type"](value)
            except ValueError:
                raise UserError(f"--{f.name.replace('_', '-')} {value!r} is not a number") from None
        values[f.name] = value
    settings = Settings(**values).ready(img2img=args.init_image is not None, inpaint=args.mask_image is not None)
    if values["seed"] == -1:
        print(f"seed: {settings.seed}", file=sys.stderr)
    return settings


def lora_files(args: argparse.Namespace) -> tuple[list[tuple[Path, float]], str]:
    """The LoRAs to merge: --lora FILE[:WEIGHT] and the prompt's <lora:NAME:WEIGHT> tags, found in --lora-dir as
    NAME.safetensors (subfolders allowed, nothing outside it). Returns them and the prompt without its tags (the PNG
    keeps the tags, as A1111 does)."""
    loras = []
    for spec in args.lora:
        path, _, weight = spec.rpartition(":")
        loras.append((path, weight) if path and re.fullmatch(r"[-+.\deE]+", weight) else (spec, "1"))
    folder = Path(args.lora_dir).expanduser()
    tags, prompt = lora_tags(args.prompt)
    for name, weight in tags:
        path = folder / f"{name}.safetensors"
        if not path.resolve().is_relative_to(folder.resolve()):
            raise UserError(
                f"<lora:{name}> in the prompt names a file outside --lora-dir {folder}; give its name there"
            )
        if not path.is_file():
            raise UserError(f"<lora:{name}> in the prompt: no {path.name} in {folder.resolve()}; see --lora-dir")
        loras.append((str(path), weight or "1"))
    out = []
    for path, weight in loras:
        try:
            out.append((Path(path).expanduser(), float(weight)))
        except ValueError:
            raise UserError(f"LoRA weight {weight!r} of {path} is not a number") from None
        if not math.isfinite(out[-1][1]):
            raise UserError(f"LoRA weight {weight!r} of {path} is not a finite number")
        if not out[-1][0].is_file():
            raise UserError(f"LoRA file {path} does not exist")
    return out, prompt


def watch_files(args: argparse.Namespace, output: Output) -> tuple[Path | None, Path | None]:
    """--trajectory's file and the preview file (`<output>.preview.png`; `preview.png` in an output folder)."""
    trajectory = Path(args.trajectory).expanduser() if args.trajectory else None
    if trajectory is not None and trajectory.suffix.lower() not in (".gif", ".png"):
        raise UserError(f"--trajectory {args.trajectory} must be a .gif or .png file name")
    if args.preview_every is None:
        return trajectory, None
    if args.preview_every < 1:
        raise UserError(f"--preview-every must be at least 1, got {args.preview_every}")
    return trajectory, output.path / "preview.png" if output.is_folder else output.path.with_suffix(".preview.png")


def load_for_cli(args: argparse.Namespace) -> Pipeline:
    """The model once per run, with the embeddings of --embedding and --embeddings-dir."""
    device = pick_device(args.device)
    if device.type == "cpu":
        tune_malloc()  # -20% per step on the CPU (bench/README.md)
    pipe = load_pipeline(args.model, device, args.dtype)
    if args.compile:
        speed_up(pipe)
    folder = Path(args.embeddings_dir).expanduser() if args.embeddings_dir else None
    if folder is not None and not folder.is_dir():
        raise UserError(f"--embeddings-dir {args.embeddings_dir} is not a folder")
    for path in [*map(Path, args.embedding), *(sorted(folder.glob("*.safetensors")) if folder else [])]:
        try:
            load_embedding(pipe.tokenizer, pipe.text_encoder, path)
        except ValueError as e:  # a name already taken
            raise UserError(f"embedding {path}: {e}") from None
    return pipe


@dataclass(frozen=True)
class Job:
    """One generation, checked and ready to run: everything but the model."""

    settings: Settings
    prompt: str  # without its <lora:...> tags, which are in `loras`
    output: Output
    trajectory: Path | None
    preview_path: Path | None
    loras: list[tuple[Path, float]]
    init: Image.Image | None
    mask: Image.Image | None


def check_job(args: argparse.Namespace, line: argparse.Namespace, number: int, batch: bool) -> Job | None:
    """A command line's or prompt-file line's generation, every check that needs no model done (against SD 1.5's
    shapes, so that a typo costs no model loading); None for a line --skip-existing skips."""
    settings = job_settings(line)
    check_metadata_text(line.prompt, line.negative_prompt)
    output = Output.parse(f"{args.output.removesuffix('.png')}/" if batch else args.output, settings.num_images)
    if batch:  # numbered by line, so that --skip-existing can resume a killed job
        output = Output(output.path / f"{number:05d}.png", is_folder=False)
        if args.skip_existing and output.file(0, settings.num_images).exists():
            return None
    trajectory, preview_path = watch_files(args, output)
    loras, prompt = lora_files(line)
    init = open_image(args.init_image) if args.init_image else None
    mask = open_image(args.mask_image, "mask image") if args.mask_image else None
    return Job(settings, prompt, output, trajectory, preview_path, loras, init, mask)


def run_job(pipe: Pipeline, args: argparse.Namespace, line: argparse.Namespace, job: Job, batch: bool) -> list[Path]:
    """Merge the job's LoRAs, generate, write the PNGs (and the trajectory); returns the files written. The preview
    file goes when the job ends, unless --keep-preview."""
    for path, weight in job.loras:
        try:
            apply_lora(pipe.unet, pipe.text_encoder, path, weight)
        except ValueError as e:
            raise UserError(f"LoRA {path}: {e}") from None
    watcher = None
    if job.trajectory or job.preview_path:
        watcher = Watcher(pipe, job.trajectory is not None, args.trajectory_decoder, args.trajectory_noisy,
                          job.preview_path, args.preview_every or 1)  # fmt: skip
    try:
        images = generate(pipe, job.prompt, line.negative_prompt, init_image=job.init, mask_image=job.mask,
                          prompt_syntax="plain" if args.plain_prompt else "a1111", progress=not (args.quiet or batch),
                          callback=watcher, **asdict(job.settings))  # fmt: skip
        if job.trajectory:
            watcher.write_trajectory(job.trajectory)
        written = []
        for i, image in enumerate(images):
            text = parameters_text(job.settings, line.prompt, line.negative_prompt, image.size, args.model,
                                   job.init is not None)  # fmt: skip
            written.append(job.output.save(image, text, i, len(images), job.settings.seed))
        return written
    finally:
        if job.preview_path is not None and not args.keep_preview:
            job.preview_path.unlink(missing_ok=True)


def print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"min_pipeline.py: warning: {message}", file=sys.stderr)  # one line, not warnings' file:line + source


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start, pipe, paths, failed = time.perf_counter(), None, [], 0
    with warnings.catch_warnings():
        warnings.showwarning = print_warning
        try:
            if (args.prompt is None) == (args.from_file is None):
                raise UserError("give --prompt or --from-file (one of them)")
            if args.from_file is None and (args.shard or args.skip_existing):
                raise UserError("--shard and --skip-existing work with --from-file")
            jobs = prompt_file_jobs(args) if args.from_file else [(0, args)]
            batch = args.from_file is not None
            for number, job in tqdm(jobs, desc="prompts", disable=not batch or args.quiet):
                try:
                    if isinstance(job, str):
                        raise UserError(job)
                    checked = check_job(args, job, number, batch)
                    if checked is None:
                        continue
                    pipe = pipe or load_for_cli(args)
                    paths += run_job(pipe, args, job, checked, batch)
                except (UserError, NonFiniteError) as e:
                    if not batch:
                        raise
                    print(f"min_pipeline.py: {args.from_file} line {number}: error: {e}", file=sys.stderr)
                    failed += 1
                finally:
                    if pipe is not None:
                        remove_loras(pipe.unet, pipe.text_encoder)  # a line's LoRAs never reach the next line
        except (UserError, WeightsError) as e:
            print(f"min_pipeline.py: error: {e}", file=sys.stderr)
            return 2
        except NonFiniteError as e:
            print(f"min_pipeline.py: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nmin_pipeline.py: interrupted", file=sys.stderr)
            return 130
    print(f"wrote {', '.join(map(str, paths)) or 'nothing'} in {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0
