"""Overlap decode and output with denoising: a decode stream on CUDA, and a bounded writer thread.

The denoiser keeps the main CUDA stream busy. A finished clip's latents are decoded on a side stream that waits
on an event recorded after the clip's last step, and its frames and resume state are copied into pinned host
memory there; a writer thread waits on the copy, stores the clip, writes it to the video and saves the resume
state, in clip order. The queue between them is bounded, so a slow writer holds the denoiser back (memory stays
flat). On the CPU decode runs in the caller's thread and only the writing overlaps.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch


@dataclass
class Clip:
    """One finished clip: its index, its frames (uint8 [F, H, W, 3]), how long it took, and the resume state a
    sequential run has right after it ({"clip_state": ClipState.state_dict() on the CPU, "noise": generator state})."""

    index: int
    frames: np.ndarray
    seconds: float
    resume: dict = field(default_factory=dict, repr=False)


def frames_uint8_on_device(video: torch.Tensor) -> torch.Tensor:
    """[1, 3, F, H, W] in [0, 1] -> uint8 [F, H, W, 3] on the same device, rounded (not truncated)."""
    return (video[0].permute(1, 2, 3, 0) * 255).round().to(torch.uint8)


class PendingClip:
    """A clip whose decode and host copies may still be running; result() waits for them (in any thread)."""

    def __init__(self, index: int, frames: torch.Tensor, resume: dict, done: Optional["torch.cuda.Event"],
                 keep_from: int, clock: "_Clock"):
        self.index, self._frames, self._resume, self._done = index, frames, resume, done
        self._keep_from, self._clock = keep_from, clock

    def result(self) -> Clip:
        if self._done is not None:
            self._done.synchronize()  # only this clip's copies; the denoiser's stream runs on
        frames = np.array(self._frames.numpy()[self._keep_from :])  # own copy: pinned buffers go back to the cache
        state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in self._resume["clip_state"].items()}
        return Clip(self.index, frames, self._clock.lap(), {"clip_state": state, "noise": self._resume["noise"]})


class _Clock:
    """Seconds between consecutive finished clips, as the consumer sees them."""

    def __init__(self):
        self.last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds


class AsyncDecoder:
    """decode(latents) -> frames in [0, 1]; submit() returns a PendingClip without waiting on the device.

    On CUDA the decoder runs on its own stream, so it must enqueue its work on torch's current stream (the torch
    and compiled decoders do).
    """

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor], device):
        self.decode = decode
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.clock = _Clock()

    @torch.inference_mode()
    def submit(self, index: int, latents: torch.Tensor, clip_state: dict, noise_state: torch.Tensor,
               keep_from: int = 0) -> PendingClip:
        """latents [1, C, N, h, w] and clip_state tensors must not be modified by the caller afterwards."""
        if self.stream is None:
            frames = frames_uint8_on_device(self.decode(latents)).cpu()  # [N, H, W, 3]
            state = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in clip_state.items()}
            return PendingClip(index, frames, {"clip_state": state, "noise": noise_state}, None, keep_from, self.clock)
        ready = torch.cuda.Event()
        ready.record()  # after the clip's last step on the denoiser's stream
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            frames = _to_pinned(frames_uint8_on_device(self.decode(latents)))  # [N, H, W, 3]
            state = {k: (_to_pinned(v) if torch.is_tensor(v) else v) for k, v in clip_state.items()}
            done = torch.cuda.Event()
            done.record()
        for t in [latents, *(v for v in clip_state.values() if torch.is_tensor(v))]:
            t.record_stream(self.stream)  # made on the main stream, read here: keep them until this stream is done
        return PendingClip(index, frames, {"clip_state": state, "noise": noise_state}, done, keep_from, self.clock)


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


class ClipSink:
    """A writer thread fed through a bounded queue: handle(item) runs for each put() item, in order.

    put() blocks while the queue is full (back-pressure) and raises the thread's error once it has failed; after a
    failure the thread handles nothing more. close() handles what is queued, joins, and re-raises a failure.
    """

    _STOP = object()

    def __init__(self, handle: Callable[[object], None], depth: int = 2):
        self.handle = handle
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="vidrd-writer", daemon=True)
        self.thread.start()

    def put(self, item) -> None:
        self._put(item)
        self.raise_error()

    def close(self, raise_error: bool = True) -> None:
        """Finish the queued items (unless the thread failed) and stop the thread."""
        if self.thread.is_alive():
            self._put(self._STOP)
            self.thread.join()
        if raise_error:
            self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _put(self, item) -> None:
        while self.thread.is_alive():
            try:
                self.queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is self._STOP:
                return
            try:
                self.handle(item)
            except BaseException as err:  # noqa: BLE001 - handed to the producer, which re-raises it
                self.error = err
                return
