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


def kernel_times(fn, steps: int = 5, warmup: int = 3) -> list[tuple[str, float, int]]:
    """(kernel name, GPU ms per call, launches per call) of fn, costliest first."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    events = [(e.key, e.device_time_total / steps / 1000, e.count // steps) for e in prof.key_averages()
              if e.device_time_total > 0]
    return sorted(events, key=lambda e: -e[1])


def by_category(events: list[tuple[str, float, int]]) -> dict:
    totals: dict[str, float] = defaultdict(float)
    for key, ms, _ in events:
        totals[category(key)] += ms
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def breakdown(fn, steps: int = 5) -> dict:
    """GPU ms per call by kernel category."""
    return by_category(kernel_times(fn, steps))


def top_kernels(fn, steps: int = 3, top: int = 25) -> dict:
    """GPU time per call in total, by category, and for the `top` costliest kernels by name."""
    events = kernel_times(fn, steps, warmup=2)
    return {"total_ms": sum(e[1] for e in events), "by_category_ms": by_category(events),
            "top": [{"kernel": k[:160], "ms": ms, "calls": n, "category": category(k)} for k, ms, n in events[:top]]}


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
