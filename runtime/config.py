"""Plain dataclass configs: model shape, sampling, and execution, kept apart."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field

import torch

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value is out of range; the message says which and how to fix it."""


# ---------------------------------------------------------------------------------------------------------------
# Model shape
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetConfig:
    """The temporal UNet (SD 2.1 UNet inflated over frames, with Temp-Conv and Temp-Attn)."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    # SD 2.1 names this `attention_head_dim`, but the value is the number of heads per block (head dim 64).
    attention_heads: tuple[int, ...] = (5, 10, 20, 20)
    cross_attention_dim: int = 1024
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    temporal_conv_layers: int = 4  # Conv3d layers per Temp-Conv block
    temporal_position_embedding: bool = True  # `add_temp_embed` in the authors' config
    sample_size: int = 32  # latent side the model was trained at (informational)

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        object.__setattr__(self, "attention_heads", tuple(self.attention_heads))
        if len(self.attention_heads) != len(self.block_out_channels):
            raise ConfigError("unet: attention_heads needs one entry per block in block_out_channels")
        for channels, heads in zip(self.block_out_channels, self.attention_heads):
            if channels % heads or channels % self.norm_num_groups or channels % 32:
                raise ConfigError(f"unet: {channels} channels do not split into {heads} heads and 32 groups")

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class VAEConfig:
    """SD 2.1's AutoencoderKL whose decoder runs a Temp-Conv after every up-block ResNet."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    temporal_conv_layers: int = 3
    temporal_decoder: bool = True  # `add_temp_conv` in the authors' VAE config

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP text model (transformers' CLIPTextConfig fields we set)."""

    vocab_size: int = 49408
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 23
    num_attention_heads: int = 16
    max_position_embeddings: int = 77
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1

    def to_transformers(self):
        from transformers import CLIPTextConfig

        return CLIPTextConfig(**dataclasses.asdict(self))


@dataclass(frozen=True)
class SchedulerConfig:
    """DDIM training schedule, as in Stable Diffusion 2.1-base's scheduler_config.json."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    timestep_spacing: str = "leading"
    clip_sample: bool = False

    def __post_init__(self):
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"scheduler: prediction_type {self.prediction_type!r} is not epsilon or v_prediction")


@dataclass(frozen=True)
class ModelConfig:
    """All networks of one VidRD model plus its native resolution."""

    name: str
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    height: int = 256
    width: int = 256

    @property
    def pixel_multiple(self) -> int:
        """Height and width must be multiples of this (VAE factor x UNet downsampling)."""
        return self.vae.downsample_factor * self.unet.downsample_factor

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(
            name=d["name"],
            unet=UNetConfig(**d["unet"]),
            vae=VAEConfig(**d["vae"]),
            text_encoder=TextEncoderConfig(**d["text_encoder"]),
            scheduler=SchedulerConfig(**d.get("scheduler", {})),
            height=d.get("height", 256),
            width=d.get("width", 256),
        )

    def fingerprint(self) -> str:
        """Short stable hash of the architecture, for cache keys."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


MODEL_PRESETS: dict[str, ModelConfig] = {
    # The authors' model: SD 2.1-base inflated, 256x256 (32x32 latents).
    "vidrd-base": ModelConfig(name="vidrd-base"),
    # Same architecture and block structure with small widths: fast on a CPU, for tests and smoke runs.
    "tiny": ModelConfig(
        name="tiny",
        unet=UNetConfig(
            block_out_channels=(32, 64, 64, 64),
            attention_heads=(1, 2, 2, 2),
            cross_attention_dim=32,
            sample_size=8,
        ),
        vae=VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1),
        text_encoder=TextEncoderConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32
        ),
        height=64,
        width=64,
    ),
    # The shipped default model's architecture (runtime/assets/default_model, trained by training/train.py on
    # synthetic scenes): 64x64 video, 8x8 latents, a word-level tokenizer. Small enough for a 2-core CPU.
    "shapes": ModelConfig(
        name="shapes",
        unet=UNetConfig(
            block_out_channels=(64, 96, 128),
            attention_heads=(2, 3, 4),
            cross_attention_dim=128,
            layers_per_block=1,
            temporal_conv_layers=2,
            sample_size=8,
        ),
        vae=VAEConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=1, temporal_conv_layers=1),
        text_encoder=TextEncoderConfig(
            vocab_size=1024, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            projection_dim=128, bos_token_id=665, eos_token_id=666, pad_token_id=666,
        ),
        height=64,
        width=64,
    ),
}


def model_preset(name: str) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model {name!r}: choose one of {', '.join(MODEL_PRESETS)} or give --model DIR")
    return MODEL_PRESETS[name]


# ---------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------


HELD_FRAMES = ("noisy", "clean")  # SamplerConfig.held_frames


@dataclass(frozen=True)
class SamplerConfig:
    """Long-video sampling (paper section 4.3): N frames per clip, M of them prompted by the previous clip."""

    clips: int = 1
    frames: int = 16  # N
    overlap: int = 4  # M: frames of clip k prompted by the last M frames of clip k-1
    alpha: float = 4.0  # PNS strength (Eq. 7)
    beta: float = 0.4  # DSG strength (Eq. 8)
    steps: int = 50  # DDIM steps T
    guidance: float = 10.0  # classifier-free guidance w
    eta: float = 0.0
    noise_prior: float = 0.0  # optional progressive (PYoCo) prior on clip 0's initial noise; 0 = i.i.d.
    seed: int = 0
    # What the UNet sees of the M frames DSG holds. "noisy" (the paper, Eq. 8): the previous clip's latents at the
    # same step, for the steps beta sets. "clean": the previous clip's finished frames (FNR order) at timestep 0
    # (a per-frame timestep), at every step, so the free frames know where things are from the first step and the
    # held frames are copies (beta is not used). Only for models trained so (training/train.py --context-share);
    # clips then run one after another (the backend must be torch, --inflight 1).
    held_frames: str = "noisy"

    def __post_init__(self):
        checks = [
            (self.clips >= 1, f"--clips must be at least 1 (got {self.clips})"),
            (self.frames >= 2, f"--frames must be at least 2 (got {self.frames})"),
            (0 <= self.overlap <= self.frames, f"--overlap must be in [0, --frames={self.frames}] (got {self.overlap})"),
            (0 <= self.alpha < math.inf, f"--alpha must be a finite number >= 0 (got {self.alpha})"),
            (0.0 <= self.beta <= 1.0, f"--beta must be in [0, 1] (got {self.beta})"),
            (self.steps >= 1, f"--steps must be at least 1 (got {self.steps})"),
            (self.noise_prior >= 0, f"--noise-prior must be >= 0 (got {self.noise_prior})"),
            (self.eta == 0.0, "only eta = 0 (deterministic DDIM) is supported"),
            (self.held_frames in HELD_FRAMES, f"--held-frames must be {' or '.join(HELD_FRAMES)} "
                                              f"(got {self.held_frames!r})"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


# ---------------------------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------------------------

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# How Temp-Attn and Temp-Conv may run (runtime/layers.py: TEMPORAL_ATTENTION, TemporalConv.conv_op).
TEMPORAL_ATTENTION_FORMS = ("sdpa", "kernel", "native", "native-kernel", "math")
TEMPORAL_CONV_OPS = ("conv2d", "conv3d")


@dataclass(frozen=True)
class RuntimeConfig:
    """How to run: each field trades speed against fidelity or memory as its comment says."""

    # "cpu" or "cuda[:N]". The UNet is ~1.2 B parameters: vidrd-base wants a GPU.
    device: str = "cpu"
    # Weights and activations. fp16/bf16 halve memory and run ~2.5x faster on tensor cores; GroupNorm statistics and
    # attention softmax are computed in fp32 inside the ops either way. fp32 reproduces the authors' numbers.
    dtype: str = "fp32"
    # "torch" (eager), "compiled" (torch.compile of the step), "onnxruntime", "tensorrt".
    backend: str = "torch"
    # "temporal": the decoder's Temp-Conv layers see the whole clip (the paper). "per-frame": they are inactive,
    # as in the authors' code; slightly faster, can flicker more.
    decoder: str = "temporal"
    # Clips denoised together in one batched UNet call (wavefront, clip k one step behind k-1). More clips raise
    # throughput until the GPU is full; memory grows with it, not with the number of clips.
    inflight: int = 1
    # Where ONNX / TensorRT artefacts live (backends onnxruntime and tensorrt); built by `vidrd-rt build-engine`.
    engine_dir: str | None = None
    # Backend "compiled" only: compile the decoder too (one more compile and CUDA graph per clip shape). Eager, its
    # layout copies and GroupNorms cost ~200 ms a 256x256 clip of GPU time that the next clips' steps wait behind.
    compile_decoder: bool = True
    # CUDA: cuDNN times its algorithms for each convolution shape on first use (once per shape, inside the warm-up)
    # instead of picking one by heuristics. Process-wide (torch.backends.cudnn.benchmark), set when a pipeline is built.
    # Off: measured no faster for vidrd-base, compiled, K=1 and K=4 (bench/RESULTS.md).
    cudnn_benchmark: bool = False
    # Backend "compiled" only (runtime/compiled.py CompileSettings): Inductor's coordinate-descent search of Triton
    # block sizes for the fused normalisation/elementwise kernels (a longer compile), and freezing (weights folded
    # into the graph as constants; a second copy of the weights while compiling). Off until measured faster.
    coordinate_descent: bool = False
    freezing: bool = False
    # Backend "compiled" only: the UNet's attention input projections as one GEMM each (q, k, v fused for self- and
    # Temp-Attn, k and v for cross-attention; runtime/layers.py Attention.fuse_projections): the activations are
    # read once instead of three times and N = 3C fills the GPU better at the small 8x8/16x16 levels. Same maths.
    # Measured (H200, bench/RESULTS.md sixth session): 0.4-1.4% more frames/s at K = 1, 4, 8, +73 MiB peak, the
    # fused row second in every pair and within the spread between runs: not shown to help, so off.
    fuse_projections: bool = False
    # Backend "compiled" only (CompileSettings.gemm_autotune): Inductor benchmarks Triton GEMM templates against
    # cuBLAS per shape, fusing pointwise epilogues into the chosen one; convolutions stay cuDNN. Longer compile.
    gemm_autotune: bool = False
    # CUDA, backends torch and compiled: how Temp-Attn runs (runtime/layers.py TEMPORAL_ATTENTION). "sdpa":
    # PyTorch's SDPA, as the authors; "kernel": the Triton kernel kernels/short_attention.py, which packs many of
    # the 16-frame sequences into one program (SDPA where it cannot run). Same maths; the other forms were measured
    # slower. The kernel takes the 16 Temp-Attn calls of a vidrd-base step from 1.55 to 0.22 ms (H200).
    temporal_attention: str = "kernel"
    # CUDA, backends torch and compiled: how the Temp-Conv (3, 1, 1) convolutions of UNet and decoder run
    # (runtime/layers.py TemporalConv.conv_op):
    # "conv2d", a (3, 1) convolution on the clip viewed as (B, C, F, H*W); "conv3d", the Conv3d on (B, C, F, H, W).
    # Same maths; cuDNN picks other kernels: the compiled 256x256 decode takes 48 instead of 59 ms (H200). With
    # the kernel above: 1.07-1.08x frames/s at K = 1, 4, 8 and first clip 1.17-1.20 s instead of 1.26-1.29 s.
    temporal_conv: str = "conv3d"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if self.backend not in ("torch", "compiled", "onnxruntime", "tensorrt"):
            raise ConfigError(f"--backend must be torch, compiled, onnxruntime or tensorrt (got {self.backend!r})")
        if self.decoder not in ("temporal", "per-frame"):
            raise ConfigError(f"--decoder must be temporal or per-frame (got {self.decoder!r})")
        if self.inflight < 1:
            raise ConfigError(f"--inflight must be at least 1 (got {self.inflight})")
        if self.temporal_attention not in TEMPORAL_ATTENTION_FORMS:
            raise ConfigError(f"temporal_attention must be one of {', '.join(TEMPORAL_ATTENTION_FORMS)} "
                              f"(got {self.temporal_attention!r})")
        if self.temporal_conv not in TEMPORAL_CONV_OPS:
            raise ConfigError(f"temporal_conv must be one of {', '.join(TEMPORAL_CONV_OPS)} "
                              f"(got {self.temporal_conv!r})")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
