"""Load full-size SD 1.5 weights from safetensors, ours against Diffusers/Transformers, in the same run:
  --checkpoint unet         the Diffusers-layout UNet: ours `models.loading.load_component(folder, "unet")` against
                            `UNet2DConditionModel.from_pretrained`
  --checkpoint text-encoder the Diffusers-layout text encoder: ours `load_component(folder, "text_encoder")` against
                            Transformers' `CLIPTextModel.from_pretrained`
  --checkpoint single-file  the original LDM single file (text encoder, UNet, VAE): ours
                            `models.loading.load_single_file` against
                            `StableDiffusionPipeline.from_single_file(path, config=folder)`
Ours builds the networks on the meta device and assigns memory-mapped tensors; everything is float32 on the CPU.

Each load runs in a fresh subprocess, so its time and peak RSS (resource.getrusage ru_maxrss) are its own; the
random-weight files are written by other subprocesses, because Linux carries a parent's peak RSS over fork+exec
into the child's ru_maxrss (VmHWM in /proc/self/status, which exec resets, is printed as a cross-check).
`load` is the call returning the networks; `ready` adds reading every parameter once: ours maps the file and pages
weights in on first use, so `ready` is the fair comparison. The file is in the page cache (warm) in every run but
perhaps the first; RSS counts mapped file pages once they are touched.

    uv run python bench/bench_load.py                             # UNet; random SD 1.5 folder in a temp dir (~4 GB)
    uv run python bench/bench_load.py --model DIR                 # a Diffusers-layout folder; built there if empty
    uv run python bench/bench_load.py --checkpoint single-file    # + DIR/sd15-ldm.safetensors (~8 GB written)
    uv run --with accelerate python bench/bench_load.py           # Diffusers' low_cpu_mem_usage path
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

from bench_pipeline import proc_status_mb  # a line of /proc/self/status in MB (this folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
SINGLE_FILE = "sd15-ldm.safetensors"
CHECKPOINTS = {  # --checkpoint -> the file it reads, inside the folder
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "text-encoder": "text_encoder/model.safetensors",
    "single-file": SINGLE_FILE,
}


def loader_for(loader: str, checkpoint: str, folder: Path):
    """() -> list of networks, for one implementation and checkpoint kind (imports included in the caller's timing)."""
    path = folder / CHECKPOINTS[checkpoint]
    if loader == "ours":
        sys.path.insert(0, str(ROOT))
        from models.loading import load_component, load_single_file

        if checkpoint == "unet":
            return lambda: [load_component(folder, "unet")]
        if checkpoint == "text-encoder":
            return lambda: [load_component(folder, "text_encoder")]
        return lambda: list(load_single_file(path))  # SD 1.5 configs built in: no config folder needed

    if checkpoint == "text-encoder":
        from transformers import CLIPTextModel

        return lambda: [CLIPTextModel.from_pretrained(folder / "text_encoder")]
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import logging

    logging.disable_progress_bar()
    if checkpoint == "unet":
        return lambda: [UNet2DConditionModel.from_pretrained(folder / "unet")]

    def load():
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(folder), local_files_only=True, safety_checker=None, requires_safety_checker=False
        )
        return [pipe.text_encoder, pipe.unet, pipe.vae]

    return load


def child(loader: str, checkpoint: str, folder: Path) -> None:
    """Runs in a fresh interpreter: import, load, touch every parameter; print one JSON line."""
    t0 = time.perf_counter()
    import importlib.util

    import torch

    torch.set_num_threads(2)
    load = loader_for(loader, checkpoint, folder)
    if loader == "reference":
        loader = "Transformers" if checkpoint == "text-encoder" else "Diffusers"
        loader += " (with accelerate)" if importlib.util.find_spec("accelerate") else " (no accelerate)"
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
        vm_hwm_mb=proc_status_mb("VmHWM"),
        rss_anon_mb=proc_status_mb("RssAnon"),
        rss_file_mb=proc_status_mb("RssFile"),
    )
    print(json.dumps(result))


def build(checkpoint: str, folder: Path) -> None:
    """A random SD 1.5 folder (the test fixtures' builder); for single-file, its LDM file too (the tests' writer)."""
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
    from conftest import build_model_folder

    if not (folder / "unet" / "config.json").is_file():
        build_model_folder(folder, {}, {}, {})
    if checkpoint == "single-file":
        from test_single_file import ldm_state, write

        write(ldm_state(folder), folder / SINGLE_FILE)


def child_cmd(args: argparse.Namespace, role: str, folder: Path) -> list[str]:
    return [sys.executable, __file__, "--child", role, "--checkpoint", args.checkpoint, "--model", str(folder)]


def run_child(args: argparse.Namespace, loader: str, folder: Path) -> dict:
    out = subprocess.run(child_cmd(args, loader, folder), check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", choices=list(CHECKPOINTS), default="unet")
    parser.add_argument("--model", type=Path, help="Diffusers-layout folder (default: a new random-weight one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["ours", "reference", "build"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "build":
        return build(args.checkpoint, args.model)
    if args.child:
        return child(args.child, args.checkpoint, args.model)

    tmp = None
    folder = args.model
    if folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="sd15-random-")
        folder = Path(tmp.name)
    weights = folder / CHECKPOINTS[args.checkpoint]
    if not weights.is_file():
        print(f"writing random SD 1.5 weights in {folder} ...", flush=True)
        subprocess.run(child_cmd(args, "build", folder), check=True)
    weights_mb = weights.stat().st_size / 2**20
    print(f"weights: {weights} ({weights_mb:.0f} MB)")

    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for loader in ("ours", "reference"):  # alternate, so neither always runs first
            r = run_child(args, loader, folder)
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
    ((reference, theirs),) = summary.items()
    print(f"\nready time (median): ours {ours['ready_s']:.2f} s vs {reference} {theirs['ready_s']:.2f} s")
    for name, r in (("ours", ours), (reference, theirs)):
        print(
            f"{name} peak RSS: weights {r['peak_rss_mb'] - weights_mb:+.0f} MB; over the weights + its RSS after "
            f"imports {r['peak_rss_mb'] - weights_mb - r['rss_after_import_mb']:+.0f} MB"
        )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
