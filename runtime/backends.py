"""Backends: callables that run the networks. They take tensors and know nothing about FNR, PNS or DSG.

A denoiser is `(sample [2B, 4, F, h, w], timestep [2B], context [2B, 77, D]) -> noise prediction like sample`
(the eager torch one also takes timestep [2B, F], a noise level per frame, for SamplerConfig.held_frames "clean");
a decoder is `latents [B, 4, F, h, w] -> frames [B, 3, F, H, W] in [0, 1]`. Latents stay float32 in the sampler;
a backend casts to its own precision at the boundary. A denoiser may also offer `compile_step(build)`: the pipeline
then hands it `build` (denoiser -> the sampler's whole step function) and runs the step it returns
(runtime/compiled.py); decoders enqueue their work on torch's current CUDA stream (decode runs on a side stream).
"""

from __future__ import annotations

from typing import Callable

import torch

from . import layers
from .config import RuntimeConfig
from .errors import UserError
from .model import VidRDModel
from .vae_temporal import VideoDecoder

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Decoder = Callable[[torch.Tensor], torch.Tensor]


def prepare_for_device(model: VidRDModel, runtime: RuntimeConfig) -> VidRDModel:
    """On CUDA, keep conv weights channels_last so cuDNN runs NHWC kernels without per-call layout copies, let
    cuDNN time its convolution algorithms or not (runtime.cudnn_benchmark), and choose how Temp-Attn and Temp-Conv
    run (runtime.temporal_attention, runtime.temporal_conv: the same maths). On other devices the layers get their
    reference forms back. The forms live on the model: the last prepare wins for every backend over it."""
    on_cuda = torch.device(runtime.device).type == "cuda"
    layers.set_temporal_attention(model.unet, runtime.temporal_attention if on_cuda else "sdpa")
    for module in (model.unet, model.vae):
        layers.set_temporal_conv_op(module, runtime.temporal_conv if on_cuda else "conv2d")
    if on_cuda:
        torch.backends.cudnn.benchmark = runtime.cudnn_benchmark
        formats = {4: torch.channels_last, 5: torch.channels_last_3d}  # 5-D: Temp-Conv (Conv3d, or as (C, C, 3, 1))
        for module in (model.unet, model.vae):
            for p in module.parameters():
                if p.ndim in formats:
                    p.data = p.data.contiguous(memory_format=formats[p.ndim])
    return model


class TorchDenoiser:
    """Eager PyTorch UNet."""

    def __init__(self, model: VidRDModel, runtime: RuntimeConfig):
        self.unet = model.unet
        self.dtype = runtime.torch_dtype

    @torch.inference_mode()
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(sample.to(self.dtype), timestep, context.to(self.dtype)).to(sample.dtype)


class TorchDecoder:
    """Eager PyTorch decoder, temporal (whole clip) or per frame (the authors' sampling code)."""

    def __init__(self, model: VidRDModel, runtime: RuntimeConfig):
        self.decoder = VideoDecoder(model.vae, per_frame=runtime.decoder == "per-frame")
        self.dtype = runtime.torch_dtype

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents.to(self.dtype))


class EngineDenoiser:
    """An exported UNet (ONNX Runtime, TensorRT) behind the denoiser contract; its output buffer is reused, so
    each call hands back a copy in the sample's dtype."""

    def __init__(self, unet: Callable[..., torch.Tensor]):
        self.unet = unet

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, context).to(sample.dtype, copy=True)


class EngineDecoder:
    """An exported decoder behind the decoder contract (a copy of its reused output buffer)."""

    def __init__(self, decoder: Callable[[torch.Tensor], torch.Tensor]):
        self.decoder = decoder

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents).clone()


def make_backends(model: VidRDModel, runtime: RuntimeConfig) -> tuple[Denoiser, Decoder]:
    """The denoiser and decoder for `runtime.backend` (each backend module is imported only when chosen)."""
    if runtime.backend == "torch":
        return TorchDenoiser(model, runtime), TorchDecoder(model, runtime)
    if runtime.backend == "compiled":
        from .compiled import make_compiled_backends

        return make_compiled_backends(model, runtime)
    if runtime.backend == "onnxruntime":
        from .backend_ort import make_ort_backends

        return make_ort_backends(model, runtime)
    if runtime.backend == "tensorrt":
        from .backend_trt import make_trt_backends

        return make_trt_backends(model, runtime)
    raise UserError(f"--backend {runtime.backend} is not available; use torch, compiled, onnxruntime or tensorrt")
