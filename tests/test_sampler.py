"""The sequential Reuse-and-Diffuse loop, replayed against a plain re-implementation of the authors' loop."""

import dataclasses
import math

import pytest
import torch
from diffusers import DDIMScheduler

from vidrd_rt.runtime.config import ConfigError, SamplerConfig, SchedulerConfig
from vidrd_rt.runtime.ddim import DDIMTable
from vidrd_rt.runtime.noise import TorchNoise
from vidrd_rt.runtime.sampler import ClipState, sample_clip

C, H, W, L, D = 4, 6, 6, 5, 16  # latent channels, latent side, context tokens and width


class ToyDenoiser:
    """A fixed random channel map and frame map, squashed, plus timestep and context terms: frames interact."""

    def __init__(self, frames: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.mix_c = torch.randn(C, C, generator=g) / math.sqrt(C)
        self.mix_f = torch.randn(frames, frames, generator=g) / math.sqrt(frames)
        self.t_dir = torch.randn(C, generator=g)
        self.ctx_proj = torch.randn(D, C, generator=g) / math.sqrt(D)

    def __call__(self, sample, timestep, context):
        x = sample.float()  # [2B, C, N, H, W]
        h = torch.einsum("dc,bcfhw->bdfhw", self.mix_c, x)  # [2B, C, N, H, W]
        h = torch.einsum("gf,bcfhw->bcghw", self.mix_f, h)  # [2B, C, N, H, W]
        tt = timestep.float().reshape(-1, 1, 1, 1, 1) / 1000  # [2B or 1, 1, 1, 1, 1]
        cond = (context.mean(1) @ self.ctx_proj).view(-1, C, 1, 1, 1)  # [2B, C, 1, 1, 1]
        out = torch.tanh(h) * (1 - tt) + tt * self.t_dir.view(1, C, 1, 1, 1) + 0.1 * cond
        return out.to(sample.dtype)  # [2B, C, N, H, W]


########## The authors' loop, written the way their code does it (dict of flipped clips, diffusers step)


def randn_base(shape, std, generator):
    return torch.normal(mean=0.0, std=std, size=shape, generator=generator)


def randn_progressive(shape, dim, alpha, generator):
    shape_slice = shape[:dim] + (1,) + shape[dim + 1 :]
    tensors = [randn_base(shape_slice, 1.0, generator)]
    beta, std = alpha / math.sqrt(1.0 + alpha**2), 1.0 / (1.0 + alpha**2)
    for _ in range(1, shape[dim]):
        tensors.append(beta * tensors[-1] + randn_base(shape_slice, std, generator))
    return torch.cat(tensors, dim=dim)


def authors_video(unet, cfg: SamplerConfig, context, shape, clips):
    scheduler = DDIMScheduler(**dataclasses.asdict(SchedulerConfig()))
    scheduler.set_timesteps(cfg.steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    T, M, alpha = cfg.steps, cfg.overlap, cfg.alpha
    latents_past_rev, videos = {}, []
    for k in range(clips):
        if k == 0:
            latents = randn_progressive(shape, 2, cfg.noise_prior, generator)
        else:
            latents = latents_past_rev[0].clone()
            noise = randn_base(shape, 1.0 / math.sqrt(1.0 + alpha**2), generator)
            latents[:, :, M:] = alpha / math.sqrt(1.0 + alpha**2) * latents[:, :, M:] + noise[:, :, M:]
        for i, t in enumerate(scheduler.timesteps):
            if k > 0:
                for j in range(M):
                    if i < (M - j) * (T / M) * cfg.beta:
                        latents[:, :, j] = latents_past_rev[i][:, :, j]
            latents_past_rev[i] = latents.flip(2)
            noise_pred = unet(torch.cat([latents] * 2), t, context)
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + cfg.guidance * (noise_pred_text - noise_pred_uncond)
            latents = scheduler.step(noise_pred, t, latents).prev_sample
        videos.append(latents)
    return videos


########## Helpers


def _context() -> torch.Tensor:
    return torch.randn(2, L, D, generator=torch.Generator().manual_seed(42))  # [2B, L, D]: [uncond, cond]


def _run(cfg: SamplerConfig, clips: int, dtype=torch.float32, callback=None):
    table = DDIMTable.build(SchedulerConfig(), cfg.steps, "cpu")
    state = ClipState.for_config(cfg, 1, C, H, W, "cpu", dtype)
    noise, unet = TorchNoise(cfg.seed), ToyDenoiser(cfg.frames)
    return [sample_clip(unet, table, state, _context(), cfg, noise, callback) for _ in range(clips)], state


CONFIGS = [
    SamplerConfig(frames=8, overlap=3, alpha=4.0, beta=0.4, steps=50, guidance=10.0, seed=1),
    SamplerConfig(frames=6, overlap=0, alpha=1.0, beta=0.4, steps=20, guidance=7.5, seed=2),
    SamplerConfig(frames=6, overlap=6, alpha=4.0, beta=1.0, steps=20, guidance=10.0, seed=3),
]


########## Tests


@pytest.mark.parametrize("cfg", CONFIGS, ids=["N8-M3", "M0", "M=N"])
def test_replays_the_authors_loop_exactly(cfg):
    ours, _ = _run(cfg, clips=3)
    theirs = authors_video(ToyDenoiser(cfg.frames), cfg, _context(), (1, C, cfg.frames, H, W), clips=3)
    for k in range(3):
        assert torch.equal(ours[k], theirs[k]), f"clip {k} differs"
    assert all(torch.isfinite(x).all() for x in ours)
    assert not torch.allclose(ours[1], ours[2], atol=1e-2)  # later clips are new content, not a copy


def test_dsg_changes_later_clips_so_the_replay_can_fail():
    cfg = CONFIGS[0]
    with_dsg, _ = _run(cfg, clips=2)
    without, _ = _run(dataclasses.replace(cfg, beta=0.0), clips=2)
    assert torch.equal(with_dsg[0], without[0])  # clip 0 never reads the state
    assert not torch.allclose(with_dsg[1], without[1], atol=1e-3)


def test_state_buffers_stay_in_place_over_five_clips():
    cfg = CONFIGS[0]
    table = DDIMTable.build(SchedulerConfig(), cfg.steps, "cpu")
    state = ClipState.for_config(cfg, 1, C, H, W, "cpu", torch.float32)
    assert state.prev_heads.shape == (20, 1, C, 3, H, W)  # DSG depth for T=50, M=3, beta=0.4: ceil(20) steps
    ptrs = (state.prev_initial.data_ptr(), state.prev_heads.data_ptr())
    noise, unet = TorchNoise(cfg.seed), ToyDenoiser(cfg.frames)
    for k in range(5):
        before = state.prev_heads.clone(), state.prev_initial.clone()
        sample_clip(unet, table, state, _context(), cfg, noise)
        assert (state.prev_initial.data_ptr(), state.prev_heads.data_ptr()) == ptrs
        assert not torch.equal(before[0], state.prev_heads) and not torch.equal(before[1], state.prev_initial)
        assert state.clips_done == k + 1


def test_resume_from_state_dict_reproduces_clip_3():
    cfg = CONFIGS[0]
    table = DDIMTable.build(SchedulerConfig(), cfg.steps, "cpu")
    state = ClipState.for_config(cfg, 1, C, H, W, "cpu", torch.float32)
    noise, unet = TorchNoise(cfg.seed), ToyDenoiser(cfg.frames)
    clips = [sample_clip(unet, table, state, _context(), cfg, noise) for _ in range(3)]
    saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.state_dict().items()}
    saved_noise = noise.get_state()
    clips += [sample_clip(unet, table, state, _context(), cfg, noise) for _ in range(2)]

    restored = ClipState.for_config(cfg, 1, C, H, W, "cpu", torch.float32)
    restored.load_state_dict(saved)
    other_noise = TorchNoise(seed=999)  # the saved generator state, not this seed, must decide the draw
    other_noise.set_state(saved_noise)
    assert restored.clips_done == 3
    assert torch.equal(sample_clip(unet, table, restored, _context(), cfg, other_noise), clips[3])
    assert not torch.equal(clips[3], clips[2])


def test_callback_sees_every_step_and_bf16_latents_stay_bf16():
    seen = []
    cfg = dataclasses.replace(CONFIGS[1], steps=10)
    clips, state = _run(cfg, clips=2, dtype=torch.bfloat16, callback=seen.append)
    assert [(e["clip"], e["step"]) for e in seen] == [(k, i) for k in range(2) for i in range(10)]
    assert torch.equal(seen[-1]["latents"], clips[-1])
    assert clips[-1].dtype == state.prev_initial.dtype == torch.bfloat16 and torch.isfinite(clips[-1].float()).all()


def test_mismatched_table_or_state_is_a_config_error():
    cfg = CONFIGS[0]
    state = ClipState.for_config(cfg, 1, C, H, W, "cpu", torch.float32)
    short_table = DDIMTable.build(SchedulerConfig(), 10, "cpu")
    with pytest.raises(ConfigError, match="steps"):
        sample_clip(ToyDenoiser(8), short_table, state, _context(), cfg, TorchNoise(0))
    shallow = ClipState.allocate(1, C, 8, H, W, 3, 5, "cpu", torch.float32)
    with pytest.raises(ConfigError, match="DSG steps"):
        table = DDIMTable.build(SchedulerConfig(), 50, "cpu")
        sample_clip(ToyDenoiser(8), table, shallow, _context(), cfg, TorchNoise(0))
