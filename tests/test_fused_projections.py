"""Fused attention projections (Attention.fuse_projections): the same maths as the three projections, invisible to
state_dict() and checkpoint loading, only for calls of the fused kind, and never while exporting."""

from __future__ import annotations

import pytest
import torch
from conftest import fresh_tiny

from vidrd_rt.runtime import layers
from vidrd_rt.runtime.layers import Attention, fuse_attention_projections


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _attention(context_dim: int | None = None, bias: bool = False, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    attention = Attention(32, heads=4, context_dim=context_dim, bias=bias).eval()
    if bias:  # nn.Linear draws its biases small; make them matter
        for p in (attention.to_q, attention.to_k, attention.to_v):
            p.bias.data.normal_()
    return attention


def _inputs(context_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 10, 32, generator=g)  # (N, L, C)
    return x, None if context_dim is None else torch.randn(3, 7, context_dim, generator=g)  # (N, S, Cctx)


@torch.no_grad()
def test_fused_unet_matches_unfused_and_keeps_its_keys(unet_inputs):
    model = fresh_tiny()
    want = model.unet(*unet_inputs)
    keys = list(model.unet.state_dict())
    state = {k: v.clone() for k, v in model.unet.state_dict().items()}
    attentions = [m for m in model.unet.modules() if isinstance(m, Attention)]
    assert fuse_attention_projections(model.unet) == len(attentions) > 0
    assert all(a.qkv_weight is not None or a.kv_weight is not None for a in attentions)
    got = model.unet(*unet_inputs)
    assert _rel(got, want) < 1e-5
    assert list(model.unet.state_dict()) == keys  # the fused buffers are not persistent
    model.unet.load_state_dict(state, strict=True)  # a checkpoint of the unfused keys still loads


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("context_dim", [None, 24])
@torch.no_grad()
def test_fused_attention_matches_unfused(context_dim, bias):
    attention = _attention(context_dim, bias)
    x, context = _inputs(context_dim)
    want = attention(x, context)
    attention.fuse_projections()
    if context_dim is None:  # self-attention: q, k, v in one GEMM
        assert attention.qkv_weight.shape == (96, 32) and attention.kv_weight is None
        assert (attention.qkv_bias is None) == (not bias)
    else:  # cross-attention: k and v from the context in one GEMM, q alone
        assert attention.kv_weight.shape == (64, 24) and attention.qkv_weight is None
        assert (attention.kv_bias is None) == (not bias)
    assert _rel(attention(x, context), want) < 1e-5


@torch.no_grad()
def test_self_attention_called_with_a_context_runs_unfused():
    attention = _attention(bias=True)
    x, context = _inputs(context_dim=32)
    want = attention(x, context)
    attention.fuse_projections()
    assert _rel(attention(x, context), want) < 1e-5  # k and v from the context, not from x
    assert _rel(attention(x), want) > 1e-2  # precondition: the context matters


@pytest.mark.parametrize("context_dim", [None, 24])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's notice about the TorchScript tracer
@torch.no_grad()
def test_exports_see_the_unfused_projections(context_dim):
    """With the fused weights zeroed, only the fused path changes the output: exporting() and the TorchScript tracer
    (torch.onnx's exporter) still give the reference, so they run to_q/to_k/to_v."""
    attention = _attention(context_dim)
    x, context = _inputs(context_dim)
    want = attention(x, context)
    attention.fuse_projections()
    for name in ("qkv_weight", "kv_weight"):  # new zero tensors: zero_() would zero the views in to_q/k/v too
        if getattr(attention, name) is not None:
            setattr(attention, name, torch.zeros_like(getattr(attention, name)))
    assert _rel(attention(x, context), want) > 0.5  # the fused path runs outside an export
    with layers.exporting():
        assert _rel(attention(x, context), want) < 1e-6
    args = (x,) if context is None else (x, context)
    traced = torch.jit.trace(attention, args, check_trace=False)
    assert _rel(traced(*args), want) < 1e-6


@torch.no_grad()
def test_fused_weights_share_memory_with_the_projections_and_follow_loading():
    """No second copy: to_q/to_k/to_v become views of the fused weight, so a checkpoint loaded after fusing (in
    place, as load_state_dict copies) reaches the fused GEMM."""
    attention = _attention(bias=True)
    x, _ = _inputs()
    attention.fuse_projections()
    fused = attention.qkv_weight
    assert attention.to_q.weight.data_ptr() == fused.data_ptr()
    assert attention.to_v.weight.data_ptr() == fused[64:].data_ptr()
    assert attention.to_k.bias.data_ptr() == attention.qkv_bias[32:].data_ptr()
    other = _attention(bias=True, seed=1)
    attention.load_state_dict(other.state_dict())
    assert _rel(attention(x), other(x)) < 1e-5


@torch.no_grad()
def test_fusing_again_keeps_the_weights_where_they_are_until_a_cast():
    """A second fuse (a second backend over the same model) must not move the weights a captured CUDA graph reads;
    after a cast the views are gone, and fusing again makes later loading reach the fused GEMM once more."""
    attention = _attention()
    x, _ = _inputs()
    attention.fuse_projections()
    address = attention.qkv_weight.data_ptr()
    attention.fuse_projections()
    assert attention.qkv_weight.data_ptr() == address == attention.to_q.weight.data_ptr()
    attention.double()
    attention.fuse_projections()
    assert attention.to_q.weight.data_ptr() == attention.qkv_weight.data_ptr()
    other = _attention(seed=1).double()
    attention.load_state_dict(other.state_dict())
    assert _rel(attention(x.double()), other(x.double())) < 1e-12
