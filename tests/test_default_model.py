"""The shipped default model, its tokenizer, the synthetic scenes it was trained on, and the training loop itself
(two steps on the CPU, written in our model format and loaded back)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vidrd_rt.bench import eval_shapes as ev
from vidrd_rt.runtime.text_encoder import load_tokenizer
from vidrd_rt.runtime.weights import DEFAULT_MODEL, ModelSource, load_model
from vidrd_rt.training import train as training
from vidrd_rt.training.scenes import SceneConfig, sample_batch
from vidrd_rt.training.tokenizer import build_tokenizer
from vidrd_rt.training.vocab import all_words, time_reversed_caption

from conftest import run_cli


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs short CPU work (conftest.one_thread)."""


#################################################################################
#                              The shipped model                                 #
#################################################################################


def test_default_model_is_small_and_loads_from_the_package():
    size = sum(p.stat().st_size for p in DEFAULT_MODEL.rglob("*.safetensors"))
    assert size <= 25e6
    model = load_model(ModelSource())
    assert model.config.name == "shapes-default" and (model.config.height, model.config.width) == (64, 64)
    assert type(model.tokenizer).__name__.startswith("CLIPTokenizer")
    ids = model.tokenizer("a red circle moving right").input_ids
    assert ids[0] == model.config.text_encoder.bos_token_id and ids[-1] == model.config.text_encoder.eos_token_id
    assert len(ids) == 2 + 5  # one token per word


def test_generate_without_model_flags_makes_a_video(tmp_path, capsys):
    out = tmp_path / "v.npy"
    code, stdout, err = run_cli(["generate", "--prompt", "a red circle moving right", "--clips", "2", "--frames",
                                 "4", "--overlap", "1", "--steps", "3", "--out", str(out)], capsys)
    assert code == 0, err
    frames = np.load(out)
    assert frames.shape == (8, 64, 64, 3) and frames.dtype == np.uint8
    assert frames.std() > 5  # an image, not a flat field


def test_default_model_draws_the_asked_colour():
    """What training bought: red and blue prompts give red and blue objects (20 steps, CFG 10, one clip)."""
    from vidrd_rt.runtime.config import RuntimeConfig, SamplerConfig
    from vidrd_rt.runtime.pipeline import VideoPipeline, encode_prompt

    model = load_model(ModelSource())
    pipeline = VideoPipeline(model, RuntimeConfig())
    sampler = SamplerConfig(frames=4, overlap=1, steps=20)
    for colour in ("red", "blue"):
        context = encode_prompt(model, f"a {colour} circle moving right")
        state = pipeline.new_state(sampler, 64, 64)
        clip = next(pipeline.clips(context, sampler, state))
        frames = clip.frames
        mask = ev.object_mask(frames)
        assert ev.classify_colour(frames[mask]) == colour


#################################################################################
#                                  Tokenizer                                     #
#################################################################################


def test_tokenizer_build_is_deterministic_and_word_level(tmp_path):
    folder = build_tokenizer(tmp_path / "tok")
    for name in ("vocab.json", "merges.txt"):
        assert (folder / name).read_text() == (DEFAULT_MODEL / "tokenizer" / name).read_text()
    tokenizer = load_tokenizer(folder)
    for word in all_words():
        assert len(tokenizer.tokenize(word)) == 1, word
    assert len(tokenizer.tokenize("xylophone")) > 1  # unknown words still tokenize, into characters


#################################################################################
#                               Synthetic scenes                                 #
#################################################################################


def test_scenes_match_their_captions():
    """The data and the evaluation agree: for rendered motion clips, the eval reads back the captioned colour and
    direction (this is what the model is asked to learn)."""
    video, captions = sample_batch(SceneConfig(), 48, torch.Generator().manual_seed(3))
    assert video.shape == (48, 3, 16, 64, 64) and 0 <= video.min() and video.max() <= 1
    checked = 0
    for clip, caption in zip(video, captions):
        words = caption.split()
        if words[3:4] != ["moving"]:
            continue
        frames = (clip.permute(1, 2, 3, 0) * 255).round().to(torch.uint8).numpy()
        mask = ev.object_mask(frames)
        if mask.sum(axis=(1, 2)).min() < 20:  # entering or leaving the frame: the track is partial
            continue
        assert ev.classify_colour(frames[mask]) == words[1], caption
        assert ev.direction_of(ev.centroid_track(frames)) == words[4], caption
        checked += 1
    assert checked >= 8


def test_the_shipped_model_is_measured_on_its_torus():
    """The shipped model (stage 9 on) was trained on the torus; `vidrd-rt eval` and the README measure it there."""
    assert ev.model_world(ModelSource()) == "torus"


def test_torus_scenes_wrap_and_the_eval_follows_them_around():
    """With SceneConfig.wrap a shape leaving by one edge comes back by the other: every frame shows the whole
    shape's area (split across the edge while it crosses), and the eval in its torus mode reads the captioned
    direction at the same small step on every frame, also while the shape is split."""
    video, captions = sample_batch(SceneConfig(wrap=True, p_motion=1.0, p_action=0.0), 48,
                                   torch.Generator().manual_seed(5))
    crossed = 0
    for clip, caption in zip(video, captions):
        frames = (clip.permute(1, 2, 3, 0) * 255).round().to(torch.uint8).numpy()
        mask = ev.object_mask(frames)
        area = mask.sum(axis=(1, 2))
        assert area.min() > 0.8 * area.max(), caption  # never off-screen, never cut
        wrap = (64, 64)
        track = ev.centroid_track(frames, wrap=wrap)
        assert ev.direction_of(track, wrap=wrap) == caption.split()[4], caption
        steps = ev.centroid_steps(track, wrap=wrap)
        assert steps.max() < 3.5, caption  # speeds are 1-2.2 px/frame; a wrap is no jump
        split = (mask[:, :, 0] & mask[:, :, -1]).any() or (mask[:, 0] & mask[:, -1]).any()
        crossed += bool(split)  # some frame shows the shape on both sides of an edge
    assert crossed >= 8


def test_scenes_are_seeded():
    a, ca = sample_batch(SceneConfig(frames=4), 6, torch.Generator().manual_seed(1))
    b, cb = sample_batch(SceneConfig(frames=4), 6, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and ca == cb


#################################################################################
#                                   Training                                     #
#################################################################################


def test_training_runs_and_writes_a_loadable_model(tmp_path):
    cfg = training.TrainConfig(out=str(tmp_path / "run"), device="cpu", max_steps=2, vae_batch=1, vae_frames=3,
                               unet_batch=1, vae_minutes=5, unet_minutes=5)
    folder = training.train(cfg)
    info = json.loads((folder / "training.json").read_text())
    assert info["unet_steps"] == 2
    model = load_model(ModelSource(model=str(folder)))
    assert model.config.vae.scaling_factor == pytest.approx(info["latent_scale"])
    assert all(t.dtype == torch.float16 for t in _file_tensors(folder / "unet.safetensors"))
    # Continuing from the written folder (the recipe's second stage) keeps its VAE.
    cfg2 = training.TrainConfig(out=str(tmp_path / "run2"), device="cpu", max_steps=1, unet_batch=1,
                                vae_minutes=0, unet_minutes=5, init=str(folder), high_noise_share=0.5,
                                motion_share=0.8, action_share=0.1, reversal_weight=0.1, reversal_clips=1)
    again = load_model(ModelSource(model=str(training.train(cfg2))))
    assert torch.equal(again.vae.decoder.conv_out.weight, model.vae.decoder.conv_out.weight)


def test_training_flags_parse_yes_and_no():
    assert training._yes_no("yes") is True and training._yes_no("no") is False
    with pytest.raises(Exception, match="expected yes or no"):
        training._yes_no("maybe")


def test_training_timesteps_favour_high_noise_by_the_asked_share():
    g = torch.Generator().manual_seed(0)
    uniform = training.training_timesteps(20000, 1000, 0.0, g, "cpu")
    biased = training.training_timesteps(20000, 1000, 0.5, g, "cpu")
    assert 0 <= int(biased.min()) and int(biased.max()) < 1000
    # Uniform: half the draws land in the upper half; with a share of 0.5 drawn only there: 0.5 + 0.5 * 0.5.
    assert float((uniform >= 500).float().mean()) == pytest.approx(0.5, abs=0.02)
    assert float((biased >= 500).float().mean()) == pytest.approx(0.75, abs=0.02)


def test_training_data_shares_reach_the_scenes():
    cfg = training.TrainConfig(out="unused", motion_share=1.0, action_share=0.0, wrap=True)
    model = SimpleNamespace(config=SimpleNamespace(height=32))  # scenes_for reads only the frame size
    scenes = training.scenes_for(model, cfg)
    assert scenes.wrap
    _, captions = sample_batch(scenes, 12, torch.Generator().manual_seed(0))
    assert all(" moving " in c for c in captions)


def test_time_reversed_captions_swap_only_the_arrow_of_time():
    assert time_reversed_caption("a red circle moving left on a striped background") == \
        "a red circle moving right on a striped background"
    assert time_reversed_caption("a blue square growing") == "a blue square shrinking"
    assert time_reversed_caption("a red circle and a green square with camera zooming in") == \
        "a red circle and a green square with camera zooming out"
    assert time_reversed_caption("a red circle bouncing") is None  # bouncing backwards is still bouncing
    assert time_reversed_caption("") is None
    for caption in ("a red circle moving up", "a blue square with camera panning down"):
        assert time_reversed_caption(time_reversed_caption(caption)) == caption


def test_reversal_contrast_rewards_the_own_caption_and_scales_with_the_error():
    err_true = torch.tensor([0.010, 0.020], requires_grad=True)
    err_reversed = torch.tensor([0.012, 0.020], requires_grad=True)
    loss = training.reversal_contrast(err_true, err_reversed, sharpness=50.0)
    loss.backward()
    # Lower the own caption's error, raise the reversed one's: the gradient pushes both ways.
    assert (err_true.grad > 0).all() and (err_reversed.grad < 0).all()
    # A clear gap costs less than none, and the same relative gap costs the same relative amount at any level.
    assert float(training.reversal_contrast(torch.tensor([0.01]), torch.tensor([0.02]), 50.0)) < \
        float(training.reversal_contrast(torch.tensor([0.01]), torch.tensor([0.01]), 50.0))
    low = training.reversal_contrast(torch.tensor([0.01]), torch.tensor([0.011]), 50.0)
    high = training.reversal_contrast(torch.tensor([0.1]), torch.tensor([0.11]), 50.0)
    assert float(high) == pytest.approx(10 * float(low), rel=1e-5)


def test_reversal_batch_takes_only_captions_with_a_reversed_version(tmp_path):
    tokenizer = load_tokenizer(build_tokenizer(tmp_path / "tok"))
    captions = ["a red circle bouncing", "", "a red circle moving left", "a blue square growing",
                "a green triangle moving up"]
    cfg = training.TrainConfig(out="unused", device="cpu", reversal_weight=0.1, reversal_clips=2,
                               reversal_min_timestep=500)
    reversal = training.reversal_for(tokenizer, captions, cfg)
    assert reversal.index.tolist() == [2, 3, 4]
    # At most reversal_clips of them, and only those drawn at or above the minimum timestep.
    index, ids = reversal.chosen(torch.tensor([999, 999, 900, 100, 600]))
    assert index.tolist() == [2, 4]
    expected = training.tokenize(tokenizer, ["a red circle moving right", "a green triangle moving down"])
    assert torch.equal(ids, expected)
    assert reversal.chosen(torch.full((5,), 900))[0].tolist() == [2, 3]
    assert reversal.chosen(torch.full((5,), 10))[0].numel() == 0
    off = training.TrainConfig(out="unused", device="cpu")
    assert training.reversal_for(tokenizer, captions, off) is None
    assert training.reversal_for(tokenizer, ["", "a red circle bouncing"], cfg) is None


def test_caption_probe_sees_the_words_the_shipped_model_uses():
    """The probe behind README's account of the direction words: on the shipped model, a wrong axis, no caption and
    the time-reversed caption must each cost clearly more error than the true caption at a mid timestep (a probe
    that compared a caption with itself would give 1.0 everywhere)."""
    from vidrd_rt.bench.caption_probe import other_axis_caption, probe

    assert other_axis_caption("a red circle moving left on a dark background") == \
        "a red circle moving up on a dark background"
    ratios = probe(load_model(ModelSource()), clips=8, device="cpu", timesteps=(600,))[600]
    assert set(ratios) == {"reversed", "axis", "none"}
    # Stage 6 of the shipped model learnt the sign of the direction words too (the time-reversal contrast).
    assert ratios["axis"] > 1.2 and ratios["none"] > 1.2 and ratios["reversed"] > 1.2


def _file_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path)).values()
