"""Load a full-size SD 1.5 single-file (LDM layout) checkpoint: ours (`models.ldm.load_single_file`: meta-device
build, assigned memory-mapped tensors) against Diffusers' `StableDiffusionPipeline.from_single_file(path,
config=folder)`, in the same run. Both load the text encoder, UNet and VAE in float32 on the CPU.

Each load runs in a fresh subprocess, so its time and peak RSS (resource.getrusage ru_maxrss) are its own; the
random-weight folder and the single file are written by other subprocesses, because Linux carries a parent's peak
RSS over fork+exec into the child's ru_maxrss (VmHWM, which exec resets, is printed as a cross-check).
`load` is the call returning the networks; `ready` adds reading every parameter once: ours maps the file and pages
weights in on first use, so `ready` is the fair comparison. The file is in the page cache (warm) in every run but
perhaps the first; RSS counts mapped file pages once they are touched.

    uv run python bench/bench_single_file.py                 # random SD 1.5 weights in a temp dir (~8 GB written)
    uv run python bench/bench_single_file.py --model DIR     # DIR/sd15-ldm.safetensors (+ DIR as Diffusers config)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILE_NAME = "sd15-ldm.safetensors"


def rss_mb(field: str) -> float:
    """A line of /proc/self/status (VmHWM, RssAnon, RssFile) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(loader: str, folder: Path) -> None:
    """Runs in a fresh interpreter: import, load, touch every parameter; print one JSON line."""
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(2)
    path = folder / FILE_NAME
    if loader == "ours":
        sys.path.insert(0, str(ROOT))
        from models.ldm import load_single_file

        def load():
            return load_single_file(path)  # SD 1.5 configs built in: no config folder needed
    else:
        import importlib.util

        from diffusers import StableDiffusionPipeline
        from diffusers.utils import logging

        logging.disable_progress_bar()
        loader += " (with accelerate)" if importlib.util.find_spec("accelerate") else " (no accelerate)"

        def load():
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), config=str(folder), local_files_only=True, safety_checker=None, requires_safety_checker=False
            )
            return pipe.text_encoder, pipe.unet, pipe.vae

    t1 = time.perf_counter()
    rss_imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    models = load()
    t2 = time.perf_counter()
    params = [p for m in models for p in m.parameters()]
    with torch.no_grad():
        total = sum(float(p.sum(dtype=torch.float64)) for p in params)  # reads every weight
    t3 = time.perf_counter()
    result = dict(
        loader=loader,
        import_s=t1 - t0,
        load_s=t2 - t1,
        ready_s=t3 - t1,
        params_m=sum(p.numel() for p in params) / 1e6,
        checksum=round(total, 3),
        rss_after_import_mb=rss_imported,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        vm_hwm_mb=rss_mb("VmHWM"),
        rss_anon_mb=rss_mb("RssAnon"),
        rss_file_mb=rss_mb("RssFile"),
    )
    print(json.dumps(result))


def build(folder: Path) -> None:
    """A random-weight SD 1.5 folder (the test fixtures' builder) and its LDM single file (the tests' writer)."""
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
    from test_single_file import ldm_state, write

    from conftest import build_model_folder

    if not (folder / "unet" / "config.json").is_file():
        build_model_folder(folder, {}, {}, {})
    write(ldm_state(folder), folder / FILE_NAME)


def run_child(loader: str, folder: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", loader, "--model", str(folder)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help=f"Diffusers-layout folder holding {FILE_NAME} (default: built)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["ours", "diffusers", "build"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "build":
        return build(args.model)
    if args.child:
        return child(args.child, args.model)

    tmp = None
    folder = args.model
    if folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="sd15-single-file-")
        folder = Path(tmp.name)
    if not (folder / FILE_NAME).is_file():
        print(f"writing a random-weight SD 1.5 folder and {FILE_NAME} in {folder} ...", flush=True)
        subprocess.run([sys.executable, __file__, "--child", "build", "--model", str(folder)], check=True)
    weights_mb = (folder / FILE_NAME).stat().st_size / 2**20
    print(f"weights: {folder / FILE_NAME} ({weights_mb:.0f} MB)")

    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for loader in ("ours", "diffusers"):  # alternate, so neither always runs first
            r = run_child(loader, folder)
            runs.setdefault(r["loader"], []).append(r)
    checksums = {r["checksum"] for rs in runs.values() for r in rs}
    assert len(checksums) == 1, f"the loaders disagree on the weights: {checksums}"

    print(f"\n{args.repeats} fresh processes each, warm page cache; times in s (median, min), memory in MB (median)")
    times = ("import_s", "load_s", "ready_s")
    mems = ("rss_after_import_mb", "peak_rss_mb", "vm_hwm_mb", "rss_anon_mb", "rss_file_mb")
    header = ("import", "load", "ready", "RSS@import", "peak RSS", "VmHWM", "RssAnon", "RssFile")
    print(f"{'loader':<26}" + "".join(f"{h:>12}" for h in header))
    summary = {}
    for loader, rs in runs.items():
        summary[loader] = {k: statistics.median(r[k] for r in rs) for k in times + mems}
        row = [f"{summary[loader][k]:.2f},{min(r[k] for r in rs):.2f}" for k in times]
        row += [f"{summary[loader][k]:.0f}" for k in mems]
        print(f"{loader:<26}" + "".join(f"{v:>12}" for v in row))

    ours = summary.pop("ours")
    (theirs,) = summary.values()
    print(f"\nready time (median): ours {ours['ready_s']:.2f} s vs Diffusers {theirs['ready_s']:.2f} s")
    for name, r in (("ours", ours), ("Diffusers", theirs)):
        print(
            f"{name} peak RSS: weights {r['peak_rss_mb'] - weights_mb:+.0f} MB; over the weights + its RSS after "
            f"imports {r['peak_rss_mb'] - weights_mb - r['rss_after_import_mb']:+.0f} MB"
        )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
