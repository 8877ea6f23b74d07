"""Wavefront clip batching: L clips in flight, clip k one step behind clip k-1, one batched step per tick.

Schedule. Clip c runs in lane c mod L (L = min(--inflight, steps)). Each tick the clip in every lane advances one
DDIM step, all lanes in ONE call of the step function (CFG batch [uncond x L, cond x L]), each at its own step
index. Clip c starts one tick after clip c-1, or when its lane frees up; lanes are never idle once full:

    tick        0    1    2  ...  T-1   T     T+1 ...
    lane 0      c0   c0   c0      c0    c2    c2          (L = 2: clip 2 starts as clip 0 finishes)
    lane 1      -    c1   c1      c1    c1    c3

so clips finish in order, one every T/L ticks, and stream out in order.

Why the video equals the sequential one. Clip c at step i reads what clip c-1 stored at step i (its reversed
DSG head) and, at its start, clip c-1's initial latents. Each lane keeps those for its own clip, and clip c reads
the lane of clip c-1: clip c-1 wrote slot i at least one tick earlier, and its lane's next clip (c-1+L) rewrites
slot i at least one tick later than clip c reads it (L <= T). (One shared buffer would do for the video itself, see
ClipState; lane-own copies, L x a few MB for vidrd-base, keep each clip's state intact until it leaves, for resume.) Within a tick the lanes sit at distinct steps, and every
read (a gather before the step) precedes every write (copies after it). Noise is drawn at each clip's start, in
clip order, so the random stream is the sequential one. Only the batching differs: a batched UNet call rounds
differently from a batch-1 call. In fp64 the wavefront video is identical to the sequential one; in fp32 both are
equally far from fp64 (tiny random-weight UNet, guidance 7.5: the sequential fp32 video itself is 2e-4 relative
from fp64, as guidance amplifies rounding step after step; tests/test_wavefront.py).

Resume. When clip c finishes, its lane still holds its initial latents and heads, which is exactly the ClipState a
sequential run has after clip c (the shared ClipState is updated from the lane then), and the noise state right
after clip c's draw is recorded at its start. A run resumed from that pair with the same L puts every later clip
in the same lane with the same batch shape, so it reproduces the uninterrupted run bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from .config import ConfigError, SamplerConfig
from .ddim import DDIMTable
from .noise import NoiseSource, initial_noise
from .reuse import dsg_schedule, dsg_steps, pns_initial_latents, pns_noise_std
from .sampler import ClipState, Step


@dataclass
class FinishedClip:
    """A clip that has left the wavefront: x0 latents (a copy the caller owns) and the noise state after it."""

    index: int
    latents: torch.Tensor  # [1, C, N, h, w]
    noise_state: torch.Tensor  # the generator state a sequential run has right after this clip


def lane_count(inflight: int, steps: int) -> int:
    """L = min(K, T): with more lanes than steps a lane would start its next clip before clip c-1 stored slot 0."""
    return max(1, min(inflight, steps))


class _Tables:
    """Per-lane inputs of every tick, precomputed on the device and indexed by the phase tick mod T (no per-tick
    host-to-device copies). Lane j's first clip starts at tick o_j = (j - first) mod L and it sits at step
    (tick - o_j) mod T from then on."""

    def __init__(self, cfg: SamplerConfig, lanes: int, first: int, device):
        T, L = cfg.steps, lanes
        self.dsg = dsg_schedule(T, cfg.overlap, cfg.beta)  # [T, M] CPU
        self.depth = dsg_steps(self.dsg)  # S
        offsets = torch.tensor([(j - first) % L for j in range(L)])  # [L] tick of each lane's first start
        steps = (torch.arange(T)[:, None] - offsets[None, :]) % T  # [T, L]
        prev_lane = (torch.arange(L) - 1) % L  # [L]: clip c-1 lives in lane (c - 1) mod L
        S = max(self.depth, 1)
        self.gather = (prev_lane[None, :] * S + steps.clamp(max=S - 1)).to(device)  # [T, L] rows of heads.flatten
        self.masks = self.dsg[steps].to(device)  # [T, L, M]
        no_reuse = self.dsg[steps].clone()
        no_reuse[:, first % L] = False  # clip 0 (lane 0 in the first T ticks of a fresh video) has no predecessor
        self.first_masks = no_reuse.to(device)  # [T, L, M]
        self.steps_host = steps.tolist()  # host copy: which lane finishes or writes a head, decided without a sync
        self.steps = steps.to(device)  # [T, L] int64


class _Lanes:
    """The per-lane buffers, allocated once: latents, each clip's initial latents and DSG heads, step inputs."""

    def __init__(self, state: ClipState, lanes: int, depth: int, context: torch.Tensor):
        _, C, N, h, w = state.prev_initial.shape
        M = state.prev_heads.shape[3]
        like = dict(device=state.prev_initial.device, dtype=state.prev_initial.dtype)
        self.x = torch.zeros(lanes, C, N, h, w, **like)  # [L, C, N, h, w]
        self.initial = torch.zeros(lanes, C, N, h, w, **like)  # [L, C, N, h, w]
        self.heads = torch.zeros(lanes, max(depth, 1), C, M, h, w, **like)  # [L, S, C, M, h, w]
        self.prev_head = torch.zeros(lanes, C, M, h, w, **like)  # [L, C, M, h, w] gathered step input
        self.context = context.repeat_interleave(lanes, dim=0).contiguous()  # [2L, L_ctx, D]: [uncond x L, cond x L]
        self.clip: list[Optional[int]] = [None] * lanes  # host bookkeeping: the clip in each lane
        self.noise_after: list[Optional[torch.Tensor]] = [None] * lanes


def _check(state: ClipState, cfg: SamplerConfig, context: torch.Tensor, depth: int) -> None:
    if state.prev_initial.shape[0] != 1:
        raise ConfigError(f"the wavefront runs one video (ClipState batch 1), got batch {state.prev_initial.shape[0]}")
    if context.shape[0] != 2:
        raise ConfigError(f"the wavefront takes one CFG context pair [2, L, D], got {tuple(context.shape)}")
    if state.prev_initial.shape[2] != cfg.frames or state.prev_heads.shape[3] != cfg.overlap:
        raise ConfigError(f"ClipState was allocated for other frames/overlap than N={cfg.frames}, M={cfg.overlap}")
    if state.prev_heads.shape[0] < depth:
        raise ConfigError(f"ClipState keeps {state.prev_heads.shape[0]} DSG steps but beta={cfg.beta} needs {depth}")


def _to_device(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A CPU draw onto the latents' device; on CUDA through pinned memory, so the copy does not stall the stream."""
    if like.device.type == "cuda":
        return t.pin_memory().to(like.device, like.dtype, non_blocking=True)
    return t.to(like.device, like.dtype)


class Wavefront:
    """Runs clips state.clips_done .. cfg.clips-1 of one video through `step` in L lanes; see the module docstring."""

    def __init__(self, step: Step, table: DDIMTable, state: ClipState, context: torch.Tensor, cfg: SamplerConfig,
                 noise: NoiseSource, lanes: int):
        if table.steps != cfg.steps:
            raise ConfigError(f"DDIM table has {table.steps} steps but the sampler config asks for {cfg.steps}")
        self.step, self.state, self.cfg, self.noise = step, state, cfg, noise
        self.first = state.clips_done
        self.L = lane_count(lanes, cfg.steps)
        self.tables = _Tables(cfg, self.L, self.first, state.prev_initial.device)
        _check(state, cfg, context, self.tables.depth)
        self.lanes = _Lanes(state, self.L, self.tables.depth, context.to(state.prev_initial))
        self.S = self.tables.depth
        if self.first > 0:  # the first clip reads its predecessor from the lane before its own
            prev = (self.first - 1) % self.L
            self.lanes.initial[prev].copy_(state.prev_initial[0])
            if self.S:
                self.lanes.heads[prev].copy_(state.prev_heads[: self.S, 0])

    @torch.inference_mode()
    def clips(self, callback: Optional[Callable[[dict], None]] = None) -> Iterator[FinishedClip]:
        """Yield the clips in order as they finish. The shared ClipState equals the sequential run's after each."""
        T, lanes = self.cfg.steps, self.lanes
        next_clip, tick = self.first, 0
        while self.state.clips_done < self.cfg.clips:
            phase = tick % T
            if next_clip < self.cfg.clips and lanes.clip[next_clip % self.L] is None:
                self._start(next_clip)
                next_clip += 1
            self._tick(phase, first_period=self.first == 0 and tick < T)
            if callback is not None:
                self._report(callback, phase)
            done = self._finish(phase, more=next_clip < self.cfg.clips)
            if done is not None:
                yield done
            tick += 1

    def _start(self, c: int) -> None:
        """Clip c's initial latents in lane c mod L: z_T (Eq. 5) for clip 0, else FNR + PNS (Eq. 6-7)."""
        j, lanes, cfg = c % self.L, self.lanes, self.cfg
        shape = (1,) + tuple(lanes.x.shape[1:])  # [1, C, N, h, w]
        if c == 0:
            z = _to_device(initial_noise(self.noise, shape, cfg.noise_prior), lanes.x)  # [1, C, N, h, w]
        else:
            fresh = _to_device(self.noise.normal(shape, pns_noise_std(cfg.alpha)), lanes.x)  # [1, C, N, h, w]
            prev = lanes.initial[(c - 1) % self.L].unsqueeze(0)  # [1, C, N, h, w]
            z = pns_initial_latents(prev, fresh, cfg.overlap, cfg.alpha)  # [1, C, N, h, w]
        lanes.x[j].copy_(z[0])
        lanes.initial[j].copy_(z[0])
        lanes.clip[j], lanes.noise_after[j] = c, self.noise.get_state()

    def _tick(self, phase: int, first_period: bool) -> None:
        """One batched step of every lane: gather the heads to read, step, store the heads written."""
        t, lanes = self.tables, self.lanes
        if self.S:
            flat = lanes.heads.flatten(0, 1)  # [L*S, C, M, h, w], a view
            torch.index_select(flat, 0, t.gather[phase], out=lanes.prev_head)  # [L, C, M, h, w]
        masks = t.first_masks if first_period else t.masks
        x_next, head = self.step(lanes.x, t.steps[phase], lanes.prev_head, masks[phase], lanes.context)
        lanes.x.copy_(x_next)  # outputs may be a CUDA graph's static buffers: consume before the next call
        for j, i in enumerate(t.steps_host[phase]):
            if lanes.clip[j] is not None and i < self.S:
                lanes.heads[j, i].copy_(head[j])

    def _report(self, callback: Callable[[dict], None], phase: int) -> None:
        """Progress of the oldest clip in flight (the next one out)."""
        active = [(c, j) for j, c in enumerate(self.lanes.clip) if c is not None]
        c, j = min(active)
        callback({"clip": c, "step": self.tables.steps_host[phase][j], "latents": self.lanes.x[j : j + 1],
                  "inflight": len(active)})

    def _finish(self, phase: int, more: bool) -> Optional[FinishedClip]:
        """The lane at step T-1 (at most one per tick) hands its clip out and becomes the ClipState."""
        lanes, state = self.lanes, self.state
        for j, i in enumerate(self.tables.steps_host[phase]):
            c = lanes.clip[j]
            if c is None or i != self.cfg.steps - 1:
                continue
            latents = lanes.x[j : j + 1].clone()  # [1, C, N, h, w]
            state.prev_initial[0].copy_(lanes.initial[j])
            if self.S:
                state.prev_heads[: self.S, 0].copy_(lanes.heads[j])
            state.clips_done = c + 1
            lanes.clip[j] = None
            if not more:
                lanes.x[j].zero_()  # an idle lane keeps stepping (fixed batch shape): give it tame inputs
            return FinishedClip(c, latents, lanes.noise_after[j])
        return None


def wavefront_clips(step: Step, table: DDIMTable, state: ClipState, context: torch.Tensor, cfg: SamplerConfig,
                    noise: NoiseSource, lanes: int,
                    callback: Optional[Callable[[dict], None]] = None) -> Iterator[FinishedClip]:
    """Clips state.clips_done .. cfg.clips-1 through `step` with `lanes` clips in flight, in order."""
    return Wavefront(step, table, state, context, cfg, noise, lanes).clips(callback)
