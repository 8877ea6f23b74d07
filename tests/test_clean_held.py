"""SamplerConfig.held_frames "clean": per-frame timesteps in the UNet, the sampler holding the previous clip's
finished frames at timestep 0, the checks that keep it off the wavefront/engines, the training layout that teaches
it, the near-seam profile of the eval, and the CLI flag. Real tiny models throughout (CPU, fp32)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import fresh_tiny, run_cli

from vidrd_rt import cli
from vidrd_rt.bench import eval_shapes as ev
from vidrd_rt.runtime.backends import TorchDenoiser
from vidrd_rt.runtime.config import ConfigError, RuntimeConfig, SamplerConfig
from vidrd_rt.runtime.ddim import DDIMTable, alphas_cumprod
from vidrd_rt.runtime.noise import TorchNoise
from vidrd_rt.runtime.pipeline import VideoPipeline, check_held_frames, encode_prompt
from vidrd_rt.runtime.reuse import reversed_head
from vidrd_rt.runtime.sampler import ClipState, sample_clip
from vidrd_rt.runtime.text_encoder import tokenize
from vidrd_rt.training import train as tr

N, M, STEPS = 4, 2, 3
CLEAN = SamplerConfig(clips=3, frames=N, overlap=M, alpha=2.0, beta=0.6, steps=STEPS, guidance=7.5, seed=3,
                      held_frames="clean")
NOISY = dataclasses.replace(CLEAN, held_frames="noisy")


class Recorder:
    """The real denoiser, passing through; keeps a copy of every (sample, timestep) it is called with."""

    def __init__(self, denoise):
        self.denoise, self.calls = denoise, []

    def __call__(self, sample, timestep, context):
        self.calls.append((sample.clone(), timestep.clone()))
        return self.denoise(sample, timestep, context)


@pytest.fixture(scope="module")
def parts(tiny_model):
    """(denoiser, DDIM table, CFG context) of the tiny random model."""
    table = DDIMTable.build(tiny_model.config.scheduler, STEPS, "cpu")
    context = encode_prompt(tiny_model, "a red circle moving right")
    return TorchDenoiser(tiny_model, RuntimeConfig()), table, context


def _state(cfg):
    return ClipState.for_config(cfg, 1, 4, 8, 8, "cpu", torch.float32)


def _video(parts, cfg, clips=3, denoise=None, state=None, noise=None):
    default, table, context = parts
    state = state or _state(cfg)
    noise = noise or TorchNoise(cfg.seed)
    return [sample_clip(denoise or default, table, state, context, cfg, noise) for _ in range(clips)], state


########## UNet: one timestep per frame


@torch.no_grad()
def test_unet_uniform_per_frame_timesteps_equal_per_clip_timesteps(tiny_model, unet_inputs, one_thread):
    sample, t, context = unet_inputs  # t = [981, 401]: the two batch rows differ, so a frame-major fold would show
    per_clip = tiny_model.unet(sample, t, context)
    per_frame = tiny_model.unet(sample, t[:, None].expand(-1, sample.shape[2]), context)
    torch.testing.assert_close(per_frame, per_clip, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_unet_mixed_per_frame_timesteps_change_the_output(tiny_model, unet_inputs, one_thread):
    sample, t, context = unet_inputs
    uniform = t[:, None].expand(-1, sample.shape[2]).clone()
    mixed = uniform.clone()
    mixed[:, :3] = 0  # the first frames "clean"
    out_uniform, out_mixed = tiny_model.unet(sample, uniform, context), tiny_model.unet(sample, mixed, context)
    assert not torch.allclose(out_uniform, out_mixed, atol=1e-3)
    assert torch.isfinite(out_mixed).all()


########## Sampler


def test_clean_state_layout(parts):
    clean, noisy = _state(CLEAN), _state(NOISY)
    assert clean.prev_final_head.shape == (1, 4, M, 8, 8) and clean.prev_heads.shape[0] == 0
    assert noisy.prev_final_head is None and noisy.prev_heads.shape[0] > 0
    assert "prev_final_head" in clean.state_dict() and "prev_final_head" not in noisy.state_dict()


def test_clean_clips_start_with_the_previous_clips_finished_frames_reversed(parts, one_thread):
    clips, state = _video(parts, CLEAN)
    for k in (1, 2):
        assert torch.equal(clips[k][:, :, :M], clips[k - 1][:, :, N - M :].flip(2)), f"clip {k}"
        assert not torch.equal(clips[k][:, :, M:], clips[k - 1][:, :, M:])
    assert torch.equal(state.prev_final_head, reversed_head(clips[2], M))
    assert state.clips_done == 3 and all(torch.isfinite(c).all() for c in clips)


def test_clean_run_is_deterministic(parts, one_thread):
    first, _ = _video(parts, CLEAN)
    again, _ = _video(parts, CLEAN)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_unet_sees_held_frames_clean_at_timestep_zero(parts, one_thread):
    _, table, _ = parts
    recorder = Recorder(parts[0])
    clips, _ = _video(parts, CLEAN, clips=2, denoise=recorder)
    assert len(recorder.calls) == 2 * STEPS
    for i, (_, t) in enumerate(recorder.calls[:STEPS]):  # clip 0: one ordinary timestep per CFG row
        assert t.shape == (2,) and (t == table.timesteps[i]).all()
    held = torch.cat([reversed_head(clips[0], M)] * 2)  # [2B, C, M, h, w]: both CFG halves
    for i, (sample, t) in enumerate(recorder.calls[STEPS:]):  # clip 1: per-frame timesteps [2B, N]
        assert t.shape == (2, N)
        assert (t[:, :M] == 0).all() and (t[:, M:] == table.timesteps[i]).all(), (i, t)
        assert torch.equal(sample[:, :, :M], held), f"step {i}: held frames not the finished ones"


def test_clean_clip_0_matches_noisy_and_later_clips_differ(parts, one_thread):
    clean, _ = _video(parts, CLEAN, clips=2)
    noisy, _ = _video(parts, NOISY, clips=2)
    assert torch.equal(clean[0], noisy[0])  # clip 0 reads no state: the option changes nothing there
    assert not torch.allclose(clean[1], noisy[1], atol=1e-3)


def test_noisy_is_the_default_and_unchanged(parts, one_thread):
    unnamed = SamplerConfig(clips=3, frames=N, overlap=M, alpha=2.0, beta=0.6, steps=STEPS, guidance=7.5, seed=3)
    assert unnamed.held_frames == "noisy" and unnamed == NOISY
    a, _ = _video(parts, unnamed, clips=2)
    b, _ = _video(parts, NOISY, clips=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_bad_held_frames_is_a_config_error():
    with pytest.raises(ConfigError, match="--held-frames"):
        SamplerConfig(held_frames="bogus")


def test_clean_needs_a_state_allocated_for_it(parts):
    default, table, context = parts
    with pytest.raises(ConfigError, match="held_frames 'clean'"):
        sample_clip(default, table, _state(NOISY), context, CLEAN, TorchNoise(0))


def test_clean_state_dict_round_trip_resumes_exactly(parts, one_thread):
    state, noise = _state(CLEAN), TorchNoise(CLEAN.seed)
    _video(parts, CLEAN, clips=2, state=state, noise=noise)
    saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.state_dict().items()}
    saved_noise = noise.get_state()
    (third,), _ = _video(parts, CLEAN, clips=1, state=state, noise=noise)

    restored, other = _state(CLEAN), TorchNoise(999)
    restored.load_state_dict(saved)
    other.set_state(saved_noise)
    assert torch.equal(restored.prev_final_head, saved["prev_final_head"]) and restored.clips_done == 2
    (again,), _ = _video(parts, CLEAN, clips=1, state=restored, noise=other)
    assert torch.equal(again, third)


def test_loading_a_state_without_prev_final_head_raises(parts):
    saved = dict(_state(CLEAN).state_dict())
    del saved["prev_final_head"]
    with pytest.raises(ValueError, match="prev_final_head"):
        _state(CLEAN).load_state_dict(saved)
    with pytest.raises(ValueError, match="prev_heads"):  # a noisy run's state does not fit a clean one either
        _state(CLEAN).load_state_dict(_state(NOISY).state_dict())


def test_pipeline_clean_run_resumes_from_a_clip_snapshot(tiny_model, one_thread):
    pipeline = VideoPipeline(tiny_model, RuntimeConfig())
    context = encode_prompt(tiny_model, "a red circle")
    sampler = dataclasses.replace(CLEAN, clips=2)
    clips = list(pipeline.clips(context, sampler, pipeline.new_state(sampler, 64, 64), TorchNoise(sampler.seed)))
    snapshot = clips[0].resume
    assert snapshot["clip_state"]["clips_done"] == 1
    assert snapshot["clip_state"]["prev_final_head"].shape == (1, 4, M, 8, 8)
    state, noise = pipeline.new_state(sampler, 64, 64), TorchNoise(999)
    state.load_state_dict(snapshot["clip_state"])
    noise.set_state(snapshot["noise"])
    (resumed,) = list(pipeline.clips(context, sampler, state, noise))
    assert resumed.index == 1 and np.array_equal(resumed.frames, clips[1].frames)


########## Where clean may run


@pytest.mark.parametrize("runtime", [RuntimeConfig(backend="compiled"), RuntimeConfig(inflight=2)],
                         ids=["compiled", "inflight2"])
def test_check_held_frames_rejects_wavefront_and_other_backends(runtime):
    with pytest.raises(ConfigError, match="--held-frames clean"):
        check_held_frames(runtime, CLEAN)
    check_held_frames(runtime, NOISY)  # the paper's DSG runs anywhere


def test_check_held_frames_passes_torch_inflight_1():
    check_held_frames(RuntimeConfig(backend="torch", inflight=1), CLEAN)


def test_default_inflight_is_1_for_clean():
    assert cli.default_inflight("cuda", "torch", 8, "clean") == 1
    assert cli.default_inflight("cuda", "torch", 8, "noisy") == 4
    assert cli.default_inflight("cuda", "torch", 8) == 4


########## Training


def test_continuation_order():
    assert tr.continuation_order(16, 4) == [3, 2, 1, 0] + list(range(1, 13))
    assert tr.continuation_order(6, 0) == list(range(1, 7))  # M = 0: no held frames
    assert len(tr.continuation_order(16, 4)) == 16


def test_context_layout_reorders_the_first_share_of_clips():
    frames = torch.arange(16.0)
    video = (torch.arange(4.0)[:, None] * 100 + frames).view(4, 1, 16, 1, 1).expand(4, 3, 16, 2, 2).clone()
    out, held = tr.context_layout(video, 0.5, 4)
    order = torch.tensor(tr.continuation_order(16, 4))
    assert held.tolist() == [4, 4, 0, 0]
    for b in range(2):
        assert torch.equal(out[b], video[b].index_select(1, order))
    assert torch.equal(out[2:], video[2:])
    out, held = tr.context_layout(video, 0.5, 4, random_held=True, generator=torch.Generator().manual_seed(0))
    assert all(1 <= h <= 4 for h in held[:2].tolist()) and held[2:].tolist() == [0, 0]
    assert torch.equal(out[0], video[0].index_select(1, order))
    out, held = tr.context_layout(video, 0.0, 4)
    assert torch.equal(out, video) and held.tolist() == [0, 0, 0, 0]


def test_clip_errors_ignore_held_frames():
    g = torch.Generator().manual_seed(0)
    pred, noise = torch.randn(2, 4, 5, 3, 3, generator=g), torch.randn(2, 4, 5, 3, 3, generator=g)
    weights = torch.rand(2, 1, 5, 3, 3, generator=g) + 0.5
    keep = torch.ones(2, 1, 5, 1, 1)
    keep[0, :, :2] = 0
    for w in (None, weights):
        base = tr.clip_errors(pred, noise, w, keep)
        changed = pred.clone()
        changed[0, :, :2] += 10.0  # held frames of clip 0: outside the loss
        assert torch.equal(tr.clip_errors(changed, noise, w, keep), base)
        changed[0, :, 2] += 1.0  # a kept frame
        assert tr.clip_errors(changed, noise, w, keep)[0] != base[0]
    torch.testing.assert_close(tr.clip_errors(pred, noise, None, torch.ones(2, 1, 5, 1, 1)),
                               tr.clip_errors(pred, noise, None))


def test_diffusion_loss_with_held_frames_has_no_gradient_through_them(one_thread):
    model = fresh_tiny(seed=1)
    model.unet.requires_grad_(True)
    seen = {}

    def hook(module, args, out):
        out.retain_grad()
        seen.update(sample=args[0].detach(), steps=args[1], out=out)

    handle = model.unet.register_forward_hook(hook)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, N, 8, 8, generator=g)
    weights = torch.rand(2, 1, N, 8, 8, generator=g) + 0.5
    ids = tokenize(model.tokenizer, ["a red circle", "a blue square"])
    alphas = alphas_cumprod(model.config.scheduler)
    held = torch.tensor([M, 0])
    try:
        loss, gap = tr.diffusion_loss(model, latents, ids, alphas, 5.0, torch.Generator().manual_seed(1), weights,
                                      held=held)
        loss.backward()
    finally:
        handle.remove()
    assert gap is None and math.isfinite(loss.item())
    t = tr.training_timesteps(2, alphas.numel(), 0.0, torch.Generator().manual_seed(1), "cpu")  # as drawn inside
    assert t[0] > 0 and torch.equal(seen["steps"], torch.stack([torch.tensor([0] * M + [int(t[0])] * (N - M)),
                                                                 t[1].repeat(N)]))
    assert torch.equal(seen["sample"][0, :, :M], latents[0, :, :M])  # held frames given clean
    assert not torch.equal(seen["sample"][1, :, :M], latents[1, :, :M])
    grad = seen["out"].grad
    assert (grad[0, :, :M] == 0).all()  # their prediction (and so their noise target) is outside the loss
    assert (grad[0, :, M:] != 0).any() and (grad[1] != 0).all()
    assert all(torch.isfinite(p.grad).all() for p in model.unet.parameters() if p.grad is not None)


def test_diffusion_loss_with_no_held_frames_is_the_plain_loss(one_thread):
    model = fresh_tiny(seed=1)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, N, 8, 8, generator=g)
    ids = tokenize(model.tokenizer, ["a red circle", ""])
    alphas = alphas_cumprod(model.config.scheduler)
    with torch.no_grad():
        plain, _ = tr.diffusion_loss(model, latents, ids, alphas, 5.0, torch.Generator().manual_seed(1))
        zeros, _ = tr.diffusion_loss(model, latents, ids, alphas, 5.0, torch.Generator().manual_seed(1),
                                     held=torch.zeros(2, dtype=torch.long))
        some, _ = tr.diffusion_loss(model, latents, ids, alphas, 5.0, torch.Generator().manual_seed(1),
                                    held=torch.tensor([M, M]))
    assert torch.equal(plain, zeros) and plain.item() != some.item()


def test_train_config_context_defaults_are_the_paper():
    cfg = tr.TrainConfig(out="x")
    assert cfg.context_share == 0.0 and cfg.context_frames == 4 and cfg.context_random_held is False


########## Eval: near-seam profile


def _score(profile, within):
    """The least score_video dict that summarise reads."""
    return {"colour_ok": 1.0, "direction_ok": 1.0, "first_colour_ok": True, "first_direction_ok": True,
            "frame_diff": {"within": 1.0, "boundary": 1.0}, "centroid_step": {"within": within, "boundary": 1.0},
            "along_direction": {"within": 1.0, "boundary": 1.0}, "seams": {"jumps": [], "has_room": []},
            "near_seam": {"max": [max(v for v in p if math.isfinite(v)) for p in profile], "away": 1.0,
                          "profile": profile}}


def test_summarise_near_seam_profile_is_the_nan_mean_per_position():
    nan = math.nan
    a = _score([[1.0, 5.0, nan], [3.0, nan, 2.0]], within=2.0)
    b = _score([[2.0, 7.0, 4.0]], within=4.0)
    row = ev.summarise(ev.EvalConfig("x", overlap=2), [a, b])
    assert row["near_seam_profile"] == pytest.approx([2.0, 6.0, 3.0])
    assert row["worst_near_seam"] == pytest.approx(6.0)
    assert row["centroid_step_within"] == pytest.approx(3.0)
    assert row["worst_near_seam_ratio"] == pytest.approx(2.0)
    lost = _score([[nan, 5.0, 1.0]], within=1.0)  # the object never found at the seam pair: position 0 stays NaN
    row = ev.summarise(ev.EvalConfig("x", overlap=2), [lost])
    assert math.isnan(row["near_seam_profile"][0]) and row["near_seam_profile"][1:] == [5.0, 1.0]
    assert row["worst_near_seam"] == 5.0
    old = {**a, "near_seam": {"max": [5.0, 3.0], "away": 1.0}}  # a score written before the profile existed
    row = ev.summarise(ev.EvalConfig("x"), [old])
    assert row["near_seam_profile"] == [] and row["worst_near_seam"] is None and row["worst_near_seam_ratio"] is None


def test_near_seam_profile_of_a_rendered_jump():
    from test_eval_shapes import clip_video  # anti-aliased object moving right 1.2 px/frame, 3 clips of 8, M=2

    score = ev.score_video(clip_video(False, 8.0), "orange", "right", 8, 2, False)
    profile = score["near_seam"]["profile"]
    assert len(profile) == 2 and all(len(p) == 3 for p in profile)  # two seams, the seam pair and M after it
    for p in profile:
        assert p[0] == pytest.approx(9.2, abs=0.3) and p[1:] == pytest.approx([1.2, 1.2], abs=0.3)
    row = ev.summarise(ev.EvalConfig("x"), [score])
    assert row["worst_near_seam"] == pytest.approx(9.2, abs=0.3)
    assert row["worst_near_seam_ratio"] == pytest.approx(9.2 / 1.2, rel=0.1)


def test_clean_held_eval_rows():
    rows = ev.clean_held_configs()
    assert rows and all(r.held_frames == "clean" for r in rows)
    assert {r.name for r in rows} <= {c.name for c in ev.ablation_configs()}
    assert rows[0].sampler(SamplerConfig()).held_frames == "clean"
    assert ev.configs_by_name(["clean-held"])[0].sampler(SamplerConfig()).held_frames == "clean"


########## CLI


GENERATE = ["generate", "--prompt", "a red circle", "--model", "tiny", "--random-weights", "--steps", "1",
            "--frames", "4", "--overlap", "1"]


def test_cli_rejects_bad_held_frames(tmp_path, capsys):
    code, _, err = run_cli([*GENERATE, "--held-frames", "bogus", "--out", str(tmp_path / "v.mp4")], capsys)
    assert code == 2 and "--held-frames must be auto, noisy or clean" in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["--backend", "compiled"], ["--inflight", "2", "--clips", "2"]],
                         ids=["compiled", "inflight2"])
def test_cli_clean_off_torch_sequential_fails_cleanly(tmp_path, capsys, args):
    code, _, err = run_cli([*GENERATE, "--held-frames", "clean", *args, "--out", str(tmp_path / "v.mp4")], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "--held-frames clean runs clips one after another" in err
    assert list(tmp_path.iterdir()) == []  # no output file, no run folder


def test_cli_clean_generates(tmp_path, capsys, one_thread):
    out = tmp_path / "v.npy"
    code, stdout, err = run_cli([*GENERATE, "--held-frames", "clean", "--clips", "2", "--out", str(out)], capsys)
    assert code == 0, err
    assert np.load(out).shape == (8, 64, 64, 3) and "2 clips" in stdout


def test_auto_held_frames_picks_clean_only_for_a_model_trained_for_it(tmp_path, capsys):
    import shutil

    from vidrd_rt.cli import auto_held_frames
    from vidrd_rt.runtime.weights import DEFAULT_MODEL, ModelSource, clean_held_overlap

    shipped, random = ModelSource(), ModelSource(model="tiny", random_weights=True)
    assert clean_held_overlap(shipped) == 4 and clean_held_overlap(random) == 0
    assert auto_held_frames(shipped, "torch", None, 4) == "clean"
    assert auto_held_frames(shipped, "torch", 1, 4) == "clean"
    assert capsys.readouterr().err == ""
    assert auto_held_frames(shipped, "torch", 4, 4) == "noisy"  # a wavefront cannot wait for finished clips
    assert auto_held_frames(shipped, "compiled", None, 4) == "noisy"
    assert auto_held_frames(shipped, "torch", None, 8) == "noisy"  # trained to continue from M = 4 only
    assert capsys.readouterr().err.count("note: this model was trained for --held-frames clean") == 3
    assert auto_held_frames(random, "torch", None, 4) == "noisy"
    # An unreadable training.json says nothing about the model: the paper's sampler, no traceback.
    folder = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, folder)
    for text in ("{bad", "[1]", '{"stages": [{"train_config": 3}]}'):
        (folder / "training.json").write_text(text)
        assert clean_held_overlap(ModelSource(model=str(folder))) == 0


def test_train_config_rejects_bad_context_settings():
    with pytest.raises(ValueError, match="--context-share"):
        tr.TrainConfig(out="unused", context_share=-0.5)
    with pytest.raises(ValueError, match="--context-frames"):
        tr.TrainConfig(out="unused", context_frames=16)
