"""Does the Triton Temp-Conv kernel (kernels/temporal_conv.py) pay off? Reference torch ops vs the kernel at the
benchmark setting: vidrd-base fp16, channels_last, 2 clips x 16 frames (the CFG batch), 32x32 latents.

Sections (`--sections`, comma-separated; default all but block-compiled):
  layer          every Temp-Conv layer shape (320/640/1280/1280 channels at 32/16/8/4): eager GroupNorm + SiLU +
                 conv2d, the same compiled by Inductor (not with --quick), the conv alone, the kernel and its two
                 parts (statistics, GEMM)
  block          the whole Temp-Conv block (4 layers + residual) as the model runs it, kernels off vs on
  block-compiled the block under torch.compile, off vs on (a compile per shape and setting)
  e2e-eager      the UNet forward, eager, kernels off vs on
  e2e-compiled   the UNet forward compiled as the runtime does it (runtime/compiled.py: Inductor, our CUDA graph)
  forms-block-compiled  each Temp-Conv block compiled three ways: cuDNN (3,1) conv, one cuBLAS matmul over 3
                 shifted frames (runtime/layers.py temporal_conv_as_gemm), the Triton kernel
  forms-e2e-compiled    the compiled UNet step with the conv form vs the GEMM form, each with its 25 costliest
                 kernels (torch.profiler, without our CUDA graph) and the by-category totals of bench/profile_step.py
GPU times are medians of CUDA-event timings of CUDA-graph replays (no launch overhead, as in the compiled
runtime). A markdown table per section; JSON to --out, rewritten after every section (a timeout keeps what ran).

    python -m vidrd_rt.bench.kernel_bench --out $OUT/kernel_bench.json            (~4-5 min: two UNet compiles)
    python -m vidrd_rt.bench.kernel_bench --quick --out $OUT/kernel_bench.json    (~1 min: nothing compiled)
    ... --sections e2e-compiled --out $OUT/kernel_bench_e2e.json                   (the compiles alone, ~3-4 min)

Each section catches its own failure (recorded under "error" in the JSON and listed under the tables).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from vidrd_rt import kernels
from vidrd_rt.runtime.config import model_preset

SECTIONS = ("layer", "block", "block-compiled", "e2e-eager", "e2e-compiled", "forms-block-compiled",
            "forms-e2e-compiled")
DEFAULT_SECTIONS = ("layer", "block", "e2e-eager", "e2e-compiled")
QUICK_SECTIONS = ("layer", "block", "e2e-eager")
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--quick", action="store_true", help="no torch.compile, fewer iterations (~1 min)")
    p.add_argument("--sections", type=_sections, default=None, help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--model", default="vidrd-base", help="preset whose Temp-Conv shapes and UNet are timed")
    p.add_argument("--device", default="cuda")
    p.add_argument("--clips", type=int, default=2, help="clips in the batch (CFG: 2 per video)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--latent", type=int, default=32, help="latent side (256x256 video -> 32)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--compile-mode", default="default", help="Inductor mode (runtime/compiled.py MODES)")
    return p.parse_args(argv)


def _sections(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    return names


def sections(args: argparse.Namespace) -> list[str]:
    return list(args.sections or (QUICK_SECTIONS if args.quick else DEFAULT_SECTIONS))


#################################################################################
#                                     Timing                                     #
#################################################################################


def time_ms(fn: Callable, device: str, warmup: int, iters: int, inner: int = 10, graph: bool = True) -> float:
    """Median milliseconds per call. CUDA: `inner` calls captured in one CUDA graph, replays timed by events (GPU
    time only, as the compiled runtime replays graphs); a plain loop of `inner` calls if capture fails or `graph`
    is off (a function that replays a graph itself). CPU: wall clock per call."""
    for _ in range(max(warmup, 1 if device == "cuda" else 0)):
        fn()  # autotuning, compiles, cuDNN heuristics, lazy init: never inside a graph capture
    if device != "cuda":
        return _median_wall(fn, iters)
    torch.cuda.synchronize()
    run = (_graphed(fn, inner) if graph else None) or (lambda: [fn() for _ in range(inner)])
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def _graphed(fn: Callable, inner: int) -> Optional[Callable]:
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
        return graph.replay
    except Exception as e:  # noqa: BLE001 - a timing method, not a result: say so and time without the graph
        log(f"  (no CUDA graph: {type(e).__name__}: {str(e)[:120]}; timing the plain loop)")
        torch.cuda.synchronize()
        return None


def _median_wall(fn: Callable, iters: int) -> float:
    times = []
    for _ in range(max(iters, 1)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double(), b.double()
    return {"max_abs_diff": (a - b).abs().max().item(), "rel_err": ((a - b).norm() / b.norm().clamp_min(1e-30)).item()}


#################################################################################
#                              Shapes and tensors                                #
#################################################################################


def layer_shapes(args) -> list[tuple[int, int]]:
    """(channels, latent side) of every distinct Temp-Conv block of the preset's UNet (down/mid/up share them)."""
    channels = model_preset(args.model).unet.block_out_channels
    shapes = [(c, max(args.latent >> i, 1)) for i, c in enumerate(channels)]
    return list(dict.fromkeys(shapes))


def make_input(args, c: int, side: int, dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(args.clips * args.frames, c, side, side, generator=g)
    return x.to(args.device, dtype).contiguous(memory_format=torch.channels_last)


def make_block(args, c: int, dtype):
    """A Temp-Conv block in eval mode, every parameter drawn, weights laid out as prepare_for_device does."""
    from vidrd_rt.runtime.layers import TemporalConv

    torch.manual_seed(c)
    block = TemporalConv(c, model_preset(args.model).unet.temporal_conv_layers, 0.1).eval()
    with torch.no_grad():
        for name, p in block.named_parameters():
            scale = (3 * c) ** -0.5 if p.ndim == 5 else 0.1
            p.copy_((1.0 if name.endswith(".weight") and p.ndim == 1 else 0.0) + scale * torch.randn_like(p))
    block = block.to(args.device, dtype)
    for p in block.parameters():
        if p.ndim == 5:
            p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
    return block


def _layers(block) -> list[tuple]:
    from vidrd_rt.kernels.temporal_conv import module_layers

    return module_layers(block)


def kernels_runnable(device: str) -> bool:
    """Kernel columns need a GPU, or triton's interpreter (CPU tests)."""
    if not kernels.triton_available():
        return False
    if device == "cuda":
        return True
    from vidrd_rt.kernels import temporal_conv as tc

    return tc.INTERPRET


#################################################################################
#                                    Sections                                    #
#################################################################################


@torch.inference_mode()
def bench_layers(args, dtype, timing) -> list[dict]:
    from vidrd_rt.kernels.temporal_conv import temporal_conv_reference

    compile_ = lambda fn: torch.compile(fn, fullgraph=True, dynamic=False)  # noqa: E731 - one graph per shape
    rows = []
    for c, side in layer_shapes(args):
        x, block = make_input(args, c, side, dtype), make_block(args, c, dtype)
        layer = _layers(block)[0]
        ref = lambda: temporal_conv_reference(x, args.frames, *layer)  # noqa: E731
        row = {"channels": c, "side": side, "rows": x.shape[0] * side * side, "ref_ms": timing(ref)}
        row["ref_conv_only_ms"] = timing(_conv_only(x, args.frames, layer))
        if args.device == "cuda" and not args.quick:
            row["ref_compiled_ms"] = timing(compile_(temporal_conv_reference), x, args.frames, *layer)
        if kernels_runnable(args.device):
            row.update(_kernel_layer(args, x, layer, timing, ref()))
        rows.append(row)
        log(f"layer C={c} {side}x{side}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                       if isinstance(v, float)))
    return rows


def _conv_only(x, frames, layer):
    """The conv2d (3,1) alone on an already activated clip view: what cuDNN's conv costs without GroupNorm."""
    import torch.nn.functional as F

    bf, c, h, w = x.shape
    act = x.permute(0, 2, 3, 1).reshape(bf // frames, frames, h * w, c).permute(0, 3, 1, 2)
    weight = layer[2].squeeze(-1)
    return lambda: F.conv2d(act, weight, layer[3], padding=(1, 0))


def _kernel_layer(args, x, layer, timing, want) -> dict:
    from vidrd_rt.kernels import temporal_conv as tc

    gamma, beta, weight, bias, groups, eps = layer
    x2d, rows, hw = tc._rows(x), args.frames * x.shape[2] * x.shape[3], x.shape[2] * x.shape[3]
    scale, shift = tc.group_scale_shift(x2d, rows, gamma, beta, groups, eps)
    out = {"kernel_ms": timing(lambda: tc.temporal_conv(x, args.frames, *layer)),
           "kernel_stats_ms": timing(lambda: tc.group_scale_shift(x2d, rows, gamma, beta, groups, eps)),
           "kernel_gemm_ms": timing(lambda: tc.conv_gemm(x2d, rows, hw, scale, shift, weight, bias, None))}
    out["gemm_tflops"] = 2 * x2d.shape[0] * 3 * x2d.shape[1] ** 2 / out["kernel_gemm_ms"] / 1e9
    out.update(_diff(tc.temporal_conv(x, args.frames, *layer), want))
    best = getattr(tc._tconv_autotuned, "best_config", None)
    out["gemm_config"] = str(best) if best is not None else None
    return out


@torch.inference_mode()
def bench_blocks(args, dtype, timing, compiled: bool) -> list[dict]:
    rows = []
    for c, side in layer_shapes(args):
        x, block = make_input(args, c, side, dtype), make_block(args, c, dtype)
        fn = torch.compile(block, fullgraph=True, dynamic=False, mode=args.compile_mode) if compiled else block
        with kernels.disabled():
            want = fn(x, args.frames)
            row = {"channels": c, "side": side, "ref_ms": timing(fn, x, args.frames)}
        if kernels_runnable(args.device):
            with kernels.use_kernels(True):
                row["kernel_ms"] = timing(fn, x, args.frames)
                row.update(_diff(fn(x, args.frames), want))
        rows.append(row)
        log(f"block{' compiled' if compiled else ''} C={c} {side}x{side}: ref {row['ref_ms']:.4g} ms, kernel "
            f"{row.get('kernel_ms', float('nan')):.4g} ms")
    return rows


@torch.inference_mode()
def bench_forms_blocks(args, dtype, timing) -> list[dict]:
    """Each block compiled with the conv form, the GEMM form and the Triton kernel: which wins under Inductor."""
    import torch._dynamo

    from vidrd_rt.runtime.layers import temporal_conv_form

    rows = []
    for c, side in layer_shapes(args):
        x, block = make_input(args, c, side, dtype), make_block(args, c, dtype)
        row: dict = {"channels": c, "side": side}
        outs = {}
        for name, form, triton in (("conv", "never", False), ("gemm", "compiled", False), ("triton", "never", True)):
            if triton and not kernels_runnable(args.device):
                continue
            torch._dynamo.reset()  # a fresh trace under this form (the form is read while tracing)
            fn = torch.compile(block, fullgraph=True, dynamic=False, mode=args.compile_mode)
            with temporal_conv_form(form), kernels.use_kernels(triton):
                outs[name] = fn(x, args.frames).clone()
                row[f"{name}_ms"] = timing(fn, x, args.frames)
        for name in outs:
            if name != "conv":
                row[f"{name}_rel_err"] = _diff(outs[name], outs["conv"])["rel_err"]
        rows.append(row)
        log(f"forms block compiled C={c} {side}x{side}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                                      if isinstance(v, float)))
    return rows


def bench_forms_e2e(args, unet, inputs, timing) -> dict:
    """The UNet step compiled as the runtime does it, Temp-Conv as conv vs as GEMM; per variant its costliest
    kernels. Each variant is profiled before the next one changes the process-wide form."""
    import torch._dynamo

    from vidrd_rt.runtime.compiled import CompiledStep, CompileSettings

    row: dict = {}
    outs = {}
    for name, gemm in (("conv", False), ("gemm", True)):
        log(f"compiling the UNet, Temp-Conv as {name} ...")
        try:
            torch._dynamo.reset()  # a fresh trace: the form is read while tracing
            settings = CompileSettings(mode=args.compile_mode, temporal_conv_gemm=gemm)
            step = CompiledStep(lambda s, t, c: unet(s, t, c), settings, args.device, [])
            with kernels.disabled():
                start = time.perf_counter()
                outs[name] = step(*inputs).clone()
                row[f"{name}_compile_s"] = time.perf_counter() - start
                row[f"{name}_ms"] = timing(step, *inputs, inner=3, graph=False)
                if args.device == "cuda":
                    from vidrd_rt.bench.profile_step import top_kernels

                    entry = next(iter(step.entries.values()))
                    with torch.inference_mode():
                        row[f"{name}_profile"] = top_kernels(lambda: step.compiled(*entry.inputs))
        except Exception as e:  # noqa: BLE001 - reported in the result, the run goes on
            row[f"{name}_error"] = _error(e)
        log(f"UNet compiled, Temp-Conv as {name}: {row.get(f'{name}_ms', float('nan')):.4g} ms")
    if len(outs) == 2:
        row.update(_diff(outs["gemm"], outs["conv"]))
    return row


def load_unet(args, dtype):
    from vidrd_rt.runtime.backends import prepare_for_device
    from vidrd_rt.runtime.config import RuntimeConfig
    from vidrd_rt.runtime.weights import random_model

    model = random_model(model_preset(args.model), dtype, args.device).eval_()  # eval: dropout off, no grads
    prepare_for_device(model, RuntimeConfig(device=args.device, dtype="fp16" if dtype == torch.float16 else "fp32"))
    return model.unet


def unet_inputs(args, unet, dtype) -> tuple:
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(args.clips, cfg.in_channels, args.frames, args.latent, args.latent, generator=g)
    context = torch.randn(args.clips, 77, cfg.cross_attention_dim, generator=g)
    t = torch.full((args.clips,), 981, dtype=torch.long)
    return sample.to(args.device, dtype), t.to(args.device), context.to(args.device, dtype)


@torch.inference_mode()
def bench_e2e_eager(args, unet, inputs, timing) -> dict:
    """GPU time of the eager forward (captured in a CUDA graph, so launch overhead, which eager pays, is out)."""
    with kernels.disabled():
        want = unet(*inputs)
        row = {"ref_ms": timing(unet, *inputs, inner=3)}
    with kernels.use_kernels(True):
        got = unet(*inputs)
        row["kernel_ms"] = timing(unet, *inputs, inner=3)
    row.update(_diff(got, want))
    log(f"UNet eager: ref {row['ref_ms']:.4g} ms, kernels {row['kernel_ms']:.4g} ms, diff {row['max_abs_diff']:.3g}")
    return row


def bench_e2e_compiled(args, unet, inputs, timing) -> dict:
    """As the runtime compiles (CompiledStep: Inductor, fullgraph, our CUDA graph per shape), off then on. A
    failure of one variant is recorded in the row and does not lose the other."""
    row, outs = {}, {}
    for name, flag in (("ref", False), ("kernel", True)):
        log(f"compiling the UNet, kernels {'on' if flag else 'off'} ...")
        try:
            outs[name] = _compiled_variant(args, unet, inputs, timing, flag, name, row)
        except Exception as e:  # noqa: BLE001 - reported in the result, the run goes on
            row[f"{name}_error"] = _error(e)
    if len(outs) == 2:
        row.update(_diff(outs["kernel"], outs["ref"]))
    if "ref" in outs:
        with torch.inference_mode(), kernels.disabled():
            row["ref_vs_eager"] = _diff(outs["ref"], unet(*inputs))
    log("UNet compiled: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
    return row


def _compiled_variant(args, unet, inputs, timing, flag: bool, name: str, row: dict) -> torch.Tensor:
    from vidrd_rt.runtime.compiled import CompiledStep, CompileSettings

    step = CompiledStep(lambda s, t, c: unet(s, t, c), CompileSettings(mode=args.compile_mode), args.device, [])
    with kernels.use_kernels(flag):  # read while Dynamo traces (the first call); replays do not look at it
        start = time.perf_counter()
        out = step(*inputs).clone()  # a static output buffer: copied before the next replay overwrites it
        row[f"{name}_compile_s"] = time.perf_counter() - start
        row[f"{name}_ms"] = timing(step, *inputs, inner=3, graph=False)  # the step replays its own graph
    return out


def _error(e: Exception) -> str:
    import traceback

    traceback.print_exc()
    return f"{type(e).__name__}: {str(e)[:2000]}"


#################################################################################
#                                Report and main                                 #
#################################################################################


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of the given columns, with speedup = ref_ms / kernel_ms where both exist."""
    for r in rows:
        if r.get("ref_ms") and r.get("kernel_ms"):
            r["speedup"] = r["ref_ms"] / r["kernel_ms"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(col)) for col in columns) + " |" for r in rows]
    return "\n".join(lines)


LAYER_COLUMNS = ["channels", "side", "ref_ms", "ref_compiled_ms", "ref_conv_only_ms", "kernel_ms", "speedup",
                 "kernel_stats_ms", "kernel_gemm_ms", "gemm_tflops", "max_abs_diff", "rel_err"]
BLOCK_COLUMNS = ["channels", "side", "ref_ms", "kernel_ms", "speedup", "max_abs_diff", "rel_err"]
FORMS_BLOCK_COLUMNS = ["channels", "side", "conv_ms", "gemm_ms", "triton_ms", "gemm_rel_err", "triton_rel_err"]
FORMS_E2E_COLUMNS = ["conv_ms", "gemm_ms", "max_abs_diff", "rel_err", "conv_compile_s", "gemm_compile_s"]
E2E_COLUMNS = ["variant", "ref_ms", "kernel_ms", "speedup", "max_abs_diff", "rel_err", "ref_compile_s",
               "kernel_compile_s"]


def report(result: dict) -> str:
    parts = []
    for key, title, cols in (("layer", "Temp-Conv layer (GN + SiLU + conv)", LAYER_COLUMNS),
                             ("block", "Temp-Conv block, eager", BLOCK_COLUMNS),
                             ("block_compiled", "Temp-Conv block, torch.compile", BLOCK_COLUMNS)):
        if isinstance(result.get(key), list):
            parts.append(f"\n### {title}, ms per call\n\n{table(result[key], cols)}")
    e2e = [{"variant": name.replace("_", " "), **result[name]} for name in ("e2e_eager", "e2e_compiled")
           if name in result]
    errors = [f"{key}: {value['error']}" for key, value in result.items()
              if isinstance(value, dict) and "error" in value]
    errors += [f"e2e_compiled {k}: {v}" for k, v in result.get("e2e_compiled", {}).items() if k.endswith("_error")]
    errors += [f"forms_e2e_compiled {k}: {v}" for k, v in result.get("forms_e2e_compiled", {}).items()
               if k.endswith("_error")]
    if errors:
        parts.append("\n### Errors\n\n" + "\n".join(f"- {line}" for line in errors))
    if e2e:
        parts.append(f"\n### UNet forward (vidrd-base step), ms\n\n{table(e2e, E2E_COLUMNS)}")
    if isinstance(result.get("forms_block_compiled"), list):
        parts.append(f"\n### Temp-Conv block compiled: conv vs GEMM vs Triton, ms\n\n"
                     f"{table(result['forms_block_compiled'], FORMS_BLOCK_COLUMNS)}")
    forms = result.get("forms_e2e_compiled")
    if isinstance(forms, dict) and ("conv_ms" in forms or "gemm_ms" in forms):
        parts.append(f"\n### UNet step compiled: Temp-Conv as conv vs GEMM, ms\n\n{table([forms], FORMS_E2E_COLUMNS)}")
        for name in ("conv", "gemm"):
            prof = forms.get(f"{name}_profile")
            if prof:
                lines = [f"| {k['kernel'][:90]} | {k['category']} | {k['calls']} | {k['ms']:.3f} |" for k in prof["top"]]
                cats = ", ".join(f"{k} {v:.2f}" for k, v in sorted(prof["by_category_ms"].items(), key=lambda kv: -kv[1]))
                parts.append(f"\n#### Costliest kernels, Temp-Conv as {name} ({prof['total_ms']:.2f} ms GPU per step; "
                             f"{cats})\n\n| kernel | category | calls | ms |\n|---|---|---:|---:|\n" + "\n".join(lines))
    return "\n".join(parts)


def run(args, result: dict, save: Callable[[], None]) -> None:
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    iters = args.iters if args.iters is not None else (5 if args.quick else 15)

    def timing(fn, *a, inner: int = 10, graph: bool = True) -> float:
        return time_ms(lambda: fn(*a), args.device, warmup, iters, inner, graph)

    def section(name: str, fn: Callable, *a) -> None:
        """One section into result[name]; its failure is recorded there and the next section still runs."""
        try:
            result[name.replace("-", "_")] = fn(*a)
        except Exception as e:  # noqa: BLE001
            result[name.replace("-", "_")] = {"error": _error(e)}
        save()

    todo = sections(args)
    if args.device == "cuda":
        from vidrd_rt.runtime.compiled import CompileSettings, apply_inductor_flags

        # The runtime's Inductor flags for every compile here, and a recompile limit above the block section's
        # 4 shapes x 2 settings of one code object (TemporalConv.forward).
        apply_inductor_flags(CompileSettings(mode=args.compile_mode))
    if "layer" in todo:
        section("layer", bench_layers, args, dtype, timing)
    for name, compiled in (("block", False), ("block-compiled", True)):
        if name in todo:
            section(name, bench_blocks, args, dtype, timing, compiled)
    if "forms-block-compiled" in todo:
        section("forms-block-compiled", bench_forms_blocks, args, dtype, timing)
    if {"e2e-eager", "e2e-compiled", "forms-e2e-compiled"} & set(todo):
        unet = load_unet(args, dtype)
        inputs = unet_inputs(args, unet, dtype)
        log(f"{args.model} UNet loaded ({sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M parameters)")
        for name, fn in (("e2e-eager", bench_e2e_eager), ("e2e-compiled", bench_e2e_compiled),
                         ("forms-e2e-compiled", bench_forms_e2e)):
            if name in todo:
                section(name, fn, args, unet, inputs, timing)


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result: dict = {"device": device_name, "torch": torch.__version__, "triton": _triton_version(),
                    "args": vars(args) | {"sections": sections(args)}}
    log(f"{device_name}, torch {torch.__version__}, triton {result['triton']}; sections {', '.join(sections(args))}")

    def save() -> None:
        out.write_text(json.dumps(result, indent=1, default=str))

    try:
        run(args, result, save)
    finally:
        save()
        print(report(result), flush=True)
        log(f"done; JSON in {out}")
    return result


def _triton_version() -> Optional[str]:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
