"""Prompt files (--from-file): one generation per line, with per-line options, split across processes by --shard."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import stat
from pathlib import Path

from settings import UserError

LINE_OPTIONS = ("--prompt", "--negative-prompt", "--seed", "--steps", "--guidance-scale", "--width", "--height",
                "--scheduler", "--schedule")  # fmt: skip
MAX_FILE = 64 * 2**20  # bytes: a million prompts; /dev/zero or a wrong file is refused, not read to the end


class LineParser(argparse.ArgumentParser):
    """A prompt file's line options; mistakes raise (the line is reported by number) instead of exiting."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for flag in LINE_OPTIONS:
            self.add_argument(flag, type=str)
        self.add_argument("--lora", action="append")  # FILE[:WEIGHT], repeatable: added to the command line's

    def error(self, message: str):
        raise UserError(message)


def prompt_file_jobs(args: argparse.Namespace) -> list[tuple[int, argparse.Namespace | str]]:
    """--from-file: one job per non-empty line, `prompt text --seed 3 --steps 20 ...` or, as A1111's "prompts from
    file" script writes them, options only (`--prompt "..." --steps 20`), in our spelling; numbered from 1. A line's
    --lora files are merged with the command line's (for that line only). A line
    that cannot be read becomes its error message. --shard K/N keeps the lines with number % N == K."""
    k, n = shard(args.shard)
    jobs = []
    for number, raw in enumerate(read_lines(args.from_file), start=1):
        if number % n != k:
            continue
        try:  # a line at a time, so that one bad byte costs one line
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            jobs.append((number, f"the line is not UTF-8 text ({e.reason} at byte {e.start})"))
            continue
        if not line.strip():
            continue
        prompt, sep, rest = f" {line}".partition(" --")
        try:
            options = vars(LineParser(prog="", add_help=False).parse_args(shlex.split(sep.strip() + rest)))
        except ValueError as e:  # UserError from the parser, or shlex's unclosed quote
            jobs.append((number, f"cannot read the line: {e}"))
            continue
        options = {k: v for k, v in options.items() if v is not None}
        options["lora"] = args.lora + options.get("lora", [])
        prompt = options.pop("prompt", prompt.strip())
        jobs.append((number, argparse.Namespace(**{**vars(args), **options, "prompt": prompt})))
    return jobs


def read_lines(name: str) -> list[bytes]:
    r"""The lines of a prompt file as bytes, split at \n only (str.splitlines would also split at \x0c, \x85 and
    Unicode's line breaks, shifting the line numbers), without \r\n endings or a UTF-8 byte-order mark. Only a
    regular file of at most MAX_FILE bytes is read: never a device, a pipe (which would block) or a huge file."""
    path = Path(name).expanduser()
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # before open(), which waits for a FIFO's writer
            raise UserError(f"--from-file {name} is not a regular file")
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as e:
        raise UserError(f"cannot read --from-file {name}: {e.strerror or e}") from None
    if len(data) > MAX_FILE:
        raise UserError(f"--from-file {name} is larger than {MAX_FILE // 2**20} MiB; split it")
    return [line.removesuffix(b"\r") for line in data.removeprefix(b"\xef\xbb\xbf").split(b"\n")]


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
    if not (re.fullmatch(r"[0-9]{1,9}", k) and re.fullmatch(r"[0-9]{1,9}", n) and int(k) < int(n)):  # not '²'
        raise UserError(f"--shard must be K/N with 0 <= K < N, or auto; got {spec!r}")
    return int(k), int(n)
