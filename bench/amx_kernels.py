# ruff: noqa: B023, E501  (each lambda is timed inside its own loop iteration)
"""Kernel figures: 3x3 conv 320ch 64x64 batch 2 and a 8192x320x1280 matmul, fp32 vs bf16 (+channels_last), 2 threads."""

import os
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)


def bench(fn, n=10):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[0] * 1e3, ts[len(ts) // 2] * 1e3


print("torch", torch.__version__, torch.backends.cpu.get_cpu_capability(), "load", os.getloadavg())
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 320, 64, 64, generator=g)
w = torch.randn(320, 320, 3, 3, generator=g) * 0.02
b = torch.randn(320, generator=g)
a = torch.randn(8192, 320, generator=g)
m = torch.randn(320, 1280, generator=g)
with torch.inference_mode():
    for dt in (torch.float32, torch.bfloat16):
        for cl in (False, True):
            xx, ww = x.to(dt), w.to(dt)
            if cl:
                xx, ww = (
                    xx.contiguous(memory_format=torch.channels_last),
                    ww.contiguous(memory_format=torch.channels_last),
                )
            best, med = bench(lambda: F.conv2d(xx, ww, b.to(dt), padding=1))
            print(
                f"conv3x3 320ch 64x64 b2 {str(dt)[6:]:9} {'NHWC' if cl else 'NCHW'}: best {best:7.2f} ms  median {med:7.2f} ms"
            )
        aa, mm = a.to(dt), m.to(dt)
        best, med = bench(lambda: aa @ mm)
        print(f"matmul 8192x320x1280 {str(dt)[6:]:9}: best {best:7.2f} ms  median {med:7.2f} ms")
    # SDPA: UNet level-1 self-attention shape (b2*8 heads, 4096 tokens, 40 dims) and cross-attn (77 keys)
    for dt in (torch.float32, torch.bfloat16):
        q = torch.randn(2, 8, 4096, 40, generator=g).to(dt)
        kv = torch.randn(2, 8, 77, 40, generator=g).to(dt)
        best, med = bench(lambda: F.scaled_dot_product_attention(q, q, q), n=5)
        print(f"sdpa self 2x8x4096x40 {str(dt)[6:]:9}: best {best:7.2f} ms median {med:7.2f}")
        best, med = bench(lambda: F.scaled_dot_product_attention(q, kv, kv), n=5)
        print(f"sdpa cross 2x8x4096x77x40 {str(dt)[6:]:9}: best {best:7.2f} ms median {med:7.2f}")
print("load after", os.getloadavg())
