"""Issue 28's goals in one run: the default CLI job (512x512, 30 Euler steps, CFG 7.5) as a whole process, ours against
a plain Diffusers script in bfloat16 and in float32, on the same random-weight SD 1.5 folder.

    uv run python bench/amx_goals.py                       # ~25 min on a quiet 2-vCPU AMX Xeon (see bench/README.md)
    uv run python bench/amx_goals.py --repeats 2 --ours-fp32 --steps 30

Every run is a fresh process started from here; its wall time (start to exit: imports, load, text, the loop, the decode,
the PNG) and peak RSS (wait4's ru_maxrss of that child; this driver imports no torch) are the figures. Inside each
child the UNet's forward and the VAE's decode are wrapped to time them (the same wrappers for both): s/step = (first
UNet call -> decode start) / steps, decode = the decode call. Rows run interleaved, one of each per round, and the
best of the rounds is kept (memory: the worst), with the load average before each run printed beside it.

Rows: ours = `python min_pipeline.py --prompt ... --seed 0` (the CLI with its defaults: --dtype auto picks bf16 on a
CPU with AMX, fp32 elsewhere), after one untimed first run that writes the converted bf16 copy of the weights
(models.loading.read_weights; its wall and peak are printed too); Diffusers bf16 / fp32 =
StableDiffusionPipeline.from_pretrained(torch_dtype=...), EulerDiscreteScheduler from its config, pipe(...).images[0]
saved as PNG; OpenVINO (--openvino PYTHON: a Python whose environment has optimum-intel[openvino], never this project's;
see bench/README.md) = the folder exported once with optimum-intel (untimed), then OVStableDiffusionPipeline reshaped to
a static 512x512 and compiled (it picks bf16 on an AMX CPU by itself), the same scheduler and call as Diffusers'.
Optional: ours --dtype float32 (--ours-fp32: what auto runs on a CPU without AMX) and ours --compile
(--compile: the compile is part of the job).

Goals (issue 28): ours whole process <= 0.45x Diffusers bf16 and <= 0.2x Diffusers fp32; s/step <= 0.45x Diffusers
bf16; decode <= 0.35x; peak RSS <= the bf16 weights + 1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photograph of an astronaut riding a horse on the moon"
NEGATIVE = "blurry, low quality"

CHILD = r"""
import json, sys, time
t_start = time.perf_counter()
c = json.loads(sys.argv[1])
impl, model, steps, out, log, dtype = c["impl"], c["model"], c["steps"], c["png"], c["log"], c["dtype"]
events = []
def wrap(obj, name):
    fn = getattr(obj, name)
    def timed(*a, **k):
        t0 = time.perf_counter(); r = fn(*a, **k); events.append((name, t0, time.perf_counter())); return r
    setattr(obj, name, timed)
if impl == "ours":
    sys.path.insert(0, c["root"])
    import min_pipeline
    from cli.main import main
    load = min_pipeline.load_pipeline
    def load_and_wrap(*a, **k):
        pipe = load(*a, **k); wrap(pipe.unet, "forward"); wrap(pipe.vae, "decode"); return pipe
    import cli.main
    cli.main.load_pipeline = load_and_wrap
    argv = ["--model", model, "--prompt", c["prompt"], "--negative-prompt", c["negative"], "--seed", "0",
            "--steps", str(steps), "--output", out, "--quiet"] + c["extra"]
    rc = main(argv)
    assert rc == 0, rc
elif impl == "openvino-export":
    from optimum.intel import OVStableDiffusionPipeline
    OVStableDiffusionPipeline.from_pretrained(model, export=True, compile=False).save_pretrained(out)
    sys.exit()
else:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    if impl == "openvino":  # the exported folder, reshaped to the job's static size and compiled, as its docs advise
        from optimum.intel import OVStableDiffusionPipeline
        pipe = OVStableDiffusionPipeline.from_pretrained(model, compile=False)
        pipe.reshape(batch_size=1, height=512, width=512, num_images_per_prompt=1)
        pipe.compile()
    else:
        pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=getattr(torch, dtype), safety_checker=None)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    wrap(pipe.unet, "forward"); wrap(pipe.vae, "decode")
    image = pipe(c["prompt"], negative_prompt=c["negative"], num_inference_steps=steps,
                 generator=torch.Generator().manual_seed(0)).images[0]
    image.save(out)
unet = [e for e in events if e[0] == "forward"]
decode = [e for e in events if e[0] == "decode"][-1]
json.dump(dict(step_s=(decode[1] - unet[0][1]) / steps, decode_s=decode[2] - decode[1], unet_calls=len(unet),
               inside_s=time.perf_counter() - t_start), open(log, "w"))
"""


def run(name: str, cmd: list[str], env: dict, timeout: float) -> dict:
    """One child: wall time from start to exit and its own peak RSS (os.wait4)."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = t0 + timeout
    while (done := os.wait4(proc.pid, os.WNOHANG))[0] == 0:
        if time.perf_counter() > deadline:
            proc.kill()
            sys.exit(f"{name} ran over {timeout:.0f} s; stopped")
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    _, status, usage = done
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stderr.read().decode()[-3000:]}")
    return dict(wall_s=wall, peak_mb=usage.ru_maxrss / 1024, user_s=usage.ru_utime, load=load)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("/tmp/minsd-bench-sd15"), help="Diffusers-layout SD 1.5 folder")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=1, help="rounds; best time, worst memory")
    p.add_argument("--ours-fp32", action="store_true", help="also ours with --dtype float32")
    p.add_argument("--compile", action="store_true", help="also ours with --compile (compile time included)")
    p.add_argument("--openvino", metavar="PYTHON", help="also OpenVINO, run by this Python (its own venv)")
    p.add_argument("--cache", type=Path, default=Path("/tmp/minsd-goals-cache"), help="MINSD_CACHE for our runs")
    p.add_argument("--out", type=Path, default=Path("/tmp/minsd-goals"))
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed to one run")
    args = p.parse_args()
    if not (args.model / "model_index.json").is_file():
        sys.exit(f"no model folder at {args.model}: build it with bench/bench_pipeline.py (it builds one) first")
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MINSD_CACHE": str(args.cache)}
    rows = {"ours (CLI default)": ("ours", "auto", [])}
    if args.ours_fp32:
        rows["ours --dtype float32"] = ("ours", "float32", ["--dtype", "float32"])
    if args.compile:
        rows["ours --compile"] = ("ours", "auto", ["--compile"])
    rows |= {"Diffusers bf16": ("diffusers", "bfloat16", []), "Diffusers fp32": ("diffusers", "float32", [])}
    if args.openvino:
        rows["OpenVINO"] = ("openvino", "auto", [])

    def png(name: str) -> Path:
        impl, dtype, extra = rows[name]
        return args.out / f"{impl}-{dtype}{'-compile' if '--compile' in extra else ''}.png"

    def command(name: str, log: Path) -> list[str]:
        impl, dtype, extra = rows[name]
        model = args.out / "openvino-model" if impl == "openvino" else args.model
        config = dict(impl=impl, model=str(model), steps=args.steps, png=str(png(name)), log=str(log), dtype=dtype,
                      extra=extra, root=str(ROOT), prompt=PROMPT, negative=NEGATIVE)  # fmt: skip
        return [args.openvino if impl == "openvino" else sys.executable, "-c", CHILD, json.dumps(config)]

    weights = sum(
        f.stat().st_size for c in ("unet", "text_encoder", "vae") for f in (args.model / c).glob("*.safetensors")
    )
    from bench_pipeline import cpu_description  # this folder is on sys.path when run as a script

    print(f"CPU: {cpu_description()}")
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()}; {args.model}: fp32 weights {weights / 2**20:.0f} MB, "
          f"bf16 {weights / 2**21:.0f} MB; 512x512, {args.steps} Euler steps, CFG 7.5", flush=True)  # fmt: skip
    import shutil

    shutil.rmtree(args.cache, ignore_errors=True)
    first = run("ours first run", command("ours (CLI default)", args.out / "first.json"), env, args.timeout)
    print(f"ours, first run (writes the bf16 copy to {args.cache}): {first['wall_s']:.1f} s, peak "
          f"{first['peak_mb']:.0f} MB, load {first['load']:.2f}", flush=True)  # fmt: skip
    if args.openvino:
        export = dict(impl="openvino-export", model=str(args.model), steps=0, png=str(args.out / "openvino-model"),
                      log="", dtype="")  # fmt: skip
        done = run("OpenVINO export", [args.openvino, "-c", CHILD, json.dumps(export)], env, args.timeout)
        print(f"OpenVINO export (once, untimed in the rows): {done['wall_s']:.1f} s, peak {done['peak_mb']:.0f} MB",
              flush=True)  # fmt: skip
    results: dict[str, list[dict]] = {name: [] for name in rows}
    for r in range(args.repeats):
        for name in rows:
            log = args.out / f"{name.replace(' ', '_')}-{r}.json"
            record = run(name, command(name, log), env, args.timeout)
            record |= json.loads(log.read_text())
            results[name].append(record)
            print(f"  round {r + 1} {name:<22} {record['wall_s']:7.1f} s  step {record['step_s']:.2f}  decode "
                  f"{record['decode_s']:.2f}  peak {record['peak_mb']:.0f} MB  load {record['load']:.2f}",
                  flush=True)  # fmt: skip
    keys = ("wall_s", "step_s", "decode_s", "peak_mb")
    best = {n: {k: (max if k == "peak_mb" else min)(r[k] for r in rs) for k in keys} for n, rs in results.items()}
    print(f"\nbest of {args.repeats} (peak: worst); load average before each run in brackets")
    print(f"{'':<24}{'process s':>10}{'s/step':>9}{'decode':>9}{'peak MB':>9}")
    for n, b in best.items():
        loads = [round(r["load"], 2) for r in results[n]]
        print(f"{n:<24}{b['wall_s']:>10.1f}{b['step_s']:>9.2f}{b['decode_s']:>9.2f}{b['peak_mb']:>9.0f}   {loads}")
    ours, bf, fp = best["ours (CLI default)"], best["Diffusers bf16"], best["Diffusers fp32"]
    bf16_weights_mb = weights / 2**21
    goals = [
        ("whole process vs Diffusers bf16", ours["wall_s"] / bf["wall_s"], 0.45),
        ("whole process vs Diffusers fp32", ours["wall_s"] / fp["wall_s"], 0.20),
        ("s/step vs Diffusers bf16", ours["step_s"] / bf["step_s"], 0.45),
        ("decode vs Diffusers bf16", ours["decode_s"] / bf["decode_s"], 0.35),
        ("peak RSS vs bf16 weights + 1 GB", ours["peak_mb"] / (bf16_weights_mb + 1024), 1.0),
    ]
    print("\nissue 28 goals (ours = the CLI default)")
    for what, ratio, goal in goals:
        print(f"  {what:<34} {ratio:5.2f}  (goal <= {goal:.2f})  {'met' if ratio <= goal else 'NOT met'}")
    if args.openvino:
        ov = best["OpenVINO"]
        print("ours / OpenVINO (the anchor: at its speed or better = <= 1.00): " + ", ".join(
            f"{k} {ours[k] / ov[k]:.2f}" for k in ("wall_s", "step_s", "decode_s", "peak_mb")))  # fmt: skip
        print(
            "OpenVINO / Diffusers bf16: "
            + ", ".join(f"{k} {ov[k] / bf[k]:.2f}" for k in ("wall_s", "step_s", "decode_s"))
        )
    import numpy as np
    from PIL import Image

    pngs = {n: np.asarray(Image.open(png(n)), np.int16) for n in rows}
    bf16_ref = pngs["Diffusers bf16"]
    print("max |8-bit difference| to Diffusers bf16's image: " + ", ".join(
        f"{n} {int(np.abs(img - bf16_ref).max())}" for n, img in pngs.items() if n != "Diffusers bf16"))  # fmt: skip
    (args.out / "goals.json").write_text(json.dumps(dict(first=first, results=results, best=best), indent=1))
    print(f"\nwrote {args.out / 'goals.json'}; PNGs in {args.out}")


if __name__ == "__main__":
    main()
