"""`vidrd-rt bench`: time an ablation ladder of RuntimeConfigs side by side; one row of numbers per configuration.

Per row: load the model in the row's dtype, build its backends, then three passes (passes.py): warm-up,
instrumented (stage latencies) and clean (first clip, frames/s, memory), with NVML sampling power and utilisation
throughout. After every row the JSON, markdown and PNG are rewritten, so a run cut short keeps its finished rows.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch

from ..runtime.config import ConfigError, SamplerConfig
from ..runtime.errors import UserError
from ..runtime.pipeline import VideoPipeline, encode_prompt
from ..runtime.weights import ModelSource, load_model
from . import report
from .flops import matmul_peak_tflops, unet_flops
from .ladder import Row
from .metrics import Sampler, is_cuda, open_nvml, peak_mib, reset_peak
from .passes import StageTimer, Video, clean_metrics, clean_pass, instrumented_pass, warmup_pass


@dataclass(frozen=True)
class BenchRequest:
    """One invocation: which rows, on which model and device, at which sampling setting, written where."""

    source: ModelSource
    rows: tuple[Row, ...]
    device: str
    sampler: SamplerConfig  # sampler.clips = clips of the clean pass (steady state needs >= 10)
    prompt: str = "a boat is sailing in a lake"
    negative_prompt: str = ""
    height: Optional[int] = None  # None: the model's
    width: Optional[int] = None
    warmup_clips: Optional[int] = None  # None: max(2, K + 1), so DSG and every wavefront batch size run once
    stage_clips: Optional[int] = None  # None: max(2, K + 1), so a wavefront reaches its full batch
    text_reps: int = 5
    encode_in_loop: bool = False  # clean pass also writes the mp4, as `generate` does
    json_path: str = "bench/out/bench.json"
    append: bool = False
    time_budget_s: float = 0.0  # 0: none; else rows not started in time are skipped, the clean pass cut short
    peak_size: Optional[int] = None  # matmul side for the peak; None: 8192 on CUDA, 512 on the CPU
    fps: int = 8
    command: str = ""


class Log:
    """Timestamped progress lines, flushed at once to stderr and appended to a log file beside the JSON."""

    def __init__(self, path: Path):
        self.start = time.perf_counter()
        self.file = open(path, "a", buffering=1)
        self.prefix = ""

    def __call__(self, message: str) -> None:
        stamp = f"[{datetime.now().strftime('%H:%M:%S')} +{time.perf_counter() - self.start:7.1f}s]"
        line = f"{stamp} {self.prefix}{message}"
        print(line, file=sys.stderr, flush=True)
        self.file.write(line + "\n")

    def detail(self, text: str) -> None:
        """Only into the log file (tracebacks)."""
        self.file.write(text if text.endswith("\n") else text + "\n")

    def close(self) -> None:
        self.file.close()


@dataclass
class RunContext:
    """Per-invocation state shared by the rows."""

    request: BenchRequest
    log: Log
    run: dict
    deadline: Optional[float]
    sampler: Optional[Sampler] = None
    nvml: object = None
    flops: Optional[int] = None
    size: tuple = (None, None)  # (height, width) once a model has loaded
    rows: list = field(default_factory=list)


def check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"--device must be cpu or cuda[:N] (got {device!r})") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible to torch here; use --device cpu")
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda[:N] (got {device!r})")


def run_bench(request: BenchRequest) -> dict:
    """Time every row; returns the result document (also written to request.json_path with .md and .png)."""
    check_device(request.device)
    request.source.kind()  # a missing or contradictory model source fails here, before any work
    for flag, value in (("--stage-clips", request.stage_clips), ("--warmup-clips", request.warmup_clips)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1 (got {value})")
    if request.encode_in_loop:
        try:
            import av  # noqa: F401
        except ImportError:
            raise UserError("--encode needs PyAV (pip install av); leave --encode out to time the rest") from None
    out = Path(request.json_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = report.load(out) if request.append and out.exists() else None
    run = _run_record(request)
    if previous is not None:  # refuse before any work, not after the first row
        report.check_same_setting(previous["setting"], _setting(request, run, (None, None)), f"--append {out}")
    log = Log(out.with_suffix(".log"))
    deadline = time.perf_counter() + request.time_budget_s if request.time_budget_s > 0 else None
    ctx = RunContext(request, log, run, deadline)
    try:
        ctx.nvml, why = open_nvml(request.device)
        ctx.run["environment"].update(ctx.nvml.describe() if ctx.nvml else {"nvml": why})
        log(f"bench: {len(request.rows)} rows on {request.device}; output {out}")
        _measure_peaks(ctx)
        with Sampler(ctx.nvml.read) if ctx.nvml else contextlib.nullcontext() as ctx.sampler:
            for row in request.rows:
                ctx.rows.append(_run_row(ctx, row))
                log.prefix = ""
                _write(ctx, previous, out)
        doc = _write(ctx, previous, out)
        log(f"bench done: wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
        return doc
    finally:
        log.close()


def _write(ctx: RunContext, previous: Optional[dict], out: Path) -> dict:
    doc = report.document(_setting(ctx.request, ctx.run, ctx.size), [ctx.run], ctx.rows)
    if previous is not None:
        doc = report.merge([previous, doc])
    report.write_all(doc, out)
    return doc


def _run_record(request: BenchRequest) -> dict:
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "cpu_count": os.cpu_count(), "host": platform.node(),
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32}
    if is_cuda(request.device):
        env["gpu"] = torch.cuda.get_device_name(request.device)
    return {"id": started, "command": request.command, "environment": env, "matmul_peak_tflops": {},
            "flops_per_clip_step": None}


def _setting(request: BenchRequest, run: dict, size: tuple) -> dict:
    """What must match for rows to sit in one table (rows from several invocations are merged on this)."""
    s = request.sampler
    return {"model": request.source.model or request.source.ckpt, "device": torch.device(request.device).type,
            "device_name": run["environment"].get("gpu", "cpu"), "height": size[0] or request.height,
            "width": size[1] or request.width, "frames": s.frames, "overlap": s.overlap, "alpha": s.alpha,
            "beta": s.beta, "steps": s.steps, "guidance": s.guidance, "seed": s.seed, "prompt": request.prompt,
            "negative_prompt": request.negative_prompt}


def _measure_peaks(ctx: RunContext) -> None:
    """The matmul peak of every dtype the rows use, measured once per invocation before any row runs."""
    request = ctx.request
    size = request.peak_size or (8192 if is_cuda(request.device) else 512)
    for dtype in sorted({row.runtime.dtype for row in request.rows}):
        try:
            tflops = matmul_peak_tflops(request.device, dtype, size)
        except RuntimeError as e:  # e.g. a dtype the CPU build lacks a kernel for
            ctx.log(f"matmul peak {dtype}: not measured ({str(e).splitlines()[0]})")
            continue
        ctx.run["matmul_peak_tflops"][dtype] = tflops
        ctx.log(f"matmul peak {dtype} ({size}^3): {tflops:.1f} TFLOP/s")
    ctx.run["matmul_size"] = size


def _run_row(ctx: RunContext, row: Row) -> dict:
    """One configuration: a full record, or status skipped/failed with the reason (the bench goes on)."""
    rec = {"name": row.name, **row.fields(), "status": "ok", "reason": None, "run": ctx.run["id"],
           "command": ctx.request.command}
    ctx.log.prefix = f"{row.name} | "
    why = _skip_reason(ctx, row)
    if why:
        ctx.log(f"skipped: {why}")
        return {**rec, "status": "skipped", "reason": why}
    state: dict = {}
    try:
        _measure_row(ctx, row, rec, state)
    except Exception as e:  # skipped: could not be built or compiled (up to the warm-up's end); failed: later
        status = "failed" if state.get("built") else "skipped"
        reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]
        ctx.log(f"{status}: {reason} (traceback in the .log file)")
        ctx.log.detail(traceback.format_exc())
        rec.update(status=status, reason=reason)
    finally:
        state.clear()
        _free_device(ctx.request.device)
    return rec


def _skip_reason(ctx: RunContext, row: Row) -> Optional[str]:
    if row.runtime.backend in ("onnxruntime", "tensorrt") and not row.runtime.engine_dir:
        return f"{row.runtime.backend} needs --engine-dir (engines from vidrd-rt build-engine)"
    if ctx.deadline is not None and time.perf_counter() > ctx.deadline:
        return "time budget spent before this row started (--time-budget)"
    return None


def _measure_row(ctx: RunContext, row: Row, rec: dict, state: dict) -> None:
    request, runtime, log = ctx.request, row.runtime, ctx.log
    reset_peak(request.device)
    row_start = time.perf_counter()
    model = state["model"] = load_model(request.source, runtime.torch_dtype, request.device)
    rec["load_s"] = time.perf_counter() - row_start
    log(f"loaded {model.config.name} in {rec['load_s']:.1f} s")
    start = time.perf_counter()
    video, denoise, decode = _build(ctx, row, model, state)
    rec["build_s"] = time.perf_counter() - start
    log(f"built {runtime.backend} backends in {rec['build_s']:.1f} s")
    rec.update(warmup_pass(video, request.warmup_clips or max(2, runtime.inflight + 1)))
    state["built"] = True  # compiled and captured: a later error is a failure of the row, not a missing backend
    with tempfile.TemporaryDirectory(prefix="vidrd-bench-") as tmp:
        encode_text = lambda: encode_prompt(model, request.prompt, request.negative_prompt, request.device)  # noqa
        stage_clips = request.stage_clips or max(2, runtime.inflight + 1)
        rec.update(instrumented_pass(video, stage_clips, denoise, decode, encode_text, request.text_reps, tmp,
                                     request.fps))
        rec.update(_clean(ctx, video, tmp))
    rec["peak_torch_mib"] = peak_mib(request.device)
    rec["backend_compile_s"] = _compile_seconds(denoise)
    rec.update(_window(ctx, row_start, time.perf_counter(), "nvml_used_max_mib"))
    rec.update(_derived(ctx, rec, model, video))
    log(f"done: {_fmt(rec.get('fps_steady'))} frames/s steady, first clip {_fmt(rec.get('first_clip_s'))} s, "
        f"step {_fmt(rec.get('step_ms'))} ms, compile ~{_fmt(rec.get('compile_s'))} s")


def _build(ctx: RunContext, row: Row, model, state: dict):
    """Backends for the row, each wrapped in a StageTimer (off outside the instrumented pass), and the pipeline."""
    from ..runtime.backends import make_backends, prepare_for_device

    request = ctx.request
    denoise_fn, decode_fn = make_backends(prepare_for_device(model, row.runtime), row.runtime)
    denoise, decode = StageTimer(denoise_fn, request.device), StageTimer(decode_fn, request.device)
    pipeline = state["pipeline"] = VideoPipeline(model, row.runtime, denoise=denoise, decode=decode)
    context = encode_prompt(model, request.prompt, request.negative_prompt, request.device)
    height, width = request.height or model.config.height, request.width or model.config.width
    ctx.size = (height, width)
    return Video(pipeline, context, request.sampler, height, width, request.device, ctx.log), denoise, decode


def _clean(ctx: RunContext, video: Video, tmp: str) -> dict:
    """The clean pass plus its NVML window (steady part: from clip 0's arrival to the end) and energy per frame."""
    energy: dict[int, Optional[float]] = {}
    read_energy = ctx.nvml.energy_j if ctx.nvml else (lambda: None)
    compiled_before = _compile_seconds(video.pipeline.denoise)
    result = clean_pass(video, ctx.request.sampler.clips, ctx.deadline,
                        f"{tmp}/clean.mp4" if ctx.request.encode_in_loop else None, ctx.request.fps,
                        mark=lambda index: energy.__setitem__(index, read_energy()))
    out = clean_metrics(result, ctx.request.sampler.steps)
    if compiled_before is not None:  # > 0 means the warm-up missed a shape and the clean pass paid for it
        out["compile_in_clean_s"] = _compile_seconds(video.pipeline.denoise) - compiled_before
        if out["compile_in_clean_s"] > 0:
            ctx.log(f"warning: {out['compile_in_clean_s']:.1f} s of compilation inside the clean pass; "
                    f"raise --warmup-clips")
    if len(result.stamps) >= 2:
        out.update(_window(ctx, result.stamps[0], result.stamps[-1]))
        first, last = energy.get(0), energy.get(len(result.stamps) - 1)
        if first is not None and last is not None:
            out["joules_per_frame"] = (last - first) / sum(result.frames[1:])
    return out


def _compile_seconds(denoise) -> Optional[float]:
    """The compiling backend's own count of compile (and CUDA-graph capture) seconds; None for other backends."""
    reported = getattr(denoise, "compile_seconds", None)
    return float(reported) if isinstance(reported, (int, float)) else None


def _window(ctx: RunContext, t0: float, t1: float, *only: str) -> dict:
    stats = ctx.sampler.window(t0, t1) if ctx.sampler else {}
    return {k: v for k, v in stats.items() if not only or k in only}


def _derived(ctx: RunContext, rec: dict, model, video: Video) -> dict:
    """Compile-time estimate and the efficiency figures: achieved TFLOP/s and its ratio to the matmul peak."""
    s = ctx.request.sampler
    if ctx.flops is None:
        ctx.flops = unet_flops(model.config, s.frames, video.height, video.width)
        ctx.run["flops_per_clip_step"] = ctx.flops
        peaks = ctx.run["matmul_peak_tflops"]
        best = max([v for k, v in peaks.items() if k in ("fp16", "bf16")] or list(peaks.values()) or [0.0])
        # The compute floor (MISSION.md): UNet FLOPs of a clip at the best measured matmul rate, nothing else.
        ctx.run["floor_fps"] = s.frames / (s.steps * ctx.flops / (best * 1e12)) if best else None
    out = {"flops_per_clip_step": ctx.flops, "peak_tflops": ctx.run["matmul_peak_tflops"].get(rec["dtype"]),
           "compile_s": rec["backend_compile_s"]}
    if rec.get("clip_s"):
        steady = rec["first_clip_s"] + (rec["warmup_clips"] - 1) * rec["clip_s"]
        out["compile_estimate_s"] = max(0.0, rec["warmup_s"] - steady)
        if out["compile_s"] is None:
            out["compile_s"] = out["compile_estimate_s"]
        out["achieved_tflops"] = ctx.flops * s.steps / rec["clip_s"] / 1e12
        if out["peak_tflops"]:
            out["mfu"] = out["achieved_tflops"] / out["peak_tflops"]
    return out


def _free_device(device: str) -> None:
    gc.collect()
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()  # drop compiled graphs and CUDA-graph pools of the previous row
    if is_cuda(device):
        torch.cuda.empty_cache()


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def merge_files(paths: list[str], json_path: str, append: bool) -> dict:
    """Merge result files (later rows of the same name win) into json_path, rewriting its .md and .png."""
    out = Path(json_path)
    docs = [report.load(out)] if append and out.exists() else []
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"--merge {path}: file not found")
        docs.append(report.load(Path(path)))
    doc = report.merge(docs)
    out.parent.mkdir(parents=True, exist_ok=True)
    report.write_all(doc, out)
    return doc
