"""The `generate` job: stream clips into a video file, keep resume state after each clip, survive signals.

After every clip, in this order: its frames are stored in the run folder next to the output (atomically), written
to the video, and the sampler state (clip buffers + noise generator) is saved atomically. This happens in a writer
thread, clip by clip in order, while the next clips are denoised; the state saved is the one each clip carries
(a sequential run's state right after it), not the live buffers, which lanes of a wavefront may have moved on.
A resumed run re-encodes the stored clips and continues from the state, so it gives exactly the file an
uninterrupted run gives (with the same --inflight).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .config import RuntimeConfig, SamplerConfig
from .errors import Interrupted, UserError
from .noise import TorchNoise
from .overlap import ClipSink
from .pipeline import VideoPipeline, check_held_frames, encode_prompt
from .video_io import ClipFrameStore, OutputError, atomic_torch_save, check_output_path, open_writer, run_dir_for
from .weights import ModelSource, load_model

STATE_FILE = "state.pt"


@dataclass(frozen=True)
class GenerateRequest:
    """Everything that defines one video (and so whether a run folder can resume it)."""

    prompt: str
    out: str
    sampler: SamplerConfig
    runtime: RuntimeConfig
    source: ModelSource
    negative_prompt: str = ""
    height: Optional[int] = None  # None: the model's native size
    width: Optional[int] = None
    drop_overlap: bool = False
    fps: int = 8
    resume: bool = False

    def fingerprint(self, model_fingerprint: str) -> str:
        """Identity of the video apart from its length (a resumed run may ask for more clips)."""
        fields = asdict(self)
        fields["sampler"].pop("clips")
        fields.pop("resume")
        # inflight too: the lane count sets the batch shape, and with it the last bits of every clip.
        fields["runtime"] = {k: fields["runtime"][k] for k in ("dtype", "backend", "decoder", "inflight")}
        blob = json.dumps([fields, model_fingerprint], sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:20]


@contextlib.contextmanager
def signals_as_flag():
    """SIGINT/SIGTERM set a flag instead of killing the process; the step callback turns it into Interrupted."""
    caught: list[int] = []
    handler = lambda signum, frame: caught.append(signum)  # noqa: E731
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def generate(request: GenerateRequest, on_clip: Optional[Callable] = None, on_step: Optional[Callable] = None) -> dict:
    """Run the job; returns a summary. Raises Interrupted (after closing the output) on a signal."""
    if not request.prompt.strip():
        raise UserError('the prompt is empty: give --prompt "what the video shows"')
    check_output_path(request.out, overwrite=request.resume)  # fail fast, before the model loads
    check_held_frames(request.runtime, request.sampler)
    model = load_model(request.source, request.runtime.torch_dtype, request.runtime.device)
    height, width = request.height or model.config.height, request.width or model.config.width
    check_output_path(request.out, height, width, overwrite=request.resume)
    pipeline = VideoPipeline(model, request.runtime)
    context = encode_prompt(model, request.prompt, request.negative_prompt, request.runtime.device)
    state = pipeline.new_state(request.sampler, height, width)
    noise = TorchNoise(request.sampler.seed)
    run = _RunFolder(run_dir_for(request.out), request.fingerprint(model.config.fingerprint()))
    if request.resume:
        run.restore(state, noise, request.out)
    else:
        run.reset()
    writer = open_writer(request.out, request.fps, height, width, overwrite=request.resume,
                         resume_frames=run.frames(state.clips_done))
    with signals_as_flag() as caught:
        def step_hook(info: dict) -> None:
            if caught:
                raise Interrupted(caught[0])
            if on_step:
                on_step(info)

        def finish_clip(pending) -> None:  # in the writer thread, clip by clip in order
            clip = pending.result()
            run.save_clip(clip, writer)
            if on_clip:
                on_clip(clip)

        # Decoding (side CUDA stream) and writing (this thread) overlap the next clips' denoising; the bounded
        # queue holds the denoiser back when the writer lags, so memory stays flat.
        sink = ClipSink(finish_clip, depth=2)
        try:
            for pending in pipeline.pending_clips(context, request.sampler, state, noise, request.drop_overlap,
                                                  step_hook):
                sink.put(pending)  # raises what the writer thread raised (on_clip, a full disk, ...)
                if caught:
                    raise Interrupted(caught[0])
            sink.close()
        except BaseException:
            sink.close(raise_error=False)  # every clip already handed over is finished and written first
            _close_or_abort(writer)
            raise
    path = writer.close()
    run.remove()
    return {"out": path, "frames": writer.frames_written, "clips": state.clips_done, "height": height, "width": width}


def _close_or_abort(writer) -> None:
    """Keep whatever complete clips were written (a playable file); leave nothing when there were none."""
    if writer.frames_written:
        writer.close()
    else:
        writer.abort()


class _RunFolder:
    """The hidden folder next to the output holding resume state and the frames of completed clips."""

    def __init__(self, path: str, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint
        self.store = ClipFrameStore(path)

    def reset(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def restore(self, state, noise, out: str) -> None:
        file = Path(self.path) / STATE_FILE
        if not file.is_file():
            raise UserError(f"nothing to resume for {out} (no run folder {self.path}): run without --resume")
        saved = torch.load(file, map_location="cpu", weights_only=True)
        if saved.get("fingerprint") != self.fingerprint:
            raise UserError(f"{self.path} belongs to a different run (prompt, model or settings changed): "
                            f"run without --resume to start over")
        state.load_state_dict(saved["clip_state"])
        noise.set_state(saved["noise"])
        missing = sorted(set(range(state.clips_done)) - set(self.store.clips()))
        if missing:
            raise UserError(f"{self.path} lacks the frames of clip {missing[0]}: run without --resume to start over")

    def frames(self, clips_done: int):
        """Stored clips 0..clips_done-1 (a clip stored but not yet in the saved state is generated again)."""
        return (self.store.load(i) for i in range(clips_done))

    def save_clip(self, clip, writer) -> None:
        """Store, write, then save the state the clip carries (a sequential run's state right after it)."""
        self.store.append(clip.index, clip.frames)
        writer.write(clip.frames)
        os.makedirs(self.path, exist_ok=True)
        atomic_torch_save({"fingerprint": self.fingerprint, **clip.resume}, os.path.join(self.path, STATE_FILE))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


__all__ = ["GenerateRequest", "Interrupted", "OutputError", "generate"]
