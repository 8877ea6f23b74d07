"""Where the temporal decoder's time goes (vidrd-base VAE fp16, one 16-frame clip of 32x32 latents): eager GPU time
per module group, and the compiled decoder's costliest kernels. The decode is on the first clip's critical path
(issue 5's 1.2 s target). Prints a table; JSON to $OUT/profile_decode.json.

    python -m vidrd_rt.bench.profile_decode          (CUDA machine; ~2 minutes, most of it compiling)
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import defaultdict

import torch

from vidrd_rt.bench.profile_step import top_kernels
from vidrd_rt.runtime import layers
from vidrd_rt.runtime.backends import prepare_for_device
from vidrd_rt.runtime.compiled import CompileSettings, apply_inductor_flags
from vidrd_rt.runtime.config import RuntimeConfig
from vidrd_rt.runtime.vae_temporal import VideoDecoder
from vidrd_rt.runtime.weights import ModelSource, load_model


def module_times(decoder: torch.nn.Module, fn, runs: int = 5) -> dict[str, float]:
    """Eager GPU ms per call for each group of leaf-level blocks ("up_blocks.3.temp_convs": all Temp-Convs of the
    last up block), from CUDA events around their forwards."""
    groups = {}
    for name, module in decoder.named_modules():
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "up_blocks" or name in ("conv_in", "mid_block", "conv_norm_out", "conv_out"):
            groups[module] = re.sub(r"\.\d+$", "", name) if len(parts) == 4 else name
    pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
    starts: dict[torch.nn.Module, torch.cuda.Event] = {}

    def before(module, _):
        starts[module] = torch.cuda.Event(enable_timing=True)
        starts[module].record()

    def after(module, _, __):
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        pending.append((groups[module], starts.pop(module), end))

    handles = [m.register_forward_pre_hook(before) for m in groups]
    handles += [m.register_forward_hook(after) for m in groups]
    fn()  # warm-up with hooks
    torch.cuda.synchronize()
    pending.clear()
    for _ in range(runs):
        fn()
    torch.cuda.synchronize()
    for h in handles:
        h.remove()
    totals: dict[str, float] = defaultdict(float)
    for label, start, end in pending:
        totals[label] += start.elapsed_time(end) / runs
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def wall_ms(fn, runs: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(runs):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / runs


@torch.inference_mode()
def main() -> None:
    t0 = time.time()
    model = load_model(ModelSource(model="vidrd-base", random_weights=True), torch.float16, "cuda")
    prepare_for_device(model, RuntimeConfig(device="cuda", dtype="fp16"))
    decoder = VideoDecoder(model.vae)
    latents = torch.randn(1, 4, 16, 32, 32, device="cuda", dtype=torch.float16,
                          generator=torch.Generator("cuda").manual_seed(0))
    eager = lambda: decoder(latents)  # noqa: E731
    result = {"eager_ms": wall_ms(eager), "eager_modules_ms": module_times(model.vae.decoder, eager),
              "eager_kernels": top_kernels(eager, top=20)}
    print(f"[{time.time() - t0:6.1f}s] eager profiled", flush=True)
    apply_inductor_flags(CompileSettings())  # compiled as the runtime compiles it (the sixth session's run did not)
    compiled_decoder = torch.compile(decoder, fullgraph=True)
    compiled = lambda: compiled_decoder(latents)  # noqa: E731
    compiled()
    print(f"[{time.time() - t0:6.1f}s] compiled", flush=True)
    result["compiled_ms"] = wall_ms(compiled)
    result["compiled_kernels"] = top_kernels(compiled, top=20)
    # The same with each Temp-Conv traced as one matmul over 3 shifted frames (CompileSettings.temporal_conv_gemm):
    # the (3, 1) convolutions at 256x256 fall to a slow cuDNN kernel.
    reference = compiled().float()
    torch._dynamo.reset()  # the first compile is not called again: its guards would see the other form
    with layers.temporal_conv_form("compiled"):
        gemm_decoder = torch.compile(decoder, fullgraph=True)
        as_gemm = lambda: gemm_decoder(latents)  # noqa: E731
        err = ((as_gemm().float() - reference).norm() / reference.norm()).item()
        result["compiled_tconv_gemm_ms"] = wall_ms(as_gemm)
        result["compiled_tconv_gemm_rel_diff"] = err
        result["compiled_tconv_gemm_kernels"] = top_kernels(as_gemm, top=20)
    print(f"[{time.time() - t0:6.1f}s] compiled with the Temp-Conv as matmul", flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "profile_decode.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\neager {result['eager_ms']:.1f} ms, compiled {result['compiled_ms']:.1f} ms, Temp-Conv as matmul "
          f"{result['compiled_tconv_gemm_ms']:.1f} ms (rel. diff {result['compiled_tconv_gemm_rel_diff']:.1e}); wall, "
          f"no CUDA graph")
    print("\neager GPU ms by module group:")
    for label, ms in result["eager_modules_ms"].items():
        print(f"  {label:28s} {ms:7.2f}")
    for key in ("eager_kernels", "compiled_kernels", "compiled_tconv_gemm_kernels"):
        print(f"\n{key}: total {result[key]['total_ms']:.1f} ms")
        for label, ms in result[key]["by_category_ms"].items():
            print(f"  {label:28s} {ms:7.2f}")
        for k in result[key]["top"][:12]:
            print(f"  {k['ms']:7.2f} ms x{k['calls']:3d} {k['kernel'][:110]}")


if __name__ == "__main__":
    main()
