"""ONNX Runtime backend: the engines from `vidrd-rt build-engine --backend onnxruntime` behind the backend contract.

Inputs and outputs are bound (I/O binding) to static torch buffers on the run's device, one set per input shape:
each call copies its tensors into them and runs, with no host round trip. On CUDA each session runs on its own
torch stream (`user_compute_stream`) that waits for the caller's stream before the run, and the caller's stream
waits for it after: ordered on the device, no host sync, whichever stream calls (the decoder is called from a
side stream while the UNet keeps the main one busy). On the CPU the same binding code runs against host buffers
(the tests' path).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..export.build import open_engines
from ..export.specs import ExportSpec
from .backends import EngineDecoder, EngineDenoiser
from .config import RuntimeConfig
from .errors import UserError
from .model import VidRDModel

_NUMPY = {torch.float16: np.float16, torch.float32: np.float32, torch.int64: np.int64}


def make_ort_backends(model: VidRDModel, runtime: RuntimeConfig):
    """(denoiser, decoder) running the checked engines in runtime.engine_dir."""
    folder, specs = open_engines(model, runtime, "onnxruntime")
    device = torch.device(runtime.device)
    unet = OrtNetwork(folder / "unet.onnx", specs["unet"], device)
    decoder = OrtNetwork(folder / "decoder.onnx", specs["decoder"], device)
    return EngineDenoiser(unet), EngineDecoder(decoder)


class OrtNetwork:
    """One InferenceSession with its inputs and output bound to static torch buffers, per input shape."""

    def __init__(self, path: Path, spec: ExportSpec, device: torch.device):
        self.spec, self.device = spec, device
        self.index = device.index if device.index is not None else (
            torch.cuda.current_device() if device.type == "cuda" else 0)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.session = make_session(path, device, self.stream)
        self.bound: dict[int, tuple] = {}  # frames -> (binding, input buffers, output buffer)

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        binding, inputs, output = self._bound(self.spec.frames_of(tensors))
        caller = torch.cuda.current_stream(self.device) if self.stream is not None else None
        if caller is not None:
            caller.wait_stream(self.stream)  # the buffers are free once the previous run is done
        for buffer, t in zip(inputs, tensors):
            buffer.copy_(t)  # cast to the engine's precision on the device
        if caller is None:
            self.session.run_with_iobinding(binding)
            return output
        self.stream.wait_stream(caller)  # ORT reads the inputs after the copies above
        self.session.run_with_iobinding(binding)
        caller.wait_stream(self.stream)  # the caller reads the output after ORT wrote it
        return output

    def output(self, frames: int) -> torch.Tensor:
        """The static output buffer for this frame count (checks poison it to see that a run writes it all)."""
        return self._bound(frames)[2]

    def _bound(self, frames: int) -> tuple:
        if frames not in self.bound:
            with torch.inference_mode(False):  # plain tensors: callers copy into them in and out of inference mode
                self.bound[frames] = self._allocate(frames)
        return self.bound[frames]

    def _allocate(self, frames: int) -> tuple:
        """(binding, input buffers, output buffer) for this frame count, the binding pointing at the buffers."""
        inputs = [torch.empty(t.at(frames), dtype=t.dtype, device=self.device) for t in self.spec.inputs]
        out_spec = self.spec.outputs[0]
        output = torch.empty(out_spec.at(frames), dtype=out_spec.dtype, device=self.device)
        binding = self.session.io_binding()
        kind, index = self.device.type, self.index
        for t, buffer in zip(self.spec.inputs, inputs):
            binding.bind_input(t.name, kind, index, _NUMPY[buffer.dtype], list(buffer.shape), buffer.data_ptr())
        binding.bind_output(out_spec.name, kind, index, _NUMPY[output.dtype], list(output.shape), output.data_ptr())
        return binding, inputs, output


def make_session(path: Path, device: torch.device, stream: "torch.cuda.Stream | None" = None,
                 optimized_model: str | None = None):
    """An InferenceSession on the CPU, or on the CUDA EP running on `stream` (refuses a silent CPU fallback)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT warns about every node it leaves on the CPU
    if optimized_model:
        options.optimized_model_filepath = optimized_model
    if device.type == "cpu":
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu >= 1.21: load the CUDA/cuDNN libraries torch ships
        ort.preload_dlls()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise UserError("this onnxruntime has no CUDA execution provider: install onnxruntime-gpu (not onnxruntime) "
                        "to run --backend onnxruntime on --device cuda")
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = stream or torch.cuda.current_stream(index)
    cuda = {"device_id": str(index), "user_compute_stream": str(stream.cuda_stream),
            "cudnn_conv_use_max_workspace": "1", "cudnn_conv_algo_search": "EXHAUSTIVE"}
    session = ort.InferenceSession(str(path), options, providers=[("CUDAExecutionProvider", cuda),
                                                                  "CPUExecutionProvider"])
    if session.get_providers()[0] != "CUDAExecutionProvider":
        raise UserError(f"onnxruntime could not start its CUDA provider for {path.name} (CUDA/cuDNN libraries?)")
    return session
