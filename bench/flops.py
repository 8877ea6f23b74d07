"""Model FLOPs of one UNet evaluation (counted on the meta device) and a matmul peak measured on the device itself."""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..runtime.config import DTYPES, ModelConfig
from ..runtime.model import VidRDModel
from .metrics import is_cuda, sync


@torch.inference_mode()
def unet_flops(config: ModelConfig, frames: int, height: int, width: int, batch: int = 2) -> int:
    """FLOPs of one UNet call on [batch, 4, frames, h, w] latents (batch 2 = one clip with CFG).

    Counted by torch's FlopCounterMode over aten ops on the meta device: no memory, no weights, a second or two
    for vidrd-base. Counted: convolutions, linear layers and attention matmuls (2 FLOPs per multiply-add). Not
    counted: norms, activations, softmax, adds (a few percent). The count does not depend on backend or dtype.
    """
    f = config.vae.downsample_factor
    unet = VidRDModel.build(config, "meta").unet.eval()
    with torch.device("meta"):
        sample = torch.empty(batch, config.unet.in_channels, frames, height // f, width // f)
        timestep = torch.zeros(batch, dtype=torch.long)
        context = torch.empty(batch, 77, config.unet.cross_attention_dim)
    with FlopCounterMode(display=False) as counter:
        unet(sample, timestep, context)
    return int(counter.get_total_flops())


def matmul_peak_tflops(device: str, dtype: str, size: int, reps: int = 20) -> float:
    """Median TFLOP/s of a [size, size] @ [size, size] product in `dtype` (torch's default TF32 setting for fp32).

    Random inputs (zeros run faster than real data) rotated over three pairs so no run hits a warm cache; CUDA
    events on the GPU, perf_counter on the CPU; three untimed calls first (cuBLAS handle and heuristics).
    """
    torch_dtype = DTYPES[dtype]
    g = torch.Generator(device=device).manual_seed(0)
    pairs = [(torch.randn(size, size, device=device, generator=g).to(torch_dtype),
              torch.randn(size, size, device=device, generator=g).to(torch_dtype)) for _ in range(3)]
    out = torch.empty(size, size, device=device, dtype=torch_dtype)
    for a, b in pairs:
        torch.mm(a, b, out=out)
    times = [_time_once(device, lambda a=a, b=b: torch.mm(a, b, out=out))
             for a, b in (pairs[i % 3] for i in range(reps))]
    return 2 * size**3 / statistics.median(times) / 1e12


def _time_once(device: str, fn) -> float:
    """Seconds one call of fn takes on the device."""
    if is_cuda(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    sync(device)
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
