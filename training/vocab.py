"""The words of the synthetic-scene world: what the data generator draws and what `vidrd-rt eval` checks.

Object colours are saturated and backgrounds are not, so a saturation mask finds the object and its hue names the
colour (bench/eval_shapes.py).
"""

from __future__ import annotations

# Object colours, RGB in [0, 1]: hues far enough apart for a hue classifier (red 0, orange 30, yellow 55, green 130,
# blue 225, purple 280 degrees).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "orange": (0.98, 0.55, 0.08),
    "yellow": (0.95, 0.88, 0.10),
    "green": (0.12, 0.75, 0.22),
    "blue": (0.12, 0.30, 0.92),
    "purple": (0.62, 0.20, 0.85),
}
SHAPES = ("circle", "square", "triangle")
# Unit motion per direction in image coordinates (x right, y down).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# Clip-level actions besides straight motion.
ACTIONS = ("bouncing", "growing", "shrinking")
# Backgrounds are grey-scale or weakly tinted (low saturation).
BACKGROUNDS = ("black", "white", "gray", "dark", "striped", "checkered", "dotted", "cloudy")
CAMERA = ("zooming in", "zooming out", "panning left", "panning right", "panning up", "panning down")
# Words whose meaning flips when a clip plays backwards ("zooming in" backwards is "zooming out").
TIME_REVERSED_WORDS: dict[str, str] = {"left": "right", "right": "left", "up": "down", "down": "up",
                                       "growing": "shrinking", "shrinking": "growing", "in": "out", "out": "in"}


def motion_prompt(colour: str, shape: str, direction: str, background: str | None = None) -> str:
    """'a red circle moving right' (+ ' on a striped background')."""
    text = f"a {colour} {shape} moving {direction}"
    return f"{text} on a {background} background" if background else text


def time_reversed_caption(caption: str) -> str | None:
    """The caption of the same clip played backwards ('... moving left' -> '... moving right'), or None when no
    word of it tells the arrow of time (a bouncing shape, a still scene, an empty caption)."""
    words = caption.split()
    flipped = [TIME_REVERSED_WORDS.get(w, w) for w in words]
    return " ".join(flipped) if flipped != words else None


def all_words() -> list[str]:
    """Every word a caption can use: the tokenizer gets one token per word."""
    words = {"a", "an", "and", "on", "moving", "background", "still", "scene", "of", "camera", "with", "in", "out",
             "two", "shapes", "video"}
    words |= set(COLOURS) | set(SHAPES) | set(DIRECTIONS) | set(ACTIONS) | set(BACKGROUNDS)
    for phrase in CAMERA:
        words |= set(phrase.split())
    return sorted(words)


# The fixed prompt set of `vidrd-rt eval`: every colour with every direction, shapes in turn (24 prompts).
EVAL_PROMPTS: list[tuple[str, str, str]] = [
    (colour, SHAPES[(i + j) % len(SHAPES)], direction)
    for i, colour in enumerate(COLOURS)
    for j, direction in enumerate(DIRECTIONS)
]
