"""Temp-Conv layer (GroupNorm over the clip -> SiLU -> Conv3d (3,1,1)) as Triton kernels on the channels_last layout.

The model's activations (B*F, C, H, W) channels_last are physically (B, F, H*W, C): a row-major matrix with one
row per (clip, frame, pixel) and C columns. A (3,1,1) convolution is then one GEMM with K = 3C: output row
(b, f, p) is bias + sum over taps k of row (b, f+k-1, p) @ W_k^T, and row (b, f+k-1, p) is simply `k-1` frames,
i.e. (k-1)*H*W rows, away inside the clip; a tap that leaves the clip reads zeros (the conv's zero padding).

Per layer three launches instead of GroupNorm (+ layout copies) + SiLU + conv:
  1. `_stats_kernel`: per (clip, channel) shifted sums over all F*H*W rows, split over row chunks;
  2. `_finalize_kernel`: per (clip, group) mean/rstd folded with gamma/beta into a per-(clip, channel) affine
     scale/shift, so the GEMM's prologue is one FMA + SiLU per element;
  3. `_tconv_body` (autotuned: `_tconv_autotuned`): the GEMM, with GroupNorm-apply + SiLU fused into the load of
     the A operand, fp32 accumulation, bias (and optionally the block's residual) in the epilogue.
The activation never goes to memory. The price: each input element is normalised and activated once per
(tap, N tile) instead of once, i.e. 1/BLOCK_N of an exp per multiply-add.

`temporal_conv` / `temporal_conv_block` take the model's 4-D tensors; `temporal_conv_reference` /
`temporal_conv_block_reference` are the layer's torch maths (runtime/layers.py TemporalConv) for parity tests.
The kernels are registered with `torch.library.triton_op`, so torch.compile(fullgraph=True) traces them (Inductor
sees the Triton kernels themselves) without a graph break.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton


def _interpreting() -> bool:
    """Whether @triton.jit built interpreter functions (TRITON_INTERPRET=1 when this module was imported)."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older versions read the environment directly
    return bool(knobs.runtime.interpret) if knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"


INTERPRET = _interpreting()


# The kernels use only triton.language builtins and their own @triton.jit helpers, never the standard library's
# jit functions (tl.sum, tl.zeros, tl.sigmoid, tl.cdiv): those are decorated when triton is first imported, and if
# that happened before TRITON_INTERPRET=1 was set (pytest's conftest imports triton through diffusers), the
# interpreter cannot call them. On the GPU the helpers compile to the same code.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _colsum(x):
    return tl.reduce(x, 0, _add)


#################################################################################
#                          GroupNorm statistics over a clip                      #
#################################################################################

STATS_BLOCK_R, STATS_BLOCK_C = 64, 64
STATS_PROGRAMS = 512  # enough programs to fill an H100/H200 (132 SMs) a few times over
MAX_SPLIT = 128


@triton.jit
def _stats_kernel(x_ptr, part_ptr, ROWS, C, CHUNK, SPLIT, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[b, split, 0|1, c] = sum of (x - pivot) and (x - pivot)^2 over rows [split*CHUNK, (split+1)*CHUNK).

    The pivot is the clip's first row: sums of shifted values keep var = E[d^2] - E[d]^2 free of the cancellation
    that plain sums suffer when |mean| >> std.
    """
    pid_c, split, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    clip = x_ptr + b.to(tl.int64) * ROWS * C
    pivot = tl.load(clip + cols, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    s2 = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    start = split * CHUNK
    for r0 in range(start, start + CHUNK, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < ROWS)[:, None] & cmask[None, :]
        v = tl.load(clip + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, v - pivot[None, :], 0.0)
        s1 += d
        s2 += d * d
    out = part_ptr + (b * SPLIT + split) * 2 * C + cols
    tl.store(out, _colsum(s1), mask=cmask)
    tl.store(out + C, _colsum(s2), mask=cmask)


@triton.jit
def _finalize_kernel(x_ptr, part_ptr, gamma_ptr, beta_ptr, scale_ptr, shift_ptr, ROWS, C, CPG, SPLIT, eps,
                     SPLIT_P: tl.constexpr, CPG_P: tl.constexpr):
    """One (group, clip): mean and rstd over CPG channels x ROWS rows, then per channel
    scale = rstd * gamma and shift = beta - mean * scale, so that GroupNorm(x) = x * scale + shift."""
    g, b = tl.program_id(0), tl.program_id(1)
    lane = tl.arange(0, CPG_P)
    cmask = lane < CPG
    ch = g * CPG + lane
    sp = tl.arange(0, SPLIT_P)
    mask = (sp < SPLIT)[:, None] & cmask[None, :]
    part = part_ptr + (b * SPLIT + sp[:, None]) * 2 * C + ch[None, :]
    s1 = _colsum(tl.load(part, mask=mask, other=0.0))
    s2 = _colsum(tl.load(part + C, mask=mask, other=0.0))
    pivot = tl.load(x_ptr + b.to(tl.int64) * ROWS * C + ch, mask=cmask, other=0.0).to(tl.float32)
    n = ROWS * 1.0
    mean_c = pivot + s1 / n  # per-channel mean and sum of squared deviations (Chan et al.'s pairwise merge)
    m2_c = tl.maximum(s2 - s1 * s1 / n, 0.0)
    mean = _colsum(tl.where(cmask, mean_c, 0.0)) / CPG
    dev = tl.where(cmask, mean_c - mean, 0.0)
    m2 = _colsum(tl.where(cmask, m2_c, 0.0) + n * dev * dev)
    # Biased variance, as GroupNorm. The cast: Inductor passes a Python float eps as fp64, which would make the
    # variance fp64, and sqrt_rn takes fp32 only.
    rstd = 1.0 / tl.sqrt_rn((m2 / (n * CPG) + eps).to(tl.float32))
    gamma = tl.load(gamma_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    scale = rstd * gamma
    tl.store(scale_ptr + b * C + ch, scale, mask=cmask)
    tl.store(shift_ptr + b * C + ch, beta - mean * scale, mask=cmask)


def _split(rows: int, clips: int, channels: int) -> tuple[int, int]:
    """(chunk, split): rows per program (a multiple of the row block) and programs per (clip, channel block)."""
    per_clip = max(1, STATS_PROGRAMS // (clips * triton.cdiv(channels, STATS_BLOCK_C)))
    want = min(per_clip, MAX_SPLIT, triton.cdiv(rows, STATS_BLOCK_R))
    chunk = triton.cdiv(triton.cdiv(rows, want), STATS_BLOCK_R) * STATS_BLOCK_R
    return chunk, triton.cdiv(rows, chunk)


def group_scale_shift(x2d: torch.Tensor, rows: int, gamma: torch.Tensor, beta: torch.Tensor, groups: int,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm over each clip's `rows` rows of x2d (clips*rows, C) as per-(clip, channel) fp32 scale and shift."""
    total, c = x2d.shape
    clips, cpg = total // rows, c // groups
    chunk, split = _split(rows, clips, c)
    part = torch.empty(clips, split, 2, c, device=x2d.device, dtype=torch.float32)
    scale = torch.empty(clips, c, device=x2d.device, dtype=torch.float32)
    shift = torch.empty_like(scale)
    wrap_triton(_stats_kernel)[(triton.cdiv(c, STATS_BLOCK_C), split, clips)](
        x2d, part, rows, c, chunk, split, BLOCK_R=STATS_BLOCK_R, BLOCK_C=STATS_BLOCK_C)
    wrap_triton(_finalize_kernel)[(groups, clips)](
        x2d, part, gamma, beta, scale, shift, rows, c, cpg, split, eps,
        SPLIT_P=triton.next_power_of_2(split), CPG_P=triton.next_power_of_2(cpg))
    return scale, shift


#################################################################################
#                  The (3,1,1) convolution as one GEMM, GN + SiLU fused          #
#################################################################################


@triton.jit
def _tconv_body(x_ptr, scale_ptr, shift_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, ROWS, HW, C,
                stride_wn, stride_wc, stride_wk, HAS_RES: tl.constexpr, DOT_IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[b, m, n] = bias[n] (+ res[b, m, n]) + sum_k sum_c silu(x[b, m+(k-1)HW, c]*scale[b,c] + shift[b,c]) W[n,c,k].

    Grid (row tiles x column tiles of one clip, clips): a program never straddles two clips, so the GroupNorm
    scale/shift are plain vectors. Adjacent programs share a row tile (the N index varies fastest).
    """
    pid, b = tl.program_id(0), tl.program_id(1)
    num_n = (C + BLOCK_N - 1) // BLOCK_N
    rows = (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = cols < C
    clip_offset = b.to(tl.int64) * ROWS * C  # int64: clips * rows * C may pass 2^31 (rows * C is checked below it)
    x_clip = x_ptr + clip_offset
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for tap in tl.static_range(3):
        src = rows + (tap - 1) * HW  # same pixel, one frame earlier / same frame / one frame later
        rmask = (src >= 0) & (src < ROWS) & (rows < ROWS)  # outside the clip: the conv's zero padding
        for c0 in range(0, C, BLOCK_K):
            ck = c0 + tl.arange(0, BLOCK_K)
            kmask = ck < C
            a = tl.load(x_clip + src[:, None] * C + ck[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            scale = tl.load(scale_ptr + b * C + ck, mask=kmask, other=0.0)  # 0 past C: silu(0) = 0 there
            shift = tl.load(shift_ptr + b * C + ck, mask=kmask, other=0.0)
            a = a.to(tl.float32) * scale[None, :] + shift[None, :]
            a = a / (1.0 + tl.exp(-a))  # SiLU
            a = tl.where(rmask[:, None], a, 0.0)  # padding is zero after the activation, as in the reference
            w = tl.load(w_ptr + cols[None, :] * stride_wn + ck[:, None] * stride_wc + tap * stride_wk,
                        mask=kmask[:, None] & nmask[None, :], other=0.0)
            a = a.to(x_ptr.dtype.element_ty)  # the operand precision of the reference conv
            w = w.to(x_ptr.dtype.element_ty)
            if DOT_IEEE:  # fp32 products of the (already rounded) operands: exact for 16-bit ones
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
    acc += tl.load(bias_ptr + cols, mask=nmask, other=0.0).to(tl.float32)[None, :]
    offsets = clip_offset + rows[:, None] * C + cols[None, :]
    omask = (rows < ROWS)[:, None] & nmask[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + offsets, mask=omask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=omask)


def _config(m: int, n: int, k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)


# A short list (each config is compiled and timed once per shape). BLOCK_K = 64 divides 320/640/1280; 128 x 128
# for the large-M layers (latent 32, 16), 64-wide tiles so the 4x4 and 8x8 layers (M = 512, 2048) fill the GPU.
GPU_CONFIGS = [
    _config(128, 128, 64, 8, 3),
    _config(128, 64, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 64, 4, 3),
    _config(128, 128, 32, 4, 4),
]
# The interpreter cannot time configs; one small config whose N and K blocks are partial for C = 32 and 96.
INTERPRET_CONFIGS = [_config(32, 64, 64, 4, 1)]

_tconv_autotuned = triton.autotune(configs=INTERPRET_CONFIGS if INTERPRET else GPU_CONFIGS,
                                   key=["ROWS", "HW", "C"])(_tconv_body)


def conv_gemm(x2d: torch.Tensor, rows: int, hw: int, scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor, residual: Optional[torch.Tensor], config: Optional[dict] = None) -> torch.Tensor:
    """The fused GEMM on (clips*rows, C); `config` (BLOCK_M/N/K, num_warps, num_stages) bypasses autotuning."""
    total, c = x2d.shape
    torch._check(rows * c < 2**31, lambda: "one clip must hold fewer than 2^31 elements (int32 offsets)")
    out = torch.empty_like(x2d)
    w = weight.reshape(c, c, 3)  # (C_out, C_in, 3): a view for any memory format of the (C, C, 3, 1, 1) weight
    args = (x2d, scale, shift, w, bias, x2d if residual is None else residual, out, rows, hw, c,
            w.stride(0), w.stride(1), w.stride(2))
    # fp32 inputs: IEEE products (TF32 would lose ~3 digits). bf16 under the interpreter too: triton 3.9's
    # interpreter multiplies bf16's raw uint16 bits in tl.dot; fp32 products of bf16 values are the same numbers.
    ieee = x2d.dtype == torch.float32 or (INTERPRET and x2d.dtype == torch.bfloat16)
    flags = {"HAS_RES": residual is not None, "DOT_IEEE": ieee}
    if config is None:
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(c, meta["BLOCK_N"]), total // rows)
        wrap_triton(_tconv_autotuned)[grid](*args, **flags)
    else:
        grid = (triton.cdiv(rows, config["BLOCK_M"]) * triton.cdiv(c, config["BLOCK_N"]), total // rows)
        wrap_triton(_tconv_body)[grid](*args, **flags, **config)
    return out


#################################################################################
#                         The op, the launchers, the references                  #
#################################################################################


@triton_op("vidrd::temporal_conv_layer", mutates_args=())
def temporal_conv_layer(x2d: torch.Tensor, rows: int, hw: int, gamma: torch.Tensor, beta: torch.Tensor,
                        weight: torch.Tensor, bias: torch.Tensor, residual: Optional[torch.Tensor], groups: int,
                        eps: float) -> torch.Tensor:
    """One Temp-Conv layer on the (clips*rows, C) row matrix: silu(GroupNorm(x)) (*) W + bias (+ residual)."""
    if INTERPRET and is_fake(x2d):
        # Interpreter kernels are plain Python that wrap_triton cannot trace, and they would read fake tensors'
        # data: Dynamo's shape propagation (CPU tests, backend="eager") needs only the output's shape.
        return torch.empty_like(x2d, memory_format=torch.contiguous_format)
    x2d = x2d.contiguous()  # a no-op for the channels_last view; the kernels assume row stride C, column stride 1
    residual = None if residual is None else residual.contiguous()
    scale, shift = group_scale_shift(x2d, rows, gamma, beta, groups, eps)
    return conv_gemm(x2d, rows, hw, scale, shift, weight, bias, residual)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B*F, C, H, W) -> (B*F*H*W, C): free for channels_last (physically (B, F, H, W, C)), else a copy."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def temporal_conv(x: torch.Tensor, frames: int, gamma: torch.Tensor, beta: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor, groups: int, eps: float,
                  residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One layer on the model's (B*F, C, H, W) tensor; returns (B*F, C, H, W) channels_last."""
    bf, c, h, w = x.shape
    res = None if residual is None else _rows(residual)
    y = torch.ops.vidrd.temporal_conv_layer(_rows(x), frames * h * w, h * w, gamma, beta, weight, bias, res,
                                            groups, eps)
    return y.view(bf, h, w, c).permute(0, 3, 1, 2)


def temporal_conv_block(x: torch.Tensor, frames: int, layers: Sequence[tuple]) -> torch.Tensor:
    """A Temp-Conv block: each layer (gamma, beta, weight, bias, groups, eps) in turn, the residual fused into
    the last layer's epilogue."""
    y = x
    for i, layer in enumerate(layers):
        y = temporal_conv(y, frames, *layer, residual=x if i == len(layers) - 1 else None)
    return y


def temporal_conv_reference(x: torch.Tensor, frames: int, gamma: torch.Tensor, beta: torch.Tensor,
                            weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                            residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The same layer in torch ops, as runtime/layers.py TemporalConv computes it (clip viewed as (B, C, F, HW))."""
    bf, c, h, w = x.shape
    clip = x.permute(0, 2, 3, 1).reshape(bf // frames, frames, h * w, c).permute(0, 3, 1, 2)  # (B, C, F, HW)
    y = F.conv2d(F.silu(F.group_norm(clip, groups, gamma, beta, eps)), weight.squeeze(-1), bias, padding=(1, 0))
    if residual is not None:
        y = residual.permute(0, 2, 3, 1).reshape(bf // frames, frames, h * w, c).permute(0, 3, 1, 2) + y
    return y.permute(0, 2, 3, 1).reshape(bf, h, w, c).permute(0, 3, 1, 2)


def temporal_conv_block_reference(x: torch.Tensor, frames: int, layers: Sequence[tuple]) -> torch.Tensor:
    y = x
    for i, layer in enumerate(layers):
        y = temporal_conv_reference(y, frames, *layer, residual=x if i == len(layers) - 1 else None)
    return y


def module_layers(module) -> list[tuple]:
    """(gamma, beta, weight, bias, groups, eps) per layer of a runtime.layers.TemporalConv (keys convs.{4i, 4i+3})."""
    convs = module.convs
    return [(convs[i].weight, convs[i].bias, convs[i + 3].weight, convs[i + 3].bias, convs[i].num_groups,
             convs[i].eps) for i in range(0, len(convs), 4)]
