"""How Temp-Attn and Temp-Conv run (runtime/layers.py TEMPORAL_ATTENTION_FORMS, TemporalConv.conv_shape): every
form computes the same maths, the Triton kernel really runs inside the UNet (interpreted on the CPU), exports and
the CPU keep the reference forms, and the switches reject what they do not know."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import fresh_tiny

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported (see tests/test_kernels.py)

from vidrd_rt.bench.ladder import parse_ladder
from vidrd_rt.runtime import layers
from vidrd_rt.runtime.backends import prepare_for_device
from vidrd_rt.runtime.config import ConfigError, RuntimeConfig
from vidrd_rt.runtime.vae_temporal import VideoDecoder


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _blocks(unet) -> list:
    return [m for m in unet.modules() if hasattr(m, "temporal_attention")]


@pytest.fixture(scope="module")
def kernel_on_cpu():
    """Let the layers route to the short-attention kernel on CPU tensors (triton's interpreter); skipped, with why,
    where that cannot work."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        pytest.skip(f"triton is not installed ({e})")
    module = importlib.import_module("vidrd_rt.kernels.short_attention")
    if not torch.cuda.is_available() and not module.INTERPRET:
        pytest.skip("vidrd_rt.kernels.short_attention was imported before TRITON_INTERPRET=1 was set (no CUDA here)")
    return module


@torch.no_grad()
@pytest.mark.parametrize("form", [f for f in layers.TEMPORAL_ATTENTION_FORMS if f != "sdpa"])
def test_every_temporal_attention_form_is_the_same_maths(form, unet_inputs, kernel_on_cpu, monkeypatch):
    monkeypatch.setattr(layers, "KERNEL_DEVICES", ("cuda", "cpu"))  # the kernel forms run the kernel here
    model = fresh_tiny()
    want = model.unet(*unet_inputs)
    calls = []
    real = kernel_on_cpu.short_attention
    monkeypatch.setattr(kernel_on_cpu, "short_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    assert layers.set_temporal_attention(model.unet, form) == len(_blocks(model.unet)) > 0
    got = model.unet(*unet_inputs)
    assert _rel(got, want) < 1e-4  # fp32: summation order and exp2 for exp (a wrong scale or mask: > 1e-2)
    if layers.TEMPORAL_ATTENTION_FORMS[form][1] == "kernel":
        assert len(calls) == len(_blocks(model.unet))  # every Temp-Attn went through the kernel
        assert all(shape[-2] == unet_inputs[0].shape[2] for shape in calls)  # sequences along the 8 frames
    layers.set_temporal_attention(model.unet, "sdpa")
    assert torch.equal(model.unet(*unet_inputs), want)  # and back


@torch.no_grad()
def test_conv3d_temp_conv_is_the_same_maths_in_unet_and_decoder(unet_inputs):
    model = fresh_tiny()
    model.unet.double()
    model.vae.double()
    sample, t, context = (x.double() if x.is_floating_point() else x for x in unet_inputs)
    decoder = VideoDecoder(model.vae)
    latents = sample[:1]
    want_unet, want_frames = model.unet(sample, t, context), decoder(latents)
    assert layers.set_temporal_conv_shape(model.unet, "conv3d") > 0
    assert layers.set_temporal_conv_shape(model.vae, "conv3d") > 0
    assert _rel(model.unet(sample, t, context), want_unet) < 1e-12
    assert _rel(decoder(latents), want_frames) < 1e-12


@torch.no_grad()
def test_channels_last_conv3d_matches(unet_inputs):
    """On CUDA the activations are channels_last and the Conv3d weights channels_last_3d (prepare_for_device); the
    (B, C, F, H, W) view of the clip is then free. Same maths in that layout too."""
    model = fresh_tiny()
    conv = next(m for m in model.vae.modules() if isinstance(m, layers.TemporalConv))
    c = conv.convs[3].in_channels
    x = torch.randn(2 * 6, c, 8, 8, generator=torch.Generator().manual_seed(3))
    want = conv(x, 6)
    for p in conv.parameters():
        if p.ndim == 5:
            p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
    conv.conv_shape = "conv3d"
    got = conv(x.contiguous(memory_format=torch.channels_last), 6)
    assert layers.to_clip_volume(x.contiguous(memory_format=torch.channels_last), 6).is_contiguous(
        memory_format=torch.channels_last_3d)
    assert _rel(got, want) < 1e-5


@torch.no_grad()
def test_export_runs_the_reference_forms(unet_inputs, monkeypatch):
    """The engines' graph stays the reference: inside layers.exporting() neither Conv3d nor the non-SDPA forms run,
    whatever the modules were set to."""
    model = fresh_tiny()
    layers.set_temporal_attention(model.unet, "math")
    layers.set_temporal_conv_shape(model.unet, "conv3d")
    want = model.unet(*unet_inputs)

    def refuse(*args, **kwargs):
        raise AssertionError("a non-reference form ran while exporting")

    monkeypatch.setattr(F, "conv3d", refuse)
    monkeypatch.setattr(layers, "attention_math", refuse)
    monkeypatch.setitem(importlib.import_module("vidrd_rt.runtime.unet3d").ATTEND, "math", refuse)
    with pytest.raises(AssertionError, match="non-reference"):
        model.unet(*unet_inputs)  # the forms are live outside an export
    with layers.exporting():
        got = model.unet(*unet_inputs)
    assert _rel(got, want) < 1e-5


def test_forms_apply_on_cuda_only_and_bad_names_are_refused():
    model = fresh_tiny()
    prepare_for_device(model, RuntimeConfig(device="cpu", temporal_attention="kernel", temporal_conv="conv3d"))
    assert {b.temporal_attention for b in _blocks(model.unet)} == {"sdpa"}  # the CPU keeps the reference forms
    assert {m.conv_shape for m in model.vae.modules() if isinstance(m, layers.TemporalConv)} == {"conv2d"}
    defaults = RuntimeConfig()
    assert (defaults.temporal_attention, defaults.temporal_conv) == ("kernel", "conv3d")  # measured faster on H200
    with pytest.raises(ConfigError, match="temporal_attention must be one of sdpa, kernel"):
        RuntimeConfig(temporal_attention="flash")
    with pytest.raises(ConfigError, match="temporal_conv must be one of conv2d, conv3d"):
        RuntimeConfig(temporal_conv="conv1d")
    with pytest.raises(ValueError, match="Temp-Attn form"):
        layers.set_temporal_attention(model.unet, "flash")
    with pytest.raises(ValueError, match="Temp-Conv shape"):
        layers.set_temporal_conv_shape(model.vae, "conv1d")


def test_ladder_keys_name_the_rows():
    rows = parse_ladder("compiled,compiled:temporal_attention=sdpa:temporal_conv=conv2d", device="cuda")
    assert [r.name for r in rows] == ["compiled-fp16", "compiled-fp16-tattn-sdpa-tconv-conv2d"]
    assert (rows[1].runtime.temporal_attention, rows[1].runtime.temporal_conv) == ("sdpa", "conv2d")
    with pytest.raises(ConfigError, match="temporal_conv must be one of"):
        parse_ladder("compiled:temporal_conv=conv9", device="cuda")
