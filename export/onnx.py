"""ONNX export of one network from its ExportSpec: opset 17, one external-data file, checked and shape-inferred.

Exporter choice (measured here, torch 2.13, tiny UNet on 2 CPU cores): the TorchScript exporter traces the UNet in
~12 s and is correct with static and with dynamic frames. The dynamo exporter (`dynamo=True`) takes ~77 s, and with a
dynamic frame axis its graph fails in ONNX Runtime ("invalid expand shape" at the Expand it emits for
`aten.repeat_interleave.self_int` with a symbolic count, ResnetBlock3D's per-clip timestep broadcast). So we trace.
The model code stays as it is: the tracer sees plain SDPA, GroupNorm over clip views and channels_last hints.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..runtime import layers
from ..runtime.errors import UserError
from .specs import ExportSpec

OPSET = 17  # LayerNormalization is native from 17; TensorRT 10's ONNX parser and ORT 1.18+ both take it
ATTENTION = ("onnx", "mha")  # "onnx": SDPA as MatMul/Softmax/MatMul (TensorRT fuses it); "mha": ORT's fused op


class ExternalDataError(UserError):
    """An ONNX file's external data is missing or points outside the file's folder."""


def data_file(path: Path) -> Path:
    """The one external-data file beside an exported ONNX file."""
    return path.with_name(path.name + ".data")


def export_onnx(module: nn.Module, spec: ExportSpec, path: str | Path, attention: str = "onnx") -> Path:
    """Trace `module` on spec.sample_inputs() and write `path` + `path.data`; checker and shape inference pass.

    The module must already be in the spec's precision, on the device to trace on (a GPU traces vidrd-base in
    fp16 quickly). Files appear under their final names only when complete.
    """
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    path = Path(path)
    device = next(module.parameters()).device
    work = path.with_name(f".{path.name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        traced = work / "traced" / path.name
        traced.parent.mkdir()
        _trace(module.eval(), spec, traced, device, attention)
        _single_data_file(traced, work / path.name, spec)
        check_onnx(work / path.name, spec)
        os.replace(data_file(work / path.name), data_file(path))
        os.replace(work / path.name, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def _trace(module: nn.Module, spec: ExportSpec, out: Path, device, attention: str) -> None:
    args = spec.sample_inputs(device)
    fused = _fused_attention() if attention == "mha" else contextlib.nullcontext()
    with warnings.catch_warnings(), torch.no_grad(), fused, layers.exporting():
        # TracerWarnings flag Python ints taken from shapes (frame counts): intended, the graph keeps them symbolic
        # where the frame axis is dynamic. The DeprecationWarning is torch's notice about the TorchScript exporter.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, args, str(out), dynamo=False, opset_version=OPSET, input_names=spec.input_names,
                          output_names=spec.output_names, dynamic_axes=spec.dynamic_axes() or None,
                          do_constant_folding=True)


def _single_data_file(traced: Path, out: Path, spec: ExportSpec) -> None:
    """Rewrite with every initializer in one `<name>.data` file (the exporter writes one file per tensor > 2 GB)."""
    model = onnx.load(str(traced))  # pulls in whatever external data the exporter wrote
    _declare_shapes(model, spec)
    onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_file(out).name, size_threshold=1024)
    if not data_file(out).exists():  # a network without large tensors still gets its (empty) data file
        data_file(out).touch()


def _declare_shapes(model: onnx.ModelProto, spec: ExportSpec) -> None:
    """Write the contract's shapes on the graph's inputs and outputs (the tracer leaves some dims anonymous).

    A size the exporter did record must agree with the contract; strict shape inference then checks the graph.
    """
    declared = {t.name: t for t in spec.inputs + spec.outputs}
    for value in list(model.graph.input) + list(model.graph.output):
        contract = declared[value.name]
        axes = dict(contract.axes) if spec.dynamic else {}
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(contract.shape):
            raise RuntimeError(f"{spec.name}: exported {value.name} has rank {len(dims)}, contract {contract.shape}")
        for i, (dim, size) in enumerate(zip(dims, contract.shape)):
            if dim.HasField("dim_value") and dim.dim_value != size and i not in axes:
                raise RuntimeError(f"{spec.name}: exported {value.name} has size {dim.dim_value} on axis {i}, "
                                   f"the contract {size}")
            if i in axes:
                dim.dim_param = axes[i]
            else:
                dim.dim_value = size


def check_onnx(path: Path, spec: ExportSpec | None = None) -> None:
    """External data stays in the folder; onnx.checker (path form, for > 2 GB) and strict shape inference pass.

    Types are not checked through com.microsoft ops (onnx has no schema for them: their outputs' types are unknown
    to it); everything else is.
    """
    check_external_data(path)
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    standard = all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    inferred = path.with_name(f".{path.name}.inferred")
    try:
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred), check_type=standard, strict_mode=True)
        if spec is not None:
            _check_output_shapes(onnx.load(str(inferred), load_external_data=False), spec)
    finally:
        inferred.unlink(missing_ok=True)


def _check_output_shapes(model: onnx.ModelProto, spec: ExportSpec) -> None:
    """Shape inference must reproduce the contract's output shapes (symbolic where the axis is dynamic)."""
    for out, expected in zip(model.graph.output, spec.outputs):
        dims = out.type.tensor_type.shape.dim
        got = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims)
        axes = dict(expected.axes) if spec.dynamic else {}
        want = tuple(axes.get(i, size) for i, size in enumerate(expected.shape))
        if got != want:
            raise RuntimeError(f"{spec.name}: shape inference gives {out.name} {got}, the contract says {want}")


def check_external_data(path: str | Path) -> None:
    """Refuse external data outside the model's folder (absolute paths, '..', links leaving it) or missing."""
    path = Path(path)
    folder = path.parent.resolve()
    model = onnx.load(str(path), load_external_data=False)
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        target = (folder / location).resolve()
        if os.path.isabs(location) or ".." in Path(location).parts or folder not in target.parents:
            raise ExternalDataError(f"{path}: refused, tensor {tensor.name!r} keeps its data at {location!r}, "
                                    f"outside the model's folder")
        if not target.is_file():
            raise ExternalDataError(f"{path}: external data file {location!r} is missing")


#################################################################################
#             ONNX Runtime's fused attention (com.microsoft::MultiHeadAttention)  #
#################################################################################


class _RecordHeads(TorchFunctionMode):
    """Notes (heads, head_dim) of every SDPA call while tracing, in call order.

    The tracer loses static shapes on the way to the attention (the UNet reshapes with sizes read from tensors),
    so the symbolic below cannot read the head count from its inputs; the traced graph keeps call order.
    """

    def __init__(self):
        super().__init__()
        self.heads: list[tuple[int, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            query = args[0]  # (N, heads, L, d)
            self.heads.append((int(query.shape[1]), int(query.shape[3])))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _fused_attention():
    """While exporting, write each plain SDPA (no mask, not causal, default scale) as one MultiHeadAttention node.

    ORT's own graph optimiser does not fuse the exported MatMul/Softmax/MatMul (nor does onnxruntime.transformers'
    "unet" optimiser for this pattern), so the score matrix would be materialised; its CUDA kernel for this op
    runs flash / memory-efficient attention. TensorRT cannot parse com.microsoft ops: its ONNX uses "onnx".
    """
    try:
        from torch.onnx import symbolic_helper, symbolic_opset14
    except ImportError:  # the TorchScript exporter's modules without their public aliases
        from torch.onnx._internal.torchscript_exporter import symbolic_helper, symbolic_opset14

    recorder = _RecordHeads()
    calls = []

    @symbolic_helper.parse_args("v", "v", "v", "v", "f", "b", "v", "b")
    def sdpa(g, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        heads, head_dim = recorder.heads[len(calls)]
        calls.append(heads)
        plain = symbolic_helper._is_none(attn_mask) and symbolic_helper._is_none(scale)
        if not plain or is_causal or dropout_p or enable_gqa:  # e.g. CLIP's causal mask: the standard graph
            return symbolic_opset14.scaled_dot_product_attention(
                g, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        merged = g.op("Constant", value_t=torch.tensor([0, -1, heads * head_dim]))
        split = g.op("Constant", value_t=torch.tensor([0, -1, heads, head_dim]))

        def to_bsd(t):  # (N, heads, S, d) -> (N, S, heads*d); ORT cancels it against the model's own split
            return g.op("Reshape", g.op("Transpose", t, perm_i=[0, 2, 1, 3]), merged)

        out = g.op("com.microsoft::MultiHeadAttention", to_bsd(query), to_bsd(key), to_bsd(value), num_heads_i=heads)
        return g.op("Transpose", g.op("Reshape", out, split), perm_i=[0, 2, 1, 3])  # (N, heads, L, d)

    torch.onnx.register_custom_op_symbolic("aten::scaled_dot_product_attention", sdpa, OPSET)
    try:
        with recorder:
            yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::scaled_dot_product_attention", OPSET)
    if len(calls) != len(recorder.heads):
        raise RuntimeError(f"internal: traced {len(recorder.heads)} attention calls but exported {len(calls)}")
