"""Load the full SD 1.5 UNet from safetensors: ours (meta-device build + assigned memory-mapped tensors) against
Diffusers' `UNet2DConditionModel.from_pretrained`, in the same run.

Each load runs in a fresh subprocess, so its time and its peak RSS (resource.getrusage ru_maxrss) are its own; the
random folder is built in another subprocess, because Linux carries a parent's peak RSS over fork+exec into the
child's ru_maxrss (VmHWM in /proc/self/status, which exec resets, is printed as a cross-check).
Two times per load: `load` (the call returns a model) and `ready` (load + reading every parameter once). Ours maps
the file and pages weights in on first use, so `ready` is the fair comparison. The file is in the page cache
(warm) in every run but the very first after boot; RSS counts the mapped file pages once they are touched.

    uv run python bench/bench_unet_load.py                # builds a random-weight SD 1.5 folder (~4 GB, temp dir)
    uv run python bench/bench_unet_load.py --model DIR    # a Diffusers-layout folder; built there if it has no unet/
    uv run --with accelerate python bench/bench_unet_load.py --model DIR   # Diffusers' low_cpu_mem_usage path
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
    if loader == "ours":
        sys.path.insert(0, str(ROOT))
        from models.unet import load_unet

        def load():
            return load_unet(folder)
    else:
        import importlib.util

        from diffusers import UNet2DConditionModel

        loader += " (with accelerate)" if importlib.util.find_spec("accelerate") else " (no accelerate)"

        def load():
            return UNet2DConditionModel.from_pretrained(folder / "unet")

    t1 = time.perf_counter()
    rss_imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model = load()
    t2 = time.perf_counter()
    with torch.no_grad():
        total = sum(float(p.sum()) for p in model.parameters())  # reads every weight
    t3 = time.perf_counter()
    n_params = sum(p.numel() for p in model.parameters())
    result = dict(
        loader=loader,
        import_s=t1 - t0,
        load_s=t2 - t1,
        ready_s=t3 - t1,
        params_m=n_params / 1e6,
        checksum=float(total),
        rss_after_import_mb=rss_imported,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        vm_hwm_mb=rss_mb("VmHWM"),
        rss_anon_mb=rss_mb("RssAnon"),
        rss_file_mb=rss_mb("RssFile"),
    )
    print(json.dumps(result))


def run_child(loader: str, folder: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", loader, "--model", str(folder)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="Diffusers-layout folder (default: a new random-weight one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["ours", "diffusers", "build"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "build":
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import build_model_folder  # the test fixtures' builder: official layout and names

        return build_model_folder(args.model, {}, {}, {})
    if args.child:
        return child(args.child, args.model)

    tmp = None
    folder = args.model
    if folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="sd15-random-")
        folder = Path(tmp.name)
    if not (folder / "unet" / "config.json").is_file():
        print(f"building a random-weight SD 1.5 folder in {folder} ...", flush=True)
        subprocess.run([sys.executable, __file__, "--child", "build", "--model", str(folder)], check=True)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights_mb = weights.stat().st_size / 2**20
    print(f"weights: {weights} ({weights_mb:.0f} MB)")

    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for loader in ("ours", "diffusers"):  # alternate, so neither always runs first
            r = run_child(loader, folder)
            runs.setdefault(r["loader"], []).append(r)
    assert len({r["checksum"] for rs in runs.values() for r in rs}) == 1, "the loaders disagree on weights"

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
        over_weights = r["peak_rss_mb"] - weights_mb
        over_imports = over_weights - r["rss_after_import_mb"]
        print(f"{name} peak RSS: weights {over_weights:+.0f} MB; weights + RSS after imports {over_imports:+.0f} MB")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
