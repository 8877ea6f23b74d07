"""FNR, PNS and DSG (paper Eq. 6-8) and the noise source against their formulas."""

import math

import pytest
import torch

from vidrd_rt.runtime.noise import TorchNoise, initial_noise
from vidrd_rt.runtime.reuse import (
    dsg_overwrite,
    dsg_schedule,
    dsg_steps,
    pns_initial_latents,
    pns_mix,
    pns_noise_std,
    reversed_frames,
    reversed_head,
)


def _frame_ids(b=2, c=3, n=8, h=2, w=2) -> torch.Tensor:
    """Latents whose value is their frame index, so reorderings are easy to read."""
    return torch.arange(n, dtype=torch.float32).view(1, 1, n, 1, 1).expand(b, c, n, h, w).contiguous()


########## FNR (Eq. 6)


def test_fnr_new_frame_j_takes_old_frame_n_minus_1_minus_j():
    x = _frame_ids()
    assert reversed_frames(x)[0, 0, :, 0, 0].tolist() == [7, 6, 5, 4, 3, 2, 1, 0]
    assert torch.equal(reversed_head(x, 3), reversed_frames(x)[:, :, :3])
    assert reversed_head(x, 0).shape[2] == 0


########## PNS (Eq. 7)


def test_pns_reuses_reversed_frames_exactly_below_m():
    g = torch.Generator().manual_seed(0)
    prev, fresh = torch.randn(2, 4, 8, 3, 3, generator=g), torch.randn(2, 4, 8, 3, 3, generator=g)
    out = pns_initial_latents(prev, fresh, overlap=3, alpha=4.0)
    for j in range(3):
        assert torch.equal(out[:, :, j], prev[:, :, 7 - j])
    assert not torch.equal(out[:, :, 3], prev[:, :, 4])  # frames >= M are mixed, not copied


@pytest.mark.parametrize("alpha", [0.0, 1.0, 4.0])
def test_pns_mixing_coefficient_above_m(alpha):
    g = torch.Generator().manual_seed(1)
    prev, fresh = torch.randn(2, 4, 8, 3, 3, generator=g), torch.randn(2, 4, 8, 3, 3, generator=g)
    only_prev = pns_initial_latents(prev, torch.zeros_like(fresh), overlap=4, alpha=alpha)
    only_fresh = pns_initial_latents(torch.zeros_like(prev), fresh, overlap=4, alpha=alpha)
    c = alpha / math.sqrt(1 + alpha**2)
    for j in range(4, 8):
        torch.testing.assert_close(only_prev[:, :, j], c * prev[:, :, 7 - j], rtol=0, atol=0)
        assert torch.equal(only_fresh[:, :, j], fresh[:, :, j])
    assert torch.equal(only_fresh[:, :, :4], torch.zeros_like(fresh[:, :, :4]))  # fresh noise below M is unused
    assert pns_mix(alpha) == c and pns_noise_std(alpha) == 1 / math.sqrt(1 + alpha**2)


@pytest.mark.parametrize("alpha", [1.0, 4.0])
def test_pns_keeps_unit_variance_and_correlates_with_the_reversed_frame(alpha):
    noise = TorchNoise(2)
    shape = (1, 4, 8, 128, 128)  # 65536 samples per frame
    prev = noise.normal(shape, 1.0)
    out = pns_initial_latents(prev, noise.normal(shape, pns_noise_std(alpha)), overlap=2, alpha=alpha)
    for j in range(2, 8):
        frame, source = out[:, :, j].flatten(), prev[:, :, 7 - j].flatten()
        assert abs(frame.var().item() - 1) < 0.03  # std error of the variance here is ~0.006
        corr = torch.corrcoef(torch.stack([frame, source]))[0, 1].item()
        assert abs(corr - pns_mix(alpha)) < 0.01


########## DSG (Eq. 8)


@pytest.mark.parametrize(
    "steps,overlap,beta,counts",
    [
        (50, 4, 0.4, [20, 15, 10, 5]),  # the paper's setting
        (50, 4, 0.0, [0, 0, 0, 0]),
        (50, 4, 1.0, [50, 38, 25, 13]),  # i < 37.5 and i < 12.5 round up
        (10, 3, 0.5, [5, 4, 2]),
        (25, 1, 0.3, [8]),
    ],
)
def test_dsg_overwrite_counts_per_frame(steps, overlap, beta, counts):
    mask = dsg_schedule(steps, overlap, beta)
    assert mask.shape == (steps, overlap) and mask.dtype == torch.bool
    assert mask.sum(dim=0).tolist() == counts
    # Eq. 8 overwrites frame j for a leading run of steps: the count is min(T, ceil(threshold)).
    thresholds = [(overlap - j) * (steps / overlap) * beta for j in range(overlap)]
    assert counts == [min(steps, math.ceil(x)) for x in thresholds]
    for j, n in enumerate(counts):
        assert mask[:n, j].all() and not mask[n:, j].any()
    assert dsg_steps(mask) == max(counts)


def test_dsg_without_prompt_frames():
    mask = dsg_schedule(50, 0, 0.4)
    assert mask.shape == (50, 0) and dsg_steps(mask) == 0
    x = torch.randn(1, 2, 4, 2, 2)
    assert dsg_overwrite(x, x[:, :, :0], mask[0]) is x


def test_dsg_overwrite_replaces_only_masked_head_frames():
    g = torch.Generator().manual_seed(3)
    x, head = torch.randn(2, 3, 6, 2, 2, generator=g), torch.randn(2, 3, 4, 2, 2, generator=g)
    out = dsg_overwrite(x, head, torch.tensor([True, True, False, False]))
    assert torch.equal(out[:, :, :2], head[:, :, :2]) and torch.equal(out[:, :, 2:], x[:, :, 2:])
    # One mask row per batch element (clips at different steps in one batched call).
    rows = torch.tensor([[True, False, False, False], [True, True, True, False]])
    out = dsg_overwrite(x, head, rows)
    assert torch.equal(out[0, :, :1], head[0, :, :1]) and torch.equal(out[0, :, 1:], x[0, :, 1:])
    assert torch.equal(out[1, :, :3], head[1, :, :3]) and torch.equal(out[1, :, 3:], x[1, :, 3:])


########## Noise (Eq. 5)


def test_initial_noise_is_frame_by_frame_iid_at_prior_zero():
    shape = (1, 4, 6, 3, 3)
    z = initial_noise(TorchNoise(7), shape, prior=0.0)
    g = torch.Generator().manual_seed(7)
    slices = [torch.normal(0.0, 1.0, size=(1, 4, 1, 3, 3), generator=g) for _ in range(6)]
    assert torch.equal(z, torch.cat(slices, dim=2))
    assert not torch.equal(z, torch.randn(shape, generator=torch.Generator().manual_seed(7)))  # order matters


def test_initial_noise_progressive_prior_is_variance_preserving():
    prior = 2.0
    z = initial_noise(TorchNoise(8), (1, 4, 6, 128, 128), prior=prior)
    b = prior / math.sqrt(1 + prior**2)
    for f in range(6):
        assert abs(z[:, :, f].var().item() - 1) < 0.03  # the authors' 1/(1+prior^2) std: var 0.46 at f=5
    for f in range(1, 6):
        corr = torch.corrcoef(torch.stack([z[:, :, f].flatten(), z[:, :, f - 1].flatten()]))[0, 1].item()
        assert abs(corr - b) < 0.01


def test_noise_state_round_trip_replays_the_stream():
    noise = TorchNoise(9)
    noise.normal((5,), 1.0)
    state = noise.get_state()
    first = noise.normal((4, 4), 0.5)
    noise.set_state(state)
    assert torch.equal(noise.normal((4, 4), 0.5), first)
    assert not torch.equal(noise.normal((4, 4), 0.5), first)
