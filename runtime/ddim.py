"""Deterministic DDIM (eta = 0) as a few tensor ops over a per-step coefficient table built once."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SchedulerConfig


@dataclass(frozen=True)
class DDIMTable:
    """Timesteps and alpha-bar coefficients of one sampling run, stored on the device once.

    Row i holds everything step i needs, so a step is an index_select plus a few elementwise ops: no Python branch
    on the timestep, no per-step tensor construction and no host sync (several clips may sit at different rows).
    """

    timesteps: torch.Tensor  # [T] int64, e.g. 981, 961, ..., 1 for SD 2.1-base with T = 50
    alpha_bar: torch.Tensor  # [T] alphas_cumprod at timesteps[i]
    alpha_bar_prev: torch.Tensor  # [T] alphas_cumprod at timesteps[i] - 1000 // T (final_alpha_cumprod when < 0)
    coef: torch.Tensor  # [T, 4] sqrt(a), sqrt(1 - a), sqrt(a_prev), sqrt(1 - a_prev), rounded as diffusers does
    step_indices: torch.Tensor  # [T] int64 0..T-1, so the loop indexes a view instead of building a tensor
    prediction_type: str  # "epsilon" or "v_prediction"
    clip_sample: bool  # clamp x0 to [-1, 1] (diffusers' clip_sample with clip_sample_range 1.0)

    @classmethod
    def build(cls, scheduler_cfg: SchedulerConfig, steps: int, device, dtype=torch.float32) -> "DDIMTable":
        """Ask diffusers' DDIMScheduler for timesteps and alphas_cumprod, then precompute every step's coefficients."""
        scheduler = _diffusers_scheduler(scheduler_cfg)
        scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps.to(torch.int64)  # [T]
        alpha_bar, alpha_bar_prev = _alpha_bars(scheduler, timesteps, scheduler_cfg.num_train_timesteps // steps)
        # The square roots are taken here in fp32 on the CPU with the ops diffusers uses per step, so the values
        # are bit-identical to DDIMScheduler.step's and a device run only moves them.
        roots = [alpha_bar**0.5, (1 - alpha_bar) ** 0.5, alpha_bar_prev**0.5, (1 - alpha_bar_prev) ** 0.5]
        coef = torch.stack(roots, dim=1)  # [T, 4]
        return cls(
            timesteps=timesteps.to(device),
            alpha_bar=alpha_bar.to(device, dtype),
            alpha_bar_prev=alpha_bar_prev.to(device, dtype),
            coef=coef.to(device, dtype),  # [T, 4]
            step_indices=torch.arange(len(timesteps), dtype=torch.int64, device=device),
            prediction_type=scheduler_cfg.prediction_type,
            clip_sample=scheduler_cfg.clip_sample,
        )

    @property
    def steps(self) -> int:
        return self.timesteps.shape[0]


def _diffusers_scheduler(cfg: SchedulerConfig):
    from diffusers import DDIMScheduler  # imported here: only the table build needs diffusers

    return DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        steps_offset=cfg.steps_offset,
        set_alpha_to_one=cfg.set_alpha_to_one,
        timestep_spacing=cfg.timestep_spacing,
        clip_sample=cfg.clip_sample,
    )


def alphas_cumprod(cfg: SchedulerConfig) -> torch.Tensor:
    """alpha_bar for every training timestep [num_train_timesteps], float32 (what training noises with)."""
    return _diffusers_scheduler(cfg).alphas_cumprod.float()


def _alpha_bars(scheduler, timesteps: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_bar at each timestep and at its predecessor, with diffusers' rule for the step past t = 0."""
    alphas_cumprod = scheduler.alphas_cumprod.float()  # [1000]
    prev = timesteps - stride  # [T] diffusers: prev_timestep = t - num_train_timesteps // steps
    final = scheduler.final_alpha_cumprod.float().expand(len(timesteps))  # [T]
    alpha_bar_prev = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], final)  # [T]
    return alphas_cumprod[timesteps], alpha_bar_prev


def ddim_step(table: DDIMTable, x: torch.Tensor, model_output: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
    """One DDIM update with eta = 0 (Song et al. 2021, Eq. 12); step_index is [] or [B], one row per clip."""
    c = table.coef.index_select(0, step_index.reshape(-1)).float()  # [B or 1, 4]
    c = c.view(-1, 4, 1, 1, 1, 1)  # [B, 4, 1, 1, 1, 1]: broadcasts over [B, C, F, H, W]
    sqrt_a, sqrt_1ma, sqrt_a_prev, sqrt_1ma_prev = c.unbind(1)  # each [B, 1, 1, 1, 1]
    xf, out = x.float(), model_output.float()  # [B, C, F, H, W]
    if table.prediction_type == "epsilon":
        # Same operation order as diffusers (divide, not multiply by a reciprocal) so fp32 results match bit for bit.
        x0 = (xf - sqrt_1ma * out) / sqrt_a  # [B, C, F, H, W]
        eps = out
    else:  # v_prediction (Salimans & Ho 2022): v = sqrt(a) eps - sqrt(1 - a) x0
        x0 = sqrt_a * xf - sqrt_1ma * out  # [B, C, F, H, W]
        eps = sqrt_a * out + sqrt_1ma * xf  # [B, C, F, H, W]
    if table.clip_sample:
        x0 = x0.clamp(-1.0, 1.0)
    # Eq. 12 with sigma_t = 0: x_{t-1} = sqrt(a_{t-1}) * x0 + sqrt(1 - a_{t-1}) * eps.
    x_prev = sqrt_a_prev * x0 + sqrt_1ma_prev * eps  # [B, C, F, H, W]
    return x_prev.to(x.dtype)
