"""DDIM table and step against diffusers' DDIMScheduler (the reference the authors sampled with)."""

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler

from vidrd_rt.runtime.config import SchedulerConfig
from vidrd_rt.runtime.ddim import DDIMTable, ddim_step

SHAPE = (2, 4, 3, 5, 5)  # [B, C, F, H, W]


def _scheduler(cfg: SchedulerConfig, steps: int) -> DDIMScheduler:
    s = DDIMScheduler(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
    s.set_timesteps(steps)
    return s


def _toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Deterministic, state-dependent output so a wrong coefficient changes the whole trajectory."""
    return torch.tanh(0.7 * x.roll(1, dims=2) - 0.3 * x) + t.float().reshape(-1, 1, 1, 1, 1) / 1000  # [B, C, F, H, W]


def test_timesteps_and_final_alpha_for_sd21_base():
    table = DDIMTable.build(SchedulerConfig(), 50, "cpu")
    assert torch.equal(table.timesteps, torch.arange(981, 0, -20))
    assert table.timesteps.dtype == torch.int64 and torch.equal(table.step_indices, torch.arange(50))
    ref = _scheduler(SchedulerConfig(), 50)
    assert torch.equal(table.alpha_bar, ref.alphas_cumprod[table.timesteps])
    # Step 49 goes from t = 1 to t = -19 < 0: set_alpha_to_one=False means alphas_cumprod[0], not 1.
    assert table.alpha_bar_prev[-1] == ref.alphas_cumprod[0] and table.alpha_bar_prev[-1] < 1
    assert torch.equal(table.alpha_bar_prev[:-1], table.alpha_bar[1:])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_full_trajectory_matches_diffusers_bit_for_bit(prediction_type):
    cfg = SchedulerConfig(prediction_type=prediction_type)
    table, ref = DDIMTable.build(cfg, 50, "cpu"), _scheduler(cfg, 50)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))  # [B, C, F, H, W]
    ours, theirs = x.clone(), x.clone()
    for i, t in enumerate(ref.timesteps):
        ours = ddim_step(table, ours, _toy_model(ours, t), table.step_indices[i])
        theirs = ref.step(_toy_model(theirs, t), t, theirs).prev_sample
        assert torch.equal(ours, theirs), f"step {i} (t={int(t)}) differs"
    assert not torch.allclose(ours, x, atol=0.1)  # the trajectory really moved


def test_clip_sample_matches_diffusers():
    cfg = SchedulerConfig(clip_sample=True)
    table, ref = DDIMTable.build(cfg, 10, "cpu"), _scheduler(cfg, 10)
    x = 3 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))  # [B, C, F, H, W]
    eps = torch.zeros_like(x)  # x0 = x / sqrt(a) lies far outside [-1, 1], so the clamp matters
    ours = ddim_step(table, x, eps, table.step_indices[0])
    assert torch.equal(ours, ref.step(eps, ref.timesteps[0], x).prev_sample)
    unclipped = ddim_step(dataclasses.replace(table, clip_sample=False), x, eps, table.step_indices[0])
    assert not torch.equal(ours, unclipped)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_per_clip_step_indices_equal_separate_calls(prediction_type):
    table = DDIMTable.build(SchedulerConfig(prediction_type=prediction_type), 50, "cpu")
    g = torch.Generator().manual_seed(2)
    x, out = torch.randn((3,) + SHAPE[1:], generator=g), torch.randn((3,) + SHAPE[1:], generator=g)  # [3, C, F, H, W]
    idx = torch.tensor([0, 17, 49])
    batched = ddim_step(table, x, out, idx)
    for b in range(3):
        assert torch.equal(batched[b : b + 1], ddim_step(table, x[b : b + 1], out[b : b + 1], idx[b]))
    assert not torch.equal(batched[0], ddim_step(table, x[:1], out[:1], idx[1])[0])


def test_half_latents_step_in_fp32_and_keep_dtype():
    table = DDIMTable.build(SchedulerConfig(), 50, "cpu")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))  # [B, C, F, H, W]
    eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    half = ddim_step(table, x.bfloat16(), eps.bfloat16(), table.step_indices[10])
    full = ddim_step(table, x.bfloat16().float(), eps.bfloat16().float(), table.step_indices[10])
    assert half.dtype == torch.bfloat16 and torch.equal(half, full.bfloat16())
