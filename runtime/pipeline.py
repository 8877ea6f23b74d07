"""Prompt -> text embeddings -> clips of latents -> decoded frames, one clip at a time (a generator)."""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import numpy as np
import torch

from .backends import Decoder, Denoiser, make_backends, prepare_for_device
from .config import ConfigError, RuntimeConfig, SamplerConfig
from .ddim import DDIMTable
from .model import VidRDModel
from .noise import NoiseSource, TorchNoise
from .overlap import AsyncDecoder, Clip, PendingClip
from .sampler import ClipState, make_step, sample_clip
from .text_encoder import tokenize
from .wavefront import wavefront_clips


def check_size(model: VidRDModel, height: int, width: int) -> None:
    multiple = model.config.pixel_multiple
    for name, value in (("--height", height), ("--width", width)):
        if value < multiple or value % multiple:
            raise ConfigError(f"{name} {value} does not fit this model: use a positive multiple of {multiple} "
                              f"(the model's default is {model.config.height}x{model.config.width})")


def check_held_frames(runtime: RuntimeConfig, sampler: SamplerConfig) -> None:
    """Clean held frames need the previous clip finished (no wavefront) and per-frame timesteps (the torch UNet;
    exported engines take one timestep per clip)."""
    if sampler.held_frames == "clean" and (runtime.backend != "torch" or runtime.inflight != 1):
        raise ConfigError("--held-frames clean runs clips one after another through the PyTorch UNet: "
                          "use --backend torch --inflight 1, or --held-frames noisy")


@torch.inference_mode()
def encode_prompt(model: VidRDModel, prompt: str, negative_prompt: str = "", device="cpu") -> torch.Tensor:
    """Text -> CFG context [2, 77, D] ordered [uncond, cond], float32."""
    if not prompt or not prompt.strip():
        raise ConfigError('the prompt is empty: give --prompt "what the video shows"')
    ids = tokenize(model.tokenizer, [negative_prompt, prompt]).to(device)  # (2, 77)
    return model.text_encoder(ids).float()  # (2, 77, D)


def frames_uint8(video: torch.Tensor) -> np.ndarray:
    """[1, 3, F, H, W] in [0, 1] -> uint8 [F, H, W, 3], rounded (not truncated)."""
    return (video[0].permute(1, 2, 3, 0) * 255).round().to(torch.uint8).cpu().numpy()


class VideoPipeline:
    """Owns the backends and the per-video buffers; `clips()` yields each clip as soon as it is decoded."""

    def __init__(self, model: VidRDModel, runtime: RuntimeConfig,
                 denoise: Optional[Denoiser] = None, decode: Optional[Decoder] = None):
        self.model = prepare_for_device(model, runtime)
        self.runtime = runtime
        default_denoise, default_decode = (None, None) if denoise and decode else make_backends(model, runtime)
        self.denoise = denoise or default_denoise
        self.decode = decode or default_decode
        self._steps: dict[tuple, tuple] = {}  # (steps, overlap, guidance) -> (DDIM table, step function or None)

    def new_state(self, sampler: SamplerConfig, height: int, width: int) -> ClipState:
        """The clip-to-clip buffers for one prompt, allocated once for the whole video."""
        check_size(self.model, height, width)
        f = self.model.config.vae.downsample_factor
        channels = self.model.config.unet.in_channels
        return ClipState.for_config(sampler, 1, channels, height // f, width // f, self.runtime.device, torch.float32)

    def clips(self, context: torch.Tensor, sampler: SamplerConfig, state: ClipState,
              noise: Optional[NoiseSource] = None, drop_overlap: bool = False,
              on_step: Optional[Callable[[dict], None]] = None) -> Iterator[Clip]:
        """Clips state.clips_done .. sampler.clips-1. With drop_overlap, clips after the first leave out their
        first M frames (which mirror the previous clip's last M, by FNR)."""
        for pending in self.pending_clips(context, sampler, state, noise, drop_overlap, on_step):
            yield pending.result()

    def pending_clips(self, context: torch.Tensor, sampler: SamplerConfig, state: ClipState,
                      noise: Optional[NoiseSource] = None, drop_overlap: bool = False,
                      on_step: Optional[Callable[[dict], None]] = None) -> Iterator[PendingClip]:
        """As clips(), but each clip may still be decoding (on a side CUDA stream) when it is yielded: result()
        waits for it. Each carries the resume state a sequential run has right after it (runtime/overlap.py)."""
        noise = noise or TorchNoise(sampler.seed)
        context = context.to(self.runtime.device)
        decoder = AsyncDecoder(self.decode, self.runtime.device)
        for index, latents, noise_state in self._latents(context, sampler, state, noise, on_step):
            snapshot = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.state_dict().items()}
            keep_from = sampler.overlap if drop_overlap and index > 0 else 0
            yield decoder.submit(index, latents, snapshot, noise_state, keep_from)

    def _latents(self, context, sampler: SamplerConfig, state: ClipState, noise: NoiseSource, on_step):
        """(index, x0 latents [1, 4, N, h, w], noise state after the clip) in clip order. Sequential reference
        (sampler.py) for an eager backend at --inflight 1, else the wavefront over the (compiled) step."""
        table, step = self.step_for(sampler)
        if step is None:
            while state.clips_done < sampler.clips:
                index = state.clips_done
                latents = sample_clip(self.denoise, table, state, context, sampler, noise, on_step)
                yield index, latents, noise.get_state()
            return
        for clip in wavefront_clips(step, table, state, context, sampler, noise, self.runtime.inflight, on_step):
            yield clip.index, clip.latents, clip.noise_state

    def step_for(self, sampler: SamplerConfig) -> tuple:
        """The DDIM table and the step function (None: the sequential reference loop runs instead), built once per
        (steps, overlap, guidance), and compiled when the backend offers compile_step (runtime/compiled.py)."""
        check_held_frames(self.runtime, sampler)
        key = (sampler.steps, sampler.overlap, sampler.guidance)
        if key not in self._steps:
            table = DDIMTable.build(self.model.config.scheduler, sampler.steps, self.runtime.device)
            compile_step = getattr(self.denoise, "compile_step", None)
            build = lambda denoise: make_step(denoise, table, sampler)  # noqa: E731
            step = compile_step(build) if compile_step else build(self.denoise) if self.runtime.inflight > 1 else None
            self._steps[key] = (table, step)
        return self._steps[key]
