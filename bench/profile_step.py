"""Where one UNet step's GPU time goes, eager vs torch.compile, by kernel category (vidrd-base fp16, CFG 2 x 16
frames, 32x32 latents). Prints a table; JSON to $OUT/profile_step.json.

    python -m vidrd_rt.bench.profile_step          (CUDA machine; ~3 minutes, most of it compiling)
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from vidrd_rt.runtime.backends import prepare_for_device
from vidrd_rt.runtime.config import RuntimeConfig
from vidrd_rt.runtime.weights import ModelSource, load_model

# First match wins; names are CUDA kernel names as the profiler reports them.
CATEGORIES = [
    ("attention", r"flash|fmha|sdpa|attention"),
    ("convolution", r"xmma_fprop|implicit_gemm|conv|cudnn|nhwckrsc"),
    ("matmul (linear)", r"nvjet|gemm|cutlass|sm90_xmma_gemm|ampere_.*gemm|cublas"),
    ("normalisation", r"norm|moments|welford|rowwise"),
    ("layout copies", r"copy|transpose|permute|contiguous|cat"),
    ("elementwise (eager)", r"elementwise|vectorized|unrolled"),
]


def category(name: str) -> str:
    # Inductor names its kernels after every op they fuse ("triton_poi_fused_clone_convolution_native_group_norm_
    # silu_..." is the GroupNorm + SiLU feeding a convolution, no convolution itself): sort them apart first.
    if name.startswith("triton_"):
        return "Inductor reductions" if name.startswith(("triton_red", "triton_per")) else "Inductor pointwise"
    for label, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def breakdown(fn, steps: int = 5) -> dict:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.device_time_total > 0:
            totals[category(event.key)] += event.device_time_total / steps / 1000  # ms per step
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


@torch.inference_mode()
def main() -> None:
    t0 = time.time()
    model = load_model(ModelSource(model="vidrd-base", random_weights=True), torch.float16, "cuda")
    prepare_for_device(model, RuntimeConfig(device="cuda", dtype="fp16"))
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(2, 4, 16, 32, 32, device="cuda", dtype=torch.float16, generator=g)
    ctx = torch.randn(2, 77, 1024, device="cuda", dtype=torch.float16, generator=g)
    t = torch.tensor([981, 981], device="cuda")
    result = {"eager": breakdown(lambda: model.unet(x, t, ctx))}
    print(f"[{time.time() - t0:6.1f}s] eager profiled", flush=True)
    compiled = torch.compile(model.unet, fullgraph=True)
    compiled(x, t, ctx)
    print(f"[{time.time() - t0:6.1f}s] compiled", flush=True)
    result["compiled"] = breakdown(lambda: compiled(x, t, ctx))
    with open(os.path.join(os.environ.get("OUT", "."), "profile_step.json"), "w") as f:
        json.dump(result, f, indent=1)
    labels = sorted(set(result["eager"]) | set(result["compiled"]), key=lambda k: -result["eager"].get(k, 0))
    print(f"\n{'category':30s} {'eager ms':>9s} {'compiled ms':>12s}")
    for label in labels:
        print(f"{label:30s} {result['eager'].get(label, 0):9.2f} {result['compiled'].get(label, 0):12.2f}")
    print(f"{'total GPU time':30s} {sum(result['eager'].values()):9.2f} {sum(result['compiled'].values()):12.2f}")


if __name__ == "__main__":
    main()
