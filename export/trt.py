"""TensorRT engines through the TensorRT 10 Python API: build from ONNX, load, activate, allocate, infer.

The shape follows NVIDIA's TensorRT demo/Diffusion `Engine` (build / load / activate / allocate / infer), without
its shell calls: the builder parses the ONNX file itself (`parse_from_file`, so external data resolves next to
it), takes one optimization profile per shape set, reuses a timing cache file, and serializes a plan. At run time
every shape gets its own execution context, static torch buffers bound with `set_tensor_address`, and a CUDA
graph captured on first use; inputs are copied into the static buffers, so a replay sees new data.

Not run on this project's machines: the tensorrt package cannot be installed there. Errors raise, never exit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..runtime.errors import UserError

ShapeProfile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # name -> (min, opt, max)


def import_tensorrt():
    """The tensorrt module, or a one-line UserError saying it is needed."""
    try:
        import tensorrt
    except Exception as e:  # absent (ImportError), or a placeholder package that raises on import
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"--backend tensorrt needs the tensorrt Python package (TensorRT 10) on a CUDA machine; "
                        f"it is not importable here ({reason}); use --backend onnxruntime or torch") from None
    return tensorrt


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
             trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64, trt.DataType.INT8: torch.int8,
             trt.DataType.BOOL: torch.bool, trt.DataType.UINT8: torch.uint8}
    return table[dtype]


def shape_key(feed: dict[str, torch.Tensor]) -> tuple:
    """One CUDA graph and one set of buffers per distinct set of input shapes."""
    return tuple((name, tuple(t.shape)) for name, t in sorted(feed.items()))


def _write_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclass
class _Slot:
    """What one input-shape set needs: its own context (shapes are context state), buffers, and graph."""

    context: Any
    tensors: dict[str, torch.Tensor]
    graph: Optional[torch.cuda.CUDAGraph] = None
    outputs: list[str] = field(default_factory=list)


class Engine:
    """One serialized TensorRT plan file."""

    def __init__(self, plan_path: str | Path):
        self.plan_path = Path(plan_path)
        self.trt = import_tensorrt()
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)  # must outlive every object created with it
        self.engine = None
        self.slots: dict[tuple, _Slot] = {}

    # ------------------------------------------------------------------ build

    def build(self, onnx_path: str | Path, profiles: list[ShapeProfile], fp16: bool, timing_cache: str | Path,
              workspace_bytes: Optional[int] = None) -> None:
        """ONNX -> plan file, one optimization profile per entry of `profiles`; updates the timing cache file."""
        trt, timing_cache = self.trt, Path(timing_cache)
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)  # explicit batch: the only kind TensorRT 10 has
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
        for shapes in profiles:
            profile = builder.create_optimization_profile()
            for name, (low, opt, high) in shapes.items():
                profile.set_shape(name, low, opt, high)
            config.add_optimization_profile(profile)
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError(f"TensorRT could not build an engine from {onnx_path} (its log above says why)")
        _write_atomic(self.plan_path, memoryview(plan))
        _write_atomic(timing_cache, memoryview(config.get_timing_cache().serialize()))

    # ------------------------------------------------------------------ run

    def load(self) -> None:
        """Deserialize the plan (weights go to the GPU)."""
        runtime = self.trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {self.plan_path} (built by another TensorRT or GPU?)")
        self._runtime = runtime

    def activate(self) -> None:
        """Ready to allocate: the engine is loaded (contexts are made per shape in allocate)."""
        if self.engine is None:
            self.load()

    def allocate(self, shapes: dict[str, tuple[int, ...]], device: torch.device) -> _Slot:
        """A context with these input shapes and static device buffers for every input and output."""
        trt, engine = self.trt, self.engine
        context = engine.create_execution_context()
        tensors, outputs = {}, []
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        for name in names:
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                if not context.set_input_shape(name, shapes[name]):
                    raise UserError(f"{self.plan_path.name}: input {name} shape {shapes[name]} is outside the "
                                    f"engine's profile; rebuild it for this shape")
        for name in names:
            shape = tuple(context.get_tensor_shape(name))
            tensors[name] = torch.empty(shape, dtype=_torch_dtype(trt, engine.get_tensor_dtype(name)), device=device)
            context.set_tensor_address(name, tensors[name].data_ptr())
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                outputs.append(name)
        slot = _Slot(context, tensors, outputs=outputs)
        self.slots[shape_key({n: tensors[n] for n in shapes})] = slot
        return slot

    def infer(self, feed: dict[str, torch.Tensor], use_cuda_graph: bool = True) -> dict[str, torch.Tensor]:
        """Run on the current CUDA stream; returns the slot's static output buffers (copy them to keep them)."""
        slot = self.slots.get(shape_key(feed))
        if slot is None:
            slot = self.allocate({n: tuple(t.shape) for n, t in feed.items()}, next(iter(feed.values())).device)
        for name, t in feed.items():
            slot.tensors[name].copy_(t)  # casts to the engine's dtype; the graph reads these addresses
        stream = torch.cuda.current_stream()
        if not use_cuda_graph:
            self._execute(slot, stream)
        else:
            if slot.graph is None:
                slot.graph = self._capture(slot)
            slot.graph.replay()
        return {name: slot.tensors[name] for name in slot.outputs}

    def _execute(self, slot: _Slot, stream: torch.cuda.Stream) -> None:
        if not slot.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.plan_path.name}")

    def _capture(self, slot: _Slot) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream (TensorRT finishes lazy setup there), then capture one execution."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._execute(slot, side)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            self._execute(slot, side)
        return graph
