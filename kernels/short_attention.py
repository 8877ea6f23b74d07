"""Short-sequence self-attention (the UNet's temporal attention: along a clip's F frames, per pixel and head).

out = softmax(q @ k^T / sqrt(D)) @ v for N*H independent (sequence, head) pairs of length L <= 64, i.e.
F.scaled_dot_product_attention without mask or dropout. Flash/cuDNN SDPA give each pair its own program with a
64-128-row tile: at L = 16 most of the tile is padding, and a call launches ~10^4 tiny programs. Here one program
takes BLOCK_G pairs (~128 query rows in all) and does both matmuls as batched 3-D `tl.dot`s on
(BLOCK_G, BLOCK_L, BLOCK_D) tiles, with an fp32 softmax in between; L and D are padded to powers of two >= 16 (what
tl.dot needs), padded keys get -inf, padded loads read 0.

Layout: q, k, v are (N, H, L, D) with any strides but a unit last one, so the caller passes views of its own
layout without copies (e.g. heads split off a fused (N, L, 3C) qkv projection: rows 3C apart); the pair index
g = n*H + h is split back into n, h for the addresses. The output is a contiguous (N, L, H, D) buffer returned as
its (N, H, L, D) transpose, the layout flash attention returns: `out.transpose(1, 2).reshape(N, L, H*D)` is free.

`short_attention` runs the op (registered with `torch.library.triton_op`, so torch.compile(fullgraph=True)
traces it); `short_attention_reference` is the torch maths for parity tests; `supported` says what it accepts.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton


def _interpreting() -> bool:
    """Whether @triton.jit built interpreter functions (TRITON_INTERPRET=1 when this module was imported)."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older versions read the environment directly
    return bool(knobs.runtime.interpret) if knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"


INTERPRET = _interpreting()
MAX_L, MIN_D, MAX_D = 64, 8, 128
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


# Only triton.language builtins and own @triton.jit helpers, never the standard library's jit functions (tl.max,
# tl.sum): if triton was imported before TRITON_INTERPRET=1 was set, the interpreter cannot call those (see
# temporal_conv.py). On the GPU the helpers compile to the same code.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _tile(ptr, off_g, rows, cols, stride_l, gmask, L, D):
    """The (BLOCK_G, BLOCK_L, BLOCK_D) tile of pairs `off_g` (element offsets), 0 outside (pairs, L, D)."""
    mask = gmask[:, None, None] & (rows < L)[None, :, None] & (cols < D)[None, None, :]
    offsets = off_g[:, None, None] + (rows.to(tl.int64) * stride_l)[None, :, None] + cols[None, None, :]
    return tl.load(ptr + offsets, mask=mask, other=0.0)


@triton.jit
def _short_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, PAIRS, H, L, D,
                            sq_n, sq_h, sq_l, sk_n, sk_h, sk_l, sv_n, sv_h, sv_l,
                            QK_SCALE: tl.constexpr, DOT_IEEE: tl.constexpr,
                            BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """BLOCK_G (n, h) pairs: S = Q K^T (G x L x L, fp32), P = exp2(S*scale*log2e - rowmax), out = P V / rowsum."""
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = g < PAIRS
    n, h = (g // H).to(tl.int64), (g % H).to(tl.int64)  # int64: a whole tensor may pass 2^31 elements
    rows, cols = tl.arange(0, BLOCK_L), tl.arange(0, BLOCK_D)
    q = _tile(q_ptr, n * sq_n + h * sq_h, rows, cols, sq_l, gmask, L, D)
    k = _tile(k_ptr, n * sk_n + h * sk_h, rows, cols, sk_l, gmask, L, D)
    v = _tile(v_ptr, n * sv_n + h * sv_h, rows, cols, sv_l, gmask, L, D)
    kt = tl.permute(k, (0, 2, 1))
    if DOT_IEEE:  # fp32 products of the (already rounded) operands: exact for 16-bit ones
        s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
    else:
        s = tl.dot(q, kt)  # fp32 accumulation
    # Softmax in base 2 with scale and log2(e) folded into one multiply; keys past L never count. Padded query
    # rows and pairs see zero scores on the valid keys (L >= 1), so nothing is NaN; their stores are masked.
    s = tl.where((rows < L)[None, None, :], s * QK_SCALE, float("-inf"))
    p = tl.exp2(s - tl.reduce(s, 2, _max)[:, :, None])
    denom = tl.reduce(p, 2, _add)
    p = p.to(v_ptr.dtype.element_ty)  # the second product's operand precision, as flash attention
    if DOT_IEEE:
        acc = tl.dot(p.to(tl.float32), v.to(tl.float32), input_precision="ieee")
    else:
        acc = tl.dot(p, v)
    acc = acc / denom[:, :, None]  # normalise once per output element instead of once per probability
    # out is contiguous (N, L, H, D): element (n, h, l, d) at ((n*L + l)*H + h)*D + d
    offsets = ((n * L)[:, None, None] + rows[None, :, None]) * H * D + (h * D)[:, None, None] + cols[None, None, :]
    mask = gmask[:, None, None] & (rows < L)[None, :, None] & (cols < D)[None, None, :]
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors (checks only metadata, launches nothing)."""
    if q.dim() != 4 or q.dtype not in DTYPES:
        return False
    if any(t.shape != q.shape or t.dtype != q.dtype or t.device != q.device or t.stride(-1) != 1 for t in (q, k, v)):
        return False
    return 1 <= q.shape[2] <= MAX_L and MIN_D <= q.shape[3] <= MAX_D


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_g: Optional[int] = None,
           num_warps: Optional[int] = None) -> torch.Tensor:
    """The kernel on (N, H, L, D) views; block_g (pairs per program, a power of two) and num_warps default to the
    heuristic: ~128 query rows per program, 8 warps once the fp32 output tile passes 8192 elements (D > 64)."""
    if block_g is not None and (block_g < 1 or block_g & (block_g - 1)):
        raise ValueError(f"block_g must be a power of two (got {block_g})")  # tl.arange needs one
    n, h, length, d = q.shape
    block_l, block_d = max(16, triton.next_power_of_2(length)), max(16, triton.next_power_of_2(d))
    block_g = block_g or max(1, 128 // block_l)
    num_warps = num_warps or (4 if block_g * block_l * block_d <= 8192 else 8)
    out = torch.empty(n, length, h, d, device=q.device, dtype=q.dtype).transpose(1, 2)
    if out.numel() == 0:
        return out
    # fp32: IEEE products (TF32 would lose ~3 digits). bf16 under the interpreter too: triton 3.9's interpreter
    # multiplies bf16's raw uint16 bits in tl.dot; fp32 products of bf16 values are the same numbers.
    ieee = q.dtype == torch.float32 or (INTERPRET and q.dtype == torch.bfloat16)
    wrap_triton(_short_attention_kernel)[(triton.cdiv(n * h, block_g),)](
        q, k, v, out, n * h, h, length, d, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        QK_SCALE=d ** -0.5 * LOG2E, DOT_IEEE=ieee, BLOCK_G=block_g, BLOCK_L=block_l, BLOCK_D=block_d,
        num_warps=num_warps)
    return out


@triton_op("vidrd::short_attention", mutates_args=())
def short_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v on (N, H, L, D) views; returns the (N, H, L, D) transpose of an (N, L, H, D) buffer."""
    if INTERPRET and is_fake(q):
        # Interpreter kernels are plain Python that wrap_triton cannot trace, and they would read fake tensors'
        # data: Dynamo's shape propagation (CPU tests, backend="eager") needs only the output's shape and strides.
        n, h, length, d = q.shape
        return q.new_empty(n, length, h, d).transpose(1, 2)
    return launch(q, k, v)


def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.ops.vidrd.short_attention(q, k, v)


def short_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same maths in torch ops: fp32 scores, softmax and products, cast back to the input dtype."""
    s = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5
    return (s.softmax(-1) @ v.float()).to(q.dtype)
