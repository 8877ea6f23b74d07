"""The timed passes over one configuration, each a fresh video from the same prompt and seed.

1. warm-up: compiles, builds graphs and autotunes; its first clip is timed separately (compile time estimate).
2. instrumented: per-stage latency; every backend call is wrapped in device syncs, which slows the run a little,
   so nothing from this pass goes into frames/s.
3. clean: first-clip latency, steady-state frames/s and memory; no syncs beyond the pipeline's own (the frames
   come back to the host after every clip, which syncs once per clip anyway).
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..runtime.config import SamplerConfig
from ..runtime.pipeline import VideoPipeline
from .metrics import median, peak_mib, reset_peak, rss_mib, sync

Log = Callable[[str], None]


class StageTimer:
    """Wraps a backend callable. Off: a plain pass-through. On: syncs the device around each call and records
    (start, seconds, batch) with batch = the first tensor argument's leading size."""

    def __init__(self, fn: Callable, device: str):
        self.fn, self.device = fn, device
        self.on = False
        self.calls: list[tuple[float, float, int]] = []

    def __call__(self, *args, **kwargs):
        if not self.on:
            return self.fn(*args, **kwargs)
        sync(self.device)
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        sync(self.device)
        batch = next((a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.ndim), 1)
        self.calls.append((start, time.perf_counter() - start, int(batch)))
        return out

    def __getattr__(self, name: str) -> Any:
        # Anything else the pipeline asks of its backend (attributes, methods) reaches the wrapped callable.
        if name == "fn":
            raise AttributeError(name)
        return getattr(self.fn, name)

    def full_batch(self) -> list[tuple[float, float, int]]:
        """The calls at the largest batch seen (a wavefront's ramp-up and drain run smaller batches)."""
        top = max((b for _, _, b in self.calls), default=None)
        return [c for c in self.calls if c[2] == top]


@dataclass
class Video:
    """What every pass needs to start a fresh video of one configuration."""

    pipeline: VideoPipeline
    context: torch.Tensor  # [2, 77, D] CFG context, on the device
    sampler: SamplerConfig
    height: int
    width: int
    device: str
    log: Log

    def clips(self, count: int, on_step: Optional[Callable[[dict], None]] = None):
        """The clips of a new video (fresh ClipState and noise, same seed) of `count` clips."""
        sampler = dataclasses.replace(self.sampler, clips=count)
        state = self.pipeline.new_state(sampler, self.height, self.width)
        return self.pipeline.clips(self.context, sampler, state, on_step=on_step)


def warmup_pass(video: Video, count: int) -> dict:
    """Run `count` clips untimed but for the first clip (compilation happens there) and the total."""
    start, first = time.perf_counter(), None
    for clip in video.clips(count):
        now = time.perf_counter()
        first = first if first is not None else now - start
        video.log(f"warm-up clip {clip.index + 1}/{count}: {now - start:.2f} s since start")
    return {"warmup_clips": count, "warmup_s": time.perf_counter() - start, "warmup_first_clip_s": first}


def _step_intervals(marks: list[tuple[Any, Any, float]]) -> list[tuple[float, float]]:
    """(t_prev, t) between consecutive steps (i-1, i) of the same clip, from (clip, step, time) marks."""
    last: dict = {}
    out = []
    for clip, step, t in marks:
        prev = last.get(clip)
        if prev is not None and step == prev[0] + 1:
            out.append((prev[1], t))
        last[clip] = (step, t)
    return out


def _step_stats(marks, calls: list[tuple[float, float, int]]) -> tuple[Optional[float], Optional[float]]:
    """Median step seconds and median step-minus-UNet seconds, over steps whose interval holds a full-batch UNet
    call (all steps when the denoiser was never called, e.g. a backend that compiles the whole step)."""
    steps, overheads = [], []
    for t0, t1 in _step_intervals(marks):
        inside = [seconds for start, seconds, _ in calls if t0 <= start < t1]
        if calls and not inside:
            continue
        steps.append(t1 - t0)
        if inside:
            overheads.append(t1 - t0 - sum(inside))
    return median(steps), median(overheads)


def instrumented_pass(video: Video, count: int, denoise: StageTimer, decode: StageTimer,
                      encode_text: Callable[[], torch.Tensor], text_reps: int, tmp_dir: str, fps: int) -> dict:
    """Per-stage latencies (ms, medians) over `count` clips, device synced around every timed region."""
    marks: list[tuple[Any, Any, float]] = []

    def on_step(info: dict) -> None:
        sync(video.device)
        marks.append((info.get("clip"), info.get("step"), time.perf_counter()))

    denoise.calls.clear(), decode.calls.clear()
    denoise.on = decode.on = True
    try:
        encode_s = _encode_clips(video, video.clips(count, on_step), os.path.join(tmp_dir, "stage.mp4"), fps)
    finally:
        denoise.on = decode.on = False
    full = denoise.full_batch()
    unet_ms = _ms(median([seconds for _, seconds, _ in full]))
    clips_per_call = full[0][2] / 2 if full else None  # the denoiser sees [2B, ...]: CFG doubles B
    step, overhead = _step_stats(marks, full)
    return {
        "stage_clips": count,
        "text_encoder_ms": _time_text(video.device, encode_text, text_reps),
        "unet_call_ms": unet_ms,
        "unet_calls": len(denoise.calls),
        "unet_batch_clips": clips_per_call,
        "unet_ms_per_clip_step": unet_ms / clips_per_call if unet_ms and clips_per_call else None,
        "step_ms": _ms(step),
        "scheduler_ms": _ms(overhead),
        "decode_ms": _ms(median([seconds for _, seconds, _ in decode.calls])),
        "encode_ms": _ms(encode_s),
    }


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else seconds * 1000.0


def open_mp4(path: str, fps: int, height: int, width: int):
    """runtime/video_io's mp4 writer, imported here so that a machine without PyAV still runs every other stage."""
    from ..runtime.video_io import open_writer

    return open_writer(path, fps, height, width)


def _encode_clips(video: Video, clips, path: str, fps: int) -> Optional[float]:
    """Write every clip's frames to an mp4 with runtime/video_io; mean seconds per clip (write + share of close).
    None, with the clips still consumed, when PyAV is missing."""
    try:
        writer = open_mp4(path, fps, video.height, video.width)
    except ImportError as e:
        video.log(f"video encode not timed: {e}")
        writer = None
    spent, count = 0.0, 0
    try:
        for clip in clips:
            start = time.perf_counter()
            if writer:
                writer.write(clip.frames)
            spent += time.perf_counter() - start
            count += 1
            video.log(f"instrumented clip {clip.index + 1}: {len(clip.frames)} frames")
        start = time.perf_counter()
        if writer:
            writer.close()  # x264 holds look-ahead frames until here
        spent += time.perf_counter() - start
    finally:
        if writer:
            writer.abort()  # no-op once closed
        if os.path.exists(path):
            os.remove(path)
    return spent / max(count, 1) if writer else None


def _time_text(device: str, encode_text: Callable[[], torch.Tensor], reps: int) -> float:
    times = []
    for _ in range(reps + 1):  # the first call is untimed (tokenizer caches, kernel selection)
        sync(device)
        start = time.perf_counter()
        encode_text()
        sync(device)
        times.append(time.perf_counter() - start)
    return median(times[1:] or times) * 1000.0


@dataclass
class CleanResult:
    """Host timestamps of the clean pass; `stamps[i]` is when clip i's frames reached the host."""

    start: float
    stamps: list[float]
    frames: list[int]
    peak_2_mib: Optional[float]
    peak_mib: Optional[float]
    rss_2_mib: Optional[float]
    rss_mib: Optional[float]
    truncated: bool
    written: Optional[float] = None  # with a writer: when the mp4 was finished


class _WriterThread:
    """Encodes clips to an mp4 in a thread behind a 2-clip queue, as `generate` overlaps writing with denoising
    (a writer slower than the denoiser holds the denoiser back, so it shows in frames/s)."""

    def __init__(self, path: str, fps: int, height: int, width: int):
        self.writer = open_mp4(path, fps, height, width)
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._loop, name="bench-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (frames := self.queue.get()) is not None:
            try:
                self.writer.write(frames)
            except BaseException as e:  # reported to the main thread by close()
                self.error = e

    def put(self, frames) -> None:
        self.queue.put(frames)

    def close(self) -> float:
        """Finish the file, delete it, and return when it was finished (perf_counter)."""
        self.queue.put(None)
        self.thread.join()
        self.writer.close()
        finished = time.perf_counter()
        if os.path.exists(self.writer.path):
            os.remove(self.writer.path)
        if self.error is not None:
            raise self.error
        return finished


def clean_pass(video: Video, count: int, deadline: Optional[float], writer_path: Optional[str], fps: int,
               mark: Callable[[int], None] = lambda index: None) -> CleanResult:
    """Time `count` clips with no instrumentation. `mark(i)` runs as clip i arrives (energy counter reads).
    Past `deadline` (perf_counter) the pass stops once it has 3 clips; `truncated` says so."""
    writer = _WriterThread(writer_path, fps, video.height, video.width) if writer_path else None
    reset_peak(video.device)
    start = time.perf_counter()
    stamps, frames, peak_2, rss_2, truncated, written = [], [], None, None, False, None
    clips = video.clips(count)
    try:
        for clip in clips:
            stamps.append(time.perf_counter())
            frames.append(len(clip.frames))
            if writer:
                writer.put(clip.frames)
            mark(clip.index)
            if len(stamps) == 2:
                peak_2, rss_2 = peak_mib(video.device), rss_mib()
            video.log(f"clean clip {clip.index + 1}/{count}: {stamps[-1] - start:.2f} s since start")
            if deadline is not None and time.perf_counter() > deadline and 3 <= len(stamps) < count:
                truncated = True
                video.log(f"time budget reached: clean pass stops after {len(stamps)} clips")
                break
    finally:
        clips.close()
        if writer:
            written = writer.close()
    return CleanResult(start, stamps, frames, peak_2, peak_mib(video.device), rss_2, rss_mib(), truncated, written)


def clean_metrics(result: CleanResult, steps: int) -> dict:
    """First-clip latency, frames/s (steady: clips 1.. after clip 0 arrived; total: all from the start) and
    memory growth from 2 clips to the end."""
    s, f = result.stamps, result.frames
    steady_s = s[-1] - s[0] if len(s) >= 2 else None
    clip_s = steady_s / (len(s) - 1) if steady_s else None
    growth = (result.peak_mib / result.peak_2_mib - 1.0) * 100.0 if result.peak_2_mib else None
    return {
        "clips": len(s),
        "clean_truncated": result.truncated,
        "first_clip_s": s[0] - result.start,
        "clip_s": clip_s,
        "clip_step_ms": clip_s / steps * 1000.0 if clip_s else None,
        "fps_steady": sum(f[1:]) / steady_s if steady_s else None,
        "fps_total": sum(f) / (s[-1] - result.start),
        "fps_end_to_end": sum(f) / (result.written - result.start) if result.written else None,
        "clean_peak_2clips_mib": result.peak_2_mib,
        "clean_peak_mib": result.peak_mib,
        "mem_growth_pct": growth,
        "rss_2clips_mib": result.rss_2_mib,
        "rss_mib": result.rss_mib,
    }
