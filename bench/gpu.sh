#!/usr/bin/env bash
# GPU bench (bench/gpu_bench.py): parity and speed of ours against Diffusers 0.42 on a lent GPU machine.
#
#   bash bench/gpu.sh [gpu_bench.py options]   # on the GPU machine: installs .whl/*.whl, runs python3, report in $OUT
#   bash bench/gpu.sh --cpu --tiny             # dry run on a CPU machine through `uv run` (no wheels), ~2 minutes
#
# The GPU image has torch, transformers, huggingface_hub, safetensors, regex, requests, filelock, pillow, tqdm and
# numpy, but not diffusers or ftfy, and it cannot download anything. Fill .whl/ (ignored by git) once here, with
# the versions of uv.lock (pure-Python wheels, and wcwidth's abi3 x86-64 one; about 7 MB):
#   python3 -m pip download --no-deps --only-binary=:all: --dest .whl diffusers==0.42.1 ftfy==6.3.1 wcwidth==0.9.4
# and name ".whl" in the device tool's `carry` (bench/README.md, "GPU bench").
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-bench/results}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"

if [[ " $* " == *" --cpu "* ]]; then  # the project's own environment has diffusers already
    exec uv run python bench/gpu_bench.py --out "$OUT" "$@"
fi

ls .whl/*.whl >/dev/null || { echo "no wheels in .whl/: see the top of bench/gpu.sh" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.txt" || true
python3 bench/gpu_bench.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_bench.log"
