# ruff: noqa: E402, E731, B905  (a measuring script: imports after the thread setting, short lambdas)
"""AMX/bf16 experiments on minsd's models, each candidate called once per round in one process (ratios that hold on
a machine shared with other jobs; bench/README.md, "Intel Xeon with AMX"). Folder: MINSD_BENCH_MODEL (default
/tmp/minsd-bench-sd15, built by bench_pipeline.py). ROUNDS=N.
Interleaved in one process (robust ratios on a loaded machine): one call of each candidate per round.
  python exp_pair.py unet  -> ours bf16 NCHW, ours bf16 channels_last, Diffusers bf16 (CFG batch 2, 64x64 latents)
  python exp_pair.py vae   -> decode 1x4x64x64: ours fp32/bf16/bf16+CL, Diffusers fp32/bf16
  python exp_pair.py compile [cl] [cpp] -> ours bf16 eager vs torch.compile(inductor, freezing) (+ compile time)
  python exp_pair.py fpmath -> ours fp32 eager vs fp32 with oneDNN fp32_precision='bf16' vs ours bf16"""

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch

torch.set_num_threads(2)
try:
    from resources import tune_malloc
except ImportError:  # before the resources.py split
    from resources import tune_malloc
from models.loading import load_component

tune_malloc()
FOLDER = Path(os.environ.get("MINSD_BENCH_MODEL", "/tmp/minsd-bench-sd15"))
what = sys.argv[1]
opts = set(sys.argv[2:])
R = int(os.environ.get("ROUNDS", "4"))
g = torch.Generator().manual_seed(1)
bf = torch.bfloat16
log = dict(what=what, opts=sorted(opts), load_start=os.getloadavg())


def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024


def run_rounds(cands, rounds=R):
    times = {k: [] for k in cands}
    outs = {}
    with torch.inference_mode():
        for k, f in cands.items():  # warm-up call each
            t0 = time.perf_counter()
            outs[k] = f()
            log.setdefault("first_call_s", {})[k] = time.perf_counter() - t0
        cpu = {k: [] for k in cands}
        for _ in range(rounds):
            for k, f in cands.items():
                c0 = time.process_time()
                t0 = time.perf_counter()
                outs[k] = f()
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
        log["cpu_median_s"] = {k: statistics.median(v) for k, v in cpu.items()}
    names = list(cands)
    log["median_s"] = {k: statistics.median(v) for k, v in times.items()}
    log["min_s"] = {k: min(v) for k, v in times.items()}
    log["times"] = times
    ref = names[0]
    log["ratio_per_round_median_vs_" + ref] = {
        k: statistics.median(a / b for a, b in zip(times[k], times[ref])) for k in names[1:]
    }
    return outs


if what == "unet":
    from diffusers import UNet2DConditionModel

    ours = load_component(FOLDER, "unet", bf, "cpu")
    ours_cl = load_component(FOLDER, "unet", bf, "cpu").to(memory_format=torch.channels_last)
    diff = UNet2DConditionModel.from_pretrained(FOLDER / "unet", torch_dtype=bf).eval()
    x = torch.randn(2, 4, 64, 64, generator=g).to(bf)
    ctx = torch.randn(2, 77, 768, generator=g).to(bf)
    t = torch.tensor(500.0)
    xcl = x.contiguous(memory_format=torch.channels_last)
    outs = run_rounds(
        {
            "diffusers_bf16": lambda: diff(x, t, encoder_hidden_states=ctx).sample,
            "ours_bf16": lambda: ours(x, t, ctx),
            "ours_bf16_cl": lambda: ours_cl(xcl, t, ctx),
        }
    )
    r = outs["diffusers_bf16"].float()
    for k in ("ours_bf16", "ours_bf16_cl"):
        log[f"{k}_rel_err_vs_diffusers_bf16"] = float((outs[k].float() - r).norm() / r.norm())
elif what == "vae":
    from diffusers import AutoencoderKL

    o32 = load_component(FOLDER, "vae", torch.float32, "cpu")
    o16 = load_component(FOLDER, "vae", bf, "cpu")
    ocl = load_component(FOLDER, "vae", bf, "cpu").to(memory_format=torch.channels_last)
    d32 = AutoencoderKL.from_pretrained(FOLDER / "vae").eval()
    d16 = AutoencoderKL.from_pretrained(FOLDER / "vae", torch_dtype=bf).eval()
    z = torch.randn(1, 4, 64, 64, generator=g) / 0.18215
    zb = z.to(bf)
    zcl = zb.contiguous(memory_format=torch.channels_last)
    outs = run_rounds(
        {
            "diffusers_bf16": lambda: d16.decode(zb).sample,
            "ours_bf16": lambda: o16.decode(zb),
            "ours_bf16_cl": lambda: ocl.decode(zcl),
            "ours_fp32": lambda: o32.decode(z),
            "diffusers_fp32": lambda: d32.decode(z).sample,
        },
        rounds=int(os.environ.get("ROUNDS", "3")),
    )
    ref = outs["ours_fp32"].float()
    u8 = lambda p: ((p.float() / 2 + 0.5).clamp(0, 1) * 255).round()
    for k, v in outs.items():
        log[f"{k}_finite"] = bool(torch.isfinite(v).all())
        log[f"{k}_u8_vs_ours_fp32_max_mean"] = [
            float((u8(v) - u8(ref)).abs().max()),
            float((u8(v) - u8(ref)).abs().mean()),
        ]
elif what == "compile":
    import torch._inductor.config as ic

    ic.freezing = True
    if "cpp" in opts:
        ic.cpp_wrapper = True
    if "autotune" in opts:
        ic.max_autotune = True
    ours = load_component(FOLDER, "unet", bf, "cpu")
    x = torch.randn(2, 4, 64, 64, generator=g).to(bf)
    ctx = torch.randn(2, 77, 768, generator=g).to(bf)
    if "cl" in opts:
        ours.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.tensor(500.0)
    comp = torch.compile(ours, dynamic=False)
    with torch.inference_mode():
        c0 = time.process_time()
        t0 = time.perf_counter()
        comp(x, t, ctx)
        log["compile_s"] = time.perf_counter() - t0
        log["compile_cpu_s_main_process"] = time.process_time() - c0
    log["hwm_after_compile_mb"] = hwm()
    outs = run_rounds({"eager": lambda: ours(x, t, ctx), "compiled": lambda: comp(x, t, ctx)})
    r = outs["eager"].float()
    log["compiled_rel_err_vs_eager"] = float((outs["compiled"].float() - r).norm() / r.norm())
    log["hwm_mb"] = hwm()
elif what == "fpmath":
    o32 = load_component(FOLDER, "unet", torch.float32, "cpu")
    o16 = load_component(FOLDER, "unet", bf, "cpu")
    x = torch.randn(2, 4, 64, 64, generator=g)
    ctx = torch.randn(2, 77, 768, generator=g)
    t = torch.tensor(500.0)

    def fp32_bf16math():
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        torch.backends.mkldnn.conv.fp32_precision = "bf16"
        try:
            return o32(x, t, ctx)
        finally:
            torch.backends.mkldnn.matmul.fp32_precision = "ieee"
            torch.backends.mkldnn.conv.fp32_precision = "ieee"

    outs = run_rounds(
        {
            "ours_fp32": lambda: o32(x, t, ctx),
            "ours_fp32_fpmath_bf16": fp32_bf16math,
            "ours_bf16": lambda: o16(x.to(bf), t, ctx.to(bf)),
        },
        rounds=int(os.environ.get("ROUNDS", "2")),
    )
    r = outs["ours_fp32"].float()
    for k in ("ours_fp32_fpmath_bf16", "ours_bf16"):
        log[f"{k}_rel_err_vs_fp32"] = float((outs[k].float() - r).norm() / r.norm())
log["load_end"] = os.getloadavg()
log.setdefault("hwm_mb", hwm())
print(json.dumps(log))
