"""Export contracts: what each network's engine takes and returns, at which shapes (data, no export code)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from ..runtime.config import ConfigError, ModelConfig

PRECISIONS: dict[str, torch.dtype] = {"fp16": torch.float16, "fp32": torch.float32}
FRAMES = "frames"  # the one dynamic axis name, as TensorRT's demo names its temporal UNet's frame axis
DECODERS = ("temporal", "per-frame")


@dataclass(frozen=True)
class EngineShapes:
    """The shapes and precision one engine set is built for.

    `batch` counts clips per UNet call; the UNet itself runs 2 * batch (classifier-free guidance's [uncond, cond]).
    Static by default (fastest: every kernel is tuned for one shape). `min_frames`/`max_frames` make the frame
    axis dynamic within that range; `frames` is then the shape TensorRT optimises for.
    """

    frames: int = 16
    height: int | None = None  # None: the model's own size (256 for vidrd-base)
    width: int | None = None
    batch: int = 1
    precision: str = "fp16"
    min_frames: int | None = None
    max_frames: int | None = None
    decoder: str = "temporal"  # "per-frame": Temp-Conv inactive, as the authors' sampling code decodes

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be fp16 or fp32 (got {self.precision!r})")
        if self.decoder not in DECODERS:
            raise ConfigError(f"--decoder must be temporal or per-frame (got {self.decoder!r})")
        if self.batch < 1:
            raise ConfigError(f"--batch must be at least 1 (got {self.batch})")
        low, high = self.frame_range[0], self.frame_range[2]
        # Temp-Conv and Temp-Attn are traced for F > 1, so a graph never serves a single frame.
        if not 2 <= low <= self.frames <= high:
            raise ConfigError(f"frames must satisfy 2 <= min {low} <= --frames {self.frames} <= max {high}")

    @property
    def dynamic(self) -> bool:
        return self.min_frames is not None or self.max_frames is not None

    @property
    def frame_range(self) -> tuple[int, int, int]:
        """(min, opt, max) frames; all equal for a static engine."""
        low = self.frames if self.min_frames is None else self.min_frames
        high = self.frames if self.max_frames is None else self.max_frames
        return low, self.frames, high

    @property
    def torch_dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    def for_model(self, cfg: ModelConfig) -> "EngineShapes":
        """Height and width filled in from the model where not given, and checked against it."""
        shapes = replace(self, height=self.height or cfg.height, width=self.width or cfg.width)
        shapes.check_model(cfg)
        return shapes

    def check_model(self, cfg: ModelConfig) -> None:
        multiple = cfg.pixel_multiple
        for flag, value in (("--height", self.height), ("--width", self.width)):
            if value is None or value < multiple or value % multiple:
                raise ConfigError(f"{flag} {value} does not fit this model: use a positive multiple of {multiple}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EngineShapes":
        return cls(**d)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, dtype and shape; `axes` names the dynamic axes ((axis, name), ...)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]  # at the optimal (= static) frame count
    axes: tuple[tuple[int, str], ...] = ()

    def at(self, frames: int) -> tuple[int, ...]:
        """The shape with every frame axis set to `frames`."""
        named = dict(self.axes)
        return tuple(frames if named.get(i) == FRAMES else size for i, size in enumerate(self.shape))


@dataclass(frozen=True)
class ExportSpec:
    """One network's export contract: I/O names, dtypes, shapes, dynamic axes and TensorRT profile."""

    name: str  # artefact stem: unet, decoder, text_encoder
    network: str  # the VidRDModel network whose weights it holds: unet, vae, text_encoder
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    frames: tuple[int, int, int]  # (min, opt, max) frame count of the frame axes

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def dynamic(self) -> bool:
        return self.frames[0] != self.frames[2] and any(t.axes for t in self.inputs)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's dynamic_axes; empty for a static engine."""
        if not self.dynamic:
            return {}
        return {t.name: dict(t.axes) for t in self.inputs + self.outputs if t.axes}

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Per input, the (min, opt, max) shapes of one TensorRT optimization profile."""
        low, opt, high = self.frames
        return {t.name: (t.at(low), t.at(opt), t.at(high)) for t in self.inputs}

    def input_shapes(self, frames: int) -> dict[str, tuple[int, ...]]:
        return {t.name: t.at(frames) for t in self.inputs}

    def output_shapes(self, frames: int) -> dict[str, tuple[int, ...]]:
        return {t.name: t.at(frames) for t in self.outputs}

    def accepts(self, frames: int) -> bool:
        return self.frames[0] <= frames <= self.frames[2]

    def frames_of(self, tensors: tuple[torch.Tensor, ...]) -> int:
        """The frame count of one call's inputs; a one-line ConfigError when the engine was not built for them."""
        axis = next((i for i, name in self.inputs[0].axes if name == FRAMES), None)
        frames = tensors[0].shape[axis] if axis is not None else self.frames[1]
        want = [t.at(frames) for t in self.inputs]
        if [tuple(t.shape) for t in tensors] != want or not self.accepts(frames):
            raise ConfigError(f"the {self.name} engine was built for inputs {self.inputs[0].shape} (frames "
                              f"{self.frames[0]}..{self.frames[2]}), this run gives {tuple(tensors[0].shape)}; "
                              f"rebuild the engines with matching --frames/--batch/--height/--width")
        return frames

    def sample_inputs(self, device="cpu", seed: int = 0, frames: int | None = None) -> tuple[torch.Tensor, ...]:
        """Random inputs at the optimal shape (integers in their valid range), for tracing and parity checks."""
        g = torch.Generator().manual_seed(seed)
        frames = self.frames[1] if frames is None else frames
        out = []
        for t in self.inputs:
            shape = t.at(frames)
            if t.dtype.is_floating_point:
                out.append(torch.randn(shape, generator=g).to(device=device, dtype=t.dtype))
            else:  # timesteps in [0, 1000), token ids below the smallest CLIP vocabulary we ship
                out.append(torch.randint(0, 1000, shape, generator=g).to(device=device, dtype=t.dtype))
        return tuple(out)


def specs_for(cfg: ModelConfig, shapes: EngineShapes) -> dict[str, ExportSpec]:
    """The three contracts (unet, decoder, text_encoder) for one model and one EngineShapes."""
    shapes = shapes.for_model(cfg)
    f = cfg.vae.downsample_factor
    h, w, n, b = shapes.height // f, shapes.width // f, shapes.frames, shapes.batch
    float_, frame_axis = shapes.torch_dtype, ((2, FRAMES),)
    tokens, prompts = cfg.text_encoder.max_position_embeddings, 2  # one [negative, prompt] pair per video
    unet = ExportSpec(
        "unet", "unet",
        inputs=(TensorSpec("sample", float_, (2 * b, cfg.unet.in_channels, n, h, w), frame_axis),
                TensorSpec("timestep", torch.int64, (2 * b,)),
                TensorSpec("encoder_hidden_states", float_, (2 * b, tokens, cfg.unet.cross_attention_dim))),
        outputs=(TensorSpec("noise_pred", float_, (2 * b, cfg.unet.out_channels, n, h, w), frame_axis),),
        frames=shapes.frame_range,
    )
    decoder = ExportSpec(
        "decoder", "vae",
        inputs=(TensorSpec("latents", float_, (b, cfg.vae.latent_channels, n, h, w), frame_axis),),
        # VideoDecoder returns float32 in [0, 1] whatever it computes in.
        outputs=(TensorSpec("video", torch.float32, (b, cfg.vae.out_channels, n, shapes.height, shapes.width),
                            frame_axis),),
        frames=shapes.frame_range,
    )
    text = ExportSpec(
        "text_encoder", "text_encoder",
        inputs=(TensorSpec("input_ids", torch.int64, (prompts, tokens)),),
        outputs=(TensorSpec("last_hidden_state", float_, (prompts, tokens, cfg.text_encoder.hidden_size)),),
        frames=(n, n, n),
    )
    return {s.name: s for s in (unet, decoder, text)}
