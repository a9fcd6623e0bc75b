"""Prompt files (--from-file): one generation per line, with per-line options, split across processes by --shard."""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from settings import UserError

LINE_OPTIONS = ("--prompt", "--negative-prompt", "--seed", "--steps", "--guidance-scale", "--width", "--height",
                "--scheduler")  # fmt: skip


class LineParser(argparse.ArgumentParser):
    """A prompt file's line options; mistakes raise (the line is reported by number) instead of exiting."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for flag in LINE_OPTIONS:
            self.add_argument(flag, type=str)

    def error(self, message: str):
        raise UserError(message)


def prompt_file_jobs(args: argparse.Namespace) -> list[tuple[int, argparse.Namespace | str]]:
    """--from-file: one job per non-empty line, `prompt text --seed 3 --steps 20 ...` or, as A1111's "prompts from
    file" script writes them, options only (`--prompt "..." --steps 20`), in our spelling; numbered from 1. A line
    that cannot be read becomes its error message. --shard K/N keeps the lines with number % N == K."""
    try:
        lines = Path(args.from_file).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --from-file {args.from_file}: {e}") from None
    k, n = shard(args.shard)
    jobs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or number % n != k:
            continue
        prompt, sep, rest = f" {line}".partition(" --")
        try:
            options = vars(LineParser(prog="", add_help=False).parse_args(shlex.split(sep.strip() + rest)))
        except ValueError as e:  # UserError from the parser, or shlex's unclosed quote
            jobs.append((number, f"cannot read the line: {e}"))
            continue
        options = {k: v for k, v in options.items() if v is not None}
        prompt = options.pop("prompt", prompt.strip())
        jobs.append((number, argparse.Namespace(**{**vars(args), **options, "prompt": prompt})))
    return jobs


def shard(spec: str | None) -> tuple[int, int]:
    """K/N, or auto: the launcher's RANK/WORLD_SIZE (torchrun) or SLURM_PROCID/SLURM_NTASKS."""
    if spec is None:
        return 0, 1
    if spec == "auto":
        env = os.environ
        k, n = (
            (env.get("RANK"), env.get("WORLD_SIZE"))
            if "RANK" in env
            else (env.get("SLURM_PROCID"), env.get("SLURM_NTASKS"))
        )
        spec = f"{k or 0}/{n or 1}"
    k, _, n = spec.partition("/")
    if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise UserError(f"--shard must be K/N with 0 <= K < N, or auto; got {spec!r}")
    return int(k), int(n)
