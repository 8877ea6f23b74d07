"""GPU baseline for the eager torch backend: UNet step latency (fp32 vs fp16, channels_last on/off), fp16 VAE
overflow check, a short generation, and where one fp16 step spends its time. Prints a table last; JSON to $OUT.

    python -m vidrd_rt.bench.gpu_baseline        (on a CUDA machine; ~3 minutes on an H100)
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from vidrd_rt.runtime.backends import prepare_for_device
from vidrd_rt.runtime.config import RuntimeConfig, SamplerConfig
from vidrd_rt.runtime.pipeline import VideoPipeline, encode_prompt
from vidrd_rt.runtime.weights import ModelSource, load_model

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def time_cuda(fn, warmup: int = 3, iters: int = 20) -> float:
    """Median milliseconds of fn() by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def unet_inputs(frames=16, side=32, dim=1024, dtype=torch.float16):
    g = torch.Generator(device="cuda").manual_seed(0)
    sample = torch.randn(2, 4, frames, side, side, device="cuda", generator=g, dtype=dtype)
    context = torch.randn(2, 77, dim, device="cuda", generator=g, dtype=dtype)
    return sample, torch.tensor([981, 981], device="cuda"), context


@torch.inference_mode()
def main() -> None:
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    log(f"device {results['device']}, torch {torch.__version__}")
    model = load_model(ModelSource(model="vidrd-base", random_weights=True), torch.float16, "cuda")
    log("vidrd-base fp16 random weights loaded")
    x, t, ctx = unet_inputs()
    results["unet_fp16_nchw_ms"] = time_cuda(lambda: model.unet(x, t, ctx))
    log(f"unet fp16, NCHW weights: {results['unet_fp16_nchw_ms']:.1f} ms")
    prepare_for_device(model, RuntimeConfig(device="cuda", dtype="fp16"))
    results["unet_fp16_ms"] = time_cuda(lambda: model.unet(x, t, ctx))
    log(f"unet fp16, channels_last weights: {results['unet_fp16_ms']:.1f} ms")
    results["profile_fp16"] = profile_step(model, x, t, ctx)

    latents = torch.randn(1, 4, 16, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    from vidrd_rt.runtime.vae_temporal import VideoDecoder

    dec16 = VideoDecoder(model.vae)
    results["decode_fp16_ms"] = time_cuda(lambda: dec16(latents.half()), iters=10)
    results["decode_fp16_per_frame_ms"] = time_cuda(lambda: VideoDecoder(model.vae, True)(latents.half()), iters=10)
    video16 = dec16(latents.half()).float()

    model32 = load_model(ModelSource(model="vidrd-base", random_weights=True), torch.float32, "cuda")
    prepare_for_device(model32, RuntimeConfig(device="cuda"))
    x32, t32, ctx32 = unet_inputs(dtype=torch.float32)
    results["unet_fp32_ms"] = time_cuda(lambda: model32.unet(x32, t32, ctx32), iters=10)
    log(f"unet fp32: {results['unet_fp32_ms']:.1f} ms")
    eps32 = model32.unet(x32, t32, ctx32)
    eps16 = model.unet(x32.half(), t32, ctx32.half()).float()
    results["unet_fp16_vs_fp32_rel"] = ((eps16 - eps32).norm() / eps32.norm()).item()
    video32 = VideoDecoder(model32.vae)(latents)
    results["decode_fp16_vs_fp32_rel"] = ((video16 - video32).norm() / video32.norm()).item()
    results["decode_fp16_nonfinite"] = int((~torch.isfinite(video16)).sum().item())
    results["decode_fp16_max_abs_level_diff"] = ((video16 - video32).abs().max() * 255).item()
    log(f"fp16 vs fp32: unet rel {results['unet_fp16_vs_fp32_rel']:.2e}, decode rel "
        f"{results['decode_fp16_vs_fp32_rel']:.2e}, nonfinite {results['decode_fp16_nonfinite']}")
    del model32, x32, ctx32, eps32
    torch.cuda.empty_cache()

    results["generate"] = short_generation(model)
    write(results)


def profile_step(model, x, t, ctx) -> list:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            model.unet(x, t, ctx)
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:15]
    total = sum(e.device_time_total for e in prof.key_averages()) / 3
    table = [[e.key[:70], round(e.device_time_total / 3 / 1000, 2), round(100 * e.device_time_total / 3 / total, 1)]
             for e in rows]
    log("top CUDA kernels per fp16 step (ms, % of GPU time):")
    for row in table:
        log(f"   {row[1]:7.2f} ms {row[2]:5.1f}%  {row[0]}")
    return table


def short_generation(model) -> dict:
    runtime = RuntimeConfig(device="cuda", dtype="fp16")
    pipeline = VideoPipeline(model, runtime)
    sampler = SamplerConfig(clips=3, frames=16, steps=50)
    context = encode_prompt(model, "a boat is sailing in a lake", device="cuda")
    state = pipeline.new_state(sampler, 256, 256)
    seconds = []
    for clip in pipeline.clips(context, sampler, state):
        torch.cuda.synchronize()
        seconds.append(clip.seconds)
        log(f"clip {clip.index}: {clip.seconds:.2f} s, frames {clip.frames.shape}, mean {clip.frames.mean():.1f}")
    return {"clip_seconds": seconds, "frames_per_s_steady": 16 / min(seconds[1:]),
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30}


def write(results: dict) -> None:
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "gpu_baseline.json"), "w") as f:
        json.dump(results, f, indent=1)
    g = results["generate"]
    print("\n| metric | value |\n|---|---|")
    for key in ("unet_fp32_ms", "unet_fp16_nchw_ms", "unet_fp16_ms", "decode_fp16_ms", "decode_fp16_per_frame_ms",
                "unet_fp16_vs_fp32_rel", "decode_fp16_vs_fp32_rel", "decode_fp16_nonfinite",
                "decode_fp16_max_abs_level_diff"):
        print(f"| {key} | {results[key]:.4g} |")
    print(f"| clip seconds (eager fp16, 16 frames, 50 steps) | {', '.join(f'{s:.2f}' for s in g['clip_seconds'])} |")
    print(f"| frames/s steady | {g['frames_per_s_steady']:.2f} |")
    print(f"| peak memory GB | {g['peak_mem_gb']:.2f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
