"""Triton kernels (kernels/) against their torch references, on the CPU through triton's interpreter.

Without CUDA, TRITON_INTERPRET=1 is set here, before the kernel module is imported: `@triton.jit` reads it when
it decorates (i.e. at that import) and otherwise builds GPU functions that cannot run on CPU tensors. The parity
tests skip, with the reason, where triton is not installed; the tests of the layer's switch need no triton.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import kernel_module
import torch.nn.functional as F

from vidrd_rt import kernels
from vidrd_rt.runtime import layers
from vidrd_rt.runtime.layers import TemporalConv

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}  # of max |output|: ~2-3 ulp at the top


@pytest.fixture(scope="module")
def tc():
    """The kernel module, interpreted on the CPU; skipped (with why) where that cannot work."""
    return kernel_module("vidrd_rt.kernels.temporal_conv")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _clip(c: int, frames: int, h: int, w: int, clips: int, dtype, seed: int = 0, offset: float = 0.5):
    """Activations (clips*frames, C, H, W) channels_last, as the UNet holds them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(clips * frames, c, h, w, generator=g) * 1.5 + offset
    return x.to(_device(), dtype).contiguous(memory_format=torch.channels_last)


def _layer(c: int, dtype, seed: int = 1) -> tuple:
    """(gamma, beta, weight, bias, groups, eps) with the weight channels_last_3d, as prepare_for_device leaves it."""
    g = torch.Generator().manual_seed(seed)
    gamma, beta = 1 + 0.2 * torch.randn(c, generator=g), 0.2 * torch.randn(c, generator=g)
    weight = torch.randn(c, c, 3, 1, 1, generator=g) / (3 * c) ** 0.5
    bias = 0.1 * torch.randn(c, generator=g)
    dev = _device()
    weight = weight.to(dev, dtype).contiguous(memory_format=torch.channels_last_3d)
    return gamma.to(dev, dtype), beta.to(dev, dtype), weight, bias.to(dev, dtype), 32, 1e-5


def _f64(layer: tuple) -> tuple:
    return tuple(p.double() if torch.is_tensor(p) else p for p in layer)


def _assert_near(out: torch.Tensor, want: torch.Tensor, dtype) -> None:
    """`want` in float64 from the same (rounded) inputs: the kernel may differ by its own output rounding only."""
    assert out.dtype == dtype and out.shape == want.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    scale = want.abs().max().item()
    torch.testing.assert_close(out.double(), want, rtol=0, atol=TOL[dtype] * scale)


# (C, frames, H, W, clips, dtype, residual): every C, F, B and dtype, with H*W = 15, 35, 6, 21 (no block multiple).
CASES = [
    (32, 2, 3, 5, 1, torch.float32, False),
    (64, 4, 5, 7, 2, torch.float32, True),
    (96, 16, 3, 5, 1, torch.float32, False),
    (32, 16, 2, 3, 2, torch.float16, True),
    (64, 2, 3, 5, 2, torch.float16, False),
    (96, 4, 3, 7, 1, torch.float16, True),
    (32, 4, 3, 5, 2, torch.bfloat16, False),
    (64, 16, 2, 3, 1, torch.bfloat16, True),
    (96, 2, 5, 7, 2, torch.bfloat16, False),
]


@pytest.mark.parametrize("c,frames,h,w,clips,dtype,residual", CASES)
def test_layer_matches_reference(tc, c, frames, h, w, clips, dtype, residual):
    x, layer = _clip(c, frames, h, w, clips, dtype), _layer(c, dtype)
    res = _clip(c, frames, h, w, clips, dtype, seed=5) if residual else None
    out = tc.temporal_conv(x, frames, *layer, residual=res)
    want = tc.temporal_conv_reference(x.double(), frames, *_f64(layer), residual=None if res is None else res.double())
    _assert_near(out, want, dtype)


def test_explicit_block_configs_agree_with_autotuned(tc):
    """Other tile shapes than the interpreter's default: 16-row tiles cross frame boundaries inside a clip, 32-wide
    N/K tiles leave a partial tile at C = 96."""
    x, layer = _clip(96, 4, 3, 5, 2, torch.float32), _layer(96, torch.float32)
    x2d, rows = tc._rows(x), 4 * 15
    scale, shift = tc.group_scale_shift(x2d, rows, layer[0], layer[1], 32, 1e-5)
    auto = tc.conv_gemm(x2d, rows, 15, scale, shift, layer[2], layer[3], None)
    for config in ({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 16}):
        torch.testing.assert_close(tc.conv_gemm(x2d, rows, 15, scale, shift, layer[2], layer[3], None, config), auto,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_group_statistics_survive_a_large_mean(tc, dtype):
    """|mean| >> std, the case where sum(x^2) - n mean^2 cancels: the pivot keeps rstd accurate."""
    c, frames, hw = 64, 4, 15
    x = _clip(c, frames, 3, 5, 2, torch.float32, offset=0.0) * 0.02 + 40.0
    x = x.to(dtype)
    gamma, beta = torch.ones(c, device=x.device, dtype=dtype), torch.zeros(c, device=x.device, dtype=dtype)
    scale, shift = tc.group_scale_shift(tc._rows(x), frames * hw, gamma, beta, 32, 1e-5)
    groups = tc._rows(x).double().reshape(2, frames * hw, 32, c // 32)
    var, mean = torch.var_mean(groups, dim=(1, 3), unbiased=False)  # (clips, groups)
    rstd = (var + 1e-5).rsqrt().repeat_interleave(c // 32, dim=1)
    torch.testing.assert_close(scale.double(), rstd, rtol=1e-4, atol=0)
    torch.testing.assert_close(shift.double(), -mean.repeat_interleave(c // 32, dim=1) * rstd, rtol=2e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_block_with_fused_residual_matches_reference(tc, dtype):
    layers_ = [_layer(64, dtype, seed=s) for s in range(4)]
    x = _clip(64, 4, 3, 5, 2, dtype)
    want = tc.temporal_conv_block_reference(x.double(), 4, [_f64(p) for p in layers_])
    _assert_near(tc.temporal_conv_block(x, 4, layers_), want, dtype)


#################################################################################
#                      The layer: switch, predicate, reference path              #
#################################################################################


def _todays_forward(module: TemporalConv, x: torch.Tensor, frames: int) -> torch.Tensor:
    """TemporalConv.forward as it was before the kernels (verbatim maths), the bit-exact reference path."""
    bf, c, h, w = x.shape
    clip = x.permute(0, 2, 3, 1).reshape(bf // frames, frames, h * w, c).permute(0, 3, 1, 2)
    y = clip
    for i in range(0, len(module.convs), 4):
        norm, act, drop, conv = module.convs[i : i + 4]
        y = drop(act(norm(y)))
        y = F.conv2d(y, conv.weight.squeeze(-1), conv.bias, padding=(1, 0))
    y = clip + y
    return y.permute(0, 2, 3, 1).reshape(bf, h, w, c).permute(0, 3, 1, 2)


def _module(c: int = 64, num_layers: int = 2, seed: int = 2) -> TemporalConv:
    torch.manual_seed(seed)
    module = TemporalConv(c, num_layers, dropout=0.1).eval()
    for p in module.parameters():  # nothing left at its init (zero conv biases, unit gammas)
        p.data.add_(0.1 * torch.randn_like(p))
    return module


@pytest.fixture
def cpu_kernels(monkeypatch, tc):
    """The layer's predicate admits CPU tensors, so its kernel path runs under the interpreter."""
    monkeypatch.setattr(layers, "KERNEL_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(layers, "KERNEL_MIN_POSITIONS", 0)  # small frames, so the interpreter stays quick
    calls = []
    block = tc.temporal_conv_block
    monkeypatch.setattr(tc, "temporal_conv_block", lambda *a: calls.append(1) or block(*a))
    return calls


@torch.no_grad()
def test_layer_is_bit_identical_to_todays_maths_when_kernels_are_off():
    module, x = _module(), _clip(64, 4, 3, 5, 2, torch.float32).cpu()
    assert not kernels.enabled()  # default off until the GPU benchmark shows a gain
    assert torch.equal(module(x, 4), _todays_forward(module, x, 4))
    with kernels.use_kernels(True):  # on, but a CPU tensor: the reference ops all the same
        assert not layers.use_triton_temporal_conv(x)
        assert torch.equal(module(x, 4), _todays_forward(module, x, 4))


def test_switch_scopes_and_restores():
    assert not kernels.enabled()
    with kernels.use_kernels(True):
        assert kernels.enabled()
        with kernels.disabled():
            assert not kernels.enabled()
        assert kernels.enabled()
        with pytest.raises(RuntimeError), kernels.disabled():
            raise RuntimeError
        assert kernels.enabled()
    assert not kernels.enabled()


def test_layer_routes_to_the_kernels_only_when_switched_on(cpu_kernels):
    module, x = _module().to(_device()), _clip(64, 4, 3, 5, 2, torch.float32)
    with torch.no_grad():
        today = _todays_forward(module, x, 4)
        assert torch.equal(module(x, 4), today) and not cpu_kernels  # default: off
        with kernels.use_kernels(True):
            fast = module(x, 4)
            assert len(cpu_kernels) == 1
            with kernels.disabled():
                assert torch.equal(module(x, 4), today) and len(cpu_kernels) == 1
            assert torch.equal(module(x[:, :, :, :1], 4), module(x[:, :, :, :1], 4))  # a strided view: reference
            assert len(cpu_kernels) == 1
    torch.testing.assert_close(fast, today, rtol=1e-5, atol=1e-5)
    with kernels.use_kernels(True):
        module(x, 4)  # grad mode on: no autograd through the kernels, the reference runs
        module.train()
        with torch.no_grad():
            module(x, 4)  # training (dropout active): the reference runs
    assert len(cpu_kernels) == 1


def test_small_frames_keep_the_reference_ops(cpu_kernels, monkeypatch):
    """Below KERNEL_MIN_POSITIONS pixels per frame the kernel measured slower: the layer keeps cuDNN there."""
    monkeypatch.setattr(layers, "KERNEL_MIN_POSITIONS", 16)
    module, x = _module().to(_device()), _clip(64, 4, 3, 5, 2, torch.float32)  # 15 pixels per frame
    with torch.no_grad(), kernels.use_kernels(True):
        assert not layers.use_triton_temporal_conv(x)
        assert torch.equal(module(x, 4), _todays_forward(module, x, 4)) and not cpu_kernels
        monkeypatch.setattr(layers, "KERNEL_MIN_POSITIONS", 15)
        assert layers.use_triton_temporal_conv(x)


def test_layer_traces_in_one_graph_with_the_kernel_op(cpu_kernels):
    """torch.compile(fullgraph=True) traces predicate, import and op without a break; the op is in the graph.
    (Inductor's own lowering of the Triton kernels needs a GPU: bench/kernel_bench.py compiles the UNet.)"""
    module, x = _module().to(_device()), _clip(64, 4, 3, 5, 2, torch.float32)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad(), kernels.use_kernels(True):
        out = torch.compile(module, fullgraph=True, backend=backend)(x, 4)
    assert len(graphs) == 1 and graphs[0].count("vidrd.temporal_conv_layer") == 2
    torch.testing.assert_close(out, _todays_forward(module, x, 4), rtol=1e-5, atol=1e-5)


def test_exporting_sees_the_reference_ops():
    """The TorchScript tracer (torch.onnx's exporter) and our exporting() mark an export; a plain torch.compile does
    not, also on torch versions whose is_exporting() says True under torch.compile (pytorch/pytorch#176347)."""
    x = torch.zeros(2, 32, 1, 1).contiguous(memory_format=torch.channels_last)
    assert not layers._exporting()
    traced = torch.jit.trace(lambda t: t + float(layers._exporting()), x, check_trace=False)
    assert traced(x).max().item() == 1.0
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: t + float(layers._exporting()), fullgraph=True, backend="eager")
    assert compiled(x).max().item() == 0.0
    with layers.exporting():
        assert layers._exporting()
        torch._dynamo.reset()
        assert compiled(x).max().item() == 1.0
    assert not layers._exporting()


#################################################################################
#                           bench/kernel_bench.py on the CPU                     #
#################################################################################


def test_kernel_bench_arguments():
    from vidrd_rt.bench import kernel_bench

    args = kernel_bench.parse_args(["--quick", "--out", "k.json"])
    assert args.quick and "e2e-compiled" not in kernel_bench.sections(args)
    full = kernel_bench.parse_args(["--out", "k.json"])
    assert kernel_bench.sections(full) == ["layer", "block", "e2e-eager", "e2e-compiled"]
    assert full.model == "vidrd-base" and (full.clips, full.frames, full.latent) == (2, 16, 32)
    with pytest.raises(SystemExit):
        kernel_bench.parse_args(["--sections", "layer,nonsense", "--out", "k.json"])


def test_kernel_bench_runs_on_the_cpu_with_the_tiny_model(tmp_path, capsys, tc):
    """Reference timings, kernel timings (interpreted), tables and JSON; the numbers themselves mean nothing here."""
    from vidrd_rt.bench import kernel_bench

    out, device = tmp_path / "k.json", _device()
    kernel_bench.main(["--model", "tiny", "--device", device, "--latent", "8", "--frames", "2", "--clips", "1",
                       "--sections", "layer,block,e2e-eager", "--warmup", "0", "--iters", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [(r["channels"], r["side"]) for r in result["layer"]] == [(32, 8), (64, 4), (64, 2), (64, 1)]
    assert all(r["kernel_ms"] > 0 and r["rel_err"] < 1e-2 for r in result["layer"] + result["block"])
    if device == "cpu":
        assert result["e2e_eager"]["max_abs_diff"] == 0.0  # on the CPU the kernels never run inside the model
    assert "| channels |" in capsys.readouterr().out
