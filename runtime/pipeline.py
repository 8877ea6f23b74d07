"""Prompt -> text embeddings -> clips of latents -> decoded frames, one clip at a time (a generator)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from .backends import Decoder, Denoiser, make_backends, prepare_for_device
from .config import ConfigError, RuntimeConfig, SamplerConfig
from .ddim import DDIMTable
from .model import VidRDModel
from .noise import NoiseSource, TorchNoise
from .sampler import ClipState, sample_clip
from .text_encoder import tokenize


@dataclass
class Clip:
    """One finished clip: its index, its frames (uint8 [F, H, W, 3]) and how long it took."""

    index: int
    frames: np.ndarray
    seconds: float


def check_size(model: VidRDModel, height: int, width: int) -> None:
    multiple = model.config.pixel_multiple
    for name, value in (("--height", height), ("--width", width)):
        if value < multiple or value % multiple:
            raise ConfigError(f"{name} {value} does not fit this model: use a positive multiple of {multiple} "
                              f"(the model's default is {model.config.height}x{model.config.width})")


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
        noise = noise or TorchNoise(sampler.seed)
        table = DDIMTable.build(self.model.config.scheduler, sampler.steps, self.runtime.device)
        context = context.to(self.runtime.device)
        while state.clips_done < sampler.clips:
            start, index = time.perf_counter(), state.clips_done
            latents = sample_clip(self.denoise, table, state, context, sampler, noise, on_step)  # [1, 4, N, h, w]
            frames = frames_uint8(self.decode(latents))  # [N, H, W, 3]
            if drop_overlap and index > 0:
                frames = frames[sampler.overlap:]
            yield Clip(index, frames, time.perf_counter() - start)
