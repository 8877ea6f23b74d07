"""Shared test builders: tiny random models written in the authors' release layout (no network, no downloads)."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from vidrd_rt import cli
from vidrd_rt.runtime.config import model_preset
from vidrd_rt.runtime.generate import Interrupted
from vidrd_rt.runtime.text_encoder import BUNDLED_TOKENIZER
from vidrd_rt.runtime.weights import ModelSource, load_model, random_model

SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
    "steps_offset": 1, "trained_betas": None,
}


@pytest.fixture
def one_thread():
    """One intra-op thread for short CPU runs: on a shared 2-core machine two threads spinning against other
    processes made them 4-10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def kernel_module(name: str):
    """A Triton kernel module (e.g. "vidrd_rt.kernels.temporal_conv"), interpreted on the CPU; skips, with why,
    where that cannot work. The test module sets TRITON_INTERPRET=1 (no CUDA) before this imports the kernels."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        pytest.skip(f"triton is not installed ({e}); pip install triton to run the kernel parity tests")
    module = importlib.import_module(name)
    if not torch.cuda.is_available() and not module.INTERPRET:
        pytest.skip(f"{name} was imported before TRITON_INTERPRET=1 was set (no CUDA here)")
    return module


@pytest.fixture(scope="session")
def tiny_model():
    """A tiny model with every parameter drawn (seed 0), fp32 on the CPU."""
    return load_model(ModelSource(model="tiny", random_weights=True))


def authors_state(model, network: str) -> dict[str, torch.Tensor]:
    return {model.to_authors(network, k): v.clone() for k, v in model.networks()[network].state_dict().items()}


def write_authors_release(root: Path, model, sd_unet_weights: dict | None = None) -> tuple[Path, Path, Path]:
    """ModelT2V.pth + a stable-diffusion-2-1-base-like folder + vae_finetuned/, as the authors ship them."""
    cfg = model.config
    text = authors_state(model, "text_encoder")
    text["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # transformers 4.30 saved this buffer
    released = {f"unet.{k}": v for k, v in authors_state(model, "unet").items()}
    released.update({f"text_encoder.{k}": v for k, v in text.items()})
    ckpt = root / "ModelT2V.pth"
    torch.save({"state_dict": released}, ckpt)

    sd = root / "stable-diffusion-2-1-base"
    _write_json(sd / "unet" / "config.json", _sd_unet_config(cfg.unet))
    if sd_unet_weights is not None:
        torch.save(sd_unet_weights, sd / "unet" / "diffusion_pytorch_model.bin")
    _write_json(sd / "text_encoder" / "config.json", {"architectures": ["CLIPTextModel"],
                                                       **cfg.text_encoder.__dict__})
    _write_json(sd / "scheduler" / "scheduler_config.json", SD21_SCHEDULER)
    shutil.copytree(BUNDLED_TOKENIZER, sd / "tokenizer")

    vae = root / "vae_finetuned"
    _write_json(vae / "config.json", _vae_config(cfg.vae))
    torch.save(authors_state(model, "vae"), vae / "diffusion_pytorch_model.bin")
    return ckpt, sd, vae


def _sd_unet_config(u) -> dict:
    return {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": list(u.attention_heads),
        "block_out_channels": list(u.block_out_channels), "center_input_sample": False,
        "cross_attention_dim": u.cross_attention_dim, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "downsample_padding": 1,
        "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": u.layers_per_block,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
        "sample_size": 64, "use_linear_projection": True,
    }


def _vae_config(v) -> dict:
    return {
        "_class_name": "TemporalAutoencoderKL", "act_fn": "silu", "add_temp_conv": True,
        "block_out_channels": list(v.block_out_channels), "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "layers_per_block": v.layers_per_block, "norm_num_groups": 32, "sample_size": 256,
        "scaling_factor": 0.18215,
    }


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture
def unet_inputs():
    """Fixed UNet inputs for the tiny model: CFG batch of 2, 8 frames, 8x8 latents, two timesteps."""
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, 8, generator=g)
    context = torch.randn(2, 77, model_preset("tiny").unet.cross_attention_dim, generator=g)
    return sample, torch.tensor([981, 401]), context


def fresh_tiny(seed: int = 0):
    return random_model(model_preset("tiny"), torch.float32, "cpu", seed).eval_()


@pytest.fixture(scope="session")
def compiled_tiny():
    """The tiny model's whole denoising step, torch.compile'd (fullgraph) once per session: 1-2 minutes on a CPU.

    A pipeline with --backend compiled and 2 lanes; `inputs(seed)` draws one tick's step inputs at the lane shape
    the pipeline's wavefront uses, so tests that run its videos reuse the compiled graph instead of recompiling.
    """
    from types import SimpleNamespace

    from vidrd_rt.runtime.config import RuntimeConfig, SamplerConfig
    from vidrd_rt.runtime.pipeline import VideoPipeline
    from vidrd_rt.runtime.sampler import make_step

    model = fresh_tiny()
    pipeline = VideoPipeline(model, RuntimeConfig(backend="compiled", inflight=2))
    sampler = SamplerConfig(clips=3, frames=4, overlap=2, alpha=2.0, beta=0.6, steps=4, guidance=7.5, seed=3)
    table, step = pipeline.step_for(sampler)
    context = torch.randn(2, 77, model.config.unet.cross_attention_dim, generator=torch.Generator().manual_seed(2))

    def inputs(seed: int) -> tuple:
        g = torch.Generator().manual_seed(seed)
        x, head = torch.randn(2, 4, 4, 8, 8, generator=g), torch.randn(2, 4, 2, 8, 8, generator=g)
        index = torch.randint(0, sampler.steps, (2,), generator=g)
        mask = torch.rand(2, 2, generator=g) < 0.5
        return x, index, head, mask, context.repeat_interleave(2, dim=0)

    with torch.inference_mode():  # as the wavefront calls it; the first call compiles
        step(*inputs(0))
    return SimpleNamespace(model=model, pipeline=pipeline, sampler=sampler, table=table, step=step, context=context,
                           eager_step=make_step(pipeline.denoise, table, sampler), inputs=inputs)


def run_cli(args, capsys) -> tuple[int, str, str]:
    """Call the console entry point in-process, as `vidrd-rt ARGS` would; (exit code, stdout, stderr)."""
    old, sys.argv = sys.argv, ["vidrd-rt", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


class StopAfter:
    """An on_clip hook that interrupts a generate run once `clips` clips are done, as a signal would."""

    def __init__(self, clips):
        self.clips = clips

    def __call__(self, clip):
        if clip.index + 1 == self.clips:
            raise Interrupted(2)


def rss_mb() -> float:
    """This process's resident memory now, in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
