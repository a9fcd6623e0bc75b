"""The fast path, switched on from outside the models: speed_up(pipe) compiles the UNet and installs a sampling loop
that, on CUDA, is captured once as a CUDA graph and replayed per UNet call.

Without it (the default) generate() runs eager PyTorch, the reference the parity tests hold to Diffusers. Images stay
within 1e-4 of eager in float32, and the graph-ready loop equals the eager loop bit for bit (tests/test_compile.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace

import torch
from tqdm import tqdm

import scheduler as sampling
from min_pipeline import Pipeline, classifier_free_guidance

SCHEDULE_TENSORS = ("timesteps", "sigmas", "alpha_bar", "alpha_bar_prev")


def speed_up(pipe: Pipeline, compile: bool = True, cuda_graph: bool | None = None, channels_last: bool = False,
             mode: str = "default", backend: str = "inductor") -> Pipeline:  # fmt: skip
    """One line per switch, with its measured gain (on the CPU: the tiny test UNet, 64x64, CFG batch 2, one thread;
    on CUDA: bench/gpu.sh):
    - compile: torch.compile of the UNet in place (nn.Module.compile keeps the parameter names, so LoRA merging and
      the checks that read pipe.unet still work), dynamic=False: one static graph per shape, and shapes change only
      between calls. mode "default": "max-autotune-no-cudagraphs" autotunes every GEMM and convolution, minutes more
      per shape, and "reduce-overhead" captures CUDA graphs of its own, which our captured loop already is.
      The VAE decoder stays eager: compiled, the tiny one decoded no faster on the CPU (0.032 s) after 45 s of
      compiling, and it runs once per image.
    - cuda_graph (default: on CUDA): the denoising loop as GraphLoop runs it, captured once per shape and replayed
      per UNet call, so the host neither launches kernels nor waits between calls. True on a CPU runs the same
      graph-ready loop uncaptured (how the tests check it equals the eager loop).
    - channels_last: NHWC weights for the UNet's convolutions; off until the GPU bench shows it pays."""
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)  # gain: not yet measured (bench/gpu.sh)
    if compile:
        # CPU: the tiny UNet -24% per call after 100 s; the full-size bf16 one (AMX) no faster than eager's packed
        # oneDNN path after 73 s (0.95x with inductor's freezing, 63 s, +3.5 GB): bench/README.md
        pipe.unet.compile(mode=mode, dynamic=False, backend=backend)
    on = pipe.device.type == "cuda" if cuda_graph is None else cuda_graph
    pipe.fast_loop = GraphLoop() if on else None  # GPU gain: bench/gpu.sh
    return pipe


class GraphLoop:
    """generate()'s sampling loop with every UNet call one function of device tensors (graph_step): the latent, call
    index, context, schedule, sampler state and noise are buffers it reads and updates in place. On CUDA it is
    captured once as a CUDA graph and replayed per call, with no kernel launch, host read or host sync in the loop;
    one captured loop is kept (a new shape, setting or LoRA merge captures anew). Elsewhere the step runs as it is.
    All of the loop's ε are drawn first, in the eager loop's order from the same generator, and moved to the device
    once, so a seed gives the eager loop's image. Prompt editing, inpainting, ControlNets, callbacks and the samplers
    marked Sampler.eager_only (multistep histories: pndm, lms, unipc, ...) take the eager loop (generate() chooses)."""

    def __init__(self):
        self.graphs = {}  # {key: (buffers, step, graph)}: the captured loop

    def __call__(self, pipe: Pipeline, schedule: sampling.Schedule, x: torch.Tensor, context: torch.Tensor,
                 guidance: float | None, eta: float, generator: torch.Generator, progress: bool):  # fmt: skip
        draws = sampling.draws_noise(schedule, eta)
        zeros = torch.zeros(x.shape, dtype=pipe.dtype)
        noise = [sampling.draw_noise(x.shape, pipe.dtype, "cpu", generator) if d else zeros for d in draws]
        states = sampling.SAMPLERS[schedule.sampler].states  # e.g. Heun's x_i and d_i, DPM++'s previous x_0
        inputs = {"x": x, "i": torch.zeros(1, dtype=torch.long), "context": context,
                  "noise": torch.stack(noise) if any(draws) else None,
                  **{k: getattr(schedule, k) for k in SCHEDULE_TENSORS},
                  **{f"state{k}": torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32))
                     for k in range(states)}}  # fmt: skip
        inputs = {k: v for k, v in inputs.items() if v is not None}
        weights = tuple(p.data_ptr() for p in pipe.unet.parameters())  # a LoRA merge swaps the tensors a graph reads
        key = (*((k, v.shape, v.dtype) for k, v in inputs.items()), schedule.sampler, guidance, eta, weights)
        if key not in self.graphs:
            self.graphs.clear()  # each captured loop holds the memory of one UNet call's activations
            buffers = {k: v.to(x.device, copy=True) for k, v in inputs.items()}
            sched = replace(schedule, **{k: buffers.get(k) for k in SCHEDULE_TENSORS})
            step = functools.partial(graph_step, pipe, sched, buffers, guidance, eta)
            self.graphs[key] = buffers, step, capture(step, buffers["i"]) if x.device.type == "cuda" else None
        buffers, step, graph = self.graphs[key]
        for k, v in inputs.items():
            buffers[k].copy_(v)  # before the loop: host-to-device copies and their syncs happen here, once
        for _ in tqdm(range(len(schedule.timesteps)), desc="denoising", disable=not progress):
            step() if graph is None else graph.replay()
        return buffers["x"].clone()


def graph_step(pipe: Pipeline, sched: sampling.Schedule, b: dict[str, torch.Tensor], guidance: float | None,
               eta: float) -> None:  # fmt: skip
    """One UNet call of GraphLoop on its buffers b, as generate()'s eager loop does it: scale the input, the UNet on
    the CFG batch, guidance, the sampler step (scheduler.graph_step), then i += 1; all on the device."""
    i, x = b["i"], b["x"]
    x_in = sampling.scale_model_input(sched, i, x)
    eps = pipe.unet(torch.cat([x_in, x_in]) if guidance else x_in, sampling.at(sched.timesteps, i), b["context"])
    if guidance:
        eps = classifier_free_guidance(*eps.chunk(2), guidance)
    noise = sampling.at(b["noise"], i) if "noise" in b else None
    names = [k for k in b if k.startswith("state")]
    x_next, state = sampling.graph_step(sched, i, x, eps, tuple(b[k] for k in names), noise, eta)
    for buffer, value in zip([x, *(b[k] for k in names)], [x_next, *state], strict=True):
        buffer.copy_(value)
    i.add_(1)


def capture(step: Callable[[], None], i: torch.Tensor) -> torch.cuda.CUDAGraph:
    """`step` recorded as a CUDA graph, after two warm-up runs on a side stream where compilation, autotuning and
    cuBLAS/cuDNN workspace allocation happen, outside the capture (as torch.cuda.graph's documentation asks). The
    warm-up changes the buffers; GraphLoop refills them before replaying."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
            i.zero_()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph
