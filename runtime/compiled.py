"""The compiled backend: torch.compile (Inductor) of the whole denoising step, replayed from CUDA graphs.

The sampler builds the step (DSG overwrite, CFG batch, UNet, guidance, DDIM update) as a pure function of device
tensors from any denoiser; this backend only compiles whatever step it is given. On CUDA each input shape (one
per lane count) is compiled once, warmed up on a side stream, captured into a CUDA graph whose static inputs are
refilled with copy_, and replayed: one launch per step instead of hundreds of kernel launches.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from . import layers
from .backends import TorchDecoder
from .config import RuntimeConfig
from .errors import UserError
from .model import VidRDModel
from .vae_temporal import VideoDecoder

Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
StepFn = Callable[..., tuple]

MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")


@dataclass(frozen=True)
class CompileSettings:
    """How the step is compiled; each field says what it buys and what it costs (stable-fast CompilationConfig)."""

    # Inductor mode. "default": fused Triton (CUDA) or C++ (CPU) kernels around cuBLAS/cuDNN; the reference.
    # "max-autotune-no-cudagraphs": also benchmarks Triton GEMM/conv templates; a few to 15% faster steps, but
    # compiles take many minutes more. "reduce-overhead"/"max-autotune": Inductor's own CUDA graphs (cudagraph
    # trees) instead of ours; they copy inputs the same way but skip graphs silently on some inputs.
    mode: str = "default"
    # Our CUDA graph per input shape (CUDA only, ignored with Inductor's own graphs): one launch per step, so the
    # host never limits the GPU. Costs one graph's activations per lane count (shared pool) and a capture per shape.
    cuda_graphs: bool = True
    # A graph break is an error, never a silent split of the step into pieces that CUDA graphs cannot span.
    fullgraph: bool = True
    # Symbolic batch size: one compile serves every lane count K. Off (default): each K compiles once (then comes
    # from the cache), and every kernel is specialised to its shape, which is a little faster.
    dynamic: bool = False
    # Inductor freezing: weights become constants (constant folding, weight layouts chosen once). Faster convs,
    # longer compile, and a second copy of the weights while compiling. Inference only.
    freezing: bool = False
    # 1x1 convolutions (the ResNet shortcuts) as matmuls: usually faster on tensor cores; rounding differs.
    conv_1x1_as_mm: bool = True
    # Coordinate-descent search of Triton block sizes: a few % faster kernels for a longer compile.
    coordinate_descent_tuning: bool = False
    # Inductor GEMM autotuning (max_autotune_gemm) in the default mode, with our CUDA graphs: Triton GEMM templates
    # benchmarked against cuBLAS per shape, with pointwise epilogues (bias, GEGLU gate, residual) fused into the
    # chosen template. Convolutions keep cuDNN (no conv templates, unlike mode="max-autotune"). Longer compile.
    gemm_autotune: bool = False
    # Inductor's on-disk caches (FX graphs, kernels, autotuning): a second run with the same model, shapes and
    # settings loads the compiled step in seconds. None: $VIDRD_RT_CACHE_DIR, else ~/.cache/vidrd-rt.
    cache_dir: Optional[str] = None
    # Calls before a CUDA graph capture: the first compiles, the next lets lazy initialisation settle.
    warmup_calls: int = 2
    # Temp-Conv traced as one matmul over 3 shifted frames (runtime/layers.py temporal_conv_as_gemm) instead of a
    # cuDNN (3, 1) convolution; same maths, fp16 rounding differs.
    temporal_conv_gemm: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"compile mode must be one of {', '.join(MODES)} (got {self.mode!r})")
        if self.warmup_calls < 1:
            raise UserError(f"warmup_calls must be at least 1 (got {self.warmup_calls})")

    @property
    def inductor_graphs(self) -> bool:
        """Whether Inductor captures CUDA graphs itself (then ours are off)."""
        return self.mode in ("reduce-overhead", "max-autotune")

    def resolved_cache_dir(self) -> str:
        root = self.cache_dir or os.environ.get("VIDRD_RT_CACHE_DIR") or str(Path.home() / ".cache" / "vidrd-rt")
        return os.path.join(os.path.abspath(os.path.expanduser(root)), "inductor")


def apply_inductor_flags(settings: CompileSettings) -> None:
    """Every Inductor/Dynamo flag this runtime sets, in one place (process-wide, as Inductor's config is)."""
    import torch._dynamo
    import torch._inductor.config as inductor

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = settings.resolved_cache_dir()  # read by Inductor at each compile
    inductor.fx_graph_cache = True  # compiled graphs keyed by graph + shapes + flags, reused across runs
    inductor.autotune_local_cache = True
    inductor.freezing = settings.freezing
    inductor.conv_1x1_as_mm = settings.conv_1x1_as_mm
    inductor.coordinate_descent_tuning = settings.coordinate_descent_tuning
    # Set on and off alike: a later step compiled without gemm_autotune must not inherit it. With it: GEMMs choose
    # between cuBLAS and Triton templates, convolutions stay cuDNN (max_autotune_gemm alone would also benchmark
    # Triton conv templates). Without it: torch's defaults, which only the max-autotune modes search.
    inductor.max_autotune_gemm = settings.gemm_autotune
    inductor.max_autotune_gemm_backends = "ATEN,TRITON" if settings.gemm_autotune else "ATEN,TRITON,CPP"
    inductor.max_autotune_conv_backends = "ATEN" if settings.gemm_autotune else "ATEN,TRITON"
    layers.set_temporal_conv_form("compiled" if settings.temporal_conv_gemm else "never")
    torch._dynamo.config.suppress_errors = False  # a failure to compile is an error, never a silent eager fallback
    # Every pipeline, lane count and sampler setting compiles the same step code object once; the default limit of
    # 8 would silently send later ones to eager in a long-lived process (a benchmark ladder, a server).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


def _shape_key(args) -> tuple:
    return tuple((tuple(a.shape), tuple(a.stride()), a.dtype, a.device) for a in args)


def _cache_counters() -> dict:
    from torch._dynamo.utils import counters

    return {k: counters["inductor"][k] for k in ("fxgraph_cache_hit", "fxgraph_cache_miss")}


class _Entry:
    """One input shape: static inputs refilled with copy_ in front of the compiled step, so Dynamo's guards always
    see the same tensors (no recompiles for views at other offsets or tensors of another kind), and on CUDA the
    CUDA graph replaying it, whose static outputs every replay overwrites."""

    def __init__(self, fn: Callable, inputs: list, graph: Optional["torch.cuda.CUDAGraph"] = None, outputs=None):
        self.fn, self.inputs, self.graph, self.outputs = fn, inputs, graph, outputs

    def __call__(self, args):
        for static, a in zip(self.inputs, args):
            if static is not a:
                static.copy_(a)
        if self.graph is None:
            return self.fn(*self.inputs)
        self.graph.replay()
        return self.outputs


class CompiledStep:
    """A step function compiled once per input shape; on CUDA replayed from a CUDA graph (STYLE point 9).

    Outputs may be static buffers that the next call overwrites: the caller consumes (copies) them first. The first
    call for each shape compiles (and captures); it is timed on its own, as compile time, into `log`.
    """

    def __init__(self, fn: StepFn, settings: CompileSettings, device, log: list,
                 on_compile: Optional[Callable[[dict], None]] = None):
        apply_inductor_flags(settings)
        self.settings, self.device, self.log, self.on_compile = settings, torch.device(device), log, on_compile
        self.compiled = torch.compile(fn, fullgraph=settings.fullgraph, dynamic=settings.dynamic, mode=settings.mode)
        self.use_graphs = self.device.type == "cuda" and settings.cuda_graphs and not settings.inductor_graphs
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.entries: dict[tuple, _Entry] = {}

    @torch.inference_mode()  # one grad mode for every call: a change would recompile (and static inputs are
    def __call__(self, *args):  # inference tensors, which only inference mode may copy into)
        entry = self.entries.get(_shape_key(args))
        return entry(args) if entry is not None else self._first_call(args)

    def _first_call(self, args):
        """Compile (and capture) for a new shape, timed on its own: this is compile time, not run time."""
        self._sync()
        before, start = _cache_counters(), time.perf_counter()
        inputs = [a.clone() for a in args]  # static inputs: same shapes and strides, made in the caller's mode
        entry = self._capture(inputs) if self.use_graphs else _Entry(self.compiled, inputs)
        result = entry(args)
        self._sync()
        after = _cache_counters()
        record = {"shapes": [list(a.shape) for a in args], "seconds": time.perf_counter() - start,
                  "cuda_graph": self.use_graphs, **{k: after[k] - before[k] for k in after},
                  "settings": asdict(self.settings)}
        self.entries[_shape_key(args)] = entry
        self.log.append(record)
        if self.on_compile is not None:
            self.on_compile(record)
        return result

    def _capture(self, inputs: list) -> _Entry:
        """Warm up on a side stream (the first call compiles), then capture one step into a CUDA graph."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.settings.warmup_calls):
                self.compiled(*inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the writer thread may wait on events or pin memory while this thread captures.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            outputs = self.compiled(*inputs)
        return _Entry(self.compiled, inputs, graph, outputs)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class CompiledDenoiser:
    """The UNet as a denoiser, plus compile_step(build): the sampler hands over how to build its step from a
    denoiser, and gets that step compiled around this UNet. Called directly, it runs eagerly."""

    def __init__(self, model: VidRDModel, runtime: RuntimeConfig, settings: Optional[CompileSettings] = None,
                 on_compile: Optional[Callable[[dict], None]] = None):
        self.unet, self.dtype, self.device = model.unet, runtime.torch_dtype, runtime.device
        self.settings = settings or CompileSettings()
        self.compile_log: list[dict] = []  # one entry per compiled shape: seconds, cache hits, settings
        self.on_compile = on_compile

    def unet_call(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """What the compiled step calls (traced by Dynamo, so no decorators): casts at the boundary."""
        return self.unet(sample.to(self.dtype), timestep, context.to(self.dtype)).to(sample.dtype)

    @torch.inference_mode()
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet_call(sample, timestep, context)

    def compile_step(self, build: Callable[[Denoise], StepFn]) -> CompiledStep:
        return CompiledStep(build(self.unet_call), self.settings, self.device, self.compile_log, self.on_compile)

    @property
    def compile_seconds(self) -> float:
        """Time spent compiling (and capturing) so far, kept apart from run time."""
        return sum(entry["seconds"] for entry in self.compile_log)


class CompiledDecoder:
    """The decoder compiled like the step: once per latent shape, replayed from a CUDA graph on CUDA. The graph's
    output buffer is overwritten by the next decode, so each call hands back a copy (on the caller's stream)."""

    def __init__(self, model: VidRDModel, runtime: RuntimeConfig, settings: CompileSettings, log: list,
                 on_compile: Optional[Callable[[dict], None]] = None):
        self.decoder = VideoDecoder(model.vae, per_frame=runtime.decoder == "per-frame")
        self.dtype = runtime.torch_dtype
        self.step = CompiledStep(self._decode, settings, runtime.device, log, on_compile)

    def _decode(self, latents: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.decoder(latents.to(self.dtype)),)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return self.step(latents)[0].clone()


def make_compiled_backends(model: VidRDModel, runtime: RuntimeConfig, settings: Optional[CompileSettings] = None,
                           on_compile: Optional[Callable[[dict], None]] = None):
    """(CompiledDenoiser, decoder) for `--backend compiled`: the decoder compiled too unless runtime says not.
    Both log their compiles into the denoiser's compile_log, so compile time is counted once, apart from run time.
    With runtime.fuse_projections the UNet's attention projections are fused in place (see below)."""
    settings = settings or CompileSettings(coordinate_descent_tuning=runtime.coordinate_descent,
                                           freezing=runtime.freezing, gemm_autotune=runtime.gemm_autotune)
    if runtime.fuse_projections:
        # The model arrives loaded in the run's dtype on its device (load_model, then prepare_for_device, which
        # leaves the 2-D projection weights alone). Fusing stays on the caller's model (to_q/to_k/to_v become
        # views of the fused weights, Attention.fuse_projections): an eager use later runs the same maths, and a
        # second backend over the same model finds it fused and leaves the weights where they are.
        layers.fuse_attention_projections(model.unet)
    denoiser = CompiledDenoiser(model, runtime, settings, on_compile)
    if not runtime.compile_decoder:
        return denoiser, TorchDecoder(model, runtime)
    return denoiser, CompiledDecoder(model, runtime, denoiser.settings, denoiser.compile_log, on_compile)
