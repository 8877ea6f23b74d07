"""The one injectable noise source, drawn in the authors' order so a seed gives their latents.

Draw order for a video (everything else is deterministic; nothing else draws):
  1. clip 0's initial noise, N slices of shape [B, C, 1, H, W] frame by frame (`initial_noise`, the authors'
     `randn_progressive`): slice 0 with std 1, each later slice with std 1/sqrt(1 + prior^2);
  2. for every later clip, one draw of the full clip shape [B, C, N, H, W] with std 1/sqrt(1 + alpha^2) for PNS
     (Eq. 7); only its frames >= M are used, but drawing all N keeps the stream aligned with the authors' code.
Draws are fp32 on a CPU generator so a seed means the same video on every device; callers move the tensors.
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence

import torch


class NoiseSource(Protocol):
    """Where every random number of a run comes from; its state is saved alongside ClipState for resume."""

    def normal(self, shape: Sequence[int], std: float) -> torch.Tensor:
        """fp32 CPU tensor of the given shape, entries N(0, std^2)."""
        ...

    def get_state(self) -> torch.Tensor: ...

    def set_state(self, state: torch.Tensor) -> None: ...


class TorchNoise:
    """NoiseSource over a CPU torch.Generator: torch.normal with it is the stream of the authors' `randn_base`."""

    def __init__(self, seed: int):
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def normal(self, shape: Sequence[int], std: float) -> torch.Tensor:
        return torch.normal(0.0, std, size=tuple(shape), generator=self.generator)  # [*shape] fp32

    def get_state(self) -> torch.Tensor:
        return self.generator.get_state()  # uint8 CPU tensor, a copy

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def initial_noise(noise: NoiseSource, shape: Sequence[int], prior: float) -> torch.Tensor:
    """Clip 0's z_T (Eq. 5), optionally with PYoCo's progressive prior along frames (dim 2): z_f = b z_{f-1} + eps."""
    frames = shape[2]
    slice_shape = tuple(shape[:2]) + (1,) + tuple(shape[3:])  # [B, C, 1, H, W]
    b = prior / math.sqrt(1.0 + prior**2)
    # Variance-preserving std. The authors' randn_progressive uses 1 / (1 + prior^2), which lets the variance drift
    # for prior > 0; both agree at prior = 0, the default, where every frame is plain N(0, 1).
    s = 1.0 / math.sqrt(1.0 + prior**2)
    slices = [noise.normal(slice_shape, 1.0)]  # [B, C, 1, H, W]
    for _ in range(1, frames):
        slices.append(b * slices[-1] + noise.normal(slice_shape, s))  # [B, C, 1, H, W]
    return torch.cat(slices, dim=2)  # [B, C, N, H, W]
