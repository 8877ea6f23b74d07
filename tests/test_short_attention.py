"""kernels/short_attention.py against its torch reference and SDPA, on the CPU through triton's interpreter.

Without CUDA, TRITON_INTERPRET=1 is set here, before the kernel module is imported (see tests/test_kernels.py);
the kernel tests skip, with the reason, where triton is not installed.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import kernel_module
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}  # of max |output|

SHAPES = [(6, 2, 16, 64), (5, 3, 12, 40), (4, 1, 8, 8), (3, 2, 24, 16), (2, 2, 1, 64), (3, 1, 64, 32)]


@pytest.fixture(scope="module")
def sa():
    """The kernel module, interpreted on the CPU; skipped (with why) where that cannot work."""
    return kernel_module("vidrd_rt.kernels.short_attention")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(shape, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(*shape, generator=g) * 1.5).to(_device(), dtype) for _ in range(3))


def _fused(b: int, frames: int, pixels: int, heads: int, d: int, dtype, seed: int = 0):
    """q, k, v as (B*P, heads, F, d) views of one fused qkv projection output (B*P, F, 3C), heads split off as
    Attention._split_heads does: rows 3C apart, heads d apart, no copy."""
    g = torch.Generator().manual_seed(seed)
    c = heads * d
    x = (torch.randn(b * pixels, frames, 3 * c, generator=g) * 1.5).to(_device(), dtype)
    views = tuple(x[..., i * c:(i + 1) * c].view(b * pixels, frames, heads, d).transpose(1, 2) for i in range(3))
    assert all(t.data_ptr() == x.data_ptr() + i * c * x.element_size() for i, t in enumerate(views))  # views
    return views


def _err(out: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs difference, relative to max |want|."""
    return ((out.double() - want.double()).abs().max() / want.double().abs().max()).item()


def _check(sa, out: torch.Tensor, q, k, v) -> None:
    n, h, length, d = q.shape
    assert out.dtype == q.dtype and out.shape == (n, h, length, d)
    assert out.transpose(1, 2).is_contiguous()  # (N, L, H, D) underneath: the flash attention layout
    tol = TOL[q.dtype]
    assert _err(out, F.scaled_dot_product_attention(q.double(), k.double(), v.double())) < tol
    assert _err(out, F.scaled_dot_product_attention(q, k, v)) < tol
    if length > 1:  # a wrong scale fails by far: the tolerance means something (one key: softmax is 1 at any scale)
        assert _err(out, F.scaled_dot_product_attention(q, k, v, scale=1.0)) > 10 * tol
    assert _err(out, sa.short_attention_reference(q, k, v)) < tol


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_sdpa_and_reference(sa, shape, dtype):
    q, k, v = _qkv(shape, dtype)
    assert sa.supported(q, k, v)
    _check(sa, sa.short_attention(q, k, v), q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_strided_views_of_a_fused_projection(sa, dtype):
    q, k, v = _fused(2, 16, 3, 2, 40, dtype)
    assert not q.is_contiguous() and q.stride(-1) == 1 and sa.supported(q, k, v)
    _check(sa, sa.short_attention(q, k, v), q, k, v)


def test_different_strides_per_input_and_explicit_blocks(sa):
    """q, k, v with three different layouts; pair blocks that leave a partial last block (N*H = 15)."""
    q, k, v = _qkv((5, 3, 12, 40), torch.float32)
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # (N, L, H, D) underneath
    v = torch.cat([v, v], dim=-1)[..., :40]  # row stride 80
    want = sa.short_attention_reference(q, k, v)
    for block_g, warps in ((1, 4), (4, 2), (16, 8)):
        assert _err(sa.launch(q, k, v, block_g=block_g, num_warps=warps), want) < TOL[torch.float32]
    with pytest.raises(ValueError, match="power of two"):
        sa.launch(q, k, v, block_g=3)


def test_supported(sa):
    q, k, v = _qkv((2, 2, 16, 64), torch.float16)
    assert sa.supported(q, k, v)
    assert not sa.supported(*_qkv((1, 1, 65, 64), torch.float16))
    assert not sa.supported(*_qkv((1, 1, 16, 4), torch.float16))
    assert not sa.supported(*_qkv((1, 1, 16, 256), torch.float16))
    assert not sa.supported(*_qkv((1, 1, 16, 64), torch.float64))
    assert not sa.supported(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))  # last stride 16
    assert not sa.supported(q, k[:, :, :8], v)
    assert not sa.supported(q, k.float(), v)


def test_traces_in_one_graph(sa):
    """torch.compile(fullgraph=True) traces the op without a break and gives the same result."""
    q, k, v = _fused(2, 16, 2, 2, 32, torch.float32)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    def fn(q, k, v):
        n, h, length, d = q.shape
        return sa.short_attention(q, k, v).transpose(1, 2).reshape(n, length, h * d) * 2.0

    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend=backend)(q, k, v)
    assert len(graphs) == 1 and graphs[0].count("vidrd.short_attention") == 1
    torch.testing.assert_close(out, fn(q, k, v), rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()
    eager = torch.compile(fn, fullgraph=True, backend="eager")(q, k, v)
    torch.testing.assert_close(eager, fn(q, k, v), rtol=1e-6, atol=1e-6)
