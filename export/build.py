"""`vidrd-rt build-engine` as a library call, and the check every engine backend runs before it loads anything."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..runtime.config import ConfigError, RuntimeConfig
from ..runtime.model import VidRDModel
from ..runtime.vae_temporal import VideoDecoder
from .manifest import MANIFEST, EngineError, Manifest, check_files, file_sha256, stale_reason, weights_hash
from .onnx import OPSET, check_external_data, data_file, export_onnx
from .specs import EngineShapes, ExportSpec, specs_for

BACKENDS = ("onnxruntime", "tensorrt")
# ORT runs attention as its fused MultiHeadAttention op; TensorRT parses only standard ops and fuses them itself.
ATTENTION = {"onnxruntime": "mha", "tensorrt": "onnx"}
NETWORKS_USED = ("unet", "decoder")  # what the backends run; prompts are encoded once per video, in torch
TIMING_CACHE = "timing.cache"  # TensorRT's kernel timings, shared by the plans of one folder


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_precision(device: str) -> str:
    """fp16 where it is fast (a GPU), fp32 on the CPU (ORT's CPU kernels are fp32)."""
    return "fp16" if torch.device(device).type == "cuda" else "fp32"


def artefact_files(backend: str, spec: ExportSpec) -> list[str]:
    onnx_path = Path(f"{spec.name}.onnx")
    files = [onnx_path.name, data_file(onnx_path).name]
    return files + [f"{spec.name}.plan"] if backend == "tensorrt" else files


#################################################################################
#                                  Building                                     #
#################################################################################


def build_engines(model: VidRDModel, backend: str, engine_dir: str | Path, shapes: EngineShapes,
                  device: Optional[str] = None, rebuild: bool = False,
                  log: Callable[[str], None] = lambda message: None) -> dict:
    """Export (and for TensorRT, build) every network into `engine_dir`, reusing what is already there and current.

    `model` must be on `device` in `shapes.precision`. A folder holding engines that do not fit (other model,
    shapes, precision, GPU or library versions) or whose files are damaged raises EngineError unless `rebuild`.
    Returns {"engine_dir", "built": [...], "reused": [...], "seconds": {name: s}}.
    """
    folder, device = Path(engine_dir), device or default_device()
    check_request(backend, folder, device)
    shapes = shapes.for_model(model.config)
    _check_model(model, shapes, device)
    specs = specs_for(model.config, shapes)
    weights = {net: weights_hash(module) for net, module in model.networks().items()}
    want = Manifest.expected(model, backend, shapes, device, ATTENTION[backend], OPSET, weights)
    found = _existing(folder, rebuild)
    stale = {name: _reason(folder, want, found, spec) for name, spec in specs.items()}
    stale = {name: why for name, why in stale.items() if why}
    # What exists but does not fit needs --rebuild; what an interrupted build never wrote is simply built.
    conflicts = [(name, why) for name, why in stale.items() if found is not None and name in found.artefacts]
    if conflicts and not rebuild:
        name, why = conflicts[0]
        raise EngineError(f"{folder}: {name}: {why}; rebuild with --rebuild or choose another --engine-dir")
    folder.mkdir(parents=True, exist_ok=True)
    want.artefacts = {name: entry for name, entry in (found.artefacts.items() if found else ())
                      if name in specs and name not in stale}
    if backend == "tensorrt":
        _check_timing_cache(folder, found, want)
    seconds = {}
    for name in stale:
        log(f"{name}: {stale[name] if found else 'building'}")
        start = time.perf_counter()
        _build_one(model, backend, specs[name], folder, shapes)
        seconds[name] = round(time.perf_counter() - start, 2)
        want.artefacts[name] = _entry(want, backend, specs[name], folder)
        if backend == "tensorrt":
            want.artefacts[TIMING_CACHE] = {"key": None, "files": {TIMING_CACHE: file_sha256(folder / TIMING_CACHE)}}
        want.save(folder)  # after each network, so an interrupted build keeps what it finished
    return {"engine_dir": str(folder), "built": list(stale), "reused": [n for n in specs if n not in stale],
            "seconds": seconds}


def build_from_source(source, backend: str, engine_dir: str | Path, shapes: EngineShapes,
                      device: Optional[str] = None, rebuild: bool = False,
                      log: Callable[[str], None] = lambda message: None) -> dict:
    """`vidrd-rt build-engine`: check the request, load the model in the engines' precision, build."""
    from ..runtime.weights import load_model

    device = device or default_device()
    check_request(backend, Path(engine_dir), device)
    model = load_model(source, shapes.torch_dtype, device)
    return build_engines(model, backend, engine_dir, shapes, device, rebuild, log)


def check_request(backend: str, folder: Path, device: str) -> None:
    """Fail fast, before a model is loaded: unknown backend, TensorRT without CUDA, a folder that is not ours."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend must be onnxruntime or tensorrt for build-engine (got {backend!r})")
    if backend == "tensorrt":
        from .trt import import_tensorrt

        if torch.device(device).type != "cuda":
            raise ConfigError("--backend tensorrt builds on a CUDA GPU: run build-engine with --device cuda")
        import_tensorrt()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--engine-dir {folder} is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MANIFEST).exists():
        raise ConfigError(f"--engine-dir {folder} is not empty and holds no {MANIFEST}: choose a new or empty "
                          f"folder (nothing in it is overwritten)")


def _check_model(model: VidRDModel, shapes: EngineShapes, device: str) -> None:
    param = next(model.unet.parameters())
    if param.dtype != shapes.torch_dtype or param.device.type != torch.device(device).type:
        raise ConfigError(f"the model is {param.dtype} on {param.device}, engines of precision {shapes.precision} "
                          f"on {device} need it loaded as {shapes.torch_dtype} there")


def _existing(folder: Path, rebuild: bool) -> Optional[Manifest]:
    """The manifest found in the folder (None: a new folder). An unreadable one needs --rebuild."""
    if not (folder / MANIFEST).exists():
        return None
    try:
        return Manifest.load(folder)
    except EngineError as e:
        if rebuild:
            return None
        raise EngineError(f"{e}; rebuild with --rebuild or choose another --engine-dir") from None


def _reason(folder: Path, want: Manifest, found: Optional[Manifest], spec: ExportSpec) -> Optional[str]:
    if found is None:
        return "not built yet"
    return stale_reason(folder, want, found, spec.name, spec.network)


def network_module(model: VidRDModel, spec: ExportSpec, shapes: EngineShapes) -> nn.Module:
    """The module whose forward is exactly the spec's contract."""
    if spec.name == "decoder":
        return VideoDecoder(model.vae, per_frame=shapes.decoder == "per-frame")
    return model.networks()[spec.network]


def _build_one(model: VidRDModel, backend: str, spec: ExportSpec, folder: Path, shapes: EngineShapes) -> None:
    for name in artefact_files(backend, spec):  # never leave an old plan beside a new ONNX
        (folder / name).unlink(missing_ok=True)
    onnx_path = export_onnx(network_module(model, spec, shapes), spec, folder / f"{spec.name}.onnx",
                            attention=ATTENTION[backend])
    if backend == "tensorrt":
        from .trt import Engine

        Engine(folder / f"{spec.name}.plan").build(onnx_path, [spec.profile()], fp16=shapes.precision == "fp16",
                                                   timing_cache=folder / TIMING_CACHE)


def _check_timing_cache(folder: Path, found: Optional[Manifest], want: Manifest) -> None:
    """The timing cache only speeds builds up: one the manifest does not vouch for is deleted, not trusted."""
    path = folder / TIMING_CACHE
    entry = (found.artefacts.get(TIMING_CACHE) if found else None) or {}
    if path.exists() and check_files(folder, entry) is not None:
        path.unlink()
    elif path.exists():
        want.artefacts[TIMING_CACHE] = entry


def _entry(want: Manifest, backend: str, spec: ExportSpec, folder: Path) -> dict:
    files = {name: file_sha256(folder / name) for name in artefact_files(backend, spec)}
    return {"key": want.key(spec.network), "network": spec.network, "files": files}


#################################################################################
#                        Before a backend loads anything                        #
#################################################################################


def open_engines(model: VidRDModel, runtime: RuntimeConfig, backend: str) -> tuple[Path, dict[str, ExportSpec]]:
    """Check runtime.engine_dir against this model and run; return it and the contracts of the networks to run.

    Missing, stale or damaged engines raise EngineError (a UserError: one line, exit 2) naming the command that
    rebuilds them. Hashes the weights of the networks used and the files loaded (seconds for vidrd-base).
    """
    folder = Path(runtime.engine_dir) if runtime.engine_dir else None

    def hint(rebuild: bool = True) -> str:
        return (f"build them with `vidrd-rt build-engine [model flags] --backend {backend} --engine-dir "
                f"{folder or 'DIR'} --frames N --height H --width W --precision {runtime.dtype} --decoder "
                f"{runtime.decoder}{' --rebuild' if rebuild else ''}`")

    if folder is None:
        raise EngineError(f"--backend {backend} runs prebuilt engines: pass --engine-dir DIR; {hint(False)}")
    if not (folder / MANIFEST).is_file():
        raise EngineError(f"{folder} holds no engines ({MANIFEST} missing); {hint(False)}")
    try:
        found = Manifest.load(folder)
        shapes = found.shapes
    except (EngineError, KeyError, TypeError, ValueError) as e:  # unreadable, or shapes EngineShapes refuses
        raise EngineError(f"{folder}: {MANIFEST} is damaged ({type(e).__name__}); {hint()}") from None
    if runtime.dtype != shapes.precision or runtime.decoder != shapes.decoder:
        raise EngineError(f"{folder} holds {shapes.precision} engines with the {shapes.decoder} decoder, this run asks "
                          f"for --dtype {runtime.dtype} --decoder {runtime.decoder}; {hint()}")
    specs = {name: spec for name, spec in specs_for(model.config, shapes).items() if name in NETWORKS_USED}
    weights = {spec.network: weights_hash(model.networks()[spec.network]) for spec in specs.values()}
    want = Manifest.expected(model, backend, shapes, runtime.device, ATTENTION[backend], OPSET, weights)
    for name, spec in specs.items():
        why = stale_reason(folder, want, found, name, spec.network)
        if why:
            raise EngineError(f"{folder}: {name}: {why}; {hint()}")
        check_external_data(folder / f"{name}.onnx")
    return folder, specs

