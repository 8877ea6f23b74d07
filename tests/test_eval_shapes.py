"""`bench/eval_shapes.py` on frames drawn here with numpy (anti-aliased shapes over grey and tinted striped
backgrounds), plus one end-to-end `run_eval` with the tiny random model (structure only, not the values)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vidrd_rt.bench import eval_shapes as ev
from vidrd_rt.runtime.config import ConfigError
from vidrd_rt.runtime.weights import ModelSource
from vidrd_rt.training.vocab import COLOURS, DIRECTIONS

SIZE = 64


def background(kind: str, seed: int = 0) -> np.ndarray:
    """float [H, W, 3] in [0, 1]: flat grey, or 4-px vertical stripes of two weakly tinted greys; mild noise."""
    if kind == "grey":
        bg = np.full((SIZE, SIZE, 3), 0.5)
    else:
        stripe = (np.arange(SIZE) // 4) % 2 == 0  # [W]
        bg = np.where(stripe[None, :, None], [0.36, 0.33, 0.30], [0.66, 0.64, 0.70]) * np.ones((SIZE, 1, 1))
    noise = np.random.default_rng(seed).normal(0, 0.015, bg.shape)
    return np.clip(bg + noise, 0, 1)


def coverage(shape: str, cx: float, cy: float, radius: float = 6.0) -> np.ndarray:
    """float [H, W] in [0, 1]: an anti-aliased disc or square centred at (cx, cy)."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    if shape == "circle":
        distance = np.hypot(xs - cx, ys - cy)
    else:
        distance = np.maximum(np.abs(xs - cx), np.abs(ys - cy))
    return np.clip(radius + 0.5 - distance, 0.0, 1.0)


def render(colour: str, shape: str, centres, bg: str = "grey") -> np.ndarray:
    """uint8 [F, H, W, 3]: one object of a COLOURS colour at each centre over a static background."""
    base, rgb = background(bg), np.array(COLOURS[colour])
    frames = [base * (1 - a[..., None]) + rgb * a[..., None] for a in (coverage(shape, x, y) for x, y in centres)]
    return (np.stack(frames) * 255).round().astype(np.uint8)


def straight_path(direction: str, frames: int = 12, speed: float = 1.5, start=None):
    """Centres moving `speed` px/frame in a DIRECTIONS direction, centred in the frame."""
    dx, dy = DIRECTIONS[direction]
    travel = speed * (frames - 1)
    x0, y0 = start or (SIZE / 2 - dx * travel / 2, SIZE / 2 - dy * travel / 2)
    return [(x0 + dx * speed * t, y0 + dy * speed * t) for t in range(frames)]


##### colour and direction


@pytest.mark.parametrize("bg", ["grey", "striped"])
@pytest.mark.parametrize("colour", list(COLOURS))
def test_colour_and_direction_of_rendered_shapes(colour, bg):
    for i, direction in enumerate(DIRECTIONS):
        video = render(colour, ("circle", "square")[i % 2], straight_path(direction), bg)
        mask = ev.object_mask(video)
        assert 0 < mask.sum() < 0.2 * mask.size  # the object, not the background
        assert ev.classify_colour(video[mask]) == colour, (direction, bg)
        assert ev.direction_of(ev.centroid_track(video)) == direction, (colour, bg)


def test_track_follows_the_centre():
    centres = straight_path("right", frames=6, speed=2.0)
    track = ev.centroid_track(render("blue", "circle", centres, "striped"))
    np.testing.assert_allclose(track, np.array(centres) - 0.5, atol=0.3)  # pixel (i, j) is centred on (j, i)


def test_background_alone_is_no_object():
    video = np.stack([(background(kind) * 255).astype(np.uint8) for kind in ("grey", "striped")])
    mask = ev.object_mask(video)
    assert not mask.any()
    assert ev.classify_colour(video[mask]) is None
    assert np.isnan(ev.centroid_track(video)).all()
    assert ev.direction_of(ev.centroid_track(video)) is None


def test_hue_distance_wraps_around_red():
    magenta_red = np.array([[250, 10, 40]] * 30, dtype=np.uint8)  # hue ~352.5 degrees
    assert ev.classify_colour(magenta_red) == "red"
    assert ev.classify_colour(magenta_red[:5]) is None  # too few pixels


def test_a_still_object_has_no_direction():
    video = render("green", "square", [(30.0, 30.0)] * 8)
    assert ev.direction_of(ev.centroid_track(video)) is None


def test_direction_ignores_missing_frames_and_glitches():
    track = np.array(straight_path("up", frames=10, speed=1.0))
    track[3] = np.nan
    track[6] = [60.0, 60.0]  # a detection glitch: two long steps, both ignored
    assert ev.direction_of(track) == "up"
    assert ev.direction_of(track[:1]) is None


##### clip structure


def test_boundary_pairs_all_frames_and_drop_overlap():
    assert ev.clip_spans(3, 8, 2, False) == [(0, 8), (8, 16), (16, 24)]
    assert ev.boundary_pairs(3, 8, 2, False) == [(7, 8), (15, 16)]
    assert ev.clip_spans(3, 8, 2, True) == [(0, 8), (8, 14), (14, 20)]
    assert ev.boundary_pairs(3, 8, 2, True) == [(7, 8), (13, 14)]
    assert ev.boundary_pairs(4, 16, 4, True) == [(15, 16), (27, 28), (39, 40)]
    assert ev.boundary_pairs(3, 8, 0, True) == ev.boundary_pairs(3, 8, 0, False) == [(7, 8), (15, 16)]
    assert ev.boundary_pairs(1, 8, 2, True) == []
    assert ev.boundary_pairs(3, 4, 4, True) == []  # later clips add no frames at all


def test_clips_in_inverts_the_spans():
    for drop in (False, True):
        for clips in (1, 2, 5):
            frames = ev.clip_spans(clips, 16, 4, drop)[-1][1]
            assert ev.clips_in(frames, 16, 4, drop) == clips
    with pytest.raises(ValueError):
        ev.clips_in(30, 16, 4, True)


##### smoothness


def clip_video(drop: bool, jump: float, N: int = 8, M: int = 2, clips: int = 3, speed: float = 1.2):
    """A video with the clip structure of (clips, N, M, drop): the object moves right at `speed` px/frame; each
    later clip's frames are shifted by a further `jump` px (0: one smooth motion)."""
    spans = ev.clip_spans(clips, N, M, drop)
    total = spans[-1][1]
    xs = 8 + speed * np.arange(total)
    for k, (a, _) in enumerate(spans):
        xs[a:] += jump if k else 0.0
    return render("orange", "circle", [(x, 32.0) for x in xs], "striped")


@pytest.mark.parametrize("drop", [False, True])
def test_smooth_video_has_boundary_ratio_about_one(drop):
    score = ev.score_video(clip_video(drop, 0.0), "orange", "right", 8, 2, drop)
    assert score["clips"] == 3 and len(score["per_clip"]) == 3
    assert score["colour_ok"] == score["direction_ok"] == 1.0
    assert score["first_colour_ok"] and score["first_direction_ok"]
    assert 0.8 < score["frame_diff"]["ratio"] < 1.25
    assert 0.8 < score["centroid_step"]["ratio"] < 1.25
    assert score["along_direction"]["boundary"] > 0


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("jump", [8.0, -6.0])
def test_jump_at_the_boundary_gives_a_large_ratio(drop, jump):
    score = ev.score_video(clip_video(drop, jump), "orange", "right", 8, 2, drop)
    assert score["frame_diff"]["ratio"] > 2.0
    assert score["centroid_step"]["ratio"] > 3.0
    assert score["centroid_step"]["boundary"] == pytest.approx(abs(jump + 1.2), abs=0.3)
    assert math.copysign(1, score["along_direction"]["boundary"]) == math.copysign(1, jump)
    assert score["direction_ok"] == 1.0  # the seams do not confuse the per-clip direction


def test_seams_with_room_split_edge_restarts_from_sampling_jumps():
    score = ev.score_video(clip_video(False, 8.0), "orange", "right", 8, 2, False)
    assert score["seams"]["has_room"] == [True, True]  # x ends near 37 of 64: room for 8 more frames at 1.2 px
    assert score["seams"]["jumps"] == pytest.approx([9.2, 9.2], abs=0.3)
    # Near the right edge, moving right leaves 3 px of room and moving left 60 px.
    assert ev.room_ahead(np.array([[60.0, 32.0], [61.0, 32.0]]), [(0, 1)], "right", 64, 64)[0] == pytest.approx(3.0)
    assert ev.room_ahead(np.array([[60.0, 32.0], [61.0, 32.0]]), [(0, 1)], "left", 64, 64)[0] == 60.0
    edge = ev.seams_with_room(np.array([[55.0, 32.0], [56.0, 32.0], [10.0, 32.0]]), [(1, 2)], "right", 64, 64,
                              new_frames=8, within_step=1.0)
    assert edge == {"jumps": [46.0], "has_room": [False]}
    rows = ev.summarise(ev.EvalConfig("x"), [score, dict(score, seams=edge)])
    assert rows["seams_with_room"] == pytest.approx(2 / 3)
    assert rows["centroid_step_boundary_room"] == pytest.approx(9.2, abs=0.3)  # the edge restart is left out
    assert rows["centroid_step_ratio_room"] == pytest.approx(rows["centroid_step_boundary_room"] / 1.2, rel=0.1)


def test_near_seam_window_catches_a_jump_moved_past_a_copied_seam_frame():
    # Clip 0 ends at x = 10; the seam pair is a copy (x = 10 again), then the new clip jumps to 20 and moves on.
    track = np.array([[8.0, 5.0], [9.0, 5.0], [10.0, 5.0], [10.0, 5.0], [20.0, 5.0], [21.0, 5.0]])
    assert ev.near_seam(track, [(2, 3)], overlap=1) == {"max": [10.0], "away": 1.0, "profile": [[0.0, 10.0]]}
    assert ev.near_seam(track, [(2, 3)], overlap=0)["max"] == [0.0]  # the seam pair alone sees no jump
    score = ev.score_video(clip_video(False, 8.0), "orange", "right", 8, 2, False)
    assert score["near_seam"]["max"] == pytest.approx([9.2, 9.2], abs=0.3)
    assert score["near_seam"]["away"] == pytest.approx(1.2, abs=0.1)
    row = ev.summarise(ev.EvalConfig("x"), [score])
    assert row["near_seam_ratio"] == pytest.approx(9.2 / 1.2, rel=0.1)


def test_torus_mode_measures_positions_and_steps_around_the_frame():
    # A circle crossing the right edge: centred at x = 62, 63.5, 1, 2.5 (mod 64), split across the edge.
    centres = [(62.0, 30.0), (63.5, 30.0), (65.0, 30.0), (66.5, 30.0)]
    base, rgb = background("grey"), np.array(COLOURS["red"])
    frames = []
    for x, y in centres:
        a = np.maximum(coverage("circle", x, y), coverage("circle", x - SIZE, y))  # the shape and its copy
        frames.append(base * (1 - a[..., None]) + rgb * a[..., None])
    video = (np.stack(frames) * 255).round().astype(np.uint8)
    wrap = (SIZE, SIZE)
    track = ev.centroid_track(video, wrap=wrap)
    # Pixel indices: a centre at x sits at index x - 0.5.
    assert track[:, 0] == pytest.approx([61.5, 63.0, 0.5, 2.0], abs=0.15)
    assert track[:, 1] == pytest.approx([29.5] * 4, abs=0.15)
    assert ev.centroid_steps(track, wrap) == pytest.approx([1.5] * 3, abs=0.2)
    assert ev.along_steps(track, "right", wrap) == pytest.approx([1.5] * 3, abs=0.2)
    assert ev.direction_of(track, wrap=wrap) == "right"
    plain = ev.centroid_track(video)  # the plain mode averages the two halves: a blob sliding the wrong way
    assert ev.centroid_steps(plain).min() > 5 and ev.direction_of(plain, max_jump=10) == "left"
    # No edge on a torus: every seam has room.
    assert ev.room_ahead(track, [(1, 2)], "right", SIZE, SIZE, wrap)[0] == np.inf
    score = ev.score_video(video, "red", "right", 4, 0, False, clips=1, torus=True)
    assert score["first_direction_ok"] and score["centroid_step"]["within"] == pytest.approx(1.5, abs=0.2)


def test_model_world_reads_the_training_record(tmp_path):
    assert ev.model_world(ModelSource(model="tiny", random_weights=True)) == "plain"
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "training.json").write_text(json.dumps({"train_config": {"wrap": True}}))
    assert ev.model_world(ModelSource(model=str(folder))) == "torus"
    (folder / "training.json").write_text(json.dumps({"stages": [{"train_config": {"wrap": True}},
                                                                 {"train_config": {}}]}))
    assert ev.model_world(ModelSource(model=str(folder))) == "plain"  # the last stage decides
    (folder / "training.json").write_text(json.dumps({"stages": []}))
    assert ev.model_world(ModelSource(model=str(folder))) == "plain"
    (folder / "training.json").unlink()
    assert ev.model_world(ModelSource(model=str(folder))) == "plain"


def test_single_clip_has_no_boundary_ratio():
    score = ev.score_video(clip_video(False, 0.0, clips=1), "orange", "right", 8, 2, False)
    assert score["frame_diff"]["boundary"] is None and score["frame_diff"]["ratio"] is None
    assert score["frame_diff"]["within"] > 0


def test_ablation_rows_say_what_they_switch_off():
    rows = {c.name: c for c in ev.ablation_configs()}
    assert len(rows) == len(ev.ablation_configs())  # names unique
    assert (rows["independent"].overlap, rows["independent"].alpha) == (0, 0.0)
    assert (rows["fnr"].alpha, rows["fnr"].beta) == (0.0, 0.0)
    assert rows["fnr+pns"].beta == 0.0 and rows["fnr+pns"].alpha > 0
    assert {c.name for c in ev.ablation_configs(quick=True)} <= set(rows)
    assert len({p[0] for p in ev.eval_prompts(quick=True)}) == len(COLOURS)
    assert len({p[2] for p in ev.eval_prompts(quick=True)}) == len(DIRECTIONS)


##### end to end


def _numbers_ok(value) -> bool:
    if isinstance(value, dict):
        return all(_numbers_ok(v) for v in value.values())
    if isinstance(value, list):
        return all(_numbers_ok(v) for v in value)
    return value is None or not isinstance(value, float) or math.isfinite(value)


def test_bad_rows_fail_before_loading(tmp_path):
    source = ModelSource(model="no-such-folder")  # would fail to load; the row check must come first
    with pytest.raises(ConfigError, match="overlap"):
        ev.run_eval(source, [ev.EvalConfig("m8", overlap=8)], ev.eval_prompts(True)[:1], clips=2, seed=0,
                    device="cpu", dtype="fp32", out_json=tmp_path / "x.json", frames=6, steps=2)
    with pytest.raises(ConfigError, match="unknown eval config"):
        ev.configs_by_name(["fnr", "nope"])
    assert not (tmp_path / "x.json").exists()


def test_run_eval_tiny_random_model(tmp_path, one_thread):
    # Four rows cover the code paths (M = 0, the default, drop_overlap, the other decoder); each costs
    # 2 prompts x 2 clips x 2 steps UNet calls.
    rows = {c.name: c for c in ev.ablation_configs()}
    configs = [rows[n] for n in ("independent", "fnr+pns+dsg", "fnr+pns+dsg/drop-overlap",
                                 "fnr+pns+dsg/per-frame-decoder")]
    prompts = ev.eval_prompts(quick=True)[:2]
    out = tmp_path / "eval.json"
    ev.run_eval(ModelSource(model="tiny", random_weights=True), configs, prompts, clips=2, seed=0, device="cpu",
                dtype="fp32", out_json=out, out_md=tmp_path / "eval.md", frames=5, steps=2)
    doc = json.loads(out.read_text())  # strict JSON: no NaN
    assert doc["schema"] == ev.SCHEMA and doc["setting"]["frames"] == 5 and len(doc["setting"]["prompts"]) == 2
    assert [r["name"] for r in doc["rows"]] == [c.name for c in configs]
    for row in doc["rows"]:
        assert len(row["videos"]) == 2 and all(len(v["per_clip"]) == 2 for v in row["videos"])
        for key in ("colour_acc", "direction_acc", "frame_diff_within", "frame_diff_boundary", "frame_diff_ratio",
                    "centroid_step_within", "centroid_step_boundary", "centroid_step_ratio", "seams_with_room",
                    "centroid_step_ratio_room", "near_seam_max", "near_seam_away", "near_seam_ratio"):
            assert key in row
        assert row["frame_diff_within"] is not None and row["frame_diff_boundary"] is not None
        assert _numbers_ok(row)
    table = [line for line in (tmp_path / "eval.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(configs)
    assert [line.split("|")[1].strip() for line in table[2:]] == [c.name for c in configs]


def test_eval_command_writes_json_and_markdown(tmp_path, capsys):
    from conftest import run_cli

    out = tmp_path / "eval.json"
    args = ["eval", "--model", "tiny", "--random-weights", "--rows", "independent,fnr+pns+dsg", "--prompts", "quick",
            "--clips", "2", "--frames", "4", "--steps", "1", "--json", str(out)]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert [row["name"] for row in doc["rows"]] == ["independent", "fnr+pns+dsg"]
    assert len(doc["rows"][0]["videos"]) == 6
    assert out.with_suffix(".md").read_text().count("\n| fnr+pns+dsg |") == 1


def test_eval_command_rejects_bad_choices(tmp_path, capsys):
    from conftest import run_cli

    code, _, err = run_cli(["eval", "--prompts", "some", "--json", str(tmp_path / "e.json")], capsys)
    assert code == 2 and "--prompts must be all or quick" in err and err.count("\n") == 1
    code, _, err = run_cli(["eval", "--rows", "nonsense", "--json", str(tmp_path / "e.json")], capsys)
    assert code == 2 and err.count("\n") == 1
    code, _, err = run_cli(["eval", "--world", "flat", "--json", str(tmp_path / "e.json")], capsys)
    assert code == 2 and "--world must be one of auto, plain, torus" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_forward_order_experiment_maps_frames_as_documented():
    from vidrd_rt.bench.overlap_order import last_frames, shifted_frames

    x = torch.arange(6.0).reshape(1, 1, 6, 1, 1)  # frame i holds the value i
    assert shifted_frames(x, 2).flatten().tolist() == [4, 5, 0, 1, 2, 3]  # new j <- old (j - 2) mod 6
    assert last_frames(x, 2).flatten().tolist() == [4, 5]
    assert shifted_frames(x, 2)[:, :, :2].equal(last_frames(x, 2))  # the head PNS keeps is the head DSG writes


@torch.no_grad()
def test_continuation_guidance_experiment_is_the_sampler_at_weight_zero(one_thread):
    """bench/continuation_guidance.py: at w_r = 0 its loop gives the sampler's clips bit for bit, and so does the
    guided branch at a negligible w_r (its eps, x0 and DDIM update are the sampler's); at w_r > 0 the first clip (no
    predecessor) is unchanged and later clips move."""
    from conftest import fresh_tiny

    from vidrd_rt.bench.continuation_guidance import make_guided_sampler
    from vidrd_rt.runtime.config import RuntimeConfig, SamplerConfig
    from vidrd_rt.runtime.noise import TorchNoise
    from vidrd_rt.runtime.pipeline import VideoPipeline
    from vidrd_rt.runtime.sampler import sample_clip

    model = fresh_tiny()
    pipeline = VideoPipeline(model, RuntimeConfig())
    cfg = SamplerConfig(clips=2, frames=4, overlap=2, steps=3, guidance=5.0, seed=1)
    table, _ = pipeline.step_for(cfg)
    context = torch.randn(2, 77, model.config.unet.cross_attention_dim, generator=torch.Generator().manual_seed(2))

    def clips(sample) -> list[torch.Tensor]:
        state = pipeline.new_state(cfg, model.config.height, model.config.width)
        noise = TorchNoise(cfg.seed)
        return [sample(pipeline.denoise, table, state, context, cfg, noise) for _ in range(cfg.clips)]

    reference = clips(sample_clip)
    assert all(torch.equal(a, b) for a, b in zip(clips(make_guided_sampler(0.0, None)), reference))
    assert all(torch.equal(a, b) for a, b in zip(clips(make_guided_sampler(1e-12, None)), reference))
    guided = clips(make_guided_sampler(5.0, None))
    assert torch.equal(guided[0], reference[0])
    assert (guided[1][:, :, 2:] - reference[1][:, :, 2:]).abs().max() > 1e-3
