"""bench/gpu.sh's dry run on the CPU (`--cpu --tiny`): the prepared GPU session runs end to end here, so that the
one call on a lent GPU does not fail on a typo. It writes its markdown report with the parity and speed rows."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_bench_dry_run_on_the_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    run = subprocess.run(["bash", "bench/gpu.sh", "--cpu", "--tiny"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = (tmp_path / "gpu_bench.md").read_text()
    for row in ("parity", "ours eager", "ours fast path", "Diffusers eager"):
        assert row.lower() in report.lower(), f"no {row!r} in the report:\n{report[:3000]}"
