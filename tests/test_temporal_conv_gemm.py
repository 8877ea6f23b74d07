"""Temp-Conv as one matmul over three shifted frames (runtime/layers.py temporal_conv_as_gemm): same maths as the
(3, 1) convolution, used only where it is switched on, never while exporting."""

from __future__ import annotations

import json

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from vidrd_rt.runtime import layers
from vidrd_rt.runtime.compiled import CompileSettings, apply_inductor_flags
from vidrd_rt.runtime.layers import TemporalConv, temporal_conv_as_gemm, temporal_conv_form


def _random_block(c: int, num_layers: int = 2) -> TemporalConv:
    torch.manual_seed(c)
    block = TemporalConv(c, num_layers).double().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(0.3 * torch.randn_like(p))  # the last conv too (it starts at zero, which would hide it)
    return block


@pytest.fixture
def gemm_calls(monkeypatch):
    """Counts calls of the GEMM form (the block looks it up in the module at each call)."""
    calls = []

    def spy(*args):
        calls.append(1)
        return temporal_conv_as_gemm(*args)

    monkeypatch.setattr(layers, "temporal_conv_as_gemm", spy)
    return calls


@pytest.mark.parametrize("c, frames, hw, bias", [(8, 2, 5, True), (16, 5, 1, True), (4, 16, 12, False)])
def test_gemm_equals_the_convolution(c, frames, hw, bias):
    torch.manual_seed(frames)
    y = torch.randn(3, c, frames, hw, dtype=torch.float64)
    weight = torch.randn(c, c, 3, 1, 1, dtype=torch.float64)
    b = torch.randn(c, dtype=torch.float64) if bias else None
    want = F.conv2d(y, weight.squeeze(-1), b, padding=(1, 0))
    torch.testing.assert_close(temporal_conv_as_gemm(y, weight, b), want, rtol=1e-12, atol=1e-12)


def test_gemm_uses_each_tap_on_the_right_neighbour():
    """A weight that only reads the previous frame shifts the clip forward by one frame (zero in frame 0)."""
    y = torch.arange(1.0, 5.0, dtype=torch.float64).reshape(1, 1, 4, 1)
    weight = torch.zeros(1, 1, 3, 1, 1, dtype=torch.float64)
    weight[0, 0, 0] = 1.0  # tap 0: frame f - 1
    assert temporal_conv_as_gemm(y, weight, None).flatten().tolist() == [0.0, 1.0, 2.0, 3.0]


def test_block_in_gemm_form_matches_conv_form(gemm_calls):
    block = _random_block(32)
    x = torch.randn(2 * 6, 32, 3, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = block(x, 6)
        with temporal_conv_form("always"):
            got = block(x, 6)
    assert len(gemm_calls) == 2  # one per layer
    assert (got - x).abs().max() > 0.1  # the block does something, so agreeing means something
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_compiled_form_is_used_only_while_tracing(gemm_calls):
    block = _random_block(32)
    x = torch.randn(8, 32, 2, 2, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), temporal_conv_form("compiled"):
        want = block(x, 4)
        assert gemm_calls == []  # eager keeps the convolution
        torch._dynamo.reset()
        got = torch.compile(block, fullgraph=True, backend="eager")(x, 4)
    assert len(gemm_calls) == 2
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_export_never_uses_the_gemm_form(gemm_calls):
    block = _random_block(32).float().requires_grad_(False)
    x = torch.randn(4, 32, 2, 2).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), temporal_conv_form("always"):
        torch.jit.trace(lambda t: block(t, 2), x, check_trace=False)
    assert gemm_calls == []


def test_form_switch_is_checked_scoped_and_set_by_compile_settings():
    assert layers.TEMPORAL_CONV_GEMM == "never"
    with pytest.raises(ValueError, match="one of never, compiled, always"):
        layers.set_temporal_conv_form("sometimes")
    with temporal_conv_form("always"):
        assert layers.use_temporal_conv_gemm()
    assert layers.TEMPORAL_CONV_GEMM == "never"
    try:
        apply_inductor_flags(CompileSettings(temporal_conv_gemm=True))
        assert layers.TEMPORAL_CONV_GEMM == "compiled" and not layers.use_temporal_conv_gemm()  # eager here
    finally:
        apply_inductor_flags(CompileSettings(temporal_conv_gemm=False))
    assert layers.TEMPORAL_CONV_GEMM == "never"


def test_kernel_bench_compares_the_forms_on_the_cpu(tmp_path, capsys):
    """The GPU benchmark's forms section end to end on the tiny model's shapes (timings mean nothing here)."""
    from vidrd_rt.bench import kernel_bench

    out = tmp_path / "k.json"
    kernel_bench.main(["--model", "tiny", "--device", "cpu", "--latent", "4", "--frames", "2", "--clips", "1",
                       "--sections", "forms-block-compiled", "--warmup", "0", "--iters", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["forms_block_compiled"]
    assert [(r["channels"], r["side"]) for r in rows] == [(32, 4), (64, 2), (64, 1)]
    assert all(r["conv_ms"] > 0 and r["gemm_ms"] > 0 and r["gemm_rel_err"] < 1e-5 for r in rows)
    assert "conv vs GEMM vs Triton" in capsys.readouterr().out
