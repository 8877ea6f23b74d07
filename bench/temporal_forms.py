"""Temp-Attn forms and the decoder's Temp-Conv shape, timed on the GPU (vidrd-base fp16, 2 clips x 16 frames, 32x32
latents, as one CFG step of a 256x256 video).

Sections (`--sections`, comma-separated):
  attention  every attention call of one UNet step by shape (hooks on one eager forward), each timed alone in a
             CUDA graph: SDPA as the model calls it, and for Temp-Attn the other forms (runtime/layers.py
             TEMPORAL_ATTENTION: native views into SDPA, compiled matmul-softmax, the Triton kernel);
  step       the UNet step compiled as the runtime does it (CompiledStep: Inductor, CUDA graph), once per Temp-Attn
             form in --forms (optionally with the UNet's Temp-Convs as Conv3d): each form's GPU time per step,
             re-timed at the end in reverse order, its output against the first form's and (CUDA) against an fp32
             copy's, and its costliest kernels;
  decoder    the temporal VAE decoder compiled, Temp-Conv as a (3, 1) conv2d vs as the Conv3d (3, 1, 1) itself.

    python -m vidrd_rt.bench.temporal_forms --sections step --forms sdpa,kernel --out $OUT/forms.json

JSON to --out, rewritten after every section; each section records its own failure and the next still runs.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from vidrd_rt.bench.kernel_bench import _diff, _error, load_unet, log, time_ms, unet_inputs
from vidrd_rt.runtime import layers
from vidrd_rt.runtime.config import TEMPORAL_ATTENTION_FORMS, TEMPORAL_CONV_OPS

SECTIONS = ("attention", "step", "decoder")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--forms", default="sdpa,kernel",
                   help=f"step section: Temp-Attn forms ({','.join(TEMPORAL_ATTENTION_FORMS)}), each optionally "
                        f"+conv3d (the UNet's Temp-Convs as Conv3d); the first is the reference")
    p.add_argument("--model", default="vidrd-base")
    p.add_argument("--device", default="cuda")
    p.add_argument("--clips", type=int, default=2, help="clips in the batch (CFG: 2 per video)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--latent", type=int, default=32, help="latent side (256x256 video -> 32)")
    p.add_argument("--iters", type=int, default=20)
    return p.parse_args(argv)


def _timer(args) -> Callable:
    def timing(fn: Callable, inner: int = 10, graph: bool = True) -> float:
        return time_ms(fn, args.device, warmup=3, iters=args.iters, inner=inner, graph=graph)
    return timing


#################################################################################
#                          Attention calls, one by one                           #
#################################################################################


def attention_calls(unet, inputs) -> Counter:
    """(kind, x shape, context shape, heads) -> calls per step, from hooks on one eager forward."""
    calls: Counter = Counter()
    kinds = {}
    for name, module in unet.named_modules():
        if isinstance(module, layers.Attention):
            kinds[module] = name.rsplit(".", 1)[-1]  # attn1 (spatial), attn2 (cross), temp_attn

    def hook(module, args, kwargs):
        x = args[0]
        context = args[1] if len(args) > 1 else kwargs.get("context")
        calls[(kinds[module], tuple(x.shape), None if context is None else tuple(context.shape), module.heads)] += 1

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in kinds]
    try:
        with torch.inference_mode():
            layers.set_temporal_attention(unet, "sdpa")
            unet(*inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    n, seq, c = t.shape
    return t.view(n, seq, heads, c // heads).transpose(1, 2)  # (N, heads, L, d) as Attention._split_heads


@torch.inference_mode()
def bench_attention(args, unet, inputs) -> list[dict]:
    timing = _timer(args)
    dev, dtype = args.device, torch.float16
    compiled_math = torch.compile(layers.attention_math, fullgraph=True)
    rows = []
    for (kind, x_shape, ctx_shape, heads), count in sorted(attention_calls(unet, inputs).items()):
        n, seq, c = x_shape
        keys = seq if ctx_shape is None else ctx_shape[1]
        g = torch.Generator(dev).manual_seed(0)
        q, k, v = (_heads(torch.randn(n, s, c, device=dev, dtype=dtype, generator=g), heads)
                   for s in (seq, keys, keys))
        row = {"kind": kind, "x": list(x_shape), "keys": keys, "heads": heads, "calls": count,
               "sdpa_ms": timing(lambda: F.scaled_dot_product_attention(q, k, v))}
        if kind == "temp_attn":
            # The same sequences as strided views of the native (B, F, P, C) layout (Attention.forward_along_frames).
            frames, pixels = seq, n // args.clips
            base = [torch.randn(args.clips, frames, pixels, c, device=dev, dtype=dtype, generator=g) for _ in range(3)]
            nq, nk, nv = (t.reshape(args.clips, frames, pixels * heads, c // heads).transpose(1, 2) for t in base)
            want = F.scaled_dot_product_attention(nq, nk, nv)
            row["native_sdpa_ms"] = timing(lambda: F.scaled_dot_product_attention(nq, nk, nv))
            row["math_compiled_ms"] = timing(lambda: compiled_math(nq, nk, nv))
            row["math_rel_err"] = _diff(compiled_math(nq, nk, nv), want)["rel_err"]
            try:
                from vidrd_rt.kernels.short_attention import short_attention

                row["kernel_ms"] = timing(lambda: short_attention(nq, nk, nv))
                row["kernel_rel_err"] = _diff(short_attention(nq, nk, nv), want)["rel_err"]
            except Exception as e:  # noqa: BLE001 - recorded, the other columns stand
                row["kernel_error"] = _error(e)
        log("attention " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        rows.append(row)
    return rows


#################################################################################
#                         The compiled step per Temp-Attn form                   #
#################################################################################


@torch.inference_mode()
def fp32_truth(unet, inputs) -> torch.Tensor:
    """The step's output from an fp32 copy of the UNet (same weights, reference forms, TF32 off): the yardstick
    that tells the forms' fp16 rounding from a wrong result."""
    import copy

    reference = copy.deepcopy(unet).float()
    layers.set_temporal_attention(reference, "sdpa")
    layers.set_temporal_conv_op(reference, "conv2d")
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return reference(*(t.float() if t.is_floating_point() else t for t in inputs))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        del reference
        torch.cuda.empty_cache()


def bench_step(args, unet, inputs) -> dict:
    import torch._dynamo

    from vidrd_rt.bench.profile_step import top_kernels
    from vidrd_rt.runtime.compiled import CompiledStep, CompileSettings

    timing = _timer(args)
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    result: dict = {"forms": forms}
    truth = fp32_truth(unet, inputs) if args.device == "cuda" else None
    steps, outs = {}, {}
    for form in forms:
        log(f"compiling the UNet step, Temp-Attn {form} ...")
        try:
            torch._dynamo.reset()  # a fresh trace: the forms are read while tracing
            attention, _, conv_shape = form.partition("+")
            layers.set_temporal_attention(unet, attention)
            layers.set_temporal_conv_op(unet, conv_shape or "conv2d")
            step = CompiledStep(lambda s, t, c: unet(s, t, c), CompileSettings(), args.device, [])
            start = time.perf_counter()
            outs[form] = step(*inputs).clone()
            result[f"{form}_compile_s"] = time.perf_counter() - start
            result[f"{form}_ms"] = timing(lambda: step(*inputs), inner=3, graph=False)  # replays its own graph
            if args.device == "cuda":
                entry = next(iter(step.entries.values()))
                with torch.inference_mode():
                    result[f"{form}_profile"] = top_kernels(lambda: step.compiled(*entry.inputs))
            steps[form] = step
            if truth is not None:
                result[f"{form}_vs_fp32"] = _diff(outs[form], truth)
            if form != forms[0] and forms[0] in outs:
                result[f"{form}_vs_{forms[0]}"] = _diff(outs[form], outs[forms[0]])
            log(f"step, Temp-Attn {form}: {result[f'{form}_ms']:.4g} ms")
        except Exception as e:  # noqa: BLE001 - recorded, the next form still runs
            result[f"{form}_error"] = _error(e)
            log(f"step, Temp-Attn {form}: failed: {result[f'{form}_error']}")
    for form in reversed(list(steps)):  # again, in reverse order: a drift of the GPU's clocks shows up here
        step = steps[form]
        result[f"{form}_ms_again"] = timing(lambda: step(*inputs), inner=3, graph=False)
        log(f"step again, Temp-Attn {form}: {result[f'{form}_ms_again']:.4g} ms")
    layers.set_temporal_attention(unet, "sdpa")
    layers.set_temporal_conv_op(unet, "conv2d")
    return result


#################################################################################
#                          The decoder's Temp-Conv shape                         #
#################################################################################


def bench_decoder(args) -> dict:
    import torch._dynamo

    from vidrd_rt.bench.profile_step import top_kernels
    from vidrd_rt.runtime.backends import prepare_for_device
    from vidrd_rt.runtime.compiled import CompiledStep, CompileSettings
    from vidrd_rt.runtime.config import RuntimeConfig, model_preset
    from vidrd_rt.runtime.vae_temporal import VideoDecoder
    from vidrd_rt.runtime.weights import random_model

    timing = _timer(args)
    model = random_model(model_preset(args.model), torch.float16, args.device).eval_()
    prepare_for_device(model, RuntimeConfig(device=args.device, dtype="fp16"))
    decoder = VideoDecoder(model.vae)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, args.frames, args.latent, args.latent, generator=g).to(args.device, torch.float16)
    result, outs, steps = {}, {}, {}
    for shape in TEMPORAL_CONV_OPS:
        log(f"compiling the decoder, Temp-Conv as {shape} ...")
        try:
            torch._dynamo.reset()
            layers.set_temporal_conv_op(model.vae, shape)
            step = CompiledStep(lambda z: (decoder(z),), CompileSettings(), args.device, [])
            start = time.perf_counter()
            outs[shape] = step(latents)[0].clone()
            result[f"{shape}_compile_s"] = time.perf_counter() - start
            result[f"{shape}_ms"] = timing(lambda: step(latents), inner=3, graph=False)
            if args.device == "cuda":
                entry = next(iter(step.entries.values()))
                with torch.inference_mode():
                    result[f"{shape}_profile"] = top_kernels(lambda: step.compiled(*entry.inputs))
            steps[shape] = step
            log(f"decoder, Temp-Conv as {shape}: {result[f'{shape}_ms']:.4g} ms")
        except Exception as e:  # noqa: BLE001
            result[f"{shape}_error"] = _error(e)
            log(f"decoder, Temp-Conv as {shape}: failed: {result[f'{shape}_error']}")
    if len(outs) == 2:
        result["conv3d_vs_conv2d"] = _diff(outs["conv3d"], outs["conv2d"])
    for shape in reversed(list(steps)):
        result[f"{shape}_ms_again"] = timing(lambda: steps[shape](latents), inner=3, graph=False)
        log(f"decoder again, Temp-Conv as {shape}: {result[f'{shape}_ms_again']:.4g} ms")
    layers.set_temporal_conv_op(model.vae, "conv2d")
    return result


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    todo = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in todo if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                    "torch": torch.__version__, "args": vars(args)}

    def save() -> None:
        out.write_text(json.dumps(result, indent=1, default=str))

    from vidrd_rt.runtime.compiled import CompileSettings, apply_inductor_flags

    apply_inductor_flags(CompileSettings())  # the runtime's Inductor flags for every compile here
    unet = inputs = None
    for name in todo:
        try:
            if name in ("attention", "step") and unet is None:
                unet = load_unet(args, torch.float16 if args.device == "cuda" else torch.float32)
                inputs = unet_inputs(args, unet, next(unet.parameters()).dtype)
            if name == "attention":
                result[name] = bench_attention(args, unet, inputs)
            elif name == "step":
                result[name] = bench_step(args, unet, inputs)
            else:
                result[name] = bench_decoder(args)
        except Exception as e:  # noqa: BLE001 - recorded, the next section still runs
            result[name] = {"error": _error(e)}
            log(f"{name}: failed: {result[name]['error']}")
        save()
    log(f"done; JSON in {out}")
    return result


if __name__ == "__main__":
    main()
