"""The generate job on the tiny model: replay, streaming memory, resume, real video files, interruption."""

from __future__ import annotations

import dataclasses
import os

import av
import numpy as np
import pytest
from conftest import StopAfter, rss_mb

from vidrd_rt.runtime.config import RuntimeConfig, SamplerConfig
from vidrd_rt.runtime.generate import GenerateRequest, Interrupted, generate
from vidrd_rt.runtime.noise import TorchNoise
from vidrd_rt.runtime.pipeline import VideoPipeline, encode_prompt
from vidrd_rt.runtime.video_io import run_dir_for
from vidrd_rt.runtime.weights import ModelSource

TINY = ModelSource(model="tiny", random_weights=True)
FAST = SamplerConfig(clips=3, frames=6, overlap=2, steps=3, seed=5)


def _request(out, **changes) -> GenerateRequest:
    base = GenerateRequest(prompt="a red circle moving right", out=str(out), sampler=FAST, runtime=RuntimeConfig(),
                           source=TINY)
    return dataclasses.replace(base, **changes)


def _video(pipeline, context, sampler, noise=None, **kw):
    state = pipeline.new_state(sampler, 64, 64)
    return [c.frames for c in pipeline.clips(context, sampler, state, noise or TorchNoise(sampler.seed), **kw)]


def test_recorded_run_replays_exactly(tiny_model):
    """Precomputed prompt embeddings + the seed are all a run depends on."""
    pipeline = VideoPipeline(tiny_model, RuntimeConfig())
    recorded_context = encode_prompt(tiny_model, "a blue square", "blurry").clone()
    first = _video(pipeline, recorded_context, FAST)
    again = _video(pipeline, recorded_context, FAST)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    other_seed = _video(pipeline, recorded_context, dataclasses.replace(FAST, seed=6))
    assert not np.array_equal(first[0], other_seed[0])
    assert [len(f) for f in first] == [6, 6, 6]


def test_drop_overlap_leaves_out_the_prompted_frames(tiny_model):
    pipeline = VideoPipeline(tiny_model, RuntimeConfig())
    context = encode_prompt(tiny_model, "a blue square")
    full = _video(pipeline, context, FAST)
    dropped = _video(pipeline, context, FAST, drop_overlap=True)
    assert [len(f) for f in dropped] == [6, 4, 4]
    assert np.array_equal(dropped[1], full[1][2:])


def test_per_frame_decoder_differs_from_temporal(tiny_model):
    context = encode_prompt(tiny_model, "a blue square")
    temporal = _video(VideoPipeline(tiny_model, RuntimeConfig()), context, FAST)
    per_frame = _video(VideoPipeline(tiny_model, RuntimeConfig(decoder="per-frame")), context, FAST)
    assert not np.array_equal(temporal[0], per_frame[0])


def test_mp4_decodes_back_with_expected_frames(tmp_path):
    summary = generate(_request(tmp_path / "v.mp4"))
    with av.open(summary["out"]) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 18 and frames[0].shape == (64, 64, 3)
    assert not os.path.exists(run_dir_for(summary["out"]))  # finished runs leave no resume folder


def test_npy_output_matches_pipeline_frames(tmp_path, tiny_model):
    generate(_request(tmp_path / "v.npy"))
    video = np.load(tmp_path / "v.npy")
    pipeline = VideoPipeline(tiny_model, RuntimeConfig())
    expected = np.concatenate(_video(pipeline, encode_prompt(tiny_model, "a red circle moving right"), FAST))
    assert video.dtype == np.uint8 and np.array_equal(video, expected)





@pytest.mark.parametrize("suffix", ["mp4", "npy"])
def test_resume_equals_uninterrupted_run(tmp_path, suffix):
    sampler = dataclasses.replace(FAST, clips=4)
    whole = generate(_request(tmp_path / f"whole.{suffix}", sampler=sampler))
    out = tmp_path / f"cut.{suffix}"
    with pytest.raises(Interrupted):
        generate(_request(out, sampler=sampler), on_clip=StopAfter(2))
    assert os.path.isfile(out)  # the interrupted output is already a valid, complete file of 2 clips
    partial = np.load(out) if suffix == "npy" else None
    assert partial is None or len(partial) == 12
    generate(_request(out, sampler=sampler, resume=True))
    assert (tmp_path / f"whole.{suffix}").read_bytes() == out.read_bytes()
    assert whole["frames"] == 24


def test_resume_refuses_a_different_run(tmp_path):
    out = tmp_path / "v.npy"
    with pytest.raises(Interrupted):
        generate(_request(out), on_clip=StopAfter(1))
    from vidrd_rt.runtime.errors import UserError

    with pytest.raises(UserError, match="different run"):
        generate(_request(out, prompt="something else", resume=True))
    with pytest.raises(UserError, match="nothing to resume"):
        generate(_request(tmp_path / "other.npy", resume=True))





def test_memory_flat_from_3_to_200_clips(tmp_path):
    """Host memory after clip 200 is what it was after the first few: nothing grows with the clip count."""
    rss = []
    sampler = SamplerConfig(clips=200, frames=4, overlap=2, steps=1, seed=1)
    generate(_request(tmp_path / "long.npy", sampler=sampler), on_clip=lambda clip: rss.append(rss_mb()))
    early, late = max(rss[2:20]), max(rss[150:])
    assert late - early < 16, f"RSS grew from {early:.1f} MB to {late:.1f} MB"
    assert np.load(tmp_path / "long.npy", mmap_mode="r").shape == (800, 64, 64, 3)
