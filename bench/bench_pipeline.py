"""End-to-end text-to-image on the CPU: ours (min_pipeline) against Diffusers' StableDiffusionPipeline, same folder,
same settings (full-size SD 1.5 random weights, 256x256, Euler, 4 steps, CFG 7.5, fp32, 2 threads by default).

    uv run python bench/bench_pipeline.py                        # builds/reuses /tmp/minsd-bench-sd15 (~4 GB)
    uv run python bench/bench_pipeline.py --model DIR            # a Diffusers-layout folder (built there if empty)
    uv run python bench/bench_pipeline.py --malloc-tuned         # also both again with glibc malloc env tuning
    uv run python bench/bench_pipeline.py --only ours --variants base,mallopt,mallopt+channels_last   # ours only
    uv run python bench/bench_pipeline.py --size 512 --steps 3 \
        --variants base,mallopt,mallopt+bf16,mallopt+bf16+channels_last --diffusers-variants base,bf16
        # one run: ours fp32 / bf16 / bf16+channels_last against Diffusers fp32 and bf16 (torch_dtype=bfloat16)
    uv run python bench/bench_pipeline.py --size 512 --steps 3 --variants mallopt+auto,mallopt \
        --diffusers-variants base,bf16 --openvino /tmp/ov/bin/python
        # issue 28's rows: ours auto (the CLI's default) and fp32, Diffusers fp32 and bf16, OpenVINO (its own venv)

Every run is a fresh interpreter (subprocess), so load time and peak memory are its own. Peak memory is VmHWM from
/proc/self/status (exec resets it); ru_maxrss is recorded too but Linux carries the parent's over fork+exec, which
is why the folder is built in a subprocess of its own and this driver never imports torch.

In each child: load; one untimed warm-up generate at 1 step (it pages in memory-mapped weights, primes oneDNN and
the allocator; its time is reported as `warm-up`); then the timed generate. Pieces are timed by wrapping, on the
instances, the text encoder's `forward`, the UNet's `forward` and the VAE's `decode` (the same wrappers for both
implementations, nothing else patched):
  text    = text-encoder forward calls (prompt + negative prompt; tokenization excluded)
  loop    = first UNet call start -> VAE decode start (UNet + CFG + sampler step + per-step overhead); step = loop/steps
  unet    = sum of the UNet forward calls / steps (so loop - unet is the per-step framework/sampler overhead)
  decode  = the VAE decode call
  e2e     = the whole generate / pipe() call (load excluded)
Then `bare unet`: the UNet alone at batch 2 (the CFG batch), 3 calls, the fastest reported.
User/sys CPU seconds and minor page faults are getrusage deltas over the timed generate.
With --repeats N every configuration runs N times (alternating); times are the best of N, memory the worst.
Diffusers runs once per --diffusers-variants entry: base (--dtype) or bf16 (torch_dtype=torch.bfloat16); mallopt
may be added there too, to compare allocators alike.
The output starts with the CPU (model name, the flags that decide fp32/bf16 speed, torch's CPU capability) and
every row carries the 1-minute load average before each of its runs: the figures of a loaded machine are marked so.
Switches (ours): mallopt (min_pipeline.tune_malloc, which the CLI calls on the CPU), channels_last (the UNet;
_all: the VAE too), bf16 (PyTorch's bf16 conv and matmul are ~100x slower than fp32 on AVX2-only CPUs and were
still 1.2-1.5x slower with AVX-512 BF16 but no AMX: see bench/README.md).
--openvino PYTHON adds OpenVINO (optimum-intel's OVStableDiffusionPipeline on the folder exported once, reshaped to the
static size and compiled; it picks bf16 on an AMX CPU by itself), run by a Python of its own venv, timed by the same
wrappers; the default job as whole processes, with the same anchor: bench/amx_goals.py --openvino PYTHON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FOLDER = Path("/tmp/minsd-bench-sd15")
PROMPT = "a photograph of an astronaut riding a horse on the moon"
NEGATIVE = "blurry, low quality"
MALLOC_ENV = {  # glibc tunables: keep freed activation buffers in the heap instead of unmapping them per op
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    "MALLOC_TOP_PAD_": "1073741824",
}
SWITCHES = ("mallopt", "channels_last", "channels_last_all", "bf16", "auto")  # joined by "+": mallopt+channels_last
# auto: load_pipeline's dtype=None (what the CLI's default --dtype auto runs: bf16 on an AMX CPU, else fp32)
DIFFUSERS_SWITCHES = ("mallopt", "bf16")  # Diffusers' own dtype switch (torch_dtype) and the same allocator tuning
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_info() -> dict:
    """Model name, family/model numbers and the vector extensions that decide fp32/bf16 speed (from /proc/cpuinfo),
    and what the installed torch makes of them (asked in a child: this driver never imports torch)."""
    info: dict = {"model": platform.machine(), "flags": []}
    keys = {"model name": "model", "cpu family": "family", "model": "model_number", "stepping": "stepping"}
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        key, _, value = line.partition(":")
        if key.strip() in keys:
            info[keys[key.strip()]] = value.strip()
        elif key.strip() == "flags":
            info["flags"] = [f for f in CPU_FLAGS if f in value.split()]
            break
    probe = (
        "import json, torch; print(json.dumps(dict(torch=torch.__version__, "
        "capability=torch.backends.cpu.get_cpu_capability(), mkldnn=torch.backends.mkldnn.is_available())))"
    )
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        info.update(json.loads(out.stdout.strip().splitlines()[-1]))
    except Exception as e:  # noqa: BLE001 - informational only
        info["torch"] = f"unknown ({e})"
    return info


def cpu_description(info: dict | None = None) -> str:
    info = info or cpu_info()
    flags = ", ".join(info["flags"]) or "no AVX2"
    where = f"family {info.get('family')} model {info.get('model_number')}" if "family" in info else ""
    torch_part = f"; torch {info['torch']}, CPU capability {info.get('capability')}" if "torch" in info else ""
    return f"{info['model']} ({where}; {flags}){torch_part}"


# ----------------------------------------------------------------------------- child: one implementation, one run


class Timers:
    """Wall-clock (start, end) events of wrapped callables, and the process CPU seconds of each (all threads: on a
    machine shared with other jobs the CPU seconds stay near their unloaded value while wall times stretch)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float, float]] = []
        self.cpu: list[tuple[str, float]] = []

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            c0, t0 = time.process_time(), time.perf_counter()
            out = fn(*args, **kwargs)
            self.events.append((name, t0, time.perf_counter()))
            self.cpu.append((name, time.process_time() - c0))
            return out

        return timed

    def cpu_of(self, name: str) -> float:
        return sum(c for n, c in self.cpu if n == name)

    def of(self, name: str) -> list[tuple[float, float]]:
        return [(a, b) for n, a, b in self.events if n == name]


def child(impl: str, variant: str, args: argparse.Namespace) -> None:
    parts = set(variant.split("+"))
    t_start = time.perf_counter()
    import numpy as np
    import torch

    # After the imports, before loading: where min_pipeline.main() calls it.
    if "mallopt" in parts:
        sys.path.insert(0, str(ROOT))
        from resources import tune_malloc

        tune_malloc()

    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" or "bf16" in parts else torch.float32
    folder = str(args.model)
    timers = Timers()
    t_imported = time.perf_counter()

    if impl == "ours":
        sys.path.insert(0, str(ROOT))
        import min_pipeline

        pipe = min_pipeline.load_pipeline(folder, "cpu", None if "auto" in parts else dtype)
        unet, vae, text_encoder, dtype = pipe.unet, pipe.vae, pipe.text_encoder, pipe.dtype

        def run(steps: int):
            return min_pipeline.generate(
                pipe,
                PROMPT,
                NEGATIVE,
                scheduler="euler",
                steps=steps,
                guidance_scale=args.cfg,
                height=args.size,
                width=args.size,
                seed=0,
                output_type="np",
                progress=False,
                vae_tiling=args.vae_tiling,
            )

        def bare(x, t, ctx):
            return unet(x, t, ctx)
    else:
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

        if impl == "openvino":  # optimum-intel's pipeline on the exported folder, static shapes, compiled once
            from optimum.intel import OVStableDiffusionPipeline

            pipe = OVStableDiffusionPipeline.from_pretrained(args.openvino_model, compile=False)
            pipe.reshape(batch_size=1, height=args.size, width=args.size, num_images_per_prompt=1)
            pipe.compile()
            precision = pipe.unet.request.get_property("INFERENCE_PRECISION_HINT")  # what it chose for this CPU
        else:
            pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        if args.vae_tiling:
            pipe.vae.enable_tiling()
        unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder

        def run(steps: int):
            return pipe(
                PROMPT,
                negative_prompt=NEGATIVE,
                num_inference_steps=steps,
                guidance_scale=args.cfg,
                height=args.size,
                width=args.size,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            ).images

        def bare(x, t, ctx):
            if impl == "openvino":
                return unet(sample=x, timestep=t.reshape(1), encoder_hidden_states=ctx)
            return unet(x, t, encoder_hidden_states=ctx).sample

    t_loaded = time.perf_counter()

    if "channels_last" in parts or "channels_last_all" in parts:
        unet.to(memory_format=torch.channels_last)
    if "channels_last_all" in parts:
        vae.to(memory_format=torch.channels_last)

    text_encoder.forward = timers.wrap("text", text_encoder.forward)
    unet.forward = timers.wrap("unet", unet.forward)
    vae.decode = timers.wrap("decode", vae.decode)

    t0 = time.perf_counter()
    if not args.quick:
        run(1)  # warm-up, untimed in the figures below
    warmup_s = time.perf_counter() - t0
    rss_after_warmup = proc_status_mb("VmRSS")

    timers.events.clear()
    timers.cpu.clear()
    ru0, load0 = resource.getrusage(resource.RUSAGE_SELF), os.getloadavg()[0]
    t0 = time.perf_counter()
    images = run(args.steps)
    t1 = time.perf_counter()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    unet_calls, (decode_call,) = timers.of("unet"), timers.of("decode")
    assert len(unet_calls) == args.steps, f"{len(unet_calls)} UNet calls for {args.steps} steps"
    loop_s = decode_call[0] - unet_calls[0][0]

    # The UNet alone on the CFG batch: framework overhead = step - bare unet.
    gen = torch.Generator().manual_seed(1)
    latent = args.size // 8
    x = torch.randn(2, 4, latent, latent, generator=gen).to(dtype)
    width = getattr(getattr(text_encoder, "config", None), "hidden_size", 768)
    ctx = torch.randn(2, 77, width, generator=gen).to(dtype if impl != "openvino" else torch.float32)
    x = x if impl != "openvino" else x.float()
    bare_times = []
    with torch.inference_mode():
        for _ in range(0 if args.quick else 3):
            b0 = time.perf_counter()
            bare(x, torch.tensor(500.0), ctx)
            bare_times.append(time.perf_counter() - b0)

    out_dir = Path(args.images_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_path = out_dir / f"{impl}-{variant}-{args.dtype}-{os.getpid()}.npy"
    np.save(image_path, np.asarray(images, dtype=np.float32))
    result = dict(
        impl=impl,
        variant=variant,
        dtype=str(dtype).removeprefix("torch.") if impl != "openvino" else f"OpenVINO {precision}",
        threads=torch.get_num_threads(),
        malloc_env={k: os.environ[k] for k in MALLOC_ENV if k in os.environ},
        import_s=t_imported - t_start,
        load_s=t_loaded - t_imported,
        warmup_s=warmup_s,
        text_s=sum(b - a for a, b in timers.of("text")),
        pre_loop_s=unet_calls[0][0] - t0,
        loop_s=loop_s,
        step_s=loop_s / args.steps,
        unet_s=sum(b - a for a, b in unet_calls) / args.steps,
        decode_s=decode_call[1] - decode_call[0],
        unet_cpu_s=timers.cpu_of("unet") / args.steps,  # CPU seconds (all threads) per UNet call
        decode_cpu_s=timers.cpu_of("decode"),
        post_s=t1 - decode_call[1],
        e2e_s=t1 - t0,
        bare_unet_s=min(bare_times, default=float("nan")),
        bare_unet_all=bare_times,
        unet_calls=[b - a for a, b in unet_calls],
        text_calls_s=[b - a for a, b in timers.of("text")],
        user_s=ru1.ru_utime - ru0.ru_utime,
        sys_s=ru1.ru_stime - ru0.ru_stime,
        minflt=ru1.ru_minflt - ru0.ru_minflt,
        vm_hwm_mb=proc_status_mb("VmHWM"),
        ru_maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        rss_after_warmup_mb=rss_after_warmup,
        rss_anon_mb=proc_status_mb("RssAnon"),  # at the end: private memory
        rss_file_mb=proc_status_mb("RssFile"),  # at the end: mapped file pages (our memory-mapped weights)
        loadavg_before=load0,
        loadavg_after=os.getloadavg()[0],
        image=str(image_path),
    )
    print(json.dumps(result))


# ----------------------------------------------------------------------------- driver


def run_child(impl: str, variant: str, malloc_env: bool, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    for k in MALLOC_ENV:
        env.pop(k, None)
    if malloc_env:
        env.update(MALLOC_ENV)
    cmd = [
        args.openvino if impl == "openvino" else sys.executable,
        __file__,
        "--child",
        impl,
        "--variant",
        variant,
        "--model",
        str(args.model),
        "--threads",
        str(args.threads),
        "--dtype",
        args.dtype,
        "--size",
        str(args.size),
        "--steps",
        str(args.steps),
        "--cfg",
        str(args.cfg),
        "--images-dir",
        str(args.images_dir),
        *(["--quick"] if args.quick else []),
        *(["--vae-tiling"] if args.vae_tiling else []),
        *(["--openvino-model", str(args.openvino_model)] if impl == "openvino" else []),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        sys.exit(f"{impl}/{variant} took over {args.child_timeout} s (--child-timeout); stopped")
    if proc.returncode != 0:
        sys.exit(f"{impl}/{variant} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


COLUMNS = (  # key, header, format
    ("load_s", "load", "{:.2f}"),
    ("warmup_s", "warm-up", "{:.2f}"),
    ("text_s", "text", "{:.3f}"),
    ("step_s", "s/step", "{:.2f}"),
    ("unet_s", "unet/step", "{:.2f}"),
    ("bare_unet_s", "bare unet", "{:.2f}"),
    ("decode_s", "decode", "{:.2f}"),
    ("e2e_s", "e2e", "{:.2f}"),
    ("unet_cpu_s", "unet cpu", "{:.1f}"),
    ("decode_cpu_s", "dec. cpu", "{:.1f}"),
    ("user_s", "user", "{:.1f}"),
    ("sys_s", "sys", "{:.1f}"),
    ("minflt", "minflt", "{:.0f}"),
    ("vm_hwm_mb", "peak MB", "{:.0f}"),
)
HIGHER_IS_WORSE_MEMORY = {"vm_hwm_mb", "ru_maxrss_mb", "minflt"}


def summarize(runs: list[dict]) -> dict:
    """Best of the repeats for times, worst for memory and faults."""
    out = dict(runs[0])
    for key, _, _ in COLUMNS + (
        ("ru_maxrss_mb", "", ""),
        ("import_s", "", ""),
        ("loop_s", "", ""),
        ("pre_loop_s", "", ""),
        ("post_s", "", ""),
    ):
        values = [r.get(key, float("nan")) for r in runs]  # nan: a column older partial files lack
        out[key] = max(values) if key in HIGHER_IS_WORSE_MEMORY else min(values)
    out["loadavg"] = [round(r["loadavg_before"], 2) for r in runs]
    out["runs"] = runs
    return out


def print_table(title: str, rows: list[tuple[str, dict]], ratio_of: tuple[str, str] | None = None) -> None:
    print(f"\n{title}")
    print(f"{'':<44}" + "".join(f"{h:>10}" for _, h, _ in COLUMNS) + "   load avg before each run")
    for name, r in rows:
        cells = "".join(f"{fmt.format(r[k]):>10}" for k, _, fmt in COLUMNS)
        print(f"{name:<44}{cells}   {r['loadavg']}")
    if ratio_of:
        a, b = (dict(rows)[n] for n in ratio_of)
        cells = "".join(f"{a[k] / b[k]:>10.2f}" if b[k] else f"{'':>10}" for k, _, _ in COLUMNS)
        print(f"{'ratio ours/diffusers':<44}{cells}")


RATIO_KEYS = (
    ("step_s", "s/step"),
    ("unet_cpu_s", "unet cpu"),
    ("decode_cpu_s", "dec. cpu"),
    ("bare_unet_s", "bare unet"),
    ("decode_s", "decode"),
    ("e2e_s", "e2e"),
    ("vm_hwm_mb", "peak MB"),
)


def print_ratios(summary: dict, name) -> None:
    """Every row against each Diffusers row (same run, interleaved repeats), and its image against Diffusers' of
    the same dtype."""
    refs = [(c, s) for c, s in summary.items() if c[0] == "diffusers"]
    if not refs:
        return
    import numpy as np

    for rc, rs in refs:
        print(f"\nratio to {name(rc)} ({rs['dtype']})")
        print(f"{'':<44}" + "".join(f"{h:>10}" for _, h in RATIO_KEYS) + "   max|img diff|")
        ref_image = np.load(rs["image"])
        for c, s in summary.items():
            if c == rc:
                continue
            cells = "".join(f"{s[k] / rs[k]:>10.2f}" if rs[k] else f"{'':>10}" for k, _ in RATIO_KEYS)
            diff = float(np.abs(np.load(s["image"]) - ref_image).max())
            print(f"{name(c):<44}{cells}   {diff:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_FOLDER,
        help=f"Diffusers-layout SD 1.5 folder, built with random weights if incomplete ({DEFAULT_FOLDER})",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration (best time, worst memory)")
    parser.add_argument("--malloc-tuned", action="store_true", help="also run both with the glibc malloc env vars")
    parser.add_argument("--malloc-env-only", action="store_true", help="run with the glibc malloc env vars only")
    parser.add_argument("--only", choices=["ours", "diffusers"], help="run one implementation")
    parser.add_argument(
        "--variants",
        default="base",
        help=f"comma-separated: base, or switches (ours only) {', '.join(SWITCHES)} joined by +",
    )
    parser.add_argument(
        "--diffusers-variants",
        default="base",
        help=f"comma-separated Diffusers runs: base (--dtype), or {', '.join(DIFFUSERS_SWITCHES)} joined by + "
        "(bf16: torch_dtype=torch.bfloat16)",
    )
    parser.add_argument("--quick", action="store_true", help="no warm-up and no bare-UNet calls (large sizes)")
    parser.add_argument("--vae-tiling", action="store_true", help="tiled VAE decode in both (Diffusers: enable_tiling)")
    parser.add_argument("--child-timeout", type=float, default=600, help="seconds allowed to one run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--from-partial",
        type=Path,
        help="print the tables of a stopped run from its pipeline-*.partial.jsonl (runs nothing)",
    )
    parser.add_argument(
        "--openvino",
        metavar="PYTHON",
        help="also OpenVINO (optimum-intel's pipeline, bf16 by itself on an AMX CPU), run by this Python: one of a "
        "venv of its own with optimum-intel[openvino], never this project's (bench/README.md)",
    )
    parser.add_argument(
        "--openvino-model", type=Path, help="the folder exported for OpenVINO (default: --model's + '-openvino', made "
        "once with --openvino's Python)",
    )  # fmt: skip
    parser.add_argument("--child", choices=["ours", "diffusers", "openvino", "build"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="base", help=argparse.SUPPRESS)
    parser.add_argument("--images-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "build":
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import build_model_folder  # the test fixtures' builder: official layout and names

        args.model.mkdir(parents=True, exist_ok=True)
        build_model_folder(args.model, {}, {}, {})
        return
    if args.child:
        return child(args.child, args.variant, args)
    if args.openvino:
        args.openvino_model = args.openvino_model or args.model.with_name(args.model.name + "-openvino")
        if not (args.openvino_model / "model_index.json").is_file():
            print(f"exporting {args.model} for OpenVINO to {args.openvino_model} ...", flush=True)
            export = "from optimum.intel import OVStableDiffusionPipeline as P; import sys; "
            export += "P.from_pretrained(sys.argv[1], export=True, compile=False).save_pretrained(sys.argv[2])"
            subprocess.run([args.openvino, "-c", export, str(args.model), str(args.openvino_model)], check=True)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if bad := [v for v in variants if v != "base" and not set(v.split("+")) <= set(SWITCHES)]:
        parser.error(f"unknown variants {bad}: give base, or switches from {SWITCHES} joined by +")
    diffusers_variants = [v.strip() for v in args.diffusers_variants.split(",") if v.strip()]
    if bad := [v for v in diffusers_variants if v != "base" and not set(v.split("+")) <= set(DIFFUSERS_SWITCHES)]:
        parser.error(f"unknown Diffusers variants {bad}: give base, or {DIFFUSERS_SWITCHES} joined by +")
    if not (args.model / "model_index.json").is_file():  # written last by the builder
        print(f"building a random-weight SD 1.5 folder in {args.model} ...", flush=True)
        subprocess.run([sys.executable, __file__, "--child", "build", "--model", str(args.model)], check=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    args.images_dir = args.out / f"images-{stamp}"

    configs: list[tuple[str, str, bool]] = []  # (impl, variant, malloc env)
    impls = [args.only] if args.only else ["ours", "diffusers"]
    envs = (True,) if args.malloc_env_only else (False, True) if args.malloc_tuned else (False,)
    for env in envs:
        for impl in impls:
            for variant in variants if impl == "ours" else diffusers_variants:
                configs.append((impl, variant, env))
    if args.openvino:
        configs.append(("openvino", "base", False))

    cpu = cpu_info()
    print(
        f"CPU: {cpu_description(cpu)}\n"
        f"{os.cpu_count()} CPUs, load average now "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.size}x{args.size}, {args.steps} Euler steps, "
        f"CFG {args.cfg}, {args.dtype}, {args.threads} threads, {args.repeats} repeat(s); folder {args.model}",
        flush=True,
    )
    weights = sum(
        f.stat().st_size for part in ("unet", "text_encoder", "vae") for f in (args.model / part).glob("*.safetensors")
    )
    print(f"weights (the three safetensors files): {weights / 2**20:.0f} MB; peak RSS below is in the same MB (MiB)")
    raw: dict[tuple[str, str, bool], list[dict]] = {c: [] for c in configs}
    if args.from_partial:  # the rounds a stopped run finished; configurations it never ran are left out
        raw = {}
        for line in args.from_partial.read_text().splitlines():
            record = json.loads(line)
            raw.setdefault(tuple(record.pop("config")), []).append(record)
        configs = list(raw)
        args.repeats = min(len(rs) for rs in raw.values())
        stamp = args.from_partial.name.removeprefix("pipeline-").removesuffix(".partial.jsonl") + "-summary"
    for _ in range(0 if args.from_partial else args.repeats):
        for config in configs:  # all configurations once per round, so drifting load hits each alike
            t0 = time.perf_counter()
            raw[config].append(run_child(*config, args))
            with open(args.out / f"pipeline-{stamp}.partial.jsonl", "a") as f:  # survives a run stopped half-way
                f.write(json.dumps({"config": list(config), **raw[config][-1]}) + "\n")
            print(
                f"  {config[0]:<9} {config[1]:<28} {'malloc env' if config[2] else '':<10} "
                f"{time.perf_counter() - t0:5.1f} s wall, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
                flush=True,
            )

    import numpy as np  # only now: the children are done

    def name(c):
        return f"{c[0]}{'' if c[1] == 'base' else ' ' + c[1]}{' [malloc env]' if c[2] else ''}"

    summary = {c: summarize(rs) for c, rs in raw.items()}
    ref_config = ("ours", "base", False) if ("ours", "base", False) in summary else configs[0]
    ref_image = np.load(summary[ref_config]["image"])
    for s in summary.values():
        s["max_abs_diff_vs_reference"] = float(np.abs(np.load(s["image"]) - ref_image).max())

    print(
        f"\ntimes in s (best of {args.repeats}), memory = VmHWM in MB; user/sys CPU s and minor faults over the "
        "timed generate; e2e excludes load"
    )
    for env in envs:
        rows = [(name(c), s) for c, s in summary.items() if c[2] == env and c[1] == "base"]
        if not rows or (args.only and len(variants) > 1):
            continue  # nothing to compare; the base row is in the switches table
        both = {n for n, _ in rows} == {name(("ours", "base", env)), name(("diffusers", "base", env))}
        title = "glibc malloc env tuning" if env else "default environment"
        print_table(title, rows, (name(("ours", "base", env)), name(("diffusers", "base", env))) if both else None)
    others = [(name(c), s) for c, s in summary.items() if c[1] != "base"]
    if others:
        base = [(name(c), s) for c, s in summary.items() if c[1] == "base" and not c[2]]
        print_table("switches (base rows repeated)", base + others)
    if len(summary) > 1:
        print(
            f"\nmax |image - image of {name(ref_config)}| in [0, 1]: "
            + ", ".join(
                f"{name(c)} {s['max_abs_diff_vs_reference']:.2e}" for c, s in summary.items() if c != ref_config
            )
        )

    if len(summary) > 1:
        print_ratios(summary, name)

    path = args.out / f"pipeline-{stamp}.json"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("child",)}
    settings["cpu"] = cpu
    settings["cpu_text"] = cpu_description(cpu)
    path.write_text(
        json.dumps({"settings": settings, "results": [{"config": name(c), **s} for c, s in summary.items()]}, indent=1)
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
