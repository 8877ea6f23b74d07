"""Building blocks shared by the temporal UNet and the temporal VAE decoder.

Activations are kept with frames folded into the batch, (B*F, C, H, W), so 2D convolutions run directly. The
layers that look across frames (GroupNorm over a clip, Temp-Conv, Temp-Attn) view that tensor per clip. When the
tensor is channels_last, i.e. physically (B, F, H, W, C), every such view is free; otherwise it costs a copy.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .config import TEMPORAL_ATTENTION_FORMS, TEMPORAL_CONV_OPS

#################################################################################
#                         Layout helpers (views, no maths)                       #
#################################################################################


def to_clip_rows(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B*F, C, H, W) -> (B, C, F*H, W): one 'image' per clip, frames stacked along height."""
    bf, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(bf // frames, frames * h, w, c).permute(0, 3, 1, 2)


def from_clip_rows(x: torch.Tensor, frames: int) -> torch.Tensor:
    """Inverse of to_clip_rows: (B, C, F*H, W) -> (B*F, C, H, W)."""
    b, c, fh, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b * frames, fh // frames, w, c).permute(0, 3, 1, 2)


def to_clip_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B*F, C, H, W) -> (B, C, F, H*W): frames as their own axis, pixels flattened."""
    bf, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(bf // frames, frames, h * w, c).permute(0, 3, 1, 2)


def to_clip_volume(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B*F, C, H, W) -> (B, C, F, H, W): the clip as a volume (channels_last_3d when x is channels_last)."""
    bf, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(bf // frames, frames, h, w, c).permute(0, 4, 1, 2, 3)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W, C)."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n, h * w, c)


def from_tokens(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, H*W, C) -> (N, C, H, W), channels_last."""
    n, _, c = x.shape
    return x.reshape(n, h, w, c).permute(0, 3, 1, 2)


#################################################################################
#                                  Normalisation                                 #
#################################################################################


class ClipGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics span all frames of a clip (the authors' GroupNorm on a 5D b c f h w tensor).

    Input (B*F, C, H, W) and the frame count; the clip is viewed as one (C, F*H, W) image so the native kernel
    (fp32 accumulation on CUDA also for fp16 inputs) does the work.
    """

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:  # type: ignore[override]
        y = F.group_norm(to_clip_rows(x, frames), self.num_groups, self.weight, self.bias, self.eps)  # (B, C, F*H, W)
        return from_clip_rows(y, frames)  # (B*F, C, H, W)


#################################################################################
#                                     Temp-Conv                                  #
#################################################################################


class TemporalConv(nn.Module):
    """Temp-Conv: L x [GroupNorm(32) -> SiLU -> Dropout -> Conv3d(C, C, (3,1,1))] with a residual over frames.

    The Conv3d weights keep the authors' (C, C, 3, 1, 1) shape. Which op runs, first match wins: the Triton kernel
    (kernels.enabled(), eager only in practice), the matmul form (CompileSettings.temporal_conv_gemm, under
    torch.compile), else `conv_op`. Exports always run the (3, 1) conv2d.
    """

    # conv_op, set per module (set_temporal_conv_op; RuntimeConfig.temporal_conv): "conv2d", a (3, 1) convolution on
    # the clip viewed as (B, C, F, H*W); "conv3d", the Conv3d itself on the clip viewed as (B, C, F, H, W). Both
    # views are free for channels_last activations and the maths is the same; cuDNN picks different kernels (its
    # sm90 ones for the 3-D op at 256x256, where the 2-D one fell to a slow sm80 kernel).

    def __init__(self, channels: int, num_layers: int, dropout: float = 0.0):
        super().__init__()
        self.conv_op = "conv2d"
        layers: list[nn.Module] = []
        for _ in range(num_layers):
            layers += [nn.GroupNorm(32, channels), nn.SiLU(), nn.Dropout(dropout)]
            layers += [nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))]
        self.convs = nn.ModuleList(layers)  # authors' key names: convs.{0,3,4,7,...}

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        if frames == 1:  # a single image: the temporal layers are inactive (authors' rule)
            return x
        if use_triton_temporal_conv(x) and not self.training and len(self.convs) > 0:
            return self._forward_triton(x, frames)
        as_gemm = use_temporal_conv_gemm()
        as_3d = self.conv_op == "conv3d" and not as_gemm and not _exporting()  # engines keep the reference graph
        clip = to_clip_volume(x, frames) if as_3d else to_clip_frames(x, frames)  # (B, C, F, H, W) or (B, C, F, HW)
        y = clip
        for i in range(0, len(self.convs), 4):
            norm, act, drop, conv = self.convs[i : i + 4]
            y = drop(act(norm(y)))  # GroupNorm over (C/G, F, H[, W]): all frames of the clip
            if as_gemm:
                y = temporal_conv_as_gemm(y, conv.weight, conv.bias)
            elif as_3d:
                y = F.conv3d(y, conv.weight, conv.bias, padding=(1, 0, 0))  # (B, C, F, H, W)
            else:
                y = F.conv2d(y, conv.weight.squeeze(-1), conv.bias, padding=(1, 0))  # (B, C, F, HW)
        y = clip + y
        bf, c, h, w = x.shape
        return y.permute(0, 2, *range(3, y.ndim), 1).reshape(bf, h, w, c).permute(0, 3, 1, 2)  # (B*F, C, H, W)

    def _forward_triton(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """Same maths in kernels/temporal_conv.py: per layer one GEMM (K = 3C) with GroupNorm + SiLU fused into its
        operand load, the residual into the last layer's epilogue. Imported here, not at module level: the
        runtime must import without triton."""
        from ..kernels.temporal_conv import module_layers, temporal_conv_block

        return temporal_conv_block(x, frames, module_layers(self))


def set_temporal_conv_op(module: nn.Module, op: str) -> int:
    """TemporalConv.conv_op on every Temp-Conv under `module` (TEMPORAL_CONV_OPS); how many. Read while a forward
    is traced, so set it before compiling."""
    if op not in TEMPORAL_CONV_OPS:
        raise ValueError(f"Temp-Conv op must be one of {', '.join(TEMPORAL_CONV_OPS)} (got {op!r})")
    convs = [m for m in module.modules() if isinstance(m, TemporalConv)]
    for conv in convs:
        conv.conv_op = op
    return len(convs)


def temporal_conv_as_gemm(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The (3, 1, 1) convolution as one matmul with K = 3C: each output frame reads its frame and both neighbours
    (zeros past the ends), concatenated along channels. y (B, C, F, HW) -> (B, C, F, HW), the same maths as
    F.conv2d with padding (1, 0). Under Inductor the pad and concatenation fuse into the GroupNorm/SiLU kernel that
    produces y, and the matmul goes to cuBLAS in the row-major layout it prefers."""
    frames = y.shape[2]
    rows = y.permute(0, 2, 3, 1)  # (B, F, HW, C): a view when y is channels_last
    padded = F.pad(rows, (0, 0, 0, 0, 1, 1))  # (B, F+2, HW, C)
    taps = torch.cat([padded[:, k : k + frames] for k in range(3)], dim=-1)  # (B, F, HW, 3C): frames f-1, f, f+1
    c_out, c_in = weight.shape[:2]
    w = weight.reshape(c_out, c_in, 3).transpose(1, 2).reshape(c_out, 3 * c_in)  # tap-major, as taps is
    return F.linear(taps, w, bias).permute(0, 3, 1, 2)  # (B, C, F, HW)


# Temp-Conv as one matmul (temporal_conv_as_gemm) instead of a cuDNN (3, 1) convolution: "compiled" (only while
# torch.compile traces, where Inductor fuses the concatenation away; eager would pay it as a copy), "always" or
# "never". Process-wide, like Inductor's flags: set by the compiled backend (CompileSettings.temporal_conv_gemm) or
# by temporal_conv_form(). Export never uses it.
TEMPORAL_CONV_FORMS = ("never", "compiled", "always")
TEMPORAL_CONV_GEMM = "never"


def set_temporal_conv_form(form: str) -> None:
    global TEMPORAL_CONV_GEMM
    if form not in TEMPORAL_CONV_FORMS:
        raise ValueError(f"Temp-Conv GEMM form must be one of {', '.join(TEMPORAL_CONV_FORMS)} (got {form!r})")
    TEMPORAL_CONV_GEMM = form


@contextlib.contextmanager
def temporal_conv_form(form: str):
    """Run (or trace) a block of code with the Temp-Conv GEMM form set, then put the previous one back."""
    previous = TEMPORAL_CONV_GEMM
    set_temporal_conv_form(form)
    try:
        yield
    finally:
        set_temporal_conv_form(previous)


def use_temporal_conv_gemm() -> bool:
    if TEMPORAL_CONV_GEMM == "always":
        return not _exporting()
    if TEMPORAL_CONV_GEMM == "compiled":
        return torch.compiler.is_compiling() and not _exporting()
    return False


_EXPORT_DEPTH = 0  # > 0 inside exporting(): our ONNX export enters it around the tracer


@contextlib.contextmanager
def exporting():
    """Marks an export: the layers use only the reference ops inside (export/onnx.py enters it)."""
    global _EXPORT_DEPTH
    _EXPORT_DEPTH += 1
    try:
        yield
    finally:
        _EXPORT_DEPTH -= 1


def _exporting() -> bool:
    """Whether an exporter is tracing, so the engines must see the reference ops: inside exporting(), or the
    TorchScript tracer (torch.onnx's exporter). Under Dynamo only exporting() counts: torch.compiler.is_exporting()
    is also True under a plain torch.compile in torch 2.11 (pytorch/pytorch#176347), which would keep the kernels
    and the GEMM form out of every compiled graph."""
    if _EXPORT_DEPTH > 0:
        return True
    if torch.compiler.is_compiling():
        return False
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


# Devices whose tensors may go to the Triton kernels (tests add "cpu" to run them under TRITON_INTERPRET=1).
KERNEL_DEVICES = ("cuda",)
# Pixels per frame from which the kernel beats GroupNorm + SiLU + cuDNN (H100, fp16, 2 clips x 16 frames,
# bench/results/kernel-bench-h100-2026-11-21.json): 2.2x at 32x32, 1.3x at 16x16, but 0.6x at 8x8 and 0.5x at
# 4x4, where the few GEMM rows leave most of the GPU idle (no split-K).
KERNEL_MIN_POSITIONS = 256


def use_triton_temporal_conv(x: torch.Tensor) -> bool:
    """Whether Temp-Conv runs the Triton kernels: switched on (kernels.enabled()), triton installed, inference (no
    autograd through the kernels) on a CUDA tensor in fp16/bf16/fp32 laid out channels_last, large enough frames
    to gain (KERNEL_MIN_POSITIONS), and not exporting."""
    return (kernels.enabled() and kernels.triton_available() and x.device.type in KERNEL_DEVICES
            and not torch.is_grad_enabled()
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and x.shape[-2] * x.shape[-1] >= KERNEL_MIN_POSITIONS
            and x.is_contiguous(memory_format=torch.channels_last) and not _exporting())


#################################################################################
#                                     Attention                                  #
#################################################################################


class Attention(nn.Module):
    """Multi-head attention with diffusers' key names (to_q, to_k, to_v, to_out.0); softmax through SDPA.

    After fuse_projections() the input projections run as one GEMM: q, k and v from x for self-attention, k and v
    from the context for cross-attention (see there)."""

    def __init__(self, query_dim: int, heads: int, context_dim: int | None = None, bias: bool = False):
        super().__init__()
        self.is_self_attention = context_dim is None  # k and v from x: q, k, v can share one GEMM
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, query_dim, bias=bias)
        self.to_k = nn.Linear(context_dim, query_dim, bias=bias)
        self.to_v = nn.Linear(context_dim, query_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(query_dim, query_dim), nn.Dropout(0.0)])
        # Fused projections (fuse_projections), None until fused: non-persistent, so state_dict() and checkpoint
        # loading see only the to_q/to_k/to_v keys. Self-attention fills qkv_*, cross-attention kv_*.
        for name in ("qkv_weight", "qkv_bias", "kv_weight", "kv_bias"):
            self.register_buffer(name, None, persistent=False)

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Concatenate the input projections once: self-attention -> qkv_weight [3C, C] (rows q; k; v), cross-
        attention -> kv_weight [2C, Cctx] (rows k; v; q stays to_q). One GEMM with N = 3C (2C) reads the
        activations once instead of three (two) times and fills the GPU better at the small 8x8 and 16x16 levels.

        The projections' own weights then become views of the fused buffers, so no second copy is kept and an
        in-place change of them (load_state_dict copies into them) reaches the fused GEMM too. Call after the final
        dtype/device cast (the compiled backend does): module.to() makes new tensors, after which a weight change
        no longer reaches the fused buffers until fuse_projections() runs again. While the views hold, calling
        again does nothing, so a CUDA graph captured over the fused weights keeps valid addresses. Exports never
        use the fused buffers.
        """
        projections = (self.to_q, self.to_k, self.to_v) if self.is_self_attention else (self.to_k, self.to_v)
        fused = self.qkv_weight if self.is_self_attention else self.kv_weight
        if fused is not None and projections[0].weight.data_ptr() == fused.data_ptr():
            return  # already fused, and still sharing memory
        weight = torch.cat([p.weight for p in projections])  # [3C, C] or [2C, Cctx]
        bias = None if projections[0].bias is None else torch.cat([p.bias for p in projections])  # [3C] or [2C]
        prefix = "qkv" if self.is_self_attention else "kv"
        self.register_buffer(f"{prefix}_weight", weight, persistent=False)
        self.register_buffer(f"{prefix}_bias", bias, persistent=False)
        for i, p in enumerate(projections):  # each projection's parameters become views of rows of the fused ones
            rows = slice(i * p.out_features, (i + 1) * p.out_features)
            p.weight = nn.Parameter(weight[rows], requires_grad=p.weight.requires_grad)
            if bias is not None:
                p.bias = nn.Parameter(bias[rows], requires_grad=p.bias.requires_grad)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                attend: Callable = F.scaled_dot_product_attention) -> torch.Tensor:
        q, k, v = self._project(x, context)  # (N, L, C), (N, S, C), (N, S, C)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)  # (N, heads, L or S, d)
        out = attend(q, k, v)  # (N, heads, L, d): SDPA's maths, scale d**-0.5 as in the authors' code
        n, _, seq, _ = out.shape
        return self.to_out[0](out.transpose(1, 2).reshape(n, seq, -1))  # (N, L, C)

    def forward_along_frames(self, x: torch.Tensor, attend: Callable) -> torch.Tensor:
        """Self-attention along F for every (clip, pixel, head) of x (B, F, P, C), straight from that layout: the
        heads of all pixels become one head axis (B, P*heads, F, d), a strided view of the projections, so no
        permute copies (with fused projections and several heads the reshape copies: their rows are 3C apart).
        `attend` maps such q, k, v to (B, P*heads, F, d); out (B, F, P, C)."""
        b, f, p, c = x.shape
        d = c // self.heads
        q, k, v = (t.reshape(b, f, p * self.heads, d).transpose(1, 2) for t in self._project(x, None))
        out = attend(q, k, v)  # (B, P*heads, F, d); a view of (B, F, P*heads, d) for SDPA and the kernel
        return self.to_out[0](out.transpose(1, 2).reshape(b, f, p, c))  # (B, F, P, C)

    def _project(self, x: torch.Tensor, context: torch.Tensor | None) -> tuple:
        """q (N, L, C), k and v (N, S, C): fused when fuse_projections() ran and the call is of the fused kind (a
        self-attention module called with a context runs unfused), never while exporting (the engines get the
        reference ops, and the exported weights stay the to_q/to_k/to_v initialisers)."""
        if context is None and self.qkv_weight is not None and not _exporting():
            return F.linear(x, self.qkv_weight, self.qkv_bias).chunk(3, dim=-1)  # views of (N, L, 3C)
        if context is not None and self.kv_weight is not None and not _exporting():
            return (self.to_q(x), *F.linear(context, self.kv_weight, self.kv_bias).chunk(2, dim=-1))  # (N, S, 2C)
        context = x if context is None else context
        return self.to_q(x), self.to_k(context), self.to_v(context)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        n, seq, c = t.shape
        return t.view(n, seq, self.heads, c // self.heads).transpose(1, 2)


# How Temp-Attn runs (TransformerBlock.temporal_attention, set per block by set_temporal_attention): where its
# sequences are read from, and what attends. Every form computes the same maths.
#   layout "tokens": the pixels' frame sequences gathered as (B*P, F, C) (a permute copy there and back), as the
#                    authors do; "native": strided views of the (B, F, P, C) activations, no copies
#                    (Attention.forward_along_frames).
#   attend "sdpa": PyTorch's SDPA (flash/cuDNN: one 64-128-row tile per (sequence, head), mostly padding at F = 16,
#                  ~10^4 tiny programs a call); "kernel": the Triton kernel kernels/short_attention.py, which packs
#                  ~8 sequences into one program (SDPA where it cannot run); "math": matmul, fp32 softmax, matmul,
#                  left to Inductor.
# Export always runs "sdpa" (the engines' graph stays the reference).
TEMPORAL_ATTENTION = {  # form (config.TEMPORAL_ATTENTION_FORMS) -> (layout, what attends: a key of ATTEND)
    "sdpa": ("tokens", "sdpa"), "kernel": ("tokens", "kernel"),
    "native": ("native", "sdpa"), "native-kernel": ("native", "kernel"), "math": ("native", "math"),
}


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA's maths (default scale) as matmul -> fp32 softmax -> matmul on (..., L, d) tensors."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))  # (..., L, S); scaled first: no fp16 overflow
    probs = scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(dim=-1)  # fp32 (fp64 stays fp64)
    return torch.matmul(probs.to(v.dtype), v)


def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The Triton kernel where it can run (CUDA, triton installed, shapes it takes, inference), else SDPA."""
    if (kernels.triton_available() and q.device.type in KERNEL_DEVICES and not torch.is_grad_enabled()
            and not _exporting()):
        from ..kernels.short_attention import short_attention as kernel, supported

        if supported(q, k, v):
            return kernel(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


ATTEND = {"sdpa": F.scaled_dot_product_attention, "kernel": short_attention, "math": attention_math}


def temporal_attention_form(form: str) -> tuple[str, Callable]:
    """(layout, attend) of a Temp-Attn form; always the reference ("tokens", SDPA) while exporting."""
    layout, attend = TEMPORAL_ATTENTION["sdpa" if _exporting() else form]
    return layout, ATTEND[attend]


def set_temporal_attention(module: nn.Module, form: str) -> int:
    """The Temp-Attn form of every transformer block under `module` (those with a `temporal_attention` field);
    how many. Read while a forward is traced, so set it before compiling."""
    if form not in TEMPORAL_ATTENTION_FORMS:
        raise ValueError(f"Temp-Attn form must be one of {', '.join(TEMPORAL_ATTENTION_FORMS)} (got {form!r})")
    blocks = [m for m in module.modules() if hasattr(m, "temporal_attention")]
    for block in blocks:
        block.temporal_attention = form
    return len(blocks)


def fuse_attention_projections(module: nn.Module) -> int:
    """Attention.fuse_projections() on every Attention under `module` (after its final cast); how many."""
    attentions = [m for m in module.modules() if isinstance(m, Attention)]
    for attention in attentions:
        attention.fuse_projections()
    return len(attentions)


class GEGLU(nn.Module):
    """diffusers' GEGLU: one projection to 2 x inner, gated by GELU."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """diffusers' FeedForward with GEGLU, keys net.0.proj and net.2."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


def frame_position_embedding(frames: int, dim: int, device, dtype) -> torch.Tensor:
    """Sinusoidal frame-position embedding (F, dim): sin on even channels, cos on odd (Vaswani et al. 2017)."""
    position = torch.arange(frames, device=device, dtype=torch.float32)[:, None]  # (F, 1)
    div = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = position * div  # (F, dim/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(frames, dim).to(dtype)  # interleaved
