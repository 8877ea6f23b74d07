"""Sequential Reuse-and-Diffuse sampling (paper section 4.3): one clip at a time over an opaque denoise callable."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .config import ConfigError, SamplerConfig
from .ddim import DDIMTable, ddim_step
from .noise import NoiseSource, initial_noise
from .reuse import dsg_overwrite, dsg_schedule, dsg_steps, pns_initial_latents, pns_noise_std, reversed_head

# The backend: (sample [2B, C, N, h, w], timestep [2B] int64, context [2B, L, D]) -> model output like sample.
Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ClipState:
    """What clip k+1 needs from clip k, in buffers allocated once and only ever updated with copy_.

    Clip k at step i reads only clip k-1's slot i (and its initial latents), and writes the same slot right after
    reading it, so one buffer serves both a sequential run and a wavefront driver that keeps clip k one step
    behind clip k-1, provided it does the same read-then-write within each batched step. With clean held frames
    (SamplerConfig.held_frames) clip k reads clip k-1's finished frames instead (prev_final_head), so clips run one
    after another.
    """

    prev_initial: torch.Tensor  # [B, C, N, h, w] previous clip's initial latents (its pre-UNet latents at step 0)
    prev_heads: torch.Tensor  # [S, B, C, M, h, w] previous clip's pre-UNet latents at DSG step i, reversed, first M
    clips_done: int = 0
    # held_frames "clean" only: the previous clip's finished latents of its last M frames, reversed
    prev_final_head: Optional[torch.Tensor] = None  # [B, C, M, h, w]

    @classmethod
    def allocate(cls, batch, channels, frames, height, width, overlap, dsg_steps, device, dtype,
                 clean_heads: bool = False) -> "ClipState":
        """Zeroed buffers for latents of shape [batch, channels, frames, height, width]; height/width in latents."""
        prev_initial = torch.zeros(batch, channels, frames, height, width, device=device, dtype=dtype)
        prev_heads = torch.zeros(dsg_steps, batch, channels, overlap, height, width, device=device, dtype=dtype)
        final = None
        if clean_heads:
            final = torch.zeros(batch, channels, overlap, height, width, device=device, dtype=dtype)
        return cls(prev_initial, prev_heads, 0, final)

    @classmethod
    def for_config(cls, cfg: SamplerConfig, batch, channels, height, width, device, dtype) -> "ClipState":
        """Allocate with N, M and the DSG buffer depth S taken from a SamplerConfig."""
        depth = step_slots(cfg, dsg_steps(dsg_schedule(cfg.steps, cfg.overlap, cfg.beta)))
        return cls.allocate(batch, channels, cfg.frames, height, width, cfg.overlap, depth, device, dtype,
                            clean_heads=cfg.held_frames == "clean")

    def _buffers(self) -> tuple[str, ...]:
        return ("prev_initial", "prev_heads") + (() if self.prev_final_head is None else ("prev_final_head",))

    def state_dict(self) -> dict:
        """The live buffers (not copies, as nn.Module.state_dict) and the clip counter; torch.save or clone them."""
        return {**{name: getattr(self, name) for name in self._buffers()}, "clips_done": self.clips_done}

    def load_state_dict(self, state: dict) -> None:
        for name in self._buffers():
            if name not in state:
                raise ValueError(f"ClipState.{name}: not in the saved state (saved with other sampler settings)")
            mine, theirs = getattr(self, name), state[name]
            if mine.shape != theirs.shape:
                raise ValueError(f"ClipState.{name}: saved shape {tuple(theirs.shape)} != {tuple(mine.shape)}")
            mine.copy_(theirs)
        self.clips_done = int(state["clips_done"])


def step_slots(cfg: SamplerConfig, dsg_depth: int) -> int:
    """Per-step DSG slots a state keeps: DSG's depth, or none with clean held frames (shown finished at every
    step, from prev_final_head)."""
    return 0 if cfg.held_frames == "clean" else dsg_depth


@functools.lru_cache(maxsize=16)
def _dsg_plan(steps: int, overlap: int, beta: float, device: torch.device) -> tuple[torch.Tensor, tuple, int]:
    """The DSG mask on the device (moved once, not per clip) and its host-side copy of which rows are active."""
    mask = dsg_schedule(steps, overlap, beta)  # [T, M] CPU
    active = tuple(mask.any(dim=1).tolist())  # host decisions: skip the where on rows that change nothing
    return mask.to(device), active, dsg_steps(mask)


def _check_shapes(table: DDIMTable, state: ClipState, cfg: SamplerConfig, depth: int) -> None:
    """Host-side shape checks only (no device reads)."""
    if table.steps != cfg.steps:
        raise ConfigError(f"DDIM table has {table.steps} steps but the sampler config asks for {cfg.steps}")
    if state.prev_initial.shape[2] != cfg.frames or state.prev_heads.shape[3] != cfg.overlap:
        raise ConfigError(f"ClipState was allocated for other frames/overlap than N={cfg.frames}, M={cfg.overlap}")
    if state.prev_heads.shape[0] < depth:
        raise ConfigError(f"ClipState keeps {state.prev_heads.shape[0]} DSG steps but beta={cfg.beta} needs {depth}")


def _start_latents(state: ClipState, cfg: SamplerConfig, noise: NoiseSource) -> torch.Tensor:
    """Clip 0: fresh z_T (Eq. 5). Later clips: FNR + PNS from the previous clip's initial latents (Eq. 6-7)."""
    shape = tuple(state.prev_initial.shape)  # [B, C, N, h, w]
    like = dict(device=state.prev_initial.device, dtype=state.prev_initial.dtype)
    if state.clips_done == 0:
        return initial_noise(noise, shape, cfg.noise_prior).to(**like)  # [B, C, N, h, w]
    fresh = noise.normal(shape, pns_noise_std(cfg.alpha)).to(**like)  # [B, C, N, h, w]
    return pns_initial_latents(state.prev_initial, fresh, cfg.overlap, cfg.alpha)  # [B, C, N, h, w]


def guided_output(denoise: Denoise, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): u + w (c - u), CFG batched as [uncond, cond].

    t is [] (one step for the batch), [B] (each clip at its own step) or [B, N] (each frame at its own noise
    level); context is [2B, L, D] ordered [uncond x B, cond x B], matching the [x, x] batch.
    """
    t = t if t.ndim == 2 else t.expand(x.shape[0])  # [B] or [B, N]
    out = denoise(torch.cat([x, x]), torch.cat([t, t]), context)  # [2B, C, N, h, w]
    u, c = out.chunk(2)  # each [B, C, N, h, w]
    return u + w * (c - u)  # [B, C, N, h, w]


def sample_clip(
    denoise: Denoise,
    table: DDIMTable,
    state: ClipState,
    context: torch.Tensor,
    cfg: SamplerConfig,
    noise: NoiseSource,
    callback: Optional[Callable[[dict], None]] = None,
) -> torch.Tensor:
    """Denoise the next clip of the video (Eq. 5-8) and advance `state`; returns its x0 latents [B, C, N, h, w]."""
    mask, active, depth = _dsg_plan(cfg.steps, cfg.overlap, cfg.beta, state.prev_heads.device)
    clean_run = cfg.held_frames == "clean"
    depth = step_slots(cfg, depth)
    _check_shapes(table, state, cfg, depth)
    reuse = state.clips_done > 0
    clean = reuse and clean_run and cfg.overlap > 0  # this clip's first M frames are held clean
    if clean_run and state.prev_final_head is None:
        raise ConfigError("held_frames 'clean' needs a ClipState allocated for it (ClipState.for_config)")
    x = _start_latents(state, cfg, noise)  # [B, C, N, h, w]
    for i in range(cfg.steps):
        if reuse and not clean and active[i]:
            x = dsg_overwrite(x, state.prev_heads[i], mask[i])  # [B, C, N, h, w]
        # Read (above) before write (below): slot i holds clip k-1's latents until clip k has used them.
        if i < depth:
            state.prev_heads[i].copy_(reversed_head(x, cfg.overlap))  # [B, C, M, h, w]
        if i == 0:
            state.prev_initial.copy_(x)  # [B, C, N, h, w]; PNS of this clip has already read the old value
        if clean:
            out = clean_held_output(denoise, x, state.prev_final_head, table.timesteps[i], context, cfg.guidance)
        else:
            out = guided_output(denoise, x, table.timesteps[i], context, cfg.guidance)  # [B, C, N, h, w]
        x = ddim_step(table, x, out, table.step_indices[i])  # [B, C, N, h, w]
        if callback is not None:
            callback({"clip": state.clips_done, "step": i, "latents": x})
    if clean:
        x = torch.cat([state.prev_final_head, x[:, :, cfg.overlap :]], dim=2)  # held frames: the finished ones
    if state.prev_final_head is not None:
        state.prev_final_head.copy_(reversed_head(x, cfg.overlap))  # [B, C, M, h, w]
    state.clips_done += 1
    return x


def clean_held_output(denoise: Denoise, x: torch.Tensor, final_head: torch.Tensor, timestep: torch.Tensor,
                      context: torch.Tensor, w: float) -> torch.Tensor:
    """The guided UNet output at step `timestep` with the first M frames shown as the previous clip's finished
    frames (final_head, reversed as FNR orders them) at timestep 0 (SamplerConfig.held_frames "clean")."""
    b, _, n = x.shape[:3]
    m = final_head.shape[2]
    shown = torch.cat([final_head, x[:, :, m:]], dim=2)  # [B, C, N, h, w]
    t = torch.cat([torch.zeros_like(timestep).expand(m), timestep.expand(n - m)]).expand(b, n)  # [B, N]
    return guided_output(denoise, shown, t, context, w)  # [B, C, N, h, w]; its first M frames are not used


# The whole-step seam: (x [B, C, N, h, w], step_index [B] int64, prev_head [B, C, M, h, w], mask_row [B, M] bool,
# context [2B, L, D]) -> (x_next [B, C, N, h, w], head [B, C, M, h, w]). A backend may compile it as it is.
Step = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def make_step(denoise: Denoise, table: DDIMTable, cfg: SamplerConfig) -> Step:
    """One denoising step of B clips, each at its own step: DSG overwrite, CFG, UNet, guidance, DDIM (Eq. 8, 12).

    Pure tensor maths over device tensors (no host sync, no Python branch on values), so one compiled graph serves
    every step and every clip. `mask_row` is all False for a clip that has no predecessor. The caller stores
    `head` (the post-DSG latents' reversed last M frames) where the next clip will read it at the same step.
    """

    def step(x, step_index, prev_head, mask_row, context):
        x = dsg_overwrite(x, prev_head, mask_row)  # [B, C, N, h, w], Eq. 8
        head = reversed_head(x, cfg.overlap)  # [B, C, M, h, w]
        t = table.timesteps.index_select(0, step_index)  # [B]
        out = guided_output(denoise, x, t, context, cfg.guidance)  # [B, C, N, h, w]
        return ddim_step(table, x, out, step_index), head  # [B, C, N, h, w], [B, C, M, h, w]

    return step
