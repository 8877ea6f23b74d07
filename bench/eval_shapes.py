"""`vidrd-rt eval`: is the object the prompted colour, does it move the prompted way, and are clip seams smooth?

For the synthetic-scene model (training/vocab.py): one saturated object over a low-saturation background. Every
measurement is plain numpy over uint8 frames [F, H, W, 3]:

- `object_mask`: saturated, not-too-dark pixels (HSV), i.e. the object and not the background;
- `classify_colour`: majority vote of the masked pixels' nearest named hue (circular hue distance);
- `centroid_track` / `direction_of`: the mask's centroid per frame, and the median per-frame displacement;
- smoothness: mean absolute frame difference and centroid step for consecutive frame pairs inside a clip against
  the pairs that straddle a clip boundary (`boundary_pairs` says which output-frame pairs those are).

A model trained on a torus world (training/scenes.py `SceneConfig.wrap`, recorded in its training.json) moves
shapes out by one edge and back in by the other. For it, `wrap = (width, height)` measures centroids as circular
means and steps the short way round, so a shape crossing an edge is one shape taking one small step.

`run_eval` generates every (config, prompt) in memory with one loaded model, scores each video and writes JSON
plus a markdown table, one row per `EvalConfig` (sampler overrides: overlap M, alpha, beta, drop_overlap, decoder).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..runtime.config import DTYPES, ConfigError, RuntimeConfig, SamplerConfig
from ..runtime.noise import TorchNoise
from ..runtime.pipeline import VideoPipeline, encode_prompt
from ..runtime.weights import ModelSource, last_training_stage, load_model
from ..training.vocab import COLOURS, DIRECTIONS, EVAL_PROMPTS, motion_prompt
from .report import atomic_write_bytes

SCHEMA = "vidrd-rt-eval/1"

# Object colours have HSV saturation 0.76-0.92 (training/vocab.py); backgrounds are grey or weakly tinted.
MIN_SATURATION = 0.4
MIN_VALUE = 0.25  # below this, hue is mostly sensor/decoder noise (dark backgrounds)
MIN_COLOUR_PIXELS = 20  # fewer masked pixels than this (over all frames given) = no object found
MIN_TRACK_PIXELS = 4  # per frame, for a centroid
MIN_STEP_PX = 0.25  # median displacement per frame below this = "not moving"
MAX_JUMP_PX = 8.0  # per-frame displacements above this are detection glitches or seams, not motion


##### colour


def saturation_value(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [..., 3] -> HSV saturation and value, each float [...] in [0, 1]."""
    rgb = frames.astype(np.float32) / 255.0
    value = rgb.max(axis=-1)
    spread = value - rgb.min(axis=-1)
    saturation = np.divide(spread, value, out=np.zeros_like(value), where=value > 0)
    return saturation, value


def object_mask(frames: np.ndarray, min_saturation: float = MIN_SATURATION, min_value: float = MIN_VALUE) -> np.ndarray:
    """uint8 [F, H, W, 3] -> bool [F, H, W]: saturated, not-too-dark pixels (the object, not the background)."""
    saturation, value = saturation_value(frames)
    return (saturation >= min_saturation) & (value >= min_value)


def hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """RGB [..., 3] (any scale) -> HSV hue in degrees [0, 360); 0 for grey pixels."""
    rgb = np.asarray(rgb, dtype=np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    top, spread = rgb.max(axis=-1), rgb.max(axis=-1) - rgb.min(axis=-1)
    safe = np.where(spread > 0, spread, 1.0)
    sector = np.where(top == r, ((g - b) / safe) % 6, np.where(top == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return np.where(spread > 0, sector * 60.0, 0.0) % 360.0


# The hue of each named colour, computed from the same RGB the data generator draws with.
COLOUR_HUES: dict[str, float] = {name: float(hue_degrees(np.array(rgb))) for name, rgb in COLOURS.items()}


def hue_distance(a: np.ndarray, b: float) -> np.ndarray:
    """Circular distance in degrees (red at 355 is 5 from red at 0)."""
    d = np.abs(np.asarray(a) - b) % 360.0
    return np.minimum(d, 360.0 - d)


def classify_colour(pixels: np.ndarray, min_pixels: int = MIN_COLOUR_PIXELS) -> Optional[str]:
    """Masked pixels uint8 [K, 3] (e.g. frames[mask]) -> the COLOURS name most of them are nearest to, by hue.

    A vote rather than a mean hue: anti-aliased edges and stray pixels cannot drag the answer between two names.
    None when fewer than min_pixels pixels are given (no object found)."""
    pixels = np.asarray(pixels).reshape(-1, 3)
    if len(pixels) < min_pixels:
        return None
    hues = hue_degrees(pixels)  # [K]
    names = list(COLOUR_HUES)
    distances = np.stack([hue_distance(hues, COLOUR_HUES[n]) for n in names])  # [colours, K]
    votes = np.bincount(distances.argmin(axis=0), minlength=len(names))
    return names[int(votes.argmax())]


##### motion


Wrap = Optional[tuple[int, int]]  # (width, height) of a torus world, or None for a frame with edges


def centroid_track(frames: np.ndarray, min_pixels: int = MIN_TRACK_PIXELS, wrap: Wrap = None) -> np.ndarray:
    """uint8 [F, H, W, 3] -> float [F, 2] object centroid (x, y) in pixel indices (pixel [row, col] sits at
    x = col, y = row); NaN where no object is found.

    The mean (not the median) of the mask's coordinates, so sub-pixel motion registers; on a torus (wrap) the
    circular mean, so a shape split across an edge is found where it is, not in the middle of the frame."""
    mask = object_mask(frames)  # [F, H, W]
    count = mask.sum(axis=(1, 2)).astype(np.float64)  # [F]
    columns, rows = mask.sum(axis=1), mask.sum(axis=2)  # [F, W], [F, H]: pixels per column / row
    with np.errstate(invalid="ignore", divide="ignore"):
        if wrap:
            track = np.stack([_circular_mean(columns), _circular_mean(rows)], axis=1)
        else:
            xs, ys = np.arange(mask.shape[2]), np.arange(mask.shape[1])
            track = np.stack([(columns * xs).sum(axis=1) / count, (rows * ys).sum(axis=1) / count], axis=1)
    track[count < min_pixels] = np.nan
    return track


def _circular_mean(weights: np.ndarray) -> np.ndarray:
    """[F, n] pixel counts per index around a circle of n pixels -> [F] mean position in [0, n)."""
    n = weights.shape[1]
    angle = 2 * np.pi * np.arange(n) / n
    c, s = (weights * np.cos(angle)).sum(axis=1), (weights * np.sin(angle)).sum(axis=1)
    return (np.arctan2(s, c) * n / (2 * np.pi)) % n


def displacements(track: np.ndarray, wrap: Wrap = None) -> np.ndarray:
    """float [F, 2] -> float [F-1, 2]: (dx, dy) between consecutive centroids; on a torus the short way round."""
    steps = np.diff(np.asarray(track, dtype=np.float64), axis=0)
    if wrap:
        size = np.asarray(wrap, dtype=np.float64)
        steps = (steps + size / 2) % size - size / 2
    return steps


def direction_name(dx: float, dy: float) -> str:
    """The DIRECTIONS name whose unit vector best matches (dx, dy) (image coordinates, y down)."""
    return max(DIRECTIONS, key=lambda n: DIRECTIONS[n][0] * dx + DIRECTIONS[n][1] * dy)


def direction_of(track: np.ndarray, min_step: float = MIN_STEP_PX, max_jump: float = MAX_JUMP_PX,
                 wrap: Wrap = None) -> Optional[str]:
    """float [F, 2] centroids -> the dominant direction name, from the median per-frame displacement.

    Steps with a missing centroid or longer than max_jump (a detection glitch or a seam) are ignored; the median
    also shrugs off the few reversed frames at an FNR head. None if nothing moves at least min_step px/frame."""
    steps = displacements(track, wrap)  # [F-1, 2]
    ok = np.isfinite(steps).all(axis=1) & (np.hypot(steps[:, 0], steps[:, 1]) <= max_jump)
    if not ok.any():
        return None
    dx, dy = np.median(steps[ok], axis=0)
    if max(abs(dx), abs(dy)) < min_step:
        return None
    return direction_name(dx, dy)


##### clip structure


def clip_spans(clips: int, N: int, M: int, drop_overlap: bool) -> list[tuple[int, int]]:
    """[start, stop) of each clip's frames in the output video. Clip 0 gives N frames; each later clip N, or N - M
    with drop_overlap (its first M frames, which re-create the previous clip's last M by FNR, are left out)."""
    later = N - M if drop_overlap else N
    return [(0, N)] + [(N + (k - 1) * later, N + k * later) for k in range(1, clips)]


def boundary_pairs(clips: int, N: int, M: int, drop_overlap: bool) -> list[tuple[int, int]]:
    """Output-frame index pairs (i, i+1) that straddle a clip boundary: (last frame of clip k-1, first frame of
    clip k that is in the output), k = 1 .. clips-1."""
    return [(start - 1, start) for start, stop in clip_spans(clips, N, M, drop_overlap)[1:] if stop > start]


def clips_in(n_frames: int, N: int, M: int, drop_overlap: bool) -> int:
    """How many clips a video of n_frames output frames holds; ValueError if the count does not fit."""
    later = N - M if drop_overlap else N
    extra = n_frames - N
    if extra == 0:
        return 1
    if extra < 0 or later <= 0 or extra % later:
        raise ValueError(f"{n_frames} frames do not split into clips of N={N}, M={M}, drop_overlap={drop_overlap}")
    return 1 + extra // later


##### smoothness


def frame_diffs(frames: np.ndarray) -> np.ndarray:
    """uint8 [F, H, W, 3] -> float [F-1]: mean absolute difference (0-255 levels) of each consecutive pair."""
    f = frames.astype(np.int16)
    return np.abs(f[1:] - f[:-1]).mean(axis=(1, 2, 3)).astype(np.float64)


def centroid_steps(track: np.ndarray, wrap: Wrap = None) -> np.ndarray:
    """float [F, 2] -> float [F-1]: pixel distance between consecutive centroids (NaN where one is missing)."""
    steps = displacements(track, wrap)
    return np.hypot(steps[:, 0], steps[:, 1])


def along_steps(track: np.ndarray, direction: str, wrap: Wrap = None) -> np.ndarray:
    """float [F, 2] -> float [F-1]: signed centroid step along the prompted direction (negative = backwards)."""
    dx, dy = DIRECTIONS[direction]
    steps = displacements(track, wrap)
    return steps[:, 0] * dx + steps[:, 1] * dy


def _mean(values) -> Optional[float]:
    """Mean of the finite values (None and NaN skipped); None if there are none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _ratio(top: Optional[float], bottom: Optional[float]) -> Optional[float]:
    return top / bottom if top is not None and bottom else None


def split_stats(per_pair: np.ndarray, pairs: Sequence[tuple[int, int]]) -> dict:
    """Per-pair values [F-1] -> within-clip mean, boundary mean and boundary/within (None where undefined)."""
    at_boundary = np.zeros(len(per_pair), dtype=bool)
    at_boundary[[i for i, _ in pairs]] = True
    within, boundary = _mean(per_pair[~at_boundary]), _mean(per_pair[at_boundary])
    return {"within": within, "boundary": boundary, "ratio": _ratio(boundary, within)}


def smoothness(frames: np.ndarray, track: np.ndarray, pairs: Sequence[tuple[int, int]],
               direction: Optional[str] = None, wrap: Wrap = None) -> dict:
    """Frame difference and centroid step, within clips vs across boundaries; signed steps when a direction is
    given (a seam that jumps the object back shows as a negative boundary mean)."""
    out = {"frame_diff": split_stats(frame_diffs(frames), pairs),
           "centroid_step": split_stats(centroid_steps(track, wrap), pairs)}
    if direction is not None:
        out["along_direction"] = split_stats(along_steps(track, direction, wrap), pairs)
    return out


def room_ahead(track: np.ndarray, pairs: Sequence[tuple[int, int]], direction: str, height: int,
               width: int, wrap: Wrap = None) -> np.ndarray:
    """float [len(pairs)]: px between the object in each seam's last old frame and the frame edge the prompt moves
    it toward (NaN without a centroid). Little room means the prompt cannot be followed without leaving the frame:
    the next clip then starts over (objects in training enter from the far edge) or turns back. A torus has no
    edge: infinite room wherever the object is found."""
    if wrap:
        return np.array([np.inf if np.isfinite(track[i]).all() else np.nan for i, _ in pairs], dtype=np.float64)
    dx, dy = DIRECTIONS[direction]
    room = []
    for i, _ in pairs:
        x, y = track[i]
        room.append((width - 1 - x) if dx > 0 else x if dx < 0 else (height - 1 - y) if dy > 0 else y)
    return np.asarray(room, dtype=np.float64)


def seams_with_room(track: np.ndarray, pairs: Sequence[tuple[int, int]], direction: str, height: int, width: int,
                    new_frames: int, within_step: Optional[float], wrap: Wrap = None) -> dict:
    """Boundary centroid jumps split by whether the object had room for the next clip's motion (within-clip step x
    the frames a clip adds). Separates jumps that sampling causes from restarts that the frame edge forces."""
    if not pairs or within_step is None:
        return {"jumps": [], "has_room": []}
    jumps = centroid_steps(track, wrap)[[i for i, _ in pairs]]
    has_room = room_ahead(track, pairs, direction, height, width, wrap) >= within_step * new_frames  # NaN -> False
    return {"jumps": jumps.tolist(), "has_room": has_room.tolist()}


def near_seam(track: np.ndarray, pairs: Sequence[tuple[int, int]], overlap: int, wrap: Wrap = None) -> dict:
    """Per seam, the largest centroid step over the seam pair and the overlap (M) pairs after it ("max", NaN if
    none), and the mean step over all other pairs ("away"). With all frames kept, a strong DSG turns the seam pair
    itself into a near copy and moves the jump into the new clip's first frames; this catches it there, and keeps
    the moved jump out of the yardstick. "profile": per seam, the step of each of those pairs in order (NaN where
    the object was not found); summarise() averages each position over seams, so one noisy pair does not count as
    a jump the way the per-seam maximum does."""
    steps = centroid_steps(track, wrap)  # [F-1]
    near = np.zeros(len(steps), dtype=bool)
    largest, profile = [], []
    for i, _ in pairs:
        near[i : i + overlap + 1] = True
        window = steps[i : i + overlap + 1]
        profile.append([float(v) for v in window] + [math.nan] * (overlap + 1 - len(window)))
        window = window[np.isfinite(window)]
        largest.append(float(window.max()) if len(window) else math.nan)
    return {"max": largest, "away": _mean(steps[~near]), "profile": profile}


##### one video


def clip_labels(frames: np.ndarray, mask: np.ndarray, track: np.ndarray, span: tuple[int, int],
                colour: str, direction: str, wrap: Wrap = None) -> dict:
    """Colour and direction measured on one clip's output frames, and whether they match the prompt."""
    a, b = span
    found_colour = classify_colour(frames[a:b][mask[a:b]])
    found_direction = direction_of(track[a:b], wrap=wrap)
    return {"colour": found_colour, "direction": found_direction,
            "colour_ok": found_colour == colour, "direction_ok": found_direction == direction}


def score_video(frames: np.ndarray, colour: str, direction: str, N: int, M: int, drop_overlap: bool,
                clips: Optional[int] = None, torus: bool = False) -> dict:
    """Everything measured on one video (uint8 [F, H, W, 3]): per-clip labels, the share of clips right, clip 0
    alone, and the smoothness statistics. `clips` is inferred from the frame count when not given; torus: the
    video shows a torus world (positions and steps measured around it)."""
    clips = clips or clips_in(len(frames), N, M, drop_overlap)
    wrap = (frames.shape[2], frames.shape[1]) if torus else None
    mask, track = object_mask(frames), centroid_track(frames, wrap=wrap)
    spans = [s for s in clip_spans(clips, N, M, drop_overlap) if s[1] > s[0]]
    per_clip = [clip_labels(frames, mask, track, span, colour, direction, wrap) for span in spans]
    pairs = boundary_pairs(clips, N, M, drop_overlap)
    smooth = smoothness(frames, track, pairs, direction, wrap)
    new_frames = N - M if drop_overlap else N
    seams = seams_with_room(track, pairs, direction, frames.shape[1], frames.shape[2], new_frames,
                            smooth["centroid_step"]["within"], wrap)
    return {
        "clips": clips,
        "near_seam": near_seam(track, pairs, M, wrap),
        "per_clip": per_clip,
        "colour_ok": _mean([c["colour_ok"] for c in per_clip]),  # share of clips
        "direction_ok": _mean([c["direction_ok"] for c in per_clip]),
        "first_colour_ok": per_clip[0]["colour_ok"],
        "first_direction_ok": per_clip[0]["direction_ok"],
        **smooth,
        "seams": seams,
        "track": np.round(track, 1).tolist(),  # [F, 2] (x, y) per output frame, for later analysis
    }


##### configurations


@dataclass(frozen=True)
class EvalConfig:
    """One row: sampler overrides on top of the run's base setting (defaults: the paper's FNR + PNS + DSG).

    In this code M = 0 switches FNR and DSG off, alpha = 0 switches PNS off (frames >= M get fresh unit noise)
    and beta = 0 switches DSG off (no step overwrites)."""

    name: str
    overlap: int = 4  # M
    alpha: float = 4.0  # PNS
    beta: float = 0.4  # DSG
    drop_overlap: bool = False
    decoder: str = "temporal"  # or "per-frame"
    held_frames: str = "noisy"  # or "clean": DSG shows the held frames finished (models trained for it)

    def sampler(self, base: SamplerConfig) -> SamplerConfig:
        return dataclasses.replace(base, overlap=self.overlap, alpha=self.alpha, beta=self.beta,
                                   held_frames=self.held_frames)


def ablation_configs(quick: bool = False) -> list[EvalConfig]:
    """The ablation rows; quick: the reuse ladder plus drop-overlap. Values equal to the default row (alpha 4,
    beta 0.4) are not repeated in the sweeps."""
    ladder = [
        # alpha = 0 too: with M = 0 and alpha > 0, PNS still mixes every frame of the previous clip's (reversed)
        # initial noise into the next clip (pns_initial_latents), so M = 0 alone is not independent.
        EvalConfig("independent", overlap=0, alpha=0.0, beta=0.0),
        EvalConfig("fnr", alpha=0.0, beta=0.0),
        EvalConfig("fnr+pns", beta=0.0),
        EvalConfig("fnr+pns+dsg"),
    ]
    if quick:
        return ladder + [EvalConfig("fnr+pns+dsg/drop-overlap", drop_overlap=True)]
    return ladder + [
        EvalConfig("fnr+dsg", alpha=0.0),
        EvalConfig("pns-all-frames", overlap=0),  # M = 0, alpha 4: PNS over the whole clip, no FNR or DSG
        *(EvalConfig(f"alpha={a:g}", alpha=a) for a in (1.0, 16.0)),
        *(EvalConfig(f"beta={b:g}", beta=b) for b in (0.2, 0.6, 0.8)),
        EvalConfig("fnr+pns+dsg/drop-overlap", drop_overlap=True),
        EvalConfig("fnr+pns+dsg/per-frame-decoder", decoder="per-frame"),
        # beta 1 holds frame 0 of each new clip for every step: with all frames kept the seam pair is a copy and
        # the jump moves into the new clip (the near-seam columns), with drop-overlap it stays at the seam.
        EvalConfig("beta=1", beta=1.0),
        EvalConfig("beta=1/drop-overlap", beta=1.0, drop_overlap=True),
        # More or fewer held frames (the paper's M): do the free frames outvote the held ones?
        *(EvalConfig(f"M={m}", overlap=m) for m in (2, 8)),
        EvalConfig("M=8/drop-overlap", overlap=8, drop_overlap=True),
        EvalConfig("alpha=16+beta=0.8", alpha=16.0, beta=0.8),  # the two strongest single settings together
        # DSG with clean held frames (SamplerConfig.held_frames): only for a model trained with continuations.
        *clean_held_configs(),
    ]


def clean_held_configs() -> list[EvalConfig]:
    """The rows with held frames shown clean at every step (a model trained with --context-share; beta is not
    used): all frames, drop-overlap, and without PNS."""
    return [
        EvalConfig("clean-held", held_frames="clean"),
        EvalConfig("clean-held/drop-overlap", held_frames="clean", drop_overlap=True),
        EvalConfig("clean-held/alpha=0", alpha=0.0, held_frames="clean"),
    ]


def configs_by_name(names: Sequence[str]) -> list[EvalConfig]:
    """Rows of the full ablation list by name, in the order given (e.g. for a --configs option)."""
    known = {c.name: c for c in ablation_configs()}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown eval config {unknown[0]!r}: choose from {', '.join(known)}")
    return [known[n] for n in names]


def check_inputs(configs: Sequence[EvalConfig], prompts, base: SamplerConfig) -> None:
    """Fail before the model loads: every row must make a valid SamplerConfig and RuntimeConfig, names must be
    unique, and every prompt must use the vocabulary's colours and directions."""
    for config in configs:
        config.sampler(base)  # raises ConfigError, e.g. overlap > frames
        RuntimeConfig(decoder=config.decoder)
    if len({c.name for c in configs}) != len(configs):
        raise ConfigError("eval config names must be unique")
    for colour, _, direction in prompts:
        if colour not in COLOURS or direction not in DIRECTIONS:
            raise ConfigError(f"prompt ({colour!r}, {direction!r}) is outside training/vocab.py")


def eval_prompts(quick: bool = False) -> list[tuple[str, str, str]]:
    """EVAL_PROMPTS (colour, shape, direction); quick: 6 of them, every colour once and every direction."""
    per_colour = len(DIRECTIONS)
    if not quick:
        return list(EVAL_PROMPTS)
    return [EVAL_PROMPTS[i * per_colour + i % per_colour] for i in range(len(COLOURS))]


##### the runner

WORLDS = ("auto", "plain", "torus")


def model_world(source: ModelSource) -> str:
    """"torus" if the model folder's training.json says its last stage drew motion on a torus
    (train_config.wrap), else "plain" (presets, random weights, the authors' layout, older models)."""
    return "torus" if last_training_stage(source).get("wrap") else "plain"


def run_eval(source: ModelSource, configs: Sequence[EvalConfig], prompts: Sequence[tuple[str, str, str]],
             clips: int, seed: int, device: str, dtype: str, out_json: str | Path, out_md: str | Path | None = None,
             *, frames: int = 16, steps: int = 50, guidance: float = 10.0, world: str = "auto",
             log: Optional[Callable[[str], None]] = None) -> dict:
    """Generate every (config, prompt) in memory with one loaded model, score each video, and write JSON plus a
    markdown table (out_md, default: out_json with .md) after every config. Prompt i uses seed + i in every
    config, so rows differ only by their settings. world: how to measure positions ("auto": the model's own,
    see model_world). Returns the JSON document."""
    if world not in WORLDS:
        raise ConfigError(f"world must be one of {', '.join(WORLDS)} (got {world!r})")
    base = SamplerConfig(clips=clips, frames=frames, steps=steps, guidance=guidance, seed=seed)
    check_inputs(configs, prompts, base)
    world = model_world(source) if world == "auto" else world
    model = load_model(source, DTYPES[dtype], device)
    contexts = _contexts(model, prompts, device)
    doc = {"schema": SCHEMA, "setting": {**_setting(source, base, prompts, device, dtype, model), "world": world},
           "rows": []}
    pipelines: dict[str, VideoPipeline] = {}  # one per decoder, all over the same model
    for config in configs:
        pipeline = pipelines.get(config.decoder) or _pipeline(model, device, dtype, config.decoder)
        pipelines[config.decoder] = pipeline
        scores = [_score_one(pipeline, contexts[i], config, base, i, prompt, world == "torus")
                  for i, prompt in enumerate(prompts)]
        doc["rows"].append(summarise(config, scores))
        write_results(doc, out_json, out_md)
        if log:
            log(markdown_row(doc["rows"][-1]))
    return doc


def _contexts(model, prompts, device) -> list:
    """Each prompt's CFG context, encoded once and shared by every config."""
    return [encode_prompt(model, motion_prompt(c, s, d), "", device) for c, s, d in prompts]


def _pipeline(model, device: str, dtype: str, decoder: str):
    return VideoPipeline(model, RuntimeConfig(device=device, dtype=dtype, decoder=decoder))


def _score_one(pipeline, context, config: EvalConfig, base: SamplerConfig, index: int, prompt,
               torus: bool = False) -> dict:
    """Generate one video in memory (all clips, uint8 frames) and score it against its prompt."""
    colour, shape, direction = prompt
    sampler = dataclasses.replace(config.sampler(base), seed=base.seed + index)
    height, width = pipeline.model.config.height, pipeline.model.config.width
    state = pipeline.new_state(sampler, height, width)
    clips = pipeline.clips(context, sampler, state, TorchNoise(sampler.seed), config.drop_overlap)
    video = np.concatenate([clip.frames for clip in clips])  # [F, H, W, 3]
    score = score_video(video, colour, direction, sampler.frames, sampler.overlap, config.drop_overlap,
                        clips=sampler.clips, torus=torus)
    return {"prompt": motion_prompt(colour, shape, direction), "seed": sampler.seed, **score}


def _setting(source: ModelSource, base: SamplerConfig, prompts, device: str, dtype: str, model) -> dict:
    return {"source": dataclasses.asdict(source), "model": model.config.name, "height": model.config.height,
            "width": model.config.width, "clips": base.clips, "frames": base.frames, "steps": base.steps,
            "guidance": base.guidance, "seed": base.seed, "device": device, "dtype": dtype,
            "prompts": [motion_prompt(*p) for p in prompts]}


##### results


def summarise(config: EvalConfig, scores: list[dict]) -> dict:
    """One row: the config, accuracies over prompts (all clips, and clip 0 alone), and smoothness means over
    prompts. Ratios are of the means (not means of per-video ratios, which one near-still video would swamp)."""
    row = {**dataclasses.asdict(config),
           "colour_acc": _mean([s["colour_ok"] for s in scores]),
           "direction_acc": _mean([s["direction_ok"] for s in scores]),
           "first_colour_acc": _mean([s["first_colour_ok"] for s in scores]),
           "first_direction_acc": _mean([s["first_direction_ok"] for s in scores])}
    for stat in ("frame_diff", "centroid_step", "along_direction"):
        within, boundary = (_mean([s[stat][k] for s in scores]) for k in ("within", "boundary"))
        row.update({f"{stat}_within": within, f"{stat}_boundary": boundary,
                    f"{stat}_ratio": _ratio(boundary, within)})
    seams = [(j, ok) for s in scores for j, ok in zip(s["seams"]["jumps"], s["seams"]["has_room"])
             if j is not None and math.isfinite(j)]
    with_room = [j for j, ok in seams if ok]
    row["seams_with_room"] = _mean([ok for _, ok in seams])
    row["centroid_step_boundary_room"] = _mean(with_room)  # pooled over seams, not a mean of per-video means
    row["centroid_step_ratio_room"] = _ratio(row["centroid_step_boundary_room"], row["centroid_step_within"])
    row["near_seam_max"] = _mean([m for s in scores for m in s["near_seam"]["max"]])  # pooled over seams
    row["near_seam_away"] = _mean([s["near_seam"]["away"] for s in scores])
    row["near_seam_ratio"] = _ratio(row["near_seam_max"], row["near_seam_away"])
    profile = np.array([p for s in scores for p in s["near_seam"].get("profile", [])], dtype=float)  # [seams, M+1]
    # mean step of the seam pair and of each of the M pairs after it, by position (NaN where never measured)
    means = [float(np.nanmean(c)) if np.isfinite(c).any() else math.nan for c in profile.T] if profile.size else []
    row["near_seam_profile"] = means
    finite = [m for m in means if math.isfinite(m)]
    row["worst_near_seam"] = max(finite) if finite else None
    row["worst_near_seam_ratio"] = _ratio(row["worst_near_seam"], row["centroid_step_within"])
    return {**row, "videos": scores}


COLUMNS = [  # (key, header, format)
    ("name", "config", "s"), ("overlap", "M", "d"), ("alpha", "alpha", "g"), ("beta", "beta", "g"),
    ("drop_overlap", "drop overlap", "s"), ("decoder", "decoder", "s"),
    ("colour_acc", "colour acc", ".2f"), ("first_colour_acc", "colour acc clip 0", ".2f"),
    ("direction_acc", "direction acc", ".2f"), ("first_direction_acc", "direction acc clip 0", ".2f"),
    ("frame_diff_within", "frame diff within", ".2f"), ("frame_diff_boundary", "frame diff boundary", ".2f"),
    ("frame_diff_ratio", "frame diff ratio", ".2f"), ("centroid_step_within", "centroid step within (px)", ".2f"),
    ("centroid_step_boundary", "centroid jump boundary (px)", ".2f"), ("centroid_step_ratio", "centroid ratio", ".2f"),
    ("along_direction_boundary", "boundary step along prompt (px)", ".2f"),
    ("seams_with_room", "seams with room", ".2f"),
    ("centroid_step_ratio_room", "centroid ratio, seams with room", ".2f"),
    ("near_seam_max", "largest step near seam (px)", ".2f"), ("near_seam_ratio", "near-seam ratio", ".2f"),
    ("worst_near_seam", "worst pair near seam (px)", ".2f"), ("worst_near_seam_ratio", "worst-pair ratio", ".2f"),
]


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return str(value) if fmt == "s" else format(value, fmt)


def markdown_row(row: dict) -> str:
    return "| " + " | ".join(_cell(row.get(k), f) for k, _, f in COLUMNS) + " |"


def markdown(doc: dict) -> str:
    s = doc["setting"]
    head = (f"{s['model']} ({s['width']}x{s['height']}), {len(s['prompts'])} prompts x {s['clips']} clips of "
            f"{s['frames']} frames, {s['steps']} steps, CFG {s['guidance']}, seed {s['seed']}+prompt index, "
            f"{s['device']} {s['dtype']}, {s.get('world', 'plain')} world. Accuracies: share of (prompt, clip) "
            f"pairs right; frame diff in 0-255 levels; ratio = boundary / within. Rows with drop_overlap=False: the boundary pair is the previous "
            f"clip's last frame and the FNR copy of it, so it measures how well FNR re-creates that frame. Seams "
            f"with room: share of seams where the object had room ahead (toward the prompted edge) for the next "
            f"clip's motion (on a torus: every seam); the next column is the centroid ratio over those seams alone. "
            f"Largest step near seam: the largest centroid step over each seam pair and the M pairs after it (a seam that DSG turns into a copy moves "
            f"its jump there), mean over seams; near-seam ratio: that over the mean step of all other pairs. "
            f"Worst pair near seam: of the seam pair and the M pairs after it, the one with the largest mean step "
            f"over seams; worst-pair ratio: that over the within-clip step.")
    lines = ["# vidrd-rt eval", "", head, "",
             "| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|" + "|".join("---" if f == "s" else "---:" for _, _, f in COLUMNS) + "|"]
    lines += [markdown_row(r) for r in doc["rows"]]
    return "\n".join(lines) + "\n"


def _json_safe(value):
    """NaN/inf -> None (JSON has neither), numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(doc: dict, out_json: str | Path, out_md: str | Path | None = None) -> None:
    """JSON and markdown, each replaced atomically (a run cut short keeps its finished rows)."""
    out_json = Path(out_json)
    out_md = Path(out_md) if out_md else out_json.with_suffix(".md")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(str(out_json), (json.dumps(_json_safe(doc), indent=1, allow_nan=False) + "\n").encode())
    atomic_write_bytes(str(out_md), markdown(doc).encode())
