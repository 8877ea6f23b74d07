"""Helpers shared by the engine tests: the tiny model's ONNX Runtime engines, exported once per test process."""

from __future__ import annotations

from pathlib import Path

import torch

from vidrd_rt.export.build import build_engines
from vidrd_rt.export.specs import EngineShapes

SHAPES = EngineShapes(frames=8, precision="fp32")  # tiny: 64x64 pixels, 8x8 latents, CFG batch 2
CPU = torch.device("cpu")
_BUILT: dict[str, Path] = {}


def tiny_ort_engines(tiny_model, tmp_path_factory) -> Path:
    """Export the tiny model once per process (the UNet is most of the engine tests' time); never modify it."""
    if "ort" not in _BUILT:
        folder = tmp_path_factory.mktemp("engines") / "tiny-ort"
        build_engines(tiny_model, "onnxruntime", folder, SHAPES, "cpu")
        _BUILT["ort"] = folder
    return _BUILT["ort"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())
