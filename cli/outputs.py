"""Where the images go: a .png file name, or a folder numbered as A1111 does; written so that nothing is ever
half-written, mixed up between two runs, or replaced by accident."""

from __future__ import annotations

import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, PngImagePlugin

from settings import UserError


@dataclass(frozen=True)
class Output:
    """Where the images go: a .png file name (replaced if it exists; `-<i>` before the suffix for several images),
    or a folder, where each image takes the next free A1111-style number `00012-<seed>.png` and nothing is ever
    replaced. Missing folders are created when the first image is saved, as image tools do."""

    path: Path
    is_folder: bool

    @classmethod
    def parse(cls, output: str, count: int) -> Output:
        path = Path(output).expanduser()
        is_folder = path.is_dir() or output.endswith(("/", os.sep))
        if not is_folder and path.suffix.lower() != ".png":
            raise UserError(f"output {output} must be a .png file name or a folder")
        check_folder(path if is_folder else path.parent)
        out = cls(path, is_folder)
        for p in [] if is_folder else [out.file(i, count) for i in range(count)]:
            check_file(p, "--output")
        return out

    def file(self, i: int, count: int) -> Path:
        return self.path if count == 1 else self.path.with_name(f"{self.path.stem}-{i}.png")

    def save(self, image: Image.Image, parameters: str, i: int, count: int, seed: int) -> Path:
        """Write through a unique temporary file in the target folder, then rename it into place: an error or
        Ctrl-C never leaves a half-written PNG or a temporary file, and two runs never mix their files."""
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
        placed = None
        try:
            if not self.is_folder:
                placed = self.file(i, count)
                replace_file(placed, image, format="PNG", pnginfo=info)
                return placed
            self.path.mkdir(parents=True, exist_ok=True)
            placed = next_free(self.path, seed)  # claimed with an exclusive create: still empty
            try:
                replace_file(placed, image, mode=new_file_mode(), format="PNG", pnginfo=info)
            except BaseException:
                placed.unlink(missing_ok=True)
                raise
            return placed
        except OSError as e:
            raise UserError(f"cannot write {placed or self.path}: {e.strerror or e}") from None


def check_folder(folder: Path) -> None:
    """New files can be made in `folder`, or in the folder mkdir would start from where it is missing: tried with a
    temporary file, as permissions alone do not tell (root, a read-only mount, /proc)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p.is_symlink())  # a link loop: refused
    try:
        fd, tmp = tempfile.mkstemp(prefix=".minsd-", suffix=".tmp", dir=existing)
        os.close(fd)
        os.unlink(tmp)
    except OSError:
        raise UserError(f"cannot write to {folder}: {existing} is not a writable folder") from None


def check_file(path: Path, option: str) -> None:
    """A file the run will replace: not a folder, a device (/dev/null) or another special file, not read-only."""
    if path.exists() and not path.is_file():
        raise UserError(f"{option} {path} is a folder or a special file; give a file name")
    if path.exists() and (not os.access(path, os.W_OK) or not path.stat().st_mode & stat.S_IWUSR):
        raise UserError(f"{option[2:]} {path} exists and is read-only; make it writable or choose another {option}")


def claim(path: Path) -> None:
    """Create `path` empty, only if no file has that name (O_EXCL): a file of the user's is never taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except FileExistsError:
        raise UserError(f"{path} exists: remove it, or choose another --output") from None


def replace_file(path: Path, image: Image.Image, mode: int | None = None, **save) -> None:
    """Write `image` (PIL's save options `save`) to `path` through a unique temporary file in the same folder,
    renamed into place; the temporary file is removed on any error, Ctrl-C included. The file keeps the mode of
    the one it replaces, or gets `mode`, or that of a new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".minsd-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, **save)
        if mode is None:
            mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else new_file_mode()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def next_free(folder: Path, seed: int) -> Path:
    """The next A1111-style number in `folder`, claimed by creating the empty file exclusively (O_EXCL), so two
    processes saving into one folder at once never pick the same name."""
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := re.match(r"(\d{5,})-", p.name))]
    n = max(numbers, default=-1) + 1
    while True:
        path = folder / f"{n:05d}-{seed}.png"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            return path
        except FileExistsError:
            n += 1


def new_file_mode() -> int:
    """The mode open() would give a new file (0666 less the umask); mkstemp's files are 0600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
