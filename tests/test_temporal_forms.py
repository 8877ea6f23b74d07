"""How Temp-Attn and Temp-Conv run (runtime/layers.py TEMPORAL_ATTENTION, TemporalConv.conv_op): every
form computes the same maths, the Triton kernel really runs inside the UNet (interpreted on the CPU), exports and
the CPU keep the reference forms, and the switches reject what they do not know."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import fresh_tiny, kernel_module

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported (see tests/test_kernels.py)

from vidrd_rt.bench.ladder import parse_ladder
from vidrd_rt.runtime import layers
from vidrd_rt.runtime.backends import prepare_for_device
from vidrd_rt.runtime.config import TEMPORAL_ATTENTION_FORMS, TEMPORAL_CONV_OPS, ConfigError, RuntimeConfig
from vidrd_rt.runtime.vae_temporal import VideoDecoder


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _blocks(unet) -> list:
    return [m for m in unet.modules() if hasattr(m, "temporal_attention")]


@pytest.fixture(scope="module")
def kernel_on_cpu():
    """Let the layers route to the short-attention kernel on CPU tensors (triton's interpreter); skipped, with why,
    where that cannot work."""
    return kernel_module("vidrd_rt.kernels.short_attention")


def _count(monkeypatch, owner, name: str) -> list:
    """Wrap owner.name (an attribute, or a dict entry when owner is a dict) so its calls are recorded; the list."""
    calls: list = []
    real = owner[name] if isinstance(owner, dict) else getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    (monkeypatch.setitem if isinstance(owner, dict) else monkeypatch.setattr)(owner, name, counted)
    return calls


def test_the_form_table_covers_the_config_names():
    assert tuple(layers.TEMPORAL_ATTENTION) == TEMPORAL_ATTENTION_FORMS
    assert {attend for _, attend in layers.TEMPORAL_ATTENTION.values()} == set(layers.ATTEND)


@torch.no_grad()
@pytest.mark.parametrize("form", [f for f in TEMPORAL_ATTENTION_FORMS if f != "sdpa"])
def test_every_temporal_attention_form_is_the_same_maths(form, unet_inputs, kernel_on_cpu, monkeypatch):
    monkeypatch.setattr(layers, "KERNEL_DEVICES", ("cuda", "cpu"))  # the kernel forms run the kernel here
    model = fresh_tiny()
    want = model.unet(*unet_inputs)
    layout, attend = layers.TEMPORAL_ATTENTION[form]
    attends = _count(monkeypatch, layers.ATTEND, attend)
    native = _count(monkeypatch, layers.Attention, "forward_along_frames")
    kernel = _count(monkeypatch, kernel_on_cpu, "short_attention")
    blocks = layers.set_temporal_attention(model.unet, form)
    assert blocks == len(_blocks(model.unet)) > 0
    got = model.unet(*unet_inputs)
    assert _rel(got, want) < 1e-4  # fp32: summation order and exp2 for exp (a wrong scale or mask: > 1e-2)
    assert len(attends) == blocks and len(native) == (blocks if layout == "native" else 0)  # the form ran
    if attend == "kernel":
        assert len(kernel) == blocks  # the Triton kernel itself, not the SDPA fallback
        assert all(q.shape[-2] == unet_inputs[0].shape[2] for q, *_ in kernel)  # sequences along the 8 frames
    layers.set_temporal_attention(model.unet, "sdpa")
    assert torch.equal(model.unet(*unet_inputs), want)  # and back


@torch.no_grad()
def test_temporal_attention_forms_with_fused_projections_and_single_frames(unet_inputs, monkeypatch):
    model = fresh_tiny()
    sample, t, context = unet_inputs
    want, want_one = model.unet(sample, t, context), model.unet(sample[:, :, :1], t, context)
    layers.fuse_attention_projections(model.unet)
    for form in ("native", "math"):
        layers.set_temporal_attention(model.unet, form)
        assert _rel(model.unet(sample, t, context), want) < 1e-5
        assert torch.equal(model.unet(sample[:, :, :1], t, context), want_one)  # one frame: no Temp-Attn at all


@torch.no_grad()
def test_conv3d_temp_conv_is_the_same_maths_in_unet_and_decoder(unet_inputs, monkeypatch):
    model = fresh_tiny()
    model.unet.double()
    model.vae.double()
    sample, t, context = (x.double() if x.is_floating_point() else x for x in unet_inputs)
    decoder = VideoDecoder(model.vae)
    latents = sample[:1]
    want_unet, want_frames = model.unet(sample, t, context), decoder(latents)
    conv3d = _count(monkeypatch, F, "conv3d")
    assert layers.set_temporal_conv_op(model.unet, "conv3d") > 0 and layers.set_temporal_conv_op(model.vae, "conv3d") > 0
    unet_convs, vae_convs = (sum(isinstance(m, torch.nn.Conv3d) for m in net.modules()) for net in (model.unet, model.vae))
    assert _rel(model.unet(sample, t, context), want_unet) < 1e-12
    assert len(conv3d) == unet_convs > 0  # every (3, 1, 1) convolution ran as a Conv3d
    assert _rel(decoder(latents), want_frames) < 1e-12
    assert len(conv3d) == unet_convs + vae_convs > unet_convs


@torch.no_grad()
def test_channels_last_conv3d_matches(monkeypatch):
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
    conv.conv_op = "conv3d"
    conv3d = _count(monkeypatch, F, "conv3d")
    got = conv(x.contiguous(memory_format=torch.channels_last), 6)
    assert len(conv3d) == len(conv.convs) // 4
    assert layers.to_clip_volume(x.contiguous(memory_format=torch.channels_last), 6).is_contiguous(
        memory_format=torch.channels_last_3d)
    assert _rel(got, want) < 1e-5


@torch.no_grad()
def test_export_runs_the_reference_forms(unet_inputs, monkeypatch):
    """The engines' graph stays the reference: inside layers.exporting() neither Conv3d nor the non-SDPA forms run,
    whatever the modules were set to."""
    model = fresh_tiny()
    layers.set_temporal_attention(model.unet, "math")
    layers.set_temporal_conv_op(model.unet, "conv3d")
    want = model.unet(*unet_inputs)

    def refuse(*args, **kwargs):
        raise AssertionError("a non-reference form ran while exporting")

    monkeypatch.setattr(F, "conv3d", refuse)
    monkeypatch.setitem(layers.ATTEND, "math", refuse)
    with pytest.raises(AssertionError, match="non-reference"):
        model.unet(*unet_inputs)  # the forms are live outside an export
    with layers.exporting():
        got = model.unet(*unet_inputs)
    assert _rel(got, want) < 1e-5


def test_forms_apply_on_cuda_only_and_bad_names_are_refused():
    model = fresh_tiny()  # on the CPU; preparing it for CUDA only sets fields and weight layouts, no CUDA call

    def forms() -> tuple[set, set]:
        return ({b.temporal_attention for b in _blocks(model.unet)},
                {m.conv_op for net in (model.unet, model.vae) for m in net.modules() if isinstance(m, layers.TemporalConv)})

    prepare_for_device(model, RuntimeConfig(device="cuda"))
    assert forms() == ({"kernel"}, {"conv3d"})  # the defaults, measured faster on H200 (bench/RESULTS.md)
    prepare_for_device(model, RuntimeConfig(device="cpu", temporal_attention="kernel", temporal_conv="conv3d"))
    assert forms() == ({"sdpa"}, {"conv2d"})  # elsewhere the reference forms come back
    with pytest.raises(ConfigError, match="temporal_attention must be one of sdpa, kernel"):
        RuntimeConfig(temporal_attention="flash")
    with pytest.raises(ConfigError, match="temporal_conv must be one of conv2d, conv3d"):
        RuntimeConfig(temporal_conv="conv1d")
    with pytest.raises(ValueError, match="Temp-Attn form"):
        layers.set_temporal_attention(model.unet, "flash")
    with pytest.raises(ValueError, match="Temp-Conv op"):
        layers.set_temporal_conv_op(model.vae, "conv1d")
    assert TEMPORAL_CONV_OPS == ("conv2d", "conv3d")


def test_ladder_keys_name_the_rows():
    rows = parse_ladder("compiled,compiled:temporal_attention=sdpa:temporal_conv=conv2d,authors", device="cuda")
    assert [r.name for r in rows] == ["compiled-fp16", "compiled-fp16-tattn-sdpa-tconv-conv2d", "authors"]
    assert (rows[2].runtime.temporal_attention, rows[2].runtime.temporal_conv) == ("sdpa", "conv2d")  # their ops
    assert (rows[1].runtime.temporal_attention, rows[1].runtime.temporal_conv) == ("sdpa", "conv2d")
    with pytest.raises(ConfigError, match="temporal_conv must be one of"):
        parse_ladder("compiled:temporal_conv=conv9", device="cuda")
