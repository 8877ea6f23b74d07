"""Engine folders: manifest, cache reuse, mismatch and corruption found before use, --rebuild, TensorRT around it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import fresh_tiny
from engine_fixtures import SHAPES, rel, tiny_ort_engines
from vidrd_rt.export.build import build_engines
from vidrd_rt.export.manifest import MANIFEST, EngineError, Manifest, difference, file_sha256
from vidrd_rt.export.onnx import ExternalDataError, check_external_data
from vidrd_rt.export.specs import EngineShapes, specs_for
from vidrd_rt.export.trt import shape_key
from vidrd_rt.runtime.backends import make_backends
from vidrd_rt.runtime.config import ConfigError, RuntimeConfig
from vidrd_rt.runtime.errors import UserError

NO_TENSORRT = "tensorrt is not importable here (its builder libraries cannot be installed on this machine)"


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:  # absent, or a registry's placeholder that fails on import
        return False
    return True


HAS_TENSORRT = _tensorrt_importable()


@pytest.fixture
def engines(tiny_model, tmp_path_factory, tmp_path) -> Path:
    """A private copy of the tiny model's ONNX Runtime engine folder, free to damage."""
    return Path(shutil.copytree(tiny_ort_engines(tiny_model, tmp_path_factory), tmp_path / "engines"))


def ort(folder: Path, **changes) -> RuntimeConfig:
    return RuntimeConfig(backend="onnxruntime", engine_dir=str(folder), **changes)


def _flip_first_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


#################################################################################
#                              Reuse and rebuild                                 #
#################################################################################


def test_second_build_reuses_everything(tiny_model, engines):
    before = mtimes(engines)
    summary = build_engines(tiny_model, "onnxruntime", engines, SHAPES, "cpu")
    assert summary["built"] == [] and summary["reused"] == ["unet", "decoder", "text_encoder"]
    assert mtimes(engines) == before  # nothing exported, nothing rewritten


def test_other_shapes_refused_then_rebuilt_only_where_needed(tiny_model, engines):
    with pytest.raises(EngineError, match=r"built for frames=8, asked for 4; rebuild with --rebuild"):
        build_engines(tiny_model, "onnxruntime", engines, EngineShapes(frames=4, precision="fp32"), "cpu")
    (engines / "text_encoder.onnx.data").write_bytes(b"\0" * 64)  # damaged
    with pytest.raises(EngineError, match="text_encoder.onnx.data is corrupted"):
        build_engines(tiny_model, "onnxruntime", engines, SHAPES, "cpu")
    before = mtimes(engines)
    summary = build_engines(tiny_model, "onnxruntime", engines, SHAPES, "cpu", rebuild=True)
    assert summary["built"] == ["text_encoder"] and summary["reused"] == ["unet", "decoder"]
    after = mtimes(engines)
    assert all(after[n] == before[n] for n in ("unet.onnx", "unet.onnx.data", "decoder.onnx"))
    assert build_engines(tiny_model, "onnxruntime", engines, SHAPES, "cpu")["built"] == []


def test_unreadable_manifest_needs_rebuild_and_an_interrupted_build_resumes(tiny_model, engines):
    manifest = Manifest.load(engines)
    (engines / MANIFEST).write_text("{not json")
    with pytest.raises(EngineError, match="manifest.json is unreadable .*; rebuild with --rebuild"):
        build_engines(tiny_model, "onnxruntime", engines, SHAPES, "cpu")
    del manifest.artefacts["text_encoder"]  # as if the build had stopped before the text encoder
    manifest.save(engines)
    summary = build_engines(tiny_model, "onnxruntime", engines, SHAPES, "cpu")  # no --rebuild needed
    assert summary["built"] == ["text_encoder"] and summary["reused"] == ["unet", "decoder"]


def test_folder_that_is_not_ours_is_refused(tiny_model, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and holds no manifest.json"):
        build_engines(tiny_model, "onnxruntime", tmp_path, SHAPES, "cpu", rebuild=True)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


#################################################################################
#                         Found before use, by the backend                      #
#################################################################################


def test_backend_loads_current_engines(tiny_model, engines, unet_inputs):
    denoise, decode = make_backends(tiny_model, ort(engines))
    sample, t, context = unet_inputs
    with torch.inference_mode():
        assert rel(denoise(sample, t, context), tiny_model.unet(sample, t, context)) < 1e-4


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "decoder.onnx").unlink(), "decoder: decoder.onnx is missing"),
    (lambda d: _flip_first_byte(d / "unet.onnx.data"), "unet: unet.onnx.data is corrupted"),
    (lambda d: (d / MANIFEST).write_text("{not json"), "manifest.json is damaged"),
    (lambda d: (d / MANIFEST).unlink(), "holds no engines"),
    (lambda d: shutil.rmtree(d), "holds no engines"),
])
def test_missing_or_damaged_files_give_one_line(tiny_model, engines, damage, message):
    damage(engines)
    with pytest.raises(EngineError, match=message) as caught:
        make_backends(tiny_model, ort(engines))
    text = str(caught.value)
    assert "\n" not in text and "vidrd-rt build-engine" in text and f"--engine-dir {engines}" in text


def _edit_identity(folder: Path, edit) -> None:
    """As if the folder had been built elsewhere: change what the manifest says it was built with."""
    raw = json.loads((folder / MANIFEST).read_text())
    edit(raw["identity"])
    (folder / MANIFEST).write_text(json.dumps(raw))


@pytest.mark.parametrize("edit, message", [
    (lambda i: i["environment"]["versions"].update(onnxruntime="1.17.0"), "onnxruntime 1.17.0 at build, .* now"),
    (lambda i: i["environment"].update(device="cuda", gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0"),
     r"built on NVIDIA H100 80GB HBM3 \(compute capability 9.0\), this run has cpu"),
    (lambda i: i.update(backend="tensorrt"), "backend tensorrt at build, onnxruntime now"),
    (lambda i: i["model"].update(config_hash="0123456789abcdef"), "another model"),
])
def test_manifest_mismatch_is_named(tiny_model, engines, edit, message):
    _edit_identity(engines, edit)
    with pytest.raises(EngineError, match=message):
        make_backends(tiny_model, ort(engines))


def test_other_weights_precision_or_decoder_refused(engines):
    other = fresh_tiny(seed=1)
    with pytest.raises(EngineError, match="other unet weights than the engines were built from"):
        make_backends(other, ort(engines))
    with pytest.raises(EngineError, match="fp32 engines .* asks for --dtype fp16"):
        make_backends(other, ort(engines, dtype="fp16"))
    with pytest.raises(EngineError, match="temporal decoder, .* --decoder per-frame"):
        make_backends(other, ort(engines, decoder="per-frame"))
    with pytest.raises(EngineError, match="pass --engine-dir DIR"):
        make_backends(other, RuntimeConfig(backend="onnxruntime"))


def test_wrong_frame_count_at_run_time(tiny_model, engines):
    denoise, _ = make_backends(tiny_model, ort(engines))
    with pytest.raises(UserError, match=r"built for inputs \(2, 4, 8, 8, 8\) .* gives \(2, 4, 6, 8, 8\)"):
        denoise(torch.zeros(2, 4, 6, 8, 8), torch.tensor([1, 1]), torch.zeros(2, 77, 32))


#################################################################################
#                           External data stays home                             #
#################################################################################


def _tiny_onnx(folder: Path, location: str) -> Path:
    """A one-node model whose weight lives in an external file at `location` (relative to the model)."""
    weight = numpy_helper.from_array(torch.ones(64, 64).numpy(), "w")
    onnx.external_data_helper.set_external_data(weight, location=location)
    weight.ClearField("raw_data")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight])
    path = folder / "model.onnx"
    onnx.save_model(helper.make_model(graph), str(path))
    return path


@pytest.mark.parametrize("location", ["../outside.data", "/tmp/outside.data", "sub/../../outside.data"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "outside.data").write_bytes(b"\0" * 64 * 64 * 4)
    with pytest.raises(ExternalDataError, match="refused.*outside the model's folder"):
        check_external_data(_tiny_onnx(folder, location))


def test_external_data_inside_is_accepted_and_missing_is_named(tmp_path):
    path = _tiny_onnx(tmp_path, "w.data")
    with pytest.raises(ExternalDataError, match="'w.data' is missing"):
        check_external_data(path)
    (tmp_path / "w.data").write_bytes(b"\0" * 64 * 64 * 4)
    check_external_data(path)


def test_backend_refuses_an_engine_pointing_outside(tiny_model, engines):
    """Even with a manifest that vouches for the file (sha256 updated), the location is checked before loading."""
    model = onnx.load(str(engines / "decoder.onnx"), load_external_data=False)
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../engines/decoder.onnx.data"
    onnx.save_model(model, str(engines / "decoder.onnx"))
    raw = json.loads((engines / MANIFEST).read_text())
    raw["artefacts"]["decoder"]["files"]["decoder.onnx"] = file_sha256(engines / "decoder.onnx")
    (engines / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(ExternalDataError, match="outside the model's folder"):
        make_backends(tiny_model, ort(engines))


#################################################################################
#                      Manifest, profiles and TensorRT                          #
#################################################################################


def test_manifest_records_what_the_issue_asks(engines):
    manifest = Manifest.load(engines)
    identity = manifest.identity
    assert set(identity["model"]["weights"]) == {"unet", "vae", "text_encoder"}
    assert identity["model"]["config_hash"] == fresh_tiny().config.fingerprint()
    assert identity["shapes"]["precision"] == "fp32" and identity["shapes"]["frames"] == 8
    assert identity["environment"]["gpu"] is None and identity["environment"]["compute_capability"] is None
    assert set(identity["environment"]["versions"]) == {"torch", "onnx", "onnxruntime"}
    files = {f for entry in manifest.artefacts.values() for f in entry["files"]}
    assert files == {p.name for p in engines.iterdir()} - {MANIFEST}
    assert all(len(sha) == 64 for entry in manifest.artefacts.values() for sha in entry["files"].values())
    assert difference(identity, identity) is None


def test_profiles_from_engine_shapes(tiny_model):
    static = specs_for(tiny_model.config, EngineShapes(frames=16, batch=2, precision="fp16"))["unet"]
    assert static.profile()["sample"] == ((4, 4, 16, 8, 8),) * 3
    assert static.profile()["timestep"] == ((4,),) * 3 and static.dynamic_axes() == {}
    dynamic = specs_for(tiny_model.config, EngineShapes(frames=16, min_frames=8, max_frames=24, height=128,
                                                        width=192, precision="fp16"))["unet"]
    assert dynamic.profile()["sample"] == ((2, 4, 8, 16, 24), (2, 4, 16, 16, 24), (2, 4, 24, 16, 24))
    assert dynamic.profile()["encoder_hidden_states"] == ((2, 77, 32),) * 3
    assert dynamic.dynamic_axes() == {"sample": {2: "frames"}, "noise_pred": {2: "frames"}}
    assert [t.dtype for t in dynamic.inputs] == [torch.float16, torch.int64, torch.float16]
    assert shape_key({"b": torch.zeros(2), "a": torch.zeros(1, 3)}) == (("a", (1, 3)), ("b", (2,)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(frames=1), "2 <= min"),
    (dict(frames=8, min_frames=10), "min 10 <= --frames 8"),
    (dict(precision="bf16"), "--precision must be fp16 or fp32"),
    (dict(height=100), "--height 100 does not fit"),
])
def test_bad_engine_shapes_are_one_line(tiny_model, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        specs_for(tiny_model.config, EngineShapes(**kwargs))


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is importable here")
def test_tensorrt_needs_the_package(tiny_model, engines, tmp_path):
    with pytest.raises(UserError, match="tensorrt"):
        build_engines(tiny_model, "tensorrt", tmp_path / "trt", SHAPES, "cpu")
    with pytest.raises(EngineError, match="backend onnxruntime at build, tensorrt now"):
        make_backends(tiny_model, RuntimeConfig(backend="tensorrt", engine_dir=str(engines)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT runs on a CUDA GPU and there is none here")
@pytest.mark.skipif(not HAS_TENSORRT, reason=NO_TENSORRT)
def test_tensorrt_build_and_run(tmp_path):
    """Plans from the ONNX, a CUDA graph per shape: TensorRT vs eager on the tiny model (fp32; TF32 allowed)."""
    from vidrd_rt.runtime.weights import ModelSource, load_model

    model = load_model(ModelSource(model="tiny", random_weights=True), torch.float32, "cuda")
    folder = tmp_path / "trt"
    summary = build_engines(model, "tensorrt", folder, SHAPES, "cuda")
    assert summary["built"] == ["unet", "decoder", "text_encoder"]
    assert {"unet.plan", "decoder.plan", "timing.cache"} <= {p.name for p in folder.iterdir()}
    denoise, decode = make_backends(model, RuntimeConfig(device="cuda", backend="tensorrt", engine_dir=str(folder)))
    spec = specs_for(model.config, SHAPES)["unet"]
    for seed in (0, 1):  # the first call captures the CUDA graph, the second replays it on new inputs
        inputs = [t.to("cuda") for t in spec.sample_inputs(seed=seed)]
        with torch.inference_mode():
            ref = model.unet(*inputs)
        assert rel(denoise(*inputs), ref) < 1e-2
    assert build_engines(model, "tensorrt", folder, SHAPES, "cuda")["built"] == []
