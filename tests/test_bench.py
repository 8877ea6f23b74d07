"""`vidrd-rt bench` on the CPU with the tiny model: the result files and their schema, never the timings' values."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from vidrd_rt import cli
from vidrd_rt.bench import report
from vidrd_rt.bench.ladder import parse_ladder
from vidrd_rt.bench.metrics import Sample, Sampler
from vidrd_rt.bench.passes import _step_stats
from vidrd_rt.runtime.config import ConfigError

TINY_BENCH = ["bench", "--model", "tiny", "--random-weights", "--device", "cpu", "--clips", "2", "--steps", "2",
              "--frames", "4", "--overlap", "1", "--warmup-clips", "1", "--stage-clips", "1", "--peak-size", "128"]
NUMBERS = ["load_s", "build_s", "warmup_s", "first_clip_s", "clip_s", "clip_step_ms", "fps_steady", "fps_total",
           "text_encoder_ms", "unet_call_ms", "step_ms", "decode_ms", "encode_ms", "flops_per_clip_step",
           "achieved_tflops", "peak_tflops", "mfu", "unet_ms_per_clip_step"]


def run_cli(args: list[str]) -> int:
    old = sys.argv
    sys.argv = ["vidrd-rt", *args]
    try:
        cli.main()
        return 0
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = old


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One 2-row ladder (the authors' configuration and fp32 with the temporal decoder) plus a skipped row."""
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    code = run_cli([*TINY_BENCH, "--ladder", "authors,fp32,ort", "--json", str(out)])
    return code, out


def test_bench_writes_json_md_png(bench_run, capsys):
    code, out = bench_run
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == report.SCHEMA
    assert doc["setting"]["model"] == "tiny" and doc["setting"]["steps"] == 2 and doc["setting"]["height"] == 64
    assert [r["name"] for r in doc["rows"]] == ["authors", "torch-fp32", "onnxruntime-fp16"]
    authors, fp32, ort = doc["rows"]
    assert (authors["backend"], authors["dtype"], authors["decoder"], authors["inflight"]) == \
        ("torch", "fp32", "per-frame", 1)
    assert fp32["decoder"] == "temporal"
    for row in doc["rows"]:
        assert list(row)[:len(report.ROW_FIELDS)] == list(report.ROW_FIELDS)
    for row in (authors, fp32):
        assert row["status"] == "ok" and row["clips"] == 2 and row["command"].startswith("vidrd-rt bench")
        for key in NUMBERS:
            assert isinstance(row[key], (int, float)) and row[key] > 0, (row["name"], key, row[key])
    assert authors["fps_vs_authors"] == 1.0 and authors["authors_ref"] == "authors"
    assert fp32["fps_vs_authors"] == fp32["fps_steady"] / authors["fps_steady"]
    assert ort["status"] == "skipped" and "--engine-dir" in ort["reason"]
    run = doc["runs"][0]
    assert run["flops_per_clip_step"] > 0 and run["matmul_peak_tflops"]["fp32"] > 0
    md = out.with_suffix(".md").read_text()
    assert "| authors | torch | fp32 | per-frame |" in md and "onnxruntime-fp16: skipped" in md
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.size[0] > 0 and image.size[1] > 0
    assert "bench done" in out.with_suffix(".log").read_text()


def test_merge_replaces_rows_by_name_and_refuses_other_settings(bench_run, tmp_path, capsys):
    _, out = bench_run
    doc = json.loads(out.read_text())
    other = json.loads(out.read_text())
    other["runs"][0]["id"] = "later"
    other["rows"] = [dict(doc["rows"][1], run="later", fps_steady=2 * doc["rows"][1]["fps_steady"])]
    part = tmp_path / "part.json"
    part.write_text(json.dumps(other))
    merged_path = tmp_path / "merged.json"
    assert run_cli(["bench", "--merge", str(out), "--merge", str(part), "--json", str(merged_path)]) == 0
    merged = json.loads(merged_path.read_text())
    assert [r["name"] for r in merged["rows"]] == ["authors", "torch-fp32", "onnxruntime-fp16"]
    assert merged["rows"][1]["fps_vs_authors"] == pytest.approx(2 * doc["rows"][1]["fps_vs_authors"])
    assert {r["id"] for r in merged["runs"]} == {doc["runs"][0]["id"], "later"}
    assert merged_path.with_suffix(".png").is_file() and merged_path.with_suffix(".md").is_file()
    other["setting"]["steps"] = 50
    part.write_text(json.dumps(other))
    capsys.readouterr()
    assert run_cli(["bench", "--merge", str(out), "--merge", str(part), "--json", str(merged_path)]) == 2
    assert "setting 'steps' differs" in capsys.readouterr().err


def test_readme_explains_every_column():
    readme = (Path(__file__).resolve().parents[1] / "bench" / "README.md").read_text()
    assert [key for key in report.ROW_FIELDS if f"| `{key}` |" not in readme] == []


def test_pillow_plot_without_matplotlib(bench_run):
    doc = json.loads(bench_run[1].read_text())
    png = report._plot_pillow(*report._series(doc))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_ladder_spec():
    rows = parse_ladder("authors,fp16,compiled,wavefront,bf16:decoder=per-frame,trt:name=engine", "cuda",
                        ks=(2, 4))
    assert [r.name for r in rows] == ["authors", "torch-fp16", "compiled-fp16", "compiled-fp16-k2",
                                      "compiled-fp16-k4", "torch-bf16-per-frame", "engine"]
    assert rows[0].runtime.dtype == "fp32" and rows[0].runtime.decoder == "per-frame"
    assert rows[4].runtime.inflight == 4 and rows[6].runtime.backend == "tensorrt"
    assert [r.name for r in parse_ladder("authors,fp16,compiled", "cpu", backends=("compiled",))] == \
        ["compiled-fp16"]
    both = parse_ladder("compiled,compiled:compile_decoder=no", "cuda")
    assert [r.name for r in both] == ["compiled-fp16", "compiled-fp16-eager-decoder"]
    assert [r.runtime.compile_decoder for r in both] == [True, False]
    assert rows[1].runtime.cudnn_benchmark is False
    assert parse_ladder("fp16:cudnn_benchmark=yes", "cuda")[0].name == "torch-fp16-cudnn-benchmark"
    tuned = parse_ladder("compiled:coordinate_descent=yes,compiled:freezing=yes", "cuda")
    assert [r.name for r in tuned] == ["compiled-fp16-coordinate-descent", "compiled-fp16-frozen"]
    assert (tuned[0].runtime.coordinate_descent, tuned[0].runtime.freezing) == (True, False)
    assert (tuned[1].runtime.coordinate_descent, tuned[1].runtime.freezing) == (False, True)
    fast = parse_ladder("compiled:fuse_projections=yes,compiled:gemm_autotune=yes,fp16:fuse_projections=yes", "cuda")
    assert [r.name for r in fast] == ["compiled-fp16-fused-qkv", "compiled-fp16-gemm-autotune", "torch-fp16"]
    assert (fast[0].runtime.fuse_projections, fast[0].runtime.gemm_autotune) == (True, False)
    assert (fast[1].runtime.fuse_projections, fast[1].runtime.gemm_autotune) == (False, True)
    assert (rows[2].runtime.fuse_projections, rows[2].runtime.gemm_autotune) == (False, False)  # the defaults
    assert fast[0].fields()["fuse_projections"] is True  # a column of the result rows
    for bad in ("warp", "fp16:colour=red", "fp16,fp16", "fp16:k=two", "compiled:compile_decoder=maybe"):
        with pytest.raises(ConfigError):
            parse_ladder(bad, "cpu")


@pytest.mark.parametrize("args, message", [
    (["--ladder", "nope"], "unknown row 'nope'"),
    (["--device", "cuda"], "no CUDA device"),
    (["--k", "0"], "--k takes whole numbers"),
])
def test_bad_input_is_one_line(args, message, tmp_path, capsys):
    code = run_cli([*TINY_BENCH, *args, "--json", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "x.json").exists()


def test_step_stats_pair_each_step_with_its_unet_call():
    # Precondition: clip 0 steps at t = 0, 10, 20; UNet calls inside each interval of 7 and 8 seconds.
    marks = [(0, 0, 0.0), (0, 1, 10.0), (0, 2, 20.0)]
    calls = [(1.0, 7.0, 2), (11.0, 8.0, 2)]
    # Under test / Postcondition: steps of 10 s, overheads 3 and 2 s (medians).
    assert _step_stats(marks, calls) == (10.0, 2.5)
    assert _step_stats(marks, []) == (10.0, None)


def test_sampler_window_summarises_fake_readings():
    readings = iter(range(1000))

    def read():
        i = next(readings)
        return Sample(time.perf_counter(), 100.0 + i % 2, 50.0, 1000.0 + i)

    with Sampler(read, period_s=0.001) as sampler:
        while len(sampler.samples) < 5:
            time.sleep(0.005)
    stats = sampler.window(0.0, time.perf_counter())
    assert stats["nvml_samples"] >= 5 and 100.0 <= stats["power_mean_w"] <= 101.0 and stats["util_max_pct"] == 50.0
    assert sampler.window(-2.0, -1.0) == {}
