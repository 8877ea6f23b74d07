"""The compiled backend on the CPU: the whole step compiles in one graph, matches eager, compiles once, and its
wavefront video is the sequential eager video up to fp32 rounding. (CUDA graphs: bench/smoke_compiled.py.)"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import fresh_tiny

from vidrd_rt.runtime.compiled import CompiledStep, CompileSettings, apply_inductor_flags
from vidrd_rt.runtime.errors import UserError
from vidrd_rt.runtime.noise import TorchNoise
from vidrd_rt.runtime.sampler import make_step, sample_clip
from vidrd_rt.runtime.wavefront import wavefront_clips


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class _UNet64:
    def __init__(self):
        self.unet = fresh_tiny().unet.double()  # same seed, same weights as the compiled model

    @torch.inference_mode()
    def __call__(self, sample, timestep, context):
        return self.unet(sample.double(), timestep, context.double()).to(sample.dtype)


@pytest.fixture(scope="module")
def truth():
    return _UNet64()


def test_compiled_step_is_as_accurate_as_eager(compiled_tiny, truth):
    """Fresh inputs each draw; fp64 eager is the reference, so rounding of this random-weight UNet (which guidance
    amplifies) is told apart from a wrong graph: the compiled step must land as close to it as eager does."""
    reference = make_step(truth, compiled_tiny.table, compiled_tiny.sampler)
    with torch.inference_mode():
        for seed in (3, 4, 5):
            inputs = compiled_tiny.inputs(seed)
            want = reference(*inputs)
            fast, eager = compiled_tiny.step(*inputs), compiled_tiny.eager_step(*inputs)
            assert torch.equal(fast[1], eager[1])  # the DSG head is selection only: exact
            assert torch.isfinite(fast[0]).all()
            assert _rel(fast[0], want[0]) < max(3 * _rel(eager[0], want[0]), 1e-6) and _rel(fast[0], eager[0]) < 1e-4


def test_compile_time_is_logged_once_per_shape(compiled_tiny):
    log = compiled_tiny.pipeline.denoise.compile_log
    assert len(log) == 1 and log[0]["seconds"] > 0 and log[0]["shapes"][0] == [2, 4, 4, 8, 8]
    assert compiled_tiny.pipeline.denoise.compile_seconds == log[0]["seconds"]
    assert os.path.isdir(os.environ["TORCHINDUCTOR_CACHE_DIR"])  # the on-disk cache a second run starts from


def test_compiled_wavefront_video_matches_eager_sequential(compiled_tiny, truth):
    """The pipeline's compiled step through the wavefront, two lanes, three clips; no recompilation on the way."""
    pipeline, sampler, table, context = (compiled_tiny.pipeline, compiled_tiny.sampler, compiled_tiny.table,
                                         compiled_tiny.context)

    def video(run):
        state = pipeline.new_state(sampler, 64, 64)
        return run(state, TorchNoise(sampler.seed))

    fp64 = video(lambda s, n: [sample_clip(truth, table, s, context, sampler, n) for _ in range(sampler.clips)])
    eager = video(lambda s, n: [sample_clip(pipeline.denoise, table, s, context, sampler, n)
                                for _ in range(sampler.clips)])
    with torch._dynamo.config.patch(error_on_recompile=True):
        fast = video(lambda s, n: [c.latents for c in wavefront_clips(compiled_tiny.step, table, s, context, sampler,
                                                                       n, lanes=2)])
        frames = [c.frames for c in pipeline.clips(context, sampler, pipeline.new_state(sampler, 64, 64))]
    eager_error = max(_rel(e, t) for e, t in zip(eager, fp64))
    fast_error = max(_rel(f, t) for f, t in zip(fast, fp64))
    assert fast_error < max(3 * eager_error, 1e-5) and fast_error < 1e-3, (fast_error, eager_error)
    # One compile of the step and one of the decoder (one clip shape), none more over three clips.
    assert [len(entry["shapes"][0]) for entry in pipeline.denoise.compile_log] == [5, 5]
    assert [len(f) for f in frames] == [4, 4, 4]


def test_compiled_decoder_matches_eager_and_hands_back_its_own_copies(compiled_tiny):
    from vidrd_rt.runtime.backends import TorchDecoder
    from vidrd_rt.runtime.compiled import CompiledDecoder, make_compiled_backends
    from vidrd_rt.runtime.config import RuntimeConfig

    runtime = RuntimeConfig(backend="compiled")
    decode = CompiledDecoder(compiled_tiny.model, runtime, CompileSettings(), log := [])
    eager = TorchDecoder(compiled_tiny.model, runtime)
    g = torch.Generator().manual_seed(7)
    first, second = torch.randn(1, 4, 4, 8, 8, generator=g), torch.randn(1, 4, 4, 8, 8, generator=g)
    a, b = decode(first), decode(second)  # b's decode must not overwrite a
    assert len(log) == 1
    for got, latents in ((a, first), (b, second)):
        want = eager(latents)
        assert got.shape == want.shape == (1, 3, 4, 64, 64)
        assert (got - want).abs().max().item() < 1e-4
    _, plain = make_compiled_backends(compiled_tiny.model, RuntimeConfig(backend="compiled", compile_decoder=False))
    assert isinstance(plain, TorchDecoder)
    # No compiled decoder: building one applies its Inductor flags at once, process-wide, for later tests too.
    tuned, _ = make_compiled_backends(compiled_tiny.model, RuntimeConfig(backend="compiled", coordinate_descent=True,
                                                                         freezing=True, compile_decoder=False))
    assert tuned.settings.coordinate_descent_tuning and tuned.settings.freezing  # nothing compiles until called
    assert not tuned.settings.gemm_autotune


def test_a_graph_break_is_an_error():
    """fullgraph=True: a step that cannot be one graph fails to compile instead of running in pieces."""

    def step(x):
        if x.sum().item() > 0:  # a data-dependent branch on a host value: Dynamo must break the graph here
            return x + 1
        return x - 1

    compiled = CompiledStep(step, CompileSettings(), "cpu", log=[])
    with pytest.raises(Exception, match="(?i)graph break|unsupported|item"):
        compiled(torch.ones(3))


def test_settings_are_checked_and_applied_in_one_place(tmp_path):
    with pytest.raises(UserError, match="compile mode"):
        CompileSettings(mode="fastest")
    settings = CompileSettings(cache_dir=str(tmp_path), conv_1x1_as_mm=False)
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    inductor = torch._inductor.config
    try:
        apply_inductor_flags(settings)
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
        assert inductor.conv_1x1_as_mm is False and inductor.fx_graph_cache is True
        assert inductor.max_autotune_gemm is False
        apply_inductor_flags(CompileSettings(cache_dir=str(tmp_path), gemm_autotune=True))
        assert inductor.max_autotune_gemm is True and inductor.max_autotune is False  # GEMMs only, default mode
        assert (inductor.max_autotune_gemm_backends, inductor.max_autotune_conv_backends) == ("ATEN,TRITON", "ATEN")
        apply_inductor_flags(settings)  # Inductor's config is process-wide: a later step without it turns it off
        assert inductor.max_autotune_gemm is False and inductor.max_autotune_conv_backends == "ATEN,TRITON"
        assert inductor.max_autotune_gemm_backends == "ATEN,TRITON,CPP"  # torch's default back
    finally:
        apply_inductor_flags(CompileSettings())
        if previous is not None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


def test_fused_projections_compile_and_match_the_truth(compiled_tiny, truth):
    """fuse_projections (off by default) fuses the UNet's attention projections before compiling; the step compiled
    around them is as accurate as the unfused eager step, and reads the fused weights. gemm_autotune reaches the
    settings."""
    from vidrd_rt.runtime.compiled import make_compiled_backends
    from vidrd_rt.runtime.config import RuntimeConfig
    from vidrd_rt.runtime.layers import Attention
    from vidrd_rt.runtime.pipeline import VideoPipeline

    def attentions(model) -> list:
        return [a for a in model.unet.modules() if isinstance(a, Attention)]

    assert not any(a.qkv_weight is not None or a.kv_weight is not None for a in attentions(compiled_tiny.model))
    tuned, _ = make_compiled_backends(fresh_tiny(), RuntimeConfig(backend="compiled", gemm_autotune=True,
                                                                  compile_decoder=False))
    assert tuned.settings.gemm_autotune  # nothing compiles until called
    model = fresh_tiny()  # its own model: fusing turns to_q/to_k/to_v into views of the fused weights
    pipeline = VideoPipeline(model, RuntimeConfig(backend="compiled", inflight=2, compile_decoder=False,
                                                  fuse_projections=True))
    assert all(a.qkv_weight is not None or a.kv_weight is not None for a in attentions(model))
    _, step = pipeline.step_for(compiled_tiny.sampler)
    reference = make_step(truth, compiled_tiny.table, compiled_tiny.sampler)
    with torch.inference_mode():
        inputs = compiled_tiny.inputs(3)
        want, eager = reference(*inputs), compiled_tiny.eager_step(*inputs)  # eager: the unfused shared model
        fast = step(*inputs)
        assert torch.equal(fast[1], eager[1])
        assert _rel(fast[0], want[0]) < max(3 * _rel(eager[0], want[0]), 1e-6) and _rel(fast[0], eager[0]) < 1e-4
        for a in attentions(model):  # graph inputs, read at each call: the fused weights changed, the step changes
            a.to_k.weight.mul_(2)  # a view of the fused weight: reaches the graph without re-fusing
        assert _rel(step(*inputs)[0], fast[0]) > 1e-3
    assert len(pipeline.denoise.compile_log) == 1
