"""README's picture of the default model: every third frame of two clips per prompt, one row per prompt.

    python docs/make_frames.py docs/default-model-frames.png        (CPU, ~1 minute; needs Pillow)

Each row is `vidrd-rt generate --clips 2 --prompt P --seed 0` with no model flags, decoded back from its mp4; the
colour and direction `vidrd-rt eval` reads from each clip are printed.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import av
import numpy as np
from PIL import Image

from vidrd_rt.bench import eval_shapes as ev
from vidrd_rt.runtime.weights import ModelSource

PROMPTS = ("a red circle moving right", "a blue square moving up", "a green triangle moving left")
SCALE, GAP = 2, 4  # pixels per video pixel; white gap between frames


def score(prompt: str, frames: np.ndarray) -> str:
    """The eval's colour and direction of each clip, measured in the shipped model's world."""
    words = prompt.split()
    torus = ev.model_world(ModelSource()) == "torus"
    result = ev.score_video(frames, words[1], words[4], 16, 4, False, clips=2, torus=torus)
    return ", ".join(f"{c['colour']} {c['direction']}" for c in result["per_clip"])


def frames_of(prompt: str, folder: Path) -> np.ndarray:
    out = folder / f"{abs(hash(prompt))}.mp4"
    subprocess.run([sys.executable, "-m", "vidrd_rt.cli", "generate", "--clips", "2", "--prompt", prompt, "--seed",
                    "0", "--out", str(out)], check=True, capture_output=True)
    with av.open(str(out)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])  # (T, H, W, 3)


def main(path: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        videos = [frames_of(p, Path(tmp)) for p in PROMPTS]
    for prompt, video in zip(PROMPTS, videos):
        print(f"{prompt}: {score(prompt, video)}")
    rows = [video[::3] for video in videos]
    t, h, w, _ = rows[0].shape
    sheet = np.full((len(rows) * (h * SCALE + GAP), t * (w * SCALE + GAP), 3), 255, np.uint8)
    for r, frames in enumerate(rows):
        for i, frame in enumerate(frames):
            y, x = r * (h * SCALE + GAP), i * (w * SCALE + GAP)
            sheet[y : y + h * SCALE, x : x + w * SCALE] = frame.repeat(SCALE, 0).repeat(SCALE, 1)
    Image.fromarray(sheet).save(path)
    print(f"wrote {path}: {len(rows)} prompts x {t} frames")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/default-model-frames.png")
