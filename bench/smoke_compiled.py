"""GPU smoke test of `--backend compiled` and `--inflight K` on vidrd-base (random weights), one H100, < 10 minutes.

(a) checks, each against an fp32 reference with the same weights (TF32 off), so fp16 rounding is told apart from a
    wrong graph or schedule: the compiled step vs the eager fp16 step on random inputs, and the eager wavefront
    (K=2) vs the eager sequential loop over 3 clips (later, the compiled K=2 wavefront too);
(b) timings at 256x256, 16 frames, 50 steps, guidance 10: eager fp16 K=1, compiled K=1, compiled K in --inflight
    as far as --budget allows: per-step latency (CUDA events), first-clip latency and steady-state frames/s (decode
    on its side stream, frames taken by a writer thread, as `generate` runs), compile time apart, peak memory.

Progress lines carry timestamps; $OUT/smoke_compiled.json is rewritten after every section; a table comes last.

    python bench/smoke_compiled.py [--budget 540] [--inflight 1,2,4,8] [--skip-checks] [--skip-eager] [--dynamic]

The checks run after compiled K=1 (so they need 1 in --inflight). Compiles are cached on disk (--cache-dir), so a
second command on the same machine, e.g. `--skip-eager --skip-checks --inflight 4,8`, starts where this one stopped.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

T0 = time.perf_counter()


def _import_package() -> None:
    """`vidrd_rt` is the repository root (setuptools package-dir); map it when the repo is not pip-installed."""
    try:
        import vidrd_rt  # noqa: F401
    except ImportError:
        root = Path(__file__).resolve().parents[1]
        spec = importlib.util.spec_from_file_location("vidrd_rt", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["vidrd_rt"] = module
        spec.loader.exec_module(module)


_import_package()

from vidrd_rt.runtime.backends import make_backends  # noqa: E402
from vidrd_rt.runtime.compiled import CompileSettings, make_compiled_backends  # noqa: E402
from vidrd_rt.runtime.config import RuntimeConfig, SamplerConfig  # noqa: E402
from vidrd_rt.runtime.noise import TorchNoise  # noqa: E402
from vidrd_rt.runtime.overlap import ClipSink  # noqa: E402
from vidrd_rt.runtime.pipeline import VideoPipeline, encode_prompt  # noqa: E402
from vidrd_rt.runtime.sampler import ClipState, make_step, sample_clip  # noqa: E402
from vidrd_rt.runtime.wavefront import lane_count, wavefront_clips  # noqa: E402
from vidrd_rt.runtime.weights import ModelSource, load_model  # noqa: E402

PROMPT = "a boat is sailing in a lake"
CHECK_CLIPS = 3
RUN = {"device": "cuda", "size": 256}  # --device/--size: a CPU dry run with --model tiny checks the script itself


def on_cuda() -> bool:
    return RUN["device"] == "cuda"


def sync() -> None:
    if on_cuda():
        torch.cuda.synchronize()


class Mark:
    """A point in device time: a CUDA event on the GPU, the host clock after a sync on the CPU."""

    def __init__(self):
        self.event = torch.cuda.Event(enable_timing=True) if on_cuda() else None
        if self.event is not None:
            self.event.record()
        self.t = time.perf_counter()

    def ms_until(self, other: "Mark") -> float:
        return self.event.elapsed_time(other.event) if self.event is not None else (other.t - self.t) * 1000


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def elapsed() -> float:
    return time.perf_counter() - T0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64 (METHOD.md)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def write_json(report: dict, out_dir: Path) -> None:
    path = out_dir / "smoke_compiled.json"
    path.write_text(json.dumps(report, indent=1, default=str))


##### fixtures of the run


class Fp32Reference:
    """The fp16 model's UNet upcast to fp32 (same weights), as a denoiser: the accuracy yardstick."""

    def __init__(self, unet):
        self.unet = copy.deepcopy(unet).float()

    @torch.inference_mode()
    def __call__(self, sample, timestep, context):
        return self.unet(sample.float(), timestep, context.float())


def step_inputs(lanes: int, sampler: SamplerConfig, context: torch.Tensor, seed: int) -> tuple:
    """One tick's step inputs at `lanes` lanes, random (never zeros): steps spread over the schedule, DSG on/off."""
    device, side = RUN["device"], RUN["size"] // 8
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(lanes, 4, sampler.frames, side, side, device=device, generator=g)
    head = torch.randn(lanes, 4, sampler.overlap, side, side, device=device, generator=g)
    index = torch.randint(0, sampler.steps, (lanes,), device=device, generator=g)
    mask = torch.rand(lanes, sampler.overlap, device=device, generator=g) < 0.5
    return x, index, head, mask, context.repeat_interleave(lanes, dim=0)


def build(model, backend: str, inflight: int, settings: CompileSettings) -> VideoPipeline:
    runtime = RuntimeConfig(device=RUN["device"], dtype="fp16" if on_cuda() else "fp32", backend=backend,
                            inflight=inflight)
    if backend == "compiled":
        denoise, decode = make_compiled_backends(model, runtime, settings)
    else:
        denoise, decode = make_backends(model, runtime)
    return VideoPipeline(model, runtime, denoise=denoise, decode=decode)


def free() -> None:
    gc.collect()
    if on_cuda():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


##### (a) checks


def check_step(pipeline: VideoPipeline, reference: Fp32Reference, sampler: SamplerConfig, context) -> dict:
    """Compiled step vs eager fp16 step, both against fp32, on fresh random inputs (1 lane, as compiled K=1)."""
    table, fast = pipeline.step_for(sampler)
    eager = make_step(pipeline.denoise, table, sampler)
    truth = make_step(reference, table, sampler)
    rows = []
    for seed in (1, 2, 3):
        inputs = step_inputs(1, sampler, context, seed)
        with torch.inference_mode():
            a = [t.clone() for t in fast(*inputs)]  # graph outputs are static buffers: copy before the next call
            b, r = eager(*inputs), truth(*inputs)
        rows.append({"seed": seed, "finite": finite(*a, *b), "compiled_vs_fp32": rel(a[0], r[0]),
                     "eager16_vs_fp32": rel(b[0], r[0]), "compiled_vs_eager16": rel(a[0], b[0]),
                     "head_equal": bool(torch.equal(a[1], b[1]))})
    ok = all(r["finite"] and r["compiled_vs_fp32"] <= max(2 * r["eager16_vs_fp32"], 2e-3)
             and r["compiled_vs_eager16"] < 1e-2 for r in rows)
    return {"ok": ok, "rows": rows}


def _state(sampler) -> ClipState:
    return ClipState.for_config(sampler, 1, 4, RUN["size"] // 8, RUN["size"] // 8, RUN["device"], torch.float32)


def sequential_latents(denoise, table, sampler, context) -> list:
    state = _state(sampler)
    noise = TorchNoise(sampler.seed)
    return [sample_clip(denoise, table, state, context, sampler, noise) for _ in range(sampler.clips)]


def wavefront_latents(step, table, sampler, context, lanes: int) -> list:
    state = _state(sampler)
    noise = TorchNoise(sampler.seed)
    return [c.latents for c in wavefront_clips(step, table, state, context, sampler, noise, lanes)]


def compare_videos(name: str, video: list, references: dict) -> dict:
    """Per clip: rel error vs the fp32 sequential video and vs the fp16 sequential one; ok if no farther from fp32
    than the fp16 sequential video is (within 2x, or 2e-3)."""
    fp32, fp16 = references["fp32"], references["fp16"]
    rows = [{"clip": k, "vs_fp32": rel(v, fp32[k]), "seq16_vs_fp32": rel(fp16[k], fp32[k]),
             "vs_seq16": rel(v, fp16[k]), "finite": finite(v)} for k, v in enumerate(video)]
    ok = all(r["finite"] and r["vs_fp32"] <= max(2 * r["seq16_vs_fp32"], 2e-3) for r in rows)
    log(f"check {name}: " + ", ".join(f"clip {r['clip']} {r['vs_fp32']:.2e} vs fp32 ({r['seq16_vs_fp32']:.2e} "
                                      f"sequential fp16), {r['vs_seq16']:.2e} vs seq fp16" for r in rows)
        + f" -> {'OK' if ok else 'FAIL'}")
    return {"ok": ok, "rows": rows}


def check_wavefront(pipeline_eager: VideoPipeline, reference: Fp32Reference, sampler, context) -> tuple[dict, dict]:
    """Eager fp16 wavefront K=2 vs eager fp16 sequential, both against the fp32 sequential video (3 clips)."""
    s3 = _replace(sampler, clips=CHECK_CLIPS)
    table, _ = pipeline_eager.step_for(s3)
    references = {"fp32": sequential_latents(reference, table, s3, context)}
    log("check: fp32 sequential reference done")
    references["fp16"] = sequential_latents(pipeline_eager.denoise, table, s3, context)
    step = make_step(pipeline_eager.denoise, table, s3)
    result = compare_videos("eager wavefront K=2", wavefront_latents(step, table, s3, context, 2), references)
    return result, references


def _replace(sampler: SamplerConfig, **changes) -> SamplerConfig:
    return dataclasses.replace(sampler, **changes)


##### (b) timings


def time_step(step, inputs, iters: int = 20) -> float:
    """Median ms of one step call (inputs copied into the static buffers + replay, or eager), by CUDA events."""
    times = []
    with torch.inference_mode():
        for _ in range(3):
            step(*inputs)
        for _ in range(iters):
            sync()
            start = Mark()
            step(*inputs)
            end = Mark()
            sync()
            times.append(start.ms_until(end))
    return sorted(times)[len(times) // 2]


def run_video(pipeline: VideoPipeline, sampler: SamplerConfig, context, clips: int) -> dict:
    """One video as `generate` runs it (side-stream decode, writer thread), minus the file: arrival times per clip,
    GPU time per tick from CUDA events recorded at each step callback, peak memory."""
    s = _replace(sampler, clips=clips)
    size = RUN["size"]
    state = pipeline.new_state(s, size, size)
    arrivals: list[float] = []
    ticks: list[Mark] = []

    def on_step(info: dict) -> None:
        ticks.append(Mark())

    def take(pending) -> None:
        clip = pending.result()
        arrivals.append(time.perf_counter())
        assert clip.frames.shape == (s.frames, size, size, 3)

    free()
    if on_cuda():
        torch.cuda.reset_peak_memory_stats()
    sink = ClipSink(take, depth=2)
    start = time.perf_counter()
    try:
        for pending in pipeline.pending_clips(context, s, state, on_step=on_step):
            sink.put(pending)
        sink.close()
    finally:
        sink.close(raise_error=False)
    sync()
    tick_ms = sorted(a.ms_until(b) for a, b in zip(ticks[len(ticks) // 4 :], ticks[len(ticks) // 4 + 1 :]))
    peak = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if on_cuda() else (0, 0)
    return {"start": start, "arrivals": arrivals, "tick_ms": tick_ms[len(tick_ms) // 2] if tick_ms else None,
            "peak_alloc_gib": peak[0] / 2**30, "peak_reserved_gib": peak[1] / 2**30}


def steady_fps(arrivals: list, frames: int, lanes: int) -> float | None:
    """Clips leave in bursts of L every T ticks: measure from clip 0 to the last clip of the same phase."""
    last = (len(arrivals) - 1) // lanes * lanes
    if last == 0:
        return None
    return last * frames / (arrivals[last] - arrivals[0])


def measure_config(model, backend: str, inflight: int, sampler, context, settings, references, report,
                   after=None) -> dict:
    """One row of (b); `after(pipeline)` runs once the timings are taken, while the compiled step still exists."""
    name = f"{'compiled' if backend == 'compiled' else 'eager'} {'fp16' if on_cuda() else 'fp32'} K={inflight}"
    row: dict = {"name": name, "backend": backend, "inflight": inflight, "lanes": lane_count(inflight, sampler.steps)}
    report["configs"].append(row)
    pipeline = build(model, backend, inflight, settings)
    lanes = row["lanes"]
    table, step = pipeline.step_for(sampler)
    if step is None:  # eager K=1 runs the sequential reference loop; time its step function for the step latency
        step = make_step(pipeline.denoise, table, sampler)
    inputs = step_inputs(lanes, sampler, context, seed=10 + lanes)
    log(f"{name}: first step call (compile + CUDA graph capture when compiled) ...")
    start = time.perf_counter()
    with torch.inference_mode():
        step(*inputs)
    sync()
    row["first_call_s"] = time.perf_counter() - start
    row["compile_s"] = getattr(pipeline.denoise, "compile_seconds", 0.0)
    row["compile_log"] = [{k: v for k, v in e.items() if k != "settings"}
                          for e in getattr(pipeline.denoise, "compile_log", [])]
    log(f"{name}: first call {row['first_call_s']:.1f} s (compile {row['compile_s']:.1f} s)")
    row["step_ms"] = time_step(step, inputs)
    row["clip_step_ms"] = row["step_ms"] / lanes
    log(f"{name}: step {row['step_ms']:.2f} ms for {lanes} lane(s), {row['clip_step_ms']:.2f} ms per clip-step")
    if backend == "compiled" and inflight > 1 and references is not None:
        video = wavefront_latents(step, table, _replace(sampler, clips=CHECK_CLIPS), context, inflight)
        row["check_vs_sequential"] = compare_videos(f"{name} wavefront", video, references)
    clips = max(6, 3 * lanes) + 1
    video = run_video(pipeline, sampler, context, clips)
    arrivals = video.pop("arrivals")
    row.update(video, clips=clips, first_clip_s=arrivals[0] - video.pop("start"),
               fps_steady=steady_fps(arrivals, sampler.frames, lanes))
    log(f"{name}: {clips} clips, first clip {row['first_clip_s']:.2f} s, steady {row['fps_steady'] or 0:.2f} frames/s,"
        f" tick {row['tick_ms'] or 0:.2f} ms, peak {row['peak_alloc_gib']:.2f} GiB allocated")
    if after is not None:
        after(pipeline)
    return row


##### driver


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=540.0, help="seconds for the whole command; later configs skip")
    p.add_argument("--inflight", default="1,2,4,8", help="compiled lane counts to time, in this order")
    p.add_argument("--skip-checks", action="store_true", help="no fp32 reference, no correctness checks")
    p.add_argument("--skip-eager", action="store_true", help="do not time the eager fp16 K=1 row")
    p.add_argument("--dynamic", action="store_true", help="CompileSettings(dynamic=True): one compile for all K")
    p.add_argument("--mode", default="default", help="Inductor mode (CompileSettings.mode)")
    p.add_argument("--cache-dir", default=None, help="Inductor cache (default ~/.cache/vidrd-rt)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--model", default="vidrd-base", help="preset with random weights (tiny: a CPU dry run)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", type=int, default=256, help="pixels (tiny: 64)")
    p.add_argument("--frames", type=int, default=16)
    return p.parse_args()


def table(report: dict) -> str:
    head = f"{'config':22s} {'compile s':>9s} {'step ms':>8s} {'ms/clip-step':>12s} {'first clip s':>12s} " \
           f"{'frames/s':>8s} {'peak GiB':>8s}  check"
    lines = [head, "-" * len(head)]
    for r in report["configs"]:
        check = r.get("check_vs_sequential", {}).get("ok")
        status = r.get("error", "skipped: " + r["skipped"] if "skipped" in r else "")
        lines.append(f"{r['name']:22s} {_f(r.get('compile_s'), 9, 1)} {_f(r.get('step_ms'), 8, 2)} "
                     f"{_f(r.get('clip_step_ms'), 12, 2)} {_f(r.get('first_clip_s'), 12, 2)} "
                     f"{_f(r.get('fps_steady'), 8, 2)} {_f(r.get('peak_alloc_gib'), 8, 2)}  "
                     f"{'' if check is None else ('OK' if check else 'FAIL')} {status[:60]}")
    for name, c in report["checks"].items():
        lines.append(f"check {name}: {'OK' if c.get('ok') else 'FAIL'} {c.get('error', '')[:80]}")
    return "\n".join(lines)


def _f(value, width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}s}"


def main() -> None:
    args = parse()
    out_dir = Path(os.environ.get("OUT", "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    RUN.update(device=args.device, size=args.size)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32; fp16 work is unaffected
    torch.backends.cudnn.allow_tf32 = False
    settings = CompileSettings(mode=args.mode, dynamic=args.dynamic, cache_dir=args.cache_dir)
    sampler = SamplerConfig(clips=1, frames=args.frames, overlap=4, alpha=4.0, beta=0.4, steps=args.steps,
                            guidance=10.0)
    device_name = torch.cuda.get_device_name() if on_cuda() else "cpu"
    report = {"device": device_name, "torch": torch.__version__, "args": vars(args),
              "settings": settings.__dict__, "cache_dir": settings.resolved_cache_dir(), "checks": {}, "configs": []}
    log(f"{report['device']}, torch {torch.__version__}, Inductor cache {report['cache_dir']}")
    dtype = torch.float16 if on_cuda() else torch.float32
    model = load_model(ModelSource(model=args.model, random_weights=True), dtype, args.device)
    context = encode_prompt(model, PROMPT, "", args.device)  # [2, 77, D] fp32
    log(f"{args.model} (random weights) loaded in {dtype}")
    references: dict = {}

    def checks(pipeline: VideoPipeline) -> None:  # after compiled K=1 is timed: the fp32 copy would skew its memory
        references.update(run_checks(model, pipeline, sampler, context, report) or {})

    plan = ([] if args.skip_eager else [("torch", 1)])
    plan += [("compiled", int(k)) for k in args.inflight.split(",") if k.strip()]
    compile_estimate, run_estimate = 240.0, 30.0
    for backend, k in plan:
        need = (compile_estimate if backend == "compiled" else 0) + run_estimate * max(1, k / 2)
        if elapsed() + need > args.budget:
            report["configs"].append({"name": f"{backend} fp16 K={k}", "backend": backend, "inflight": k,
                                      "skipped": f"budget: {elapsed():.0f} s used, ~{need:.0f} s needed"})
            log(f"skip {backend} K={k}: ~{need:.0f} s needed, {args.budget - elapsed():.0f} s left")
            continue
        after = checks if backend == "compiled" and k == 1 and not args.skip_checks else None
        try:
            row = measure_config(model, backend, k, sampler, context, settings, references or None, report, after)
            if any(e.get("fxgraph_cache_miss") for e in row.get("compile_log", [])):  # a cold compile: the yardstick
                compile_estimate = max(60.0, row["compile_s"] * 1.2)
        except Exception as err:  # noqa: BLE001 - one failed configuration must not lose the others
            report["configs"][-1]["error"] = f"{type(err).__name__}: {err}"
            report["configs"][-1]["traceback"] = traceback.format_exc()[-3000:]
            log(f"{backend} K={k} FAILED: {type(err).__name__}: {err}")
        free()
        write_json(report, out_dir)
    torch._dynamo.reset()
    write_json(report, out_dir)
    log(f"done in {elapsed():.0f} s; JSON in {out_dir / 'smoke_compiled.json'}")
    print(table(report), flush=True)


def run_checks(model, pipeline: VideoPipeline, sampler, context, report) -> dict | None:
    """(a): compiled (K=1 pipeline's step) vs eager step, eager wavefront K=2 vs sequential; returns the reference
    videos for the compiled wavefront rows of (b)."""
    references = None
    log("checks: fp32 reference UNet (same weights, TF32 off) ...")
    reference = Fp32Reference(model.unet)
    try:
        report["checks"]["compiled_step"] = check_step(pipeline, reference, sampler, context)
        rows = report["checks"]["compiled_step"]["rows"]
        log("check compiled step: " + ", ".join(f"{r['compiled_vs_fp32']:.2e} vs fp32 (eager fp16 "
                                                f"{r['eager16_vs_fp32']:.2e}), {r['compiled_vs_eager16']:.2e} vs "
                                                f"eager" for r in rows)
            + f" -> {'OK' if report['checks']['compiled_step']['ok'] else 'FAIL'}")
    except Exception as err:  # noqa: BLE001
        report["checks"]["compiled_step"] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                                             "traceback": traceback.format_exc()[-3000:]}
        log(f"check compiled step FAILED: {err}")
    try:
        eager = build(model, "torch", 2, CompileSettings())
        report["checks"]["wavefront_k2"], references = check_wavefront(eager, reference, sampler, context)
    except Exception as err:  # noqa: BLE001
        report["checks"]["wavefront_k2"] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                                            "traceback": traceback.format_exc()[-3000:]}
        log(f"check wavefront FAILED: {err}")
    del reference
    free()
    return references


if __name__ == "__main__":
    main()
