"""ONNX export and the ONNX Runtime backend on the tiny model: parity with torch, checker, attention graph, 3 clips."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import run_cli
from engine_fixtures import CPU, SHAPES, rel, tiny_ort_engines
from vidrd_rt.export.build import network_module
from vidrd_rt.export.onnx import check_onnx, export_onnx
from vidrd_rt.export.specs import EngineShapes, specs_for
from vidrd_rt.runtime.backend_ort import OrtNetwork, make_session
from vidrd_rt.runtime.vae_temporal import VideoDecoder
from vidrd_rt.runtime.weights import ModelSource, load_model


@pytest.fixture
def ort_engines(tiny_model, tmp_path_factory) -> Path:
    return tiny_ort_engines(tiny_model, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_fp64():
    """The same random weights in float64: the reference both fp32 implementations are measured against."""
    return load_model(ModelSource(model="tiny", random_weights=True), torch.float64)


def test_unet_parity(ort_engines, tiny_model, tiny_fp64, unet_inputs):
    spec = specs_for(tiny_model.config, SHAPES)["unet"]
    unet = OrtNetwork(ort_engines / "unet.onnx", spec, CPU)
    sample, t, context = unet_inputs
    with torch.inference_mode():
        eager = tiny_model.unet(sample, t, context)
        ref = tiny_fp64.unet(sample.double(), t, context.double())
    out = unet(sample, t, context).clone()
    assert not out.isnan().any()
    # torch's own fp32 CPU path is the looser one (its flash SDPA and channels_last GroupNorm): ~3e-5 here.
    assert rel(out, ref) < 1e-5
    assert rel(out, eager) < 1e-4
    fresh = spec.sample_inputs(seed=7)
    with torch.inference_mode():
        ref = tiny_fp64.unet(fresh[0].double(), fresh[1], fresh[2].double())
    assert rel(unet(*fresh), ref) < 1e-5


def test_decoder_parity(ort_engines, tiny_model, tiny_fp64):
    spec = specs_for(tiny_model.config, SHAPES)["decoder"]
    decoder = OrtNetwork(ort_engines / "decoder.onnx", spec, CPU)
    (latents,) = spec.sample_inputs(seed=3)
    with torch.inference_mode():
        eager = VideoDecoder(tiny_model.vae)(latents)
        ref = VideoDecoder(tiny_fp64.vae)(latents.double())
    out = decoder(latents)
    assert out.shape == (1, 3, 8, 64, 64) and out.dtype == torch.float32
    assert rel(out, ref) < 1e-5 and rel(out, eager) < 1e-5
    assert (out - eager).abs().max() < 1e-4  # 1/40 of one 8-bit level


def test_text_encoder_parity(ort_engines, tiny_model):
    spec = specs_for(tiny_model.config, SHAPES)["text_encoder"]
    encoder = OrtNetwork(ort_engines / "text_encoder.onnx", spec, CPU)
    (ids,) = spec.sample_inputs(seed=2)
    with torch.inference_mode():
        eager = tiny_model.text_encoder(ids)
    assert rel(encoder(ids), eager) < 1e-5


def test_checker_shape_inference_and_external_data(ort_engines, tiny_model):
    for name, spec in specs_for(tiny_model.config, SHAPES).items():
        path = ort_engines / f"{name}.onnx"
        check_onnx(path, spec)  # raises on failure
        model = onnx.load(str(path), load_external_data=False)
        assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {17}
        big = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert big and {e.value for t in big for e in t.external_data if e.key == "location"} == {f"{name}.onnx.data"}


def _ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_attention_is_fused_for_onnxruntime(ort_engines, tmp_path):
    """Every spatial, cross and temporal attention is one MultiHeadAttention node: no Softmax, no score matrix
    in the graph ORT runs (16 transformer blocks x 3 attentions in the tiny UNet)."""
    optimized = tmp_path / "unet.optimized.onnx"
    make_session(ort_engines / "unet.onnx", CPU, optimized_model=str(optimized))
    ops = _ops(optimized)
    assert ops["MultiHeadAttention"] == 48 and ops["Softmax"] == 0


@pytest.mark.parametrize("attention", ["onnx", "mha"])
def test_dynamic_frames_both_attention_forms(tiny_model, tiny_fp64, tmp_path, attention):
    """A dynamic frame axis, in TensorRT's form (standard ops only: attention as MatMul/Softmax/MatMul) and in
    ORT's (MultiHeadAttention), on the decoder (its VAE mid-block has one attention)."""
    shapes = EngineShapes(frames=4, min_frames=2, max_frames=6, precision="fp32")
    spec = specs_for(tiny_model.config, shapes)["decoder"]
    assert spec.dynamic_axes() == {"latents": {2: "frames"}, "video": {2: "frames"}}
    path = export_onnx(network_module(tiny_model, spec, shapes), spec, tmp_path / "decoder.onnx", attention=attention)
    model = onnx.load(str(path), load_external_data=False)
    standard = all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert (standard, _ops(path)["Softmax"], _ops(path)["MultiHeadAttention"]) == (
        (True, 1, 0) if attention == "onnx" else (False, 0, 1))
    assert model.graph.input[0].type.tensor_type.shape.dim[2].dim_param == "frames"
    decoder = OrtNetwork(path, spec, CPU)
    for frames in (2, 6):
        (latents,) = spec.sample_inputs(seed=frames, frames=frames)
        with torch.inference_mode():
            ref = VideoDecoder(tiny_fp64.vae)(latents.double())
        assert rel(decoder(latents), ref) < 1e-5


def test_three_clips_onnxruntime_vs_torch(ort_engines, tmp_path, capsys):
    """The whole video through the CLI: same sampler, ORT engines vs eager torch, frames within 1 level."""
    common = ["generate", "--model", "tiny", "--random-weights", "--prompt", "a red circle moving right",
              "--clips", "3", "--frames", "8", "--overlap", "2", "--steps", "2"]
    videos = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / f"{backend}.npy"
        code, _, err = run_cli([*common, "--out", str(out), "--backend", backend, "--engine-dir", str(ort_engines)],
                                capsys)
        assert code == 0, err
        videos[backend] = np.load(out).astype(np.int32)
    assert videos["torch"].shape == (24, 64, 64, 3)
    diff = np.abs(videos["torch"] - videos["onnxruntime"])
    assert diff.mean() <= 1.0, f"mean {diff.mean():.4f} levels, max {diff.max()}"


def test_build_engine_cli_reuses_and_refuses(ort_engines, capsys):
    """A second build-engine with the same inputs re-exports nothing; other shapes: one line, exit 2."""
    base = ["build-engine", "--model", "tiny", "--random-weights", "--engine-dir", str(ort_engines),
            "--frames", "8", "--precision", "fp32", "--device", "cpu"]
    code, out, _ = run_cli(base, capsys)
    assert code == 0 and "built nothing; reused unet, decoder, text_encoder" in out
    code, _, err = run_cli([*base, "--height", "128"], capsys)
    assert code == 2 and err.count("\n") == 1 and "height=64, asked for 128" in err and "--rebuild" in err
