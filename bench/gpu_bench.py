"""GPU bench, prepared for a lent GPU machine: parity and speed of ours against Diffusers 0.42 on CUDA.

    bash bench/gpu.sh                    # on the GPU machine: installs .whl/, then runs this with python3
    bash bench/gpu.sh --cpu --tiny       # dry run on a CPU (tiny model, 64x64, a few steps, about 2 minutes)

Builds the true-size random-weight SD 1.5 folder with Diffusers (tests/conftest.py; `--tiny`: the tiny test
configs), then measures, in this order, so that a run cut short by the time budget keeps what matters most:
  parity   ours float16 vs Diffusers float16 on the device (same folder, seed, euler and dpmpp_2m), max abs
           difference of the images in [0, 1]; ours float32 on the device vs ours float32 on the CPU; whether the
           float16 VAE-overflow fallback (min_pipeline.decode) triggered;
  speed    it/s of the denoising loop (generate's `callback` / Diffusers' `callback_on_step_end` timestamp every
           UNet call, after a device sync) and seconds per image of the whole call, median of the timed runs
           after a short warm-up; Diffusers eager and with `unet = torch.compile(unet)` (compile time apart: the
           warm-up's first UNet call minus a steady one), ours eager and with the driver's fast path
           (fast_path.speed_up: compiled UNet, the loop replayed as one CUDA graph; compile + capture time:
           the warm-up call minus a timed one; the compile section first diffs its images against ours eager,
           euler_a, and runs its loop step under set_sync_debug_mode("error")), batch 1 and 4; peak memory of the row
           (torch.cuda.max_memory_allocated, reset per row, minus the other pipeline's resident weights);
  profile  torch.profiler's top kernels for one UNet call of ours on the CFG batch (the bulk of one step);
  ours     img2img at strength 0.6 and 768x768, eager and compiled.
Every row is checked against a time budget first (default: the whole run inside 6 minutes) and skipped, with the
reason written, if its estimate would not fit. The report ($OUT/gpu_bench.md) is rewritten after every row, so a
run killed at its limit still leaves what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import conftest  # noqa: E402 (the model folder builder and the Diffusers reference helpers of the tests)
from fast_path import speed_up  # noqa: E402
from min_pipeline import generate, load_pipeline  # noqa: E402
from prompts import encode_prompts  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse on the moon"
NEGATIVE = "blurry, low quality"
CFG = 7.5
SECTIONS = ("parity", "eager", "profile", "compile", "img2img", "768")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run on the CPU in float32 (a dry run of this script)")
    p.add_argument("--tiny", action="store_true", help="tiny test model, 64x64, 2-4 steps, 1 repeat")
    p.add_argument("--model", type=Path, help="Diffusers-layout folder (built there if empty)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where gpu_bench.md goes")
    p.add_argument("--budget", type=float, default=360, help="seconds for the whole run, folder build included")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--repeats", type=int, help="timed runs per speed row (default 3; --tiny 1)")
    p.add_argument("--compile-backend", help="torch.compile backend (default inductor; --cpu: eager, tracing only)")
    args = p.parse_args()
    args.sections = set(args.sections.split(","))
    if unknown := args.sections - set(SECTIONS):
        p.error(f"unknown sections {sorted(unknown)}")
    return args


class Bench:
    """The run's settings, its time budget, the rows measured so far and the report they are written to."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.start = time.monotonic()
        self.args, self.tiny = args, args.tiny
        self.device = torch.device("cpu" if args.cpu else "cuda")
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.float16 if self.cuda else torch.float32  # float16 is ~27x slower than float32 on a CPU
        self.size, self.big = (64, 80) if args.tiny else (512, 768)
        self.parity_steps, self.speed_steps, self.warm_steps = (2, 4, 1) if args.tiny else (20, 50, 2)
        self.cpu_steps = 2 if args.tiny else 4  # float32 on the CPU at full size: a few seconds per UNet call
        self.batches = (1, 2) if args.tiny else (1, 4)
        self.repeats = args.repeats or (1 if args.tiny else 3)
        self.backend = args.compile_backend or ("inductor" if self.cuda else "eager")
        self.compile_guess = 10.0 if args.tiny else 120.0  # s per compiled shape, until one is measured
        self.image_s = 0.5 if args.tiny else 2.0  # s per image at (size, batch 1, eager), until measured
        self.pipes: dict[str, object] = {}  # loaded pipelines and their resident device bytes
        self.resident: dict[str, int] = {}
        self.eager_unet: dict[str, torch.nn.Module] = {}
        self.compiled: dict[str, torch.nn.Module] = {}
        self.compiled_shapes: set[tuple] = set()
        self.loop_free: dict[tuple, float] = {}  # (batch, size, img2img): s of an ours eager call outside the loop
        self.header: list[str] = []
        self.parity: list[dict] = []
        self.speed: list[dict] = []
        self.profile = ""
        args.out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.start)

    def fits(self, estimate: float) -> str | None:
        """None if a row of this estimated length fits the budget, else the reason it is skipped."""
        if estimate > self.left():
            return f"skipped: needs ~{estimate:.0f} s, {max(self.left(), 0):.0f} s of the budget left"
        return None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    # ------------------------------------------------------------------------- pipelines

    def load(self, impl: str):
        """Ours or Diffusers in the bench dtype on the device, loaded once; the bytes it holds are remembered, so a
        row's peak can be reported without the other pipeline's weights."""
        if impl not in self.pipes:
            before = torch.cuda.memory_allocated() if self.cuda else 0
            if impl == "ours fast":  # the CLI's --compile; uncaptured on a CPU (CUDA graphs need CUDA)
                pipe = speed_up(load_pipeline(str(self.folder), self.device, self.dtype), backend=self.backend,
                                cuda_graph=True)  # fmt: skip
            elif impl == "ours":
                pipe = load_pipeline(str(self.folder), self.device, self.dtype)
            else:
                from diffusers import StableDiffusionPipeline

                pipe = StableDiffusionPipeline.from_pretrained(
                    self.folder, torch_dtype=self.dtype, safety_checker=None, requires_safety_checker=False
                ).to(self.device)
                pipe.set_progress_bar_config(disable=True)
            self.pipes[impl] = pipe
            self.eager_unet[impl] = pipe.unet
            self.resident[impl] = (torch.cuda.memory_allocated() if self.cuda else 0) - before
        return self.pipes[impl]

    def set_unet(self, impl: str, compiled: bool) -> None:
        """`pipe.unet = torch.compile(pipe.unet)`, made once per pipeline and swapped in and out per row.
        dynamic=False: one static graph per shape (batch, size), as a server with fixed sizes would run it."""
        pipe = self.pipes[impl]
        if compiled and impl not in self.compiled:
            self.compiled[impl] = torch.compile(self.eager_unet[impl], dynamic=False, backend=self.backend)
        pipe.unet = self.compiled[impl] if compiled else self.eager_unet[impl]

    def run(self, impl: str, size: int, batch: int, steps: int, callback=None, scheduler: str = "euler",
            init_image: Image.Image | None = None) -> np.ndarray:  # fmt: skip
        """One whole text-to-image (or image-to-image) call, images as float32 (N, H, W, 3) in [0, 1]."""
        pipe = self.pipes[impl]
        if impl.startswith("ours"):
            return generate(pipe, PROMPT, NEGATIVE, scheduler=scheduler, steps=steps, guidance_scale=CFG, height=size,
                            width=size, seed=0, num_images=batch, init_image=init_image,
                            strength=0.6 if init_image is not None else None, output_type="np", progress=False,
                            callback=callback)  # fmt: skip
        conftest.with_scheduler(pipe, scheduler)

        def on_step_end(_pipe, _i, _t, kwargs):
            callback()
            return kwargs

        return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=CFG, height=size,
                    width=size, num_images_per_prompt=batch, generator=torch.Generator().manual_seed(0),
                    output_type="np", callback_on_step_end=on_step_end if callback else None).images  # fmt: skip

    # ------------------------------------------------------------------------- the report

    def write(self) -> None:
        lines = [*self.header, ""]
        if self.parity:
            lines += ["## Parity (images in [0, 1], max abs difference)", "",
                      "| what | setting | max abs diff | note |", "|---|---|---|---|"]  # fmt: skip
            lines += [f"| {r['what']} | {r['setting']} | {r['diff']} | {r['note']} |" for r in self.parity]
            lines.append("")
        if self.speed:
            lines += ["## Speed (median of the timed runs after a warm-up)", "",
                      "| what | setting | loop it/s | s/image | compile s | peak GB | note |",
                      "|---|---|---|---|---|---|---|"]  # fmt: skip
            for r in self.speed:
                cells = [r["what"], r["setting"], r.get("its", ""), r.get("s_image", ""), r.get("compile", ""),
                         r.get("peak", ""), r.get("note", "")]  # fmt: skip
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        if self.profile:
            lines += ["## Profile: one UNet call of ours on the CFG batch", "", "```", self.profile, "```", ""]
        lines.append(f"Finished in {time.monotonic() - self.start:.0f} s of a {self.args.budget:.0f} s budget.")
        (self.args.out / "gpu_bench.md").write_text("\n".join(lines) + "\n")


def vae_note(pipe, caught: list) -> str:
    if any("overflowed" in str(w.message) for w in caught):
        return "fp16 VAE overflow: fallback to fp32 triggered"
    return "VAE now fp32 (fallback earlier)" if pipe.vae_dtype != pipe.dtype else "no VAE fallback"


def max_abs(a: np.ndarray, b: np.ndarray) -> str:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    nan = int(np.isnan(d).sum())
    return f"{np.nanmax(d):.3g}" + (f" ({nan} NaN)" if nan else "") if nan < d.size else "all NaN"


# ----------------------------------------------------------------------------- sections


def parity(b: Bench) -> None:
    ours, ref = b.load("ours"), b.load("diffusers")
    for scheduler in ("euler", "dpmpp_2m"):
        setting = f"{b.size}x{b.size}, {scheduler}, {b.parity_steps} steps, CFG {CFG}, seed 0, {b.dtype}, {b.device}"
        row = {"what": "ours vs Diffusers", "setting": setting, "diff": "", "note": ""}
        if reason := b.fits(4 * b.parity_steps / b.speed_steps * b.image_s):
            row["note"] = reason
        else:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    got, want = conftest.run_both(
                        ours, ref, PROMPT, NEGATIVE, scheduler=scheduler, steps=b.parity_steps, height=b.size,
                        width=b.size, seed=0,
                    )  # fmt: skip
                row["diff"], row["note"] = max_abs(got, want), vae_note(ours, caught)
            except Exception as e:  # a NaN (fp16 overflow in the UNet), an OOM: recorded, the bench goes on
                row["note"] = f"error: {type(e).__name__}: {e}".replace("|", "/")[:200]
        b.parity.append(row)
        b.write()
    # float32 on the device against float32 on the CPU (ours): the device's kernels against the CPU's.
    setting = f"{b.size}x{b.size}, euler, {b.cpu_steps} steps, CFG {CFG}, float32, cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}"  # noqa: E501
    row = {"what": f"ours float32 {b.device} vs cpu", "setting": setting, "diff": "", "note": ""}
    if reason := b.fits(30 if b.cuda else 5):
        row["note"] = reason
    else:
        try:
            images = []
            for device in (b.device, torch.device("cpu")):
                pipe = load_pipeline(str(b.folder), device, torch.float32)
                images.append(generate(pipe, PROMPT, NEGATIVE, steps=b.cpu_steps, guidance_scale=CFG, height=b.size,
                                       width=b.size, seed=0, output_type="np", progress=False))  # fmt: skip
                del pipe
            row["diff"] = max_abs(*images)
            row["note"] = "" if b.cuda else "dry run: both on the CPU"
        except Exception as e:
            row["note"] = f"error: {type(e).__name__}: {e}".replace("|", "/")[:200]
        if b.cuda:
            torch.cuda.empty_cache()
    b.parity.append(row)
    b.write()


def fast_parity(b: Bench) -> None:
    """Ours fast path (fast_path.speed_up: compiled UNet, loop replayed as a CUDA graph) against ours eager on the
    device, with euler_a, whose noise per step the graph loop must draw as the eager loop does. The first call of the
    fast pipeline compiles (the time is in the note), for the speed rows after it."""
    setting = f"{b.size}x{b.size}, euler_a, {b.parity_steps} steps, CFG {CFG}, seed 0, {b.dtype}, {b.device}"
    row = {"what": "ours fast path vs ours eager", "setting": setting, "diff": "", "note": ""}
    if reason := b.fits(b.compile_guess + 3 * b.parity_steps / b.speed_steps * b.image_s):
        row["note"] = reason
    else:
        try:
            images = []
            for impl in ("ours", "ours fast"):
                b.load(impl)
                t0 = time.perf_counter()
                images.append(b.run(impl, b.size, 1, b.parity_steps, scheduler="euler_a"))
            row["note"] = f"fast path's first call (compile, capture) {time.perf_counter() - t0:.1f} s"
            row["diff"] = max_abs(*images)
            if b.cuda:  # the captured loop's step run uncaptured and replayed: any host sync in it raises
                conftest.check_loop_never_syncs(b.pipes["ours fast"])
                row["note"] += "; loop step: no host sync (set_sync_debug_mode error)"
        except Exception as e:
            row["note"] = f"error: {type(e).__name__}: {e}".replace("|", "/")[:200]
            traceback.print_exc()
    b.parity.append(row)
    b.write()


def speed_row(b: Bench, impl: str, compiled: bool, batch: int, size: int, img2img: bool = False) -> None:
    """One speed row: a short warm-up call (it compiles, when compiled), then `repeats` timed calls. Ours compiled is
    the driver's fast path (speed_up), which takes no callback (a callback runs the eager loop) and captures its
    loop per step count: it warms up at the timed step count, and its loop it/s is derived, the call's time less
    the time outside the loop of the ours eager row of the same shape."""
    kind = "img2img 0.6" if img2img else "txt2img"
    fast = impl == "ours" and compiled
    key = "ours fast" if fast else impl  # the pipeline the row runs
    what = f"{'Diffusers' if impl == 'diffusers' else 'ours'} {'compile' if compiled else 'eager'}"
    what = "ours fast path" if fast else what
    setting = f"{kind}, {size}x{size}, batch {batch}, euler {b.speed_steps} steps, CFG {CFG}, {b.dtype}, {b.device}"
    if compiled:
        setting += f", torch.compile({b.backend}, dynamic=False)"
    if fast:
        setting += ", CUDA graph" if b.cuda else ", graph-ready loop uncaptured (CPU)"
    row = {"what": what, "setting": setting}
    b.speed.append(row)
    shape = (impl, batch, size)
    estimate = ((1 if fast else b.warm_steps / b.speed_steps) + b.repeats) * batch * b.image_s * (size / b.size) ** 2.6
    estimate *= 0.6 if img2img else 1
    if compiled and shape not in b.compiled_shapes:
        estimate += b.compile_guess
    if reason := b.fits(estimate):
        row["note"] = reason
        b.write()
        return
    init = None
    if img2img:  # a smooth synthetic picture: the VAE encodes it, then 60% of the steps redraw it
        u, v = np.meshgrid(np.linspace(0, 255, size), np.linspace(0, 255, size))
        init = Image.fromarray(np.stack([u, v, 255 - u], axis=-1).astype(np.uint8))
    try:
        pipe = b.load(key)
        if not fast:
            b.set_unet(impl, compiled)
        runs = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(1 + b.repeats):
                if i == 1 and b.cuda:  # the peak of the steady runs, not of the warm-up (compile workspace)
                    torch.cuda.reset_peak_memory_stats()
                stamps: list[float] = []

                def stamp(*_, stamps=stamps):
                    b.sync()
                    stamps.append(time.perf_counter())

                b.sync()
                t0 = time.perf_counter()
                warm_steps = max(b.warm_steps, 2) if img2img else b.warm_steps  # strength 0.6 of 1 step is 0 steps
                warm_steps = b.speed_steps if fast else warm_steps
                b.run(key, size, batch, warm_steps if i == 0 else b.speed_steps, None if fast else stamp,
                      init_image=init)  # fmt: skip
                b.sync()
                total = time.perf_counter() - t0
                loop = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
                runs.append((total, stamps[0] - t0 if stamps else float("nan"), loop))
        timed = runs[1:]
        s_image = statistics.median(t for t, _, _ in timed) / batch
        its = statistics.median(r[2] for r in timed)
        calls = int(b.speed_steps * 0.6) if img2img else b.speed_steps
        if impl == "ours" and not compiled:  # the call's time outside the loop, for the fast path's row
            b.loop_free[(batch, size, img2img)] = statistics.median(t - calls / its for t, _, its in timed)
        if fast:
            outside = b.loop_free.get((batch, size, img2img))
            its = calls / (statistics.median(t for t, _, _ in timed) - outside) if outside is not None else float("nan")
        row["its"] = f"{its:.2f}" if its == its else "n/a (needs the eager row)" if fast else "n/a (1 call)"
        row["s_image"] = f"{s_image:.3f}"
        if compiled:
            compile_s = runs[0][1] - statistics.median(r[1] for r in timed)
            if fast:  # compile and capture: the warm-up call (same step count) less a timed one
                compile_s = runs[0][0] - statistics.median(r[0] for r in timed)
            row["compile"] = f"{compile_s:.1f}" if fast or shape not in b.compiled_shapes else "(compiled before)"
            if shape not in b.compiled_shapes:
                b.compile_guess = max(compile_s * 1.3, 5.0)
            b.compiled_shapes.add(shape)
        if b.cuda:
            other = sum(v for k, v in b.resident.items() if k != key)
            row["peak"] = f"{(torch.cuda.max_memory_allocated() - other) / 2**30:.2f}"
        else:
            row["peak"] = "n/a (CPU)"
        row["note"] = vae_note(pipe, caught) if impl == "ours" else ""
        if fast:
            row["note"] += "; loop it/s derived (no callback), compile s includes the CUDA graph capture"
        if batch == 1 and size == b.size and not compiled and not img2img:
            b.image_s = s_image  # the scale for the estimates of the rows after this one
    except Exception as e:
        row["note"] = f"error: {type(e).__name__}: {e}".replace("|", "/")[:200]
        traceback.print_exc()
    finally:
        if impl in b.pipes and not fast:
            b.set_unet(impl, False)
    print(row, flush=True)
    b.write()


@torch.inference_mode()
def profile(b: Bench) -> None:
    """torch.profiler over one eager UNet call of ours at (size, CFG batch 2): the bulk of one sampling step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    if reason := b.fits(10 if b.cuda else 5):
        b.profile = reason
        return
    pipe = b.load("ours")
    factor = pipe.vae.downsample_factor
    x = torch.randn(2, pipe.unet.config.in_channels, b.size // factor, b.size // factor, dtype=b.dtype, device=b.device)
    t = torch.tensor(500.0, device=b.device)
    context = encode_prompts(pipe, [NEGATIVE, PROMPT], None)
    for _ in range(3):
        pipe.unet(x, t, context)
    b.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.cuda else [])
    with profiler(activities=activities) as prof:
        pipe.unet(x, t, context)
        b.sync()
    key = "self_cuda_time_total" if b.cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60)
    b.profile = f"{b.size}x{b.size} (latent {tuple(x.shape)}), {b.dtype}, {b.device}, eager, sorted by {key}\n{table}"
    print(b.profile, flush=True)
    b.write()


def main() -> None:
    args = parse_args()
    b = Bench(args)
    if args.cpu and args.tiny:  # a dry run, often beside other jobs: one thread, so no OpenMP spin-waits on busy cores
        torch.set_num_threads(1)
    import diffusers

    name = torch.cuda.get_device_name() if b.cuda else f"CPU ({platform.processor() or platform.machine()})"
    b.header = [
        "# GPU bench: minsd vs Diffusers",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- device: {name}" + (f", CUDA {torch.version.cuda}" if b.cuda else ""),
        f"- torch {torch.__version__}, diffusers {diffusers.__version__}, python {platform.python_version()}",
        f"- command: `{' '.join(['python', *sys.argv])}`",
        f"- model: {'tiny test configs' if args.tiny else 'true SD 1.5 configs'}, random weights (tests/conftest.py)",
        f"- prompt {PROMPT!r}, negative {NEGATIVE!r}",
    ]
    b.folder = args.model or Path("/tmp/minsd-gpu-bench-tiny" if args.tiny else "/tmp/minsd-gpu-bench-sd15")
    if not (b.folder / "model_index.json").exists():
        t0 = time.monotonic()
        b.folder.mkdir(parents=True, exist_ok=True)
        configs = (conftest.TINY_TEXT_ENCODER, conftest.TINY_UNET, conftest.TINY_VAE) if args.tiny else ({}, {}, {})
        conftest.build_model_folder(b.folder, *configs)
        b.header.append(f"- model folder {b.folder} built in {time.monotonic() - t0:.0f} s")
    b.write()

    if "parity" in args.sections:
        parity(b)
        for impl in ("ours", "diffusers"):  # the parity pipelines are reloaded as needed
            b.pipes.pop(impl, None)
        b.resident.clear(), b.eager_unet.clear()
        if b.cuda:
            torch.cuda.empty_cache()
    impls = ("ours", "diffusers")
    if "eager" in args.sections:
        for impl in impls:
            for batch in b.batches:
                speed_row(b, impl, False, batch, b.size)
    if "profile" in args.sections:
        profile(b)
    if "compile" in args.sections:  # batch 1 of both before batch 4 of either: the budget may stop there
        fast_parity(b)
        for batch in b.batches:
            for impl in impls:
                speed_row(b, impl, True, batch, b.size)
    if "img2img" in args.sections:
        for compiled in (False, True):
            for batch in b.batches:
                speed_row(b, "ours", compiled, batch, b.size, img2img=True)
    if "768" in args.sections:
        for compiled in (False, True):
            for batch in b.batches:
                speed_row(b, "ours", compiled, batch, b.big)
    b.write()
    print((args.out / "gpu_bench.md").read_text())


if __name__ == "__main__":
    main()
