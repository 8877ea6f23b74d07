"""TensorRT backend: plans from `vidrd-rt build-engine --backend tensorrt`, run with a CUDA graph per shape.

Not run on this project's machines (tensorrt cannot be installed there); the checks before loading are tested.
"""

from __future__ import annotations

import torch

from ..export.build import open_engines
from ..export.specs import ExportSpec
from ..export.trt import Engine, import_tensorrt
from .backends import EngineDecoder, EngineDenoiser
from .config import RuntimeConfig
from .errors import UserError
from .model import VidRDModel


def make_trt_backends(model: VidRDModel, runtime: RuntimeConfig):
    """(denoiser, decoder) running the checked TensorRT plans in runtime.engine_dir."""
    folder, specs = open_engines(model, runtime, "tensorrt")
    if torch.device(runtime.device).type != "cuda":
        raise UserError("--backend tensorrt runs on a CUDA GPU: add --device cuda")
    import_tensorrt()
    unet = TrtNetwork(Engine(folder / "unet.plan"), specs["unet"])
    decoder = TrtNetwork(Engine(folder / "decoder.plan"), specs["decoder"])
    return EngineDenoiser(unet), EngineDecoder(decoder)


class TrtNetwork:
    """An Engine behind the contract's positional inputs; shapes checked against the spec before TensorRT sees them."""

    def __init__(self, engine: Engine, spec: ExportSpec):
        self.engine, self.spec = engine, spec
        engine.activate()

    @torch.inference_mode()
    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        self.spec.frames_of(tensors)
        outputs = self.engine.infer(dict(zip(self.spec.input_names, tensors)))
        return outputs[self.spec.output_names[0]]
