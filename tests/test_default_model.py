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
from vidrd_rt.training.vocab import all_words

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
                                motion_share=0.8, action_share=0.1)
    again = load_model(ModelSource(model=str(training.train(cfg2))))
    assert torch.equal(again.vae.decoder.conv_out.weight, model.vae.decoder.conv_out.weight)


def test_training_timesteps_favour_high_noise_by_the_asked_share():
    g = torch.Generator().manual_seed(0)
    uniform = training.training_timesteps(20000, 1000, 0.0, g, "cpu")
    biased = training.training_timesteps(20000, 1000, 0.5, g, "cpu")
    assert 0 <= int(biased.min()) and int(biased.max()) < 1000
    # Uniform: half the draws land in the upper half; with a share of 0.5 drawn only there: 0.5 + 0.5 * 0.5.
    assert float((uniform >= 500).float().mean()) == pytest.approx(0.5, abs=0.02)
    assert float((biased >= 500).float().mean()) == pytest.approx(0.75, abs=0.02)


def test_training_data_shares_reach_the_scenes():
    cfg = training.TrainConfig(out="unused", motion_share=1.0, action_share=0.0)
    model = SimpleNamespace(config=SimpleNamespace(height=32))  # scenes_for reads only the frame size
    scenes = training.scenes_for(model, cfg)
    _, captions = sample_batch(scenes, 12, torch.Generator().manual_seed(0))
    assert all(" moving " in c for c in captions)


def _file_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path)).values()
