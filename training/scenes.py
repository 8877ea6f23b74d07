"""Synthetic captioned clips, rendered on the fly in torch (any device): the training data of the default model.

Three kinds of clip, each with a caption from training/vocab.py:
- motion: one shape of one colour moving left/right/up/down over a background ("a red circle moving right ...");
- action: one shape bouncing off the walls, growing or shrinking ("a blue square bouncing");
- pseudo-video: a still picture of two shapes seen by a zooming or panning camera (paper section 4.2).

Everything is drawn with anti-aliased signed distances, so sub-pixel motion stays smooth from frame to frame.
Backgrounds have low saturation and objects high saturation, which is what bench/eval_shapes.py relies on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .vocab import ACTIONS, BACKGROUNDS, CAMERA, COLOURS, DIRECTIONS, SHAPES

COLOUR_NAMES = list(COLOURS)
DIRECTION_NAMES = list(DIRECTIONS)
COLOUR_RGB = torch.tensor(list(COLOURS.values()))  # (6, 3)
DIRECTION_XY = torch.tensor(list(DIRECTIONS.values()), dtype=torch.float32)  # (4, 2)


@dataclass(frozen=True)
class SceneConfig:
    size: int = 64  # pixels per side
    frames: int = 16
    min_speed: float = 1.0  # pixels per frame
    max_speed: float = 2.2
    min_radius: float = 5.0
    max_radius: float = 9.0
    p_motion: float = 0.6  # share of motion clips; the rest split between actions and pseudo-videos
    p_action: float = 0.2
    p_background_word: float = 0.5  # how often a caption names its background
    # Motion clips on a torus: a shape leaving by one edge comes back by the opposite one, and every position is
    # as likely at every frame. A clip can then always go on the way it was going, which is what a long video
    # asks of the next clip; with edges, a shape near the edge it heads to must start over or turn back.
    wrap: bool = False


#################################################################################
#                                   Drawing                                      #
#################################################################################


def shape_distance(shape: torch.Tensor, cx, cy, r, xs, ys, period: float = 0.0) -> torch.Tensor:
    """Signed distance in pixels (negative inside) of circle (0), square (1) or upward triangle (2).

    shape (B,) long; cx, cy, r (B, F); xs, ys (H, W) pixel centres -> (B, F, H, W). With a period (the frame
    size of a torus), the nearest of the shape's copies one period away along x or y counts too, so a shape
    crossing an edge shows on both sides."""
    if period:
        copies = [(0.0, 0.0), (period, 0.0), (-period, 0.0), (0.0, period), (0.0, -period)]
        return torch.stack([shape_distance(shape, cx + ox, cy + oy, r, xs, ys) for ox, oy in copies]).amin(0)
    dx = xs - cx[..., None, None]  # (B, F, H, W)
    dy = ys - cy[..., None, None]
    r = r[..., None, None]
    circle = torch.sqrt(dx * dx + dy * dy) - r
    square = torch.maximum(dx.abs(), dy.abs()) - 0.85 * r  # same area as the circle, roughly
    # Isosceles triangle, apex at (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r).
    triangle = torch.maximum(dy - r, (dx.abs() - (dy + r) / 2) / math.sqrt(1.25))
    pick = shape[:, None, None, None]
    return torch.where(pick == 0, circle, torch.where(pick == 1, square, triangle))


def composite(background: torch.Tensor, colour: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """background (B, 3, F, H, W), colour (B, 3), distance (B, F, H, W) -> shape painted over the background."""
    alpha = (0.5 - distance).clamp(0, 1)[:, None]  # (B, 1, F, H, W): one pixel of anti-aliasing
    return background * (1 - alpha) + colour[:, :, None, None, None] * alpha


def backgrounds(kind: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """kind (B,) indexes BACKGROUNDS -> (B, 3, size, size) images with saturation below ~0.15."""
    b, device = kind.shape[0], kind.device
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=device)  # noqa: E731
    ys, xs = _grid(size, device)
    level = {"black": 0.06, "white": 0.94, "gray": 0.5, "dark": 0.25}
    base = torch.full((b,), 0.5, device=device)
    for i, name in enumerate(BACKGROUNDS):
        if name in level:
            base = torch.where(kind == i, torch.tensor(level[name], device=device), base)
    base = (base + 0.06 * (rand(b) - 0.5))[:, None, None]  # (B, 1, 1)
    # Coarse textures (periods of 14-30 px): a small VAE with 8x8 latents can keep them and the object both.
    angle, period, phase = rand(b, 1, 1) * math.pi, 14 + 16 * rand(b, 1, 1), rand(b, 1, 1) * 20
    u = xs * torch.cos(angle) + ys * torch.sin(angle)  # (B, H, W) coordinate across the stripes
    stripes = 0.35 + 0.3 * (torch.sin(2 * math.pi * (u + phase) / period) > 0)
    checks = 0.3 + 0.4 * (((xs + phase) // (period / 2) + (ys + phase) // (period / 2)) % 2)
    dots = 0.7 - 0.4 * ((torch.sin(2 * math.pi * xs / period) * torch.sin(2 * math.pi * ys / period)) > 0.6)
    cloud = F.interpolate(rand(b, 1, 4, 4), size=(size, size), mode="bicubic", align_corners=False)[:, 0]
    cloud = 0.25 + 0.5 * cloud.clamp(0, 1)
    grey = base.expand(b, size, size)
    for name, image in (("striped", stripes), ("checkered", checks), ("dotted", dots), ("cloudy", cloud)):
        grey = torch.where((kind == BACKGROUNDS.index(name))[:, None, None], image, grey)
    tint = 1 + 0.12 * (rand(b, 3, 1, 1) - 0.5)  # weak colour cast, well below object saturation
    return (grey[:, None] * tint).clamp(0, 1)  # (B, 3, H, W)


def _grid(size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    coords = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    return coords[:, None].expand(size, size), coords[None, :].expand(size, size)  # ys, xs


#################################################################################
#                                 Clip kinds                                     #
#################################################################################


def motion_tracks(cfg: SceneConfig, direction: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight motion: (cx, cy) each (B, F). Starts range from just off-screen (entering) to late positions
    (leaving), so the model sees shapes enter and leave, which long videos need. With cfg.wrap, starts are
    uniform over the frame and positions wrap around it (a torus)."""
    b, device = direction.shape[0], direction.device
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=device)  # noqa: E731
    speed = cfg.min_speed + (cfg.max_speed - cfg.min_speed) * rand(b, 1)
    t = torch.arange(cfg.frames, device=device, dtype=torch.float32)[None]  # (1, F)
    start = cfg.size * rand(b, 1) if cfg.wrap else -0.3 * cfg.size + 1.1 * cfg.size * rand(b, 1)
    along = start + speed * t  # position along the motion, (B, F)
    across = cfg.max_radius + (cfg.size - 2 * cfg.max_radius) * rand(b, 1)  # (B, 1)
    vec = DIRECTION_XY.to(device)[direction]  # (B, 2)
    # Moving in the negative direction is the mirror image of moving in the positive one.
    backward = cfg.size - along
    if cfg.wrap:
        along, backward = along % cfg.size, backward % cfg.size
    coord = lambda axis: torch.where(vec[:, axis:axis + 1] < 0, backward, along)  # noqa: E731
    cx = torch.where(vec[:, :1] != 0, coord(0), across.expand_as(along))
    cy = torch.where(vec[:, 1:] != 0, coord(1), across.expand_as(along))
    return cx, cy


def bounce_tracks(cfg: SceneConfig, radius: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal motion reflected at the walls (a triangle wave between radius and size - radius)."""
    b, device = radius.shape[0], radius.device
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=device)  # noqa: E731
    t = torch.arange(cfg.frames, device=device, dtype=torch.float32)[None]
    tracks = []
    for _ in range(2):
        span = cfg.size - 2 * radius[:, :1]  # (B, 1)
        v = (cfg.min_speed + (cfg.max_speed - cfg.min_speed) * rand(b, 1)) * torch.sign(rand(b, 1) - 0.5)
        u = (rand(b, 1) * 2 * span + v * t) % (2 * span)  # position on the unfolded path
        tracks.append(radius[:, :1] + torch.where(u < span, u, 2 * span - u))
    return tracks[0], tracks[1]


def camera_thetas(cfg: SceneConfig, move: torch.Tensor, generator) -> torch.Tensor:
    """Affine sampling grids (B*F, 2, 3) for zoom in/out and pans of a still picture (CAMERA order)."""
    b, device = move.shape[0], move.device
    t = torch.linspace(0, 1, cfg.frames, device=device)[None]  # (1, F)
    amount = 0.2 + 0.2 * torch.rand(b, 1, generator=generator, device=device)
    scale = torch.full((b, cfg.frames), 0.75, device=device)
    scale = torch.where(move[:, None] == 0, 1 - amount * t, scale)  # zooming in: the window shrinks
    scale = torch.where(move[:, None] == 1, 1 - amount * (1 - t), scale)
    shift = (1 - scale) * (2 * t - 1)  # pans sweep the spare margin from one side to the other
    tx = torch.where(move[:, None] == 2, -shift, torch.where(move[:, None] == 3, shift, torch.zeros_like(t)))
    ty = torch.where(move[:, None] == 4, -shift, torch.where(move[:, None] == 5, shift, torch.zeros_like(t)))
    theta = torch.zeros(b, cfg.frames, 2, 3, device=device)
    theta[..., 0, 0], theta[..., 1, 1], theta[..., 0, 2], theta[..., 1, 2] = scale, scale, tx, ty
    return theta.reshape(-1, 2, 3)


#################################################################################
#                                  A batch                                       #
#################################################################################


def sample_batch(cfg: SceneConfig, batch: int, generator: torch.Generator,
                 device="cpu") -> tuple[torch.Tensor, list[str]]:
    """`batch` clips (B, 3, F, H, W) in [0, 1] and their captions, kinds mixed by cfg's shares."""
    kind = torch.rand(batch, generator=generator, device=device)
    is_motion = kind < cfg.p_motion
    is_action = (~is_motion) & (kind < cfg.p_motion + cfg.p_action)
    video, captions = _objects(cfg, batch, generator, device, is_action)
    still, still_captions = _pseudo_videos(cfg, batch, generator, device)
    is_still = ~(is_motion | is_action)
    video = torch.where(is_still[:, None, None, None, None], still, video)
    captions = [s if flag else c for c, s, flag in zip(captions, still_captions, is_still.tolist())]
    return video, captions


def _draw(n: int, high: int, generator, device) -> torch.Tensor:
    return torch.randint(high, (n,), generator=generator, device=device)


def _objects(cfg: SceneConfig, b: int, generator, device, is_action: torch.Tensor):
    """Motion clips, or action clips where is_action: one shape each."""
    colour, shape = _draw(b, len(COLOURS), generator, device), _draw(b, len(SHAPES), generator, device)
    direction, action = _draw(b, len(DIRECTIONS), generator, device), _draw(b, len(ACTIONS), generator, device)
    background = _draw(b, len(BACKGROUNDS), generator, device)
    radius = cfg.min_radius + (cfg.max_radius - cfg.min_radius) * torch.rand(b, 1, generator=generator, device=device)
    radius = radius.expand(b, cfg.frames)
    cx, cy = motion_tracks(cfg, direction, generator)
    bx, by = bounce_tracks(cfg, radius, generator)
    t = torch.linspace(0, 1, cfg.frames, device=device)[None]
    grow = 3 + (cfg.max_radius + 4 - 3) * t  # (1, F): growing from 3 px, shrinking is its reverse
    bounce, growing = is_action & (action == 0), is_action & (action > 0)
    cx, cy = torch.where(bounce[:, None], bx, cx), torch.where(bounce[:, None], by, cy)
    centre = cfg.size / 2 + (cfg.size / 4) * (torch.rand(b, 2, generator=generator, device=device) - 0.5)
    cx, cy = torch.where(growing[:, None], centre[:, :1], cx), torch.where(growing[:, None], centre[:, 1:], cy)
    sizes = torch.where(action[:, None] == 1, grow, grow.flip(-1))
    radius = torch.where(growing[:, None], sizes, radius)
    ys, xs = _grid(cfg.size, device)
    canvas = backgrounds(background, cfg.size, generator)[:, :, None].expand(-1, -1, cfg.frames, -1, -1)
    distance = shape_distance(shape, cx, cy, radius, xs, ys, period=cfg.size if cfg.wrap else 0.0)
    video = composite(canvas, COLOUR_RGB.to(device)[colour], distance)
    captions = [_object_caption(cfg, generator, *v) for v in zip(
        colour.tolist(), shape.tolist(), direction.tolist(), action.tolist(), background.tolist(), is_action.tolist())]
    return video, captions


def _object_caption(cfg, generator, colour, shape, direction, action, background, is_action) -> str:
    what = f"a {COLOUR_NAMES[colour]} {SHAPES[shape]}"
    text = f"{what} {ACTIONS[action]}" if is_action else f"{what} moving {DIRECTION_NAMES[direction]}"
    if torch.rand(1, generator=generator, device=generator.device).item() < cfg.p_background_word:
        text += f" on a {BACKGROUNDS[background]} background"
    return text


def _pseudo_videos(cfg: SceneConfig, b: int, generator, device):
    """A still picture of two shapes, moved through by a camera (zoom or pan)."""
    background = _draw(b, len(BACKGROUNDS), generator, device)
    picture = backgrounds(background, cfg.size, generator)[:, :, None]  # (B, 3, 1, H, W)
    ys, xs = _grid(cfg.size, device)
    names = []
    for _ in range(2):
        colour, shape = _draw(b, len(COLOURS), generator, device), _draw(b, len(SHAPES), generator, device)
        pos = cfg.max_radius + (cfg.size - 2 * cfg.max_radius) * torch.rand(b, 2, 1, generator=generator,
                                                                            device=device)
        radius = cfg.min_radius + (cfg.max_radius - cfg.min_radius) * torch.rand(b, 1, generator=generator,
                                                                                 device=device)
        distance = shape_distance(shape, pos[:, 0], pos[:, 1], radius, xs, ys)
        picture = composite(picture, COLOUR_RGB.to(device)[colour], distance)
        names.append([f"a {COLOUR_NAMES[c]} {SHAPES[s]}" for c, s in zip(colour.tolist(), shape.tolist())])
    move = _draw(b, len(CAMERA), generator, device)
    grid = F.affine_grid(camera_thetas(cfg, move, generator), [b * cfg.frames, 3, cfg.size, cfg.size],
                         align_corners=False)
    frames = picture[:, :, 0, None].expand(-1, -1, cfg.frames, -1, -1).transpose(1, 2).reshape(-1, 3, cfg.size,
                                                                                              cfg.size)
    video = F.grid_sample(frames, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    video = video.reshape(b, cfg.frames, 3, cfg.size, cfg.size).transpose(1, 2)  # (B, 3, F, H, W)
    captions = [f"{first} and {second} with camera {CAMERA[m]}" for first, second, m in
                zip(names[0], names[1], move.tolist())]
    return video, captions
