"""FNR, PNS and DSG (paper Eq. 6-8) as pure functions over [B, C, F, H, W] latents."""

from __future__ import annotations

import math

import torch


def reversed_frames(x: torch.Tensor) -> torch.Tensor:
    """Frame-level noise reversal order (Eq. 6): new frame j takes old frame N-1-j."""
    return x.flip(2)  # [B, C, N, H, W]


def reversed_head(x: torch.Tensor, overlap: int) -> torch.Tensor:
    """The first M frames of FNR order (Eq. 6), i.e. the last M frames reversed, without flipping the whole clip."""
    return x[:, :, x.shape[2] - overlap :].flip(2)  # [B, C, M, H, W]


def pns_mix(alpha: float) -> float:
    """Weight of the reused noise in Eq. 7: alpha / sqrt(1 + alpha^2)."""
    return alpha / math.sqrt(1.0 + alpha**2)


def pns_noise_std(alpha: float) -> float:
    """Std of the fresh noise in Eq. 7, 1 / sqrt(1 + alpha^2), so the mixed latents keep unit variance."""
    return 1.0 / math.sqrt(1.0 + alpha**2)


def pns_initial_latents(
    prev_initial: torch.Tensor, fresh_noise: torch.Tensor, overlap: int, alpha: float
) -> torch.Tensor:
    """Past-noise sampling (Eq. 7) in FNR order: frames j < M reuse old[N-1-j], later ones mix in fresh noise."""
    old = reversed_frames(prev_initial)  # [B, C, N, H, W]
    # fresh_noise is drawn for the whole clip (std pns_noise_std(alpha)) so random streams match the authors';
    # its first M frames are deliberately unused.
    tail = pns_mix(alpha) * old[:, :, overlap:] + fresh_noise[:, :, overlap:]  # [B, C, N-M, H, W]
    return torch.cat([old[:, :, :overlap], tail], dim=2)  # [B, C, N, H, W]


def dsg_schedule(steps: int, overlap: int, beta: float) -> torch.Tensor:
    """Denoising with staged guidance (Eq. 8): mask[i, j] = i < (M - j) * (T / M) * beta, a CPU BoolTensor[T, M]."""
    T, M = steps, overlap
    # Same float expression and evaluation order as the authors, so boundary steps round identically.
    rows = [[i < (M - j) * (T / M) * beta for j in range(M)] for i in range(T)]
    return torch.tensor(rows, dtype=torch.bool).reshape(T, M)  # [T, M] (reshape keeps [T, 0] when M = 0)


def dsg_steps(mask: torch.Tensor) -> int:
    """Number of leading steps of a DSG schedule (Eq. 8) that overwrite any frame: the buffer depth a state needs."""
    active = mask.any(dim=1).tolist()  # host-side: the schedule is a CPU tensor built once
    return next((i for i, on in enumerate(active) if not on), len(active))


def dsg_overwrite(latents: torch.Tensor, prev_head: torch.Tensor, mask_row: torch.Tensor) -> torch.Tensor:
    """Eq. 8: frames j < M take the previous clip's same-step latents (already reversed) where mask_row[j] is set."""
    M = prev_head.shape[2]
    if M == 0:
        return latents
    # mask_row is [M] (one step for the batch) or [B, M] (each clip at its own step, for a batched wavefront).
    mask = mask_row.reshape(-1, 1, M, 1, 1)  # [B or 1, 1, M, 1, 1]
    head = torch.where(mask, prev_head, latents[:, :, :M])  # [B, C, M, H, W]
    return torch.cat([head, latents[:, :, M:]], dim=2)  # [B, C, N, H, W]
