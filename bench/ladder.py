"""The ablation ladder: a spec string -> named `RuntimeConfig` rows, from the authors' configuration upwards.

A spec is rows separated by commas; a row is a preset name with optional `:key=value` overrides, e.g.
`authors,fp16,compiled,wavefront,compiled:inflight=16:name=k16,onnxruntime`. Keys: backend, dtype, decoder,
inflight (alias k), engine_dir, compile_decoder, cudnn_benchmark, coordinate_descent, freezing, fuse_projections
and gemm_autotune (yes/no), temporal_attention (sdpa, kernel, ...), temporal_conv (conv2d, conv3d), name.
`wavefront` expands to one compiled row per K in the K list.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..runtime.config import ConfigError, RuntimeConfig

DEFAULT_LADDER = "authors,fp16,compiled,wavefront,onnxruntime,tensorrt"
DEFAULT_KS = (2, 4, 8)

# Preset -> fixed fields. Missing dtype means the bench's --dtype; missing decoder means the bench's --decoder.
PRESETS: dict[str, dict] = {
    # The authors' code as shipped: fp32 eager, decoder Temp-Conv inactive (they never pass the frame count), SDPA
    # for Temp-Attn and the Temp-Conv as a (3, 1) convolution (our reference forms).
    "authors": {"backend": "torch", "dtype": "fp32", "decoder": "per-frame", "temporal_attention": "sdpa",
                "temporal_conv": "conv2d"},
    "eager": {"backend": "torch"},
    "fp32": {"backend": "torch", "dtype": "fp32"},
    "fp16": {"backend": "torch", "dtype": "fp16"},
    "bf16": {"backend": "torch", "dtype": "bf16"},
    "compiled": {"backend": "compiled"},
    "wavefront": {"backend": "compiled"},  # one row per K of the K list
    "onnxruntime": {"backend": "onnxruntime"},
    "ort": {"backend": "onnxruntime"},
    "tensorrt": {"backend": "tensorrt"},
    "trt": {"backend": "tensorrt"},
}
# RuntimeConfig booleans (yes/no) and their defaults.
_SWITCHES = {"compile_decoder": "yes", "cudnn_benchmark": "no", "coordinate_descent": "no", "freezing": "no",
             "fuse_projections": "no", "gemm_autotune": "no"}
# RuntimeConfig fields that take one of a few names (RuntimeConfig checks them).
_CHOICES = ("temporal_attention", "temporal_conv")
_KEYS = {"backend", "dtype", "decoder", "inflight", "k", "engine_dir", "name", *_SWITCHES, *_CHOICES}


@dataclass(frozen=True)
class Row:
    """One configuration to time: a display name (unique in a result file) and how to run it."""

    name: str
    runtime: RuntimeConfig

    def fields(self) -> dict:
        """The RuntimeConfig fields as flat columns (device left out: it is part of the setting)."""
        out = dataclasses.asdict(self.runtime)
        out.pop("device")
        return out


def default_name(runtime: RuntimeConfig, preset: str) -> str:
    """authors, torch-fp16, compiled-fp16, compiled-fp16-k4, tensorrt-fp16, ... (+ -per-frame, -eager-decoder,
    -cudnn-benchmark, -coordinate-descent, -frozen, -fused-qkv, -gemm-autotune, -tattn-FORM, -tconv-SHAPE when they
    differ from the defaults)."""
    if preset == "authors":
        return "authors"
    name = f"{runtime.backend}-{runtime.dtype}"
    if runtime.inflight > 1:
        name += f"-k{runtime.inflight}"
    if runtime.decoder == "per-frame":
        name += "-per-frame"
    if runtime.backend == "compiled" and not runtime.compile_decoder:
        name += "-eager-decoder"
    if runtime.cudnn_benchmark:
        name += "-cudnn-benchmark"
    if runtime.coordinate_descent:
        name += "-coordinate-descent"
    if runtime.freezing:
        name += "-frozen"
    if runtime.backend == "compiled" and runtime.fuse_projections:
        name += "-fused-qkv"
    if runtime.backend == "compiled" and runtime.gemm_autotune:
        name += "-gemm-autotune"
    defaults = RuntimeConfig()  # the forms act on CUDA with the torch and compiled backends only
    if runtime.backend in ("torch", "compiled") and runtime.temporal_attention != defaults.temporal_attention:
        name += f"-tattn-{runtime.temporal_attention}"
    if runtime.backend in ("torch", "compiled") and runtime.temporal_conv != defaults.temporal_conv:
        name += f"-tconv-{runtime.temporal_conv}"
    return name


def _parse_row(token: str) -> tuple[str, dict]:
    preset, *pairs = token.strip().split(":")
    if preset not in PRESETS:
        raise ConfigError(f"--ladder: unknown row {preset!r}; use one of {', '.join(PRESETS)} "
                          f"with optional :key=value overrides")
    fields = dict(PRESETS[preset])
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in _KEYS:
            raise ConfigError(f"--ladder: bad override {pair!r} in {token!r}; keys: {', '.join(sorted(_KEYS))}")
        fields["inflight" if key == "k" else key] = value
    return preset, fields


def _runtime(fields: dict, device: str, dtype: str, decoder: str, engine_dir: str | None) -> RuntimeConfig:
    try:
        inflight = int(fields.get("inflight", 1))
    except ValueError:
        raise ConfigError(f"--ladder: inflight must be a whole number (got {fields['inflight']!r})") from None
    switches = {}
    for key in _SWITCHES:
        value = str(fields.get(key, _SWITCHES[key])).lower()
        if value not in ("yes", "no"):
            raise ConfigError(f"--ladder: {key} must be yes or no (got {fields[key]!r})")
        switches[key] = value == "yes"
    choices = {key: fields[key] for key in _CHOICES if key in fields}
    return RuntimeConfig(device=device, dtype=fields.get("dtype", dtype), backend=fields["backend"],
                         decoder=fields.get("decoder", decoder), inflight=inflight,
                         engine_dir=fields.get("engine_dir", engine_dir), **switches, **choices)


def parse_ladder(spec: str, device: str, dtype: str = "fp16", decoder: str = "temporal",
                 ks: tuple[int, ...] = DEFAULT_KS, engine_dir: str | None = None,
                 backends: tuple[str, ...] | None = None) -> list[Row]:
    """Rows in spec order; `backends` keeps only rows of those backends. Raises ConfigError on bad input."""
    rows: list[Row] = []
    for token in filter(str.strip, spec.split(",")):
        preset, fields = _parse_row(token)
        expand = [dict(fields, inflight=k) for k in ks] if preset == "wavefront" and "inflight" not in fields \
            else [fields]
        for f in expand:
            runtime = _runtime(f, device, dtype, decoder, engine_dir)
            rows.append(Row(f.get("name") or default_name(runtime, preset), runtime))
    if backends is not None:
        rows = [r for r in rows if r.runtime.backend in backends]
    names = [r.name for r in rows]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ConfigError(f"--ladder: two rows are named {duplicate!r}; give one of them :name=...")
    if not rows:
        raise ConfigError(f"--ladder {spec!r} with --backends {','.join(backends or ())} selects no row")
    return rows


def parse_ints(text: str, flag: str) -> tuple[int, ...]:
    """'2,4,8' -> (2, 4, 8); each at least 1."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} takes whole numbers separated by commas (got {text!r})") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} takes whole numbers >= 1 separated by commas (got {text!r})")
    return values
