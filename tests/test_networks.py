"""Properties of the temporal networks: temporal layers matter, vanish when their last layers are zero,
the decoder reduces to per-frame decoding, and torch.compile(fullgraph=True) agrees with eager."""

from __future__ import annotations

import copy

import torch
from conftest import fresh_tiny

from vidrd_rt.runtime.vae_temporal import VideoDecoder


def _zero_last_temporal_layers(model):
    for name, p in model.unet.named_parameters():
        if "temp_attn.to_out" in name:
            p.data.zero_()
    for module in list(model.unet.modules()) + list(model.vae.modules()):
        if hasattr(module, "convs") and "TemporalConv" in type(module).__name__:
            module.convs[-1].weight.data.zero_()
            module.convs[-1].bias.data.zero_()


def _rerandomise_other_temporal_params(model, seed):
    g = torch.Generator().manual_seed(seed)
    for net in (model.unet, model.vae):
        for name, p in net.named_parameters():
            last = name.endswith(("convs.15.weight", "convs.15.bias", "convs.11.weight", "convs.11.bias"))
            if ("temp_convs" in name or "temp_attn.to_q" in name or "temp_norm" in name) and not last:
                p.data.copy_(torch.randn(p.shape, generator=g))


@torch.no_grad()
def test_temporal_layers_change_the_output(unet_inputs):
    model = fresh_tiny()
    without = copy.deepcopy(model)
    _zero_last_temporal_layers(without)
    assert not torch.allclose(model.unet(*unet_inputs), without.unet(*unet_inputs), atol=1e-4)
    latents = torch.randn(1, 4, 6, 8, 8)
    assert not torch.allclose(model.vae.decode(latents), without.vae.decode(latents), atol=1e-4)


@torch.no_grad()
def test_zeroed_last_layers_make_temporal_layers_vanish(unet_inputs):
    """With the last Temp-Conv conv and Temp-Attn output zeroed, no other temporal weight has any effect."""
    a, b = fresh_tiny(), fresh_tiny()
    for m in (a, b):
        _zero_last_temporal_layers(m)
    _rerandomise_other_temporal_params(b, seed=7)
    assert not torch.equal(a.unet.down_blocks[0].temp_convs[0].convs[0].weight,
                           b.unet.down_blocks[0].temp_convs[0].convs[0].weight)
    torch.testing.assert_close(a.unet(*unet_inputs), b.unet(*unet_inputs), rtol=0, atol=0)
    latents = torch.randn(1, 4, 6, 8, 8)
    torch.testing.assert_close(a.vae.decode(latents), b.vae.decode(latents), rtol=0, atol=0)


@torch.no_grad()
def test_temporal_decoder_on_one_frame_equals_per_frame_decoding():
    model = fresh_tiny()
    latents = torch.randn(1, 4, 5, 8, 8)
    per_frame = VideoDecoder(model.vae, per_frame=True)(latents)  # (1, 3, 5, 64, 64)
    for f in range(5):
        one = VideoDecoder(model.vae)(latents[:, :, f : f + 1])  # a clip of one frame: Temp-Conv inactive
        torch.testing.assert_close(one[:, :, 0], per_frame[:, :, f], rtol=1e-5, atol=1e-5)
    whole = VideoDecoder(model.vae)(latents)
    assert (whole - per_frame).abs().max() > 1e-3  # with 5 frames the temporal layers act


@torch.no_grad()
def test_each_clip_in_a_batch_is_independent(unet_inputs):
    """Batch elements (CFG halves, clips) never mix: GroupNorm statistics span frames of one clip only."""
    model = fresh_tiny()
    sample, t, context = unet_inputs
    both = model.unet(sample, t, context)
    first = model.unet(sample[:1], t[:1], context[:1])
    torch.testing.assert_close(both[:1], first, rtol=1e-4, atol=1e-4)  # batch-size-dependent conv kernels


def test_compiled_unet_matches_eager(compiled_tiny):
    """torch.compile(fullgraph=True) of the whole denoising step around the UNet (compiled once per session by the
    compiled_tiny fixture; a graph break fails there) agrees with eager."""
    with torch.inference_mode():
        for seed in (1, 2):
            inputs = compiled_tiny.inputs(seed)
            eager, fast = compiled_tiny.eager_step(*inputs)[0], compiled_tiny.step(*inputs)[0]
            torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-4)
            assert (fast - eager).abs().max() < 1e-4 * eager.abs().max()
