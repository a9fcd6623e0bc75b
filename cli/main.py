"""The command line, a client of min_pipeline.generate(): `uv run min_pipeline.py --prompt "..."`.

Options are built from settings.Settings (one per field, with its default and help) plus the CLI's own: inputs,
LoRAs and embeddings, the model, outputs, prompt files. Every check that needs no model runs before the model loads;
bad input is one line on stderr and exit code 2, a NaN/inf stage exit code 1, Ctrl-C exit code 130.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from cli.controlnets import add_options as add_controlnet_options
from cli.controlnets import check_units, generate_arguments, png_records
from cli.hashes import NETWORK_DIGITS, embeddings_in, hash_fields, model_hash, network_name, sha256
from cli.outputs import Output, check_file, check_folder, claim
from cli.png_info import check_metadata_text, model_name, options_from_png, parameters_text, read_png
from cli.prompt_files import prompt_file_jobs
from cli.trajectory import Watcher
from fast_path import speed_up
from images import open_image
from min_pipeline import DTYPES, Pipeline, generate, load_controlnet, load_pipeline
from models.embeddings import load_embedding
from models.loading import DEFAULT_MODEL, WeightsError, hub_repo_id
from models.lora import apply_lora, remove_loras
from resources import auto_dtype, pick_device, tune_malloc
from settings import MAX_SEED, SD15_CLIP_LAYERS, SD15_VAE_FACTOR, NonFiniteError, Settings, UserError
from tokenizer.prompt_syntax import lora_tags, parse_prompt_attention, prompt_schedules


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like our other errors (argparse adds the usage block)
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, "") or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


# Where the CLI's option differs from generate()'s keyword (Settings), its default and help: a random seed by default
# (A1111 and Diffusers draw one; generate() keeps seed 0 for reproducible scripts), and clip skip in A1111's numbering,
# as the PNG records it (generate() takes Diffusers': A1111's n is clip_skip=n - 1).
CLI_SETTINGS = {
    "seed": (-1, "random seed, 0 to 2**32-1, or -1 for a random one (printed on stderr and recorded in the PNG); with "
             "--num-images N, image i gets seed + i and its own PNG records it, as in A1111"),
    "clip_skip": (None, f"A1111's clip skip, as the PNG records it: 1 = the last CLIP layer (none skipped), 2 = skip "
                  f"one layer, ... up to {SD15_CLIP_LAYERS}"),
}  # fmt: skip


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
    p.add_argument("--from-png", metavar="PNG", help="run the generation recorded in a PNG (minsd's or A1111's "
                   "`parameters` text) again; options given here override it")  # fmt: skip
    p.add_argument("--negative-prompt", default="", help="what to steer away from (replaces the empty prompt in CFG)")
    for f in fields(Settings):  # --steps, --guidance-scale, ...: one option per setting
        flag = "--" + f.name.replace("_", "-")
        default, help = CLI_SETTINGS.get(f.name, (f.default, f.metadata["help"]))
        if f.metadata["type"] is bool:
            p.add_argument(flag, action="store_true", help=help)
        else:
            p.add_argument(flag, type=f.metadata["type"], default=default, help=help)
    p.add_argument("--plain-prompt", action="store_true",
                   help="read prompts as literal text cut at 77 tokens (Diffusers), not A1111's syntax")  # fmt: skip
    p.add_argument("--init-image", default=None, help="image-to-image: start from this picture (at its size, or "
                   "resized to --height/--width by --resize-mode)")  # fmt: skip
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
    p.add_argument("--vae", help="another VAE: a Diffusers folder or hub repo (stabilityai/sd-vae-ft-mse, "
                   "madebyollin/taesd), an LDM .safetensors file (vae-ft-mse-840000-ema-pruned.safetensors) or TAESD's "
                   "taesd_decoder.safetensors")  # fmt: skip
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available, in that order)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="weights and activations; auto: "
                   "float16 on CUDA, bfloat16 on a CPU with AMX (Xeons since Sapphire Rapids), else "
                   "float32")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="the fast path (speed_up): torch.compile the UNet (the "
                   "first image waits minutes for it, then steps are faster); on CUDA the loop replays as a CUDA "
                   "graph. On a CPU the default bf16 path is as fast without it (bench/README.md)")  # fmt: skip
    p.add_argument("--output", default="out.png", help="PNG file, or a folder (created if missing); several images "
                   "get numbered names")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--trajectory", help="also write the x0 prediction after every step: FILE.gif (animated) or FILE.png"
    )
    p.add_argument("--trajectory-decoder", choices=("cheap", "vae", "taesd"), default="cheap",
                   help="cheap: a linear latent-to-RGB map (free); vae: the real decoder at every step; taesd: "
                   "the --preview-vae's")  # fmt: skip
    p.add_argument("--preview-vae", metavar="TAESD", help="TAESD (madebyollin/taesd, or taesd_decoder.safetensors) "
                   "for --trajectory-decoder taesd and the previews: nearly the VAE's picture at an eighth of its "
                   "cost")  # fmt: skip
    p.add_argument("--trajectory-noisy", action="store_true", help="show the noisy latent beside each x0 prediction")
    p.add_argument("--preview-every", type=int, metavar="N", help="rewrite <output>.preview.png every N steps")
    p.add_argument("--keep-preview", action="store_true", help="keep the preview file after the run")
    add_controlnet_options(p)  # --controlnet PATH --control-image IMG ..., repeatable (cli/controlnets.py)
    args = p.parse_args(argv)
    # The options the user typed (which --from-png must not override): parsed again into a namespace that already
    # holds every option as None, which argparse fills only from the command line, never from the defaults.
    typed = p.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(vars(args))))
    args.typed = {name for name, value in vars(typed).items() if value is not None}
    return args


def job_settings(args: argparse.Namespace) -> Settings:
    """A job's Settings from the CLI's options (a prompt file's line gives some of them as text), ready to run:
    checked against SD 1.5's shapes before any model loads, the strength's default and a random seed filled in (one
    that leaves room for seed + i of every image), --clip-skip turned from A1111's numbering into generate()'s."""
    values = {}
    for f in fields(Settings):
        value = getattr(args, f.name)
        if isinstance(value, str) and f.metadata["type"] is not str:
            try:
                value = f.metadata["type"](value)
            except ValueError:
                raise UserError(f"--{f.name.replace('_', '-')} {value!r} is not a number") from None
        values[f.name] = value
    if values["clip_skip"] is not None:  # A1111's n (1: no layer skipped) is generate()'s n - 1 (Diffusers')
        if not 1 <= values["clip_skip"] <= SD15_CLIP_LAYERS:
            raise UserError(f"--clip-skip must be between 1 (no layer skipped) and {SD15_CLIP_LAYERS} (A1111's "
                            f"numbering), got {values['clip_skip']}")  # fmt: skip
        values["clip_skip"] = values["clip_skip"] - 1 or None
    settings = Settings(**values).ready(img2img=args.init_image is not None, inpaint=args.mask_image is not None)
    if values["seed"] != -1 and settings.seed + settings.num_images - 1 > MAX_SEED:
        raise UserError(f"--seed {settings.seed} with --num-images {settings.num_images}: image i takes seed + i, "
                        f"past {MAX_SEED}; give a lower seed")  # fmt: skip
    return settings


def from_png(args: argparse.Namespace) -> None:
    """--from-png: the PNG's recorded prompt and settings become the options the user did not type. The recorded
    fields minsd does not implement are named in one warning line; a different model or LoRA file in another."""
    fields = read_png(args.from_png)
    options, missing = options_from_png(fields)
    for name, value in options.items():
        if name not in args.typed:
            setattr(args, name, value)
    notes = [f"minsd does not implement {', '.join(missing)}; running without"] if missing else []
    ours, recorded, recorded_hash = model_name(args.model), fields.get("Model"), fields.get("Model hash")
    if recorded_hash and model_hash(args.model) not in (None, recorded_hash):
        notes.append(f"the PNG's Model hash is {recorded_hash} ({recorded}), --model {ours} has "
                     f"{model_hash(args.model)}: another model")  # fmt: skip
    elif recorded and recorded != ours and not (recorded_hash and model_hash(args.model)):
        notes.append(f"the PNG's Model is {recorded}, running with {ours} (--model)")
    if fields.get("VAE") and fields["VAE"] != (args.vae and model_name(args.vae)):
        ours_vae = model_name(args.vae) if args.vae else "the model's own"
        notes.append(f"the PNG's VAE is {fields['VAE']}, running with {ours_vae}: give it with --vae")
    recorded_loras = dict(pair.partition(": ")[::2] for pair in fields.get("Lora hashes", "").split(", "))
    for name, _ in lora_tags(args.prompt)[0]:
        path = Path(args.lora_dir).expanduser() / f"{name}.safetensors"
        want, got = recorded_loras.get(network_name(name)), path.is_file() and sha256(path, True)[:NETWORK_DIGITS]
        if want and got and want != got:
            notes.append(f"<lora:{name}> in --lora-dir has hash {got}, the PNG's {want}: another file")
    if "Denoising strength" in fields and args.init_image is None and "Hires upscale" not in fields:
        inputs = "--init-image and --mask-image" if "Mask blur" in fields else "--init-image"
        notes.append(f"the PNG was made from an image (Denoising strength), which it does not hold: give it with "
                     f"{inputs}; running text-to-image")  # fmt: skip
    for note in notes:
        warnings.warn(f"--from-png {args.from_png}: {note}", stacklevel=2)


def real(path: Path) -> Path:
    """The path with its links followed; Path.resolve() raises on a link loop (Python 3.11), realpath does not."""
    return Path(os.path.realpath(path))


def lora_files(args: argparse.Namespace) -> tuple[list[tuple[Path, float]], str]:
    """The LoRAs to merge: --lora FILE[:WEIGHT] and the prompt's <lora:NAME:WEIGHT> tags, found in --lora-dir as
    NAME.safetensors (subfolders allowed, nothing outside it). Returns them, the tags' first and the --lora files
    after them, in the order of the tags the PNG records (check_job), and the prompt without its tags (the PNG keeps
    the tags, as A1111 does)."""
    loras = []
    folder = Path(args.lora_dir).expanduser()
    tags, prompt = lora_tags(args.prompt)
    for name, weight in tags:
        path = folder / f"{name}.safetensors"
        if not real(path).is_relative_to(real(folder)):
            raise UserError(
                f"<lora:{name}> in the prompt names a file outside --lora-dir {folder}; give its name there"
            )
        if not path.is_file():
            raise UserError(f"<lora:{name}> in the prompt: no {path.name} in {real(folder)}; see --lora-dir")
        loras.append((str(path), weight or "1"))
    for spec in args.lora:
        path, _, weight = spec.rpartition(":")
        loras.append((path, weight) if path and re.fullmatch(r"[-+.\deE]+", weight) else (spec, "1"))
    out = []
    for path, weight in loras:
        try:
            out.append((Path(path).expanduser(), float(weight)))
        except ValueError:
            raise UserError(f"LoRA weight {weight!r} of {path} is not a number") from None
        if not math.isfinite(out[-1][1]):
            raise UserError(f"LoRA weight {weight!r} of {path} is not a finite number")
        if not out[-1][0].is_file():
            raise UserError(f"LoRA file {path} " + ("is not a file" if out[-1][0].exists() else "does not exist"))
    return out, prompt


def watch_files(args: argparse.Namespace, output: Output, count: int, batch: bool) -> tuple[Path | None, Path | None]:
    """--trajectory's file and the preview file (`<output>.preview.png`; `preview.png` in an output folder), checked:
    writable, the preview not a file that exists (it is the user's), no output an input image, the trajectory neither
    an output nor the preview, nor an A1111-style number in the output folder (`00012...`), which a later image could
    take."""
    trajectory = Path(args.trajectory).expanduser() if args.trajectory else None
    if trajectory is not None:
        if trajectory.suffix.lower() not in (".gif", ".png"):
            raise UserError(f"--trajectory {args.trajectory} must be a .gif or .png file name")
        check_folder(trajectory.parent)
        check_file(trajectory, "--trajectory")
    preview = None
    if args.preview_every is not None:
        if args.preview_every < 1:
            raise UserError(f"--preview-every must be at least 1, got {args.preview_every}")
        preview = output.path / "preview.png" if output.is_folder else output.path.with_suffix(".preview.png")
        if preview.exists() or preview.is_symlink():
            raise UserError(f"the preview file {preview} exists (yours?): remove it or choose another --output")
    outputs = [] if output.is_folder else [output.file(i, count) for i in range(count)]
    inputs = [real(Path(p).expanduser()) for p in (args.init_image, args.mask_image) if p]
    if any(real(p) in inputs for p in [*outputs, trajectory] if p is not None):
        raise UserError("--output or --trajectory names the --init-image or --mask-image; choose another name")
    if trajectory is not None:
        taken = [preview, *outputs]
        folder = output.path if output.is_folder else output.path.parent
        numbered = (output.is_folder or batch) and real(trajectory.parent) == real(folder)
        numbered = numbered and re.match(r"\d{5}", trajectory.name)
        if numbered or real(trajectory) in [real(p) for p in taken if p is not None]:
            raise UserError(f"--trajectory {trajectory} would replace an output image or the preview; rename it")
    return trajectory, preview


def shared_inputs(args: argparse.Namespace) -> tuple[list[Path], Image.Image | None, Image.Image | None]:
    """The inputs every job shares, checked once before any (a mistake is exit code 2, even with --from-file): the
    device, the embedding files (--embedding, and --embeddings-dir's .safetensors, none from outside it), the init
    image and the mask."""
    pick_device(args.device)
    files = [Path(name).expanduser() for name in args.embedding]
    for path in files:
        if not path.is_file():
            raise UserError(f"--embedding {path} is not a file" if path.exists() else f"no --embedding file {path}")
    if args.embeddings_dir is not None:
        folder = Path(args.embeddings_dir).expanduser()
        if not folder.is_dir():
            raise UserError(f"--embeddings-dir {args.embeddings_dir} is not a folder")
        for path in sorted(folder.glob("*.safetensors")):
            if not real(path).is_relative_to(real(folder)):
                raise UserError(f"{path} in --embeddings-dir leads outside it (a link?); copy the file there")
            files += [path] if path.is_file() else []  # a folder named x.safetensors is no embedding
    if args.trajectory_decoder == "taesd" and not args.preview_vae:
        raise UserError(
            "--trajectory-decoder taesd needs --preview-vae (madebyollin/taesd, or taesd_decoder.safetensors)"
        )
    for flag, vae in (("--vae", args.vae), ("--preview-vae", args.preview_vae)):
        if vae and not Path(vae).expanduser().exists() and not hub_repo_id(vae):
            raise UserError(f"{flag} {vae} does not exist (a VAE folder, a .safetensors file or a hub repo id)")
    init = open_image(args.init_image) if args.init_image else None
    if init is not None and min(init.size) < SD15_VAE_FACTOR:
        raise UserError(f"init image is {init.width}x{init.height}: smaller than {SD15_VAE_FACTOR} pixels a side")
    return files, init, open_image(args.mask_image, "mask image") if args.mask_image else None


def load_for_cli(args: argparse.Namespace, embeddings: list[Path]) -> Pipeline:
    """The model once per run, with the embeddings (shared_inputs)."""
    device = pick_device(args.device)
    if device.type == "cpu":
        tune_malloc()  # -20% per step on the CPU (bench/README.md)
    pipe = load_pipeline(args.model, device, args.dtype, vae=args.vae)
    dtype, why = auto_dtype(device)
    if args.dtype == "auto" and dtype != torch.float32:  # said once, when auto is not the plain float32 reference
        print(f"min_pipeline.py: --dtype auto: {str(dtype).removeprefix('torch.')} ({why})", file=sys.stderr)
    if args.compile:
        speed_up(pipe)
    for path in embeddings:
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
    random_seed: bool = False  # drawn for it: printed once the first image is made
    recorded_prompt: str = ""  # the PNG's: as typed, with a <lora:NAME:WEIGHT> tag for each --lora file, as A1111
    lora_names: tuple[str, ...] = ()  # each of `loras`' name in the PNG's Lora hashes


def check_job(args: argparse.Namespace, line: argparse.Namespace, number: int, batch: bool,
              init: Image.Image | None, mask: Image.Image | None) -> Job | None:  # fmt: skip
    """A command line's or prompt-file line's generation, every check that needs no model done (against SD 1.5's
    shapes, so that a typo costs no model loading); None for a line --skip-existing skips."""
    settings = job_settings(line)
    n = settings.num_images
    check_metadata_text(line.prompt, line.negative_prompt)
    output = Output.parse(f"{args.output.removesuffix('.png')}/" if batch else args.output, n)
    if batch:  # numbered by line, so that --skip-existing can resume a killed job
        output = Output(output.path / f"{number:05d}.png", is_folder=False)
        if args.skip_existing and all(output.file(i, n).exists() for i in range(n)):
            return None
        output = Output.parse(str(output.path), n)
    trajectory, preview_path = watch_files(args, output, n, batch)
    loras, prompt = lora_files(line)
    # The PNG names every LoRA as A1111 does, by a prompt tag: a --lora file by its name (NAME.safetensors), which
    # --from-png looks up in --lora-dir as A1111 in its Lora folder. A name no tag can hold is in Lora hashes only.
    tagged = len(loras) - len(line.lora)  # the prompt's tags come first (lora_files)
    names = [name for name, _ in lora_tags(line.prompt)[0]] + [path.stem for path, _ in loras[tagged:]]
    given = zip(names[tagged:], loras[tagged:], strict=True)
    recorded = line.prompt + "".join(f" <lora:{name}:{w!r}>" for name, (_, w) in given if not set(name) & set(":<>"))
    if not args.plain_prompt:  # what generate() will parse, read now: a typo costs no model loading
        try:
            for text in (prompt, line.negative_prompt):
                [parse_prompt_attention(t) for _, t in prompt_schedules([text], settings.steps)[0]]
        except (ValueError, OverflowError) as e:
            raise UserError(f"cannot read the prompt's A1111 syntax ({e}); fix it, or pass --plain-prompt") from None
    return Job(settings, prompt, output, trajectory, preview_path, loras, init, mask, int(line.seed) == -1,
               recorded_prompt=recorded, lora_names=tuple(names))  # fmt: skip


def run_job(pipe: Pipeline, args: argparse.Namespace, line: argparse.Namespace, job: Job, batch: bool,
            embeddings: list[Path] = (), controls: list = ()) -> list[Path]:  # fmt: skip
    """Merge the job's LoRAs, generate, write the PNGs, then the trajectory; returns the files written. Image i of a
    batch is generated alone with seed + i and its own noise, as A1111 does, so that each PNG recreates its image
    (generate(num_images=N) draws a batch as Diffusers does instead). The preview file is claimed (created only if
    no file has its name) and removed when the job ends, unless --keep-preview kept a finished run's. `controls`:
    the --controlnet units, each (Unit, control image, ControlNet)."""
    for path, weight in job.loras:
        try:
            apply_lora(pipe.unet, pipe.text_encoder, path, weight)
        except (ValueError, WeightsError) as e:  # this line's error: the other lines go on
            raise UserError(f"LoRA {path}: {e}") from None
    watcher, written, claimed = None, [], False
    try:
        if job.preview_path:
            claim(job.preview_path)
            claimed = True
        if job.trajectory or job.preview_path:
            watcher = Watcher(pipe, job.trajectory is not None, args.trajectory_decoder, args.trajectory_noisy,
                              job.preview_path, args.preview_every or 1, args.preview_vae)  # fmt: skip
        n = job.settings.num_images
        factor, s = pipe.vae.downsample_factor, job.settings  # the output size, which a canny map is made at
        size = tuple(x - x % factor for x in job.init.size) if job.init else (s.width, s.height)
        control = generate_arguments(controls, size, args.guess_mode)
        for i in range(n):
            settings = replace(job.settings, seed=job.settings.seed + i)  # the PNG: this seed, "Batch size: n"
            if watcher is not None and i:
                watcher.trajectory = False  # the trajectory follows the first image
            [image] = generate(pipe, job.prompt, line.negative_prompt, init_image=job.init, mask_image=job.mask,
                               prompt_syntax="plain" if args.plain_prompt else "a1111",
                               progress=not (args.quiet or batch), callback=watcher, **control,
                               **asdict(replace(settings, num_images=1)))  # fmt: skip
            if job.random_seed and i == 0:  # once it made an image: an error before stays one line
                tqdm.write(f"seed: {job.settings.seed}", file=sys.stderr)
            used = embeddings_in(pipe.tokenizer, embeddings, [job.prompt, line.negative_prompt])
            hashes = hash_fields(args.model, list(zip(job.lora_names, [p for p, _ in job.loras], strict=True)), used)
            text = parameters_text(settings, job.recorded_prompt, line.negative_prompt, image.size, args.model,
                                   job.init is not None, hashes, vae=args.vae,
                                   controlnets=png_records(controls, size, args.guess_mode))  # fmt: skip
            written.append(job.output.save(image, text, i, n, settings.seed))
        if job.trajectory:
            watcher.write_trajectory(job.trajectory)
        return written
    except OSError as e:  # a disk that filled up, a folder removed meanwhile: every place was checked before
        raise UserError(f"cannot write {e.filename or 'a file'}: {e.strerror or e}") from None
    finally:
        if claimed and not (args.keep_preview and written and watcher.previews):
            job.preview_path.unlink(missing_ok=True)


def report(args: argparse.Namespace, number: int, error: Exception, batch: bool) -> int:
    """A prompt-file line's error, reported by number (the other lines go on); any other error is raised."""
    if not batch:
        raise error
    tqdm.write(f"min_pipeline.py: {args.from_file} line {number}: error: {error}", file=sys.stderr)  # not on the bar
    return 1


def print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    tqdm.write(f"min_pipeline.py: warning: {message}", file=sys.stderr)  # one line, not warnings' file:line + source


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start, paths, failed = time.perf_counter(), [], 0
    with warnings.catch_warnings():
        warnings.showwarning = print_warning
        try:
            if args.from_png is not None:
                if args.from_file is not None:
                    raise UserError("give --from-png or --from-file, not both")
                from_png(args)  # the PNG's prompt and settings, where not typed
            if (args.prompt is None) == (args.from_file is None):
                raise UserError("give --prompt, --from-file or --from-png (one of them)")
            if args.from_file is None and (args.shard or args.skip_existing):
                raise UserError("--shard and --skip-existing work with --from-file")
            batch = args.from_file is not None
            output = Path(args.output).expanduser()
            if batch and "output" in args.typed and output.suffix.lower() == ".png" and not output.is_dir():
                folder = args.output.removesuffix(output.suffix) + "/"
                raise UserError(f"--from-file writes one image per line into a folder: give --output a folder "
                                f"({folder}), not the file name {args.output}")  # fmt: skip
            embeddings, init, mask = shared_inputs(args)
            units = check_units(args)  # the --controlnet options and their control images
            jobs = []  # every line checked before the model loads; a bad one is reported, the rest go on
            for number, line in prompt_file_jobs(args) if batch else [(0, args)]:
                try:
                    if isinstance(line, str):
                        raise UserError(line)
                    if job := check_job(args, line, number, batch, init, mask):
                        jobs.append((number, line, job))
                except (UserError, OSError) as e:  # OSError: a path the system refuses (a name too long)
                    failed += report(args, number, e, batch)
            controls = [(u, image, load_controlnet(u.model, args.device, args.dtype)) for u, image in units if jobs]
            pipe = load_for_cli(args, embeddings) if jobs else None
            for number, line, job in tqdm(jobs, desc="prompts", disable=not batch or args.quiet):
                try:
                    paths += run_job(pipe, args, line, job, batch, embeddings, controls)
                except (UserError, NonFiniteError) as e:
                    failed += report(args, number, e, batch)
                finally:
                    remove_loras(pipe.unet, pipe.text_encoder)  # a line's LoRAs never reach the next line
        except (UserError, WeightsError, OSError) as e:
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
