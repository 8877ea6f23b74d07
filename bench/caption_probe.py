"""Which caption words a synthetic-scene model uses: denoising error with altered captions over the true one.

    python -m vidrd_rt.bench.caption_probe MODEL_DIR [--device cuda] [--clips 256] [--json out.json]

Fresh straight-motion clips are noised at several timesteps and denoised with their own caption, the caption played
backwards (the direction's sign: "moving left" for "moving right"), the other axis ("moving up"), and no caption.
A ratio near 1 means the model ignores that difference at that timestep; this is how the default model was found
to know the axis of the direction words but not their sign (README, "The default model").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..runtime.ddim import alphas_cumprod
from ..runtime.text_encoder import tokenize
from ..runtime.weights import load_converted
from ..training.scenes import SceneConfig, sample_batch
from ..training.train import clip_errors, encode_latents, latent_object_weights
from ..training.vocab import time_reversed_caption

TIMESTEPS = (200, 400, 600, 750, 900, 980)
OTHER_AXIS = {"left": "up", "right": "down", "up": "left", "down": "right"}


def other_axis_caption(caption: str) -> str:
    words = caption.split()
    i = words.index("moving") + 1
    words[i] = OTHER_AXIS[words[i]]
    return " ".join(words)


@torch.no_grad()
def probe(model, clips: int, device: str, seed: int = 1234, timesteps=TIMESTEPS) -> dict[int, dict[str, float]]:
    """{timestep: {"reversed"|"axis"|"none": mean error / mean error with the true caption}}."""
    g = torch.Generator(device=device).manual_seed(seed)
    scenes = SceneConfig(size=model.config.height, p_motion=1.0, p_action=0.0)
    video, captions = sample_batch(scenes, clips, g, device)
    latents = encode_latents(model, video, model.config.vae.scaling_factor)
    weights = latent_object_weights(video, latents.shape[-1], 10.0)
    variants = {"true": captions, "reversed": [time_reversed_caption(c) for c in captions],
                "axis": [other_axis_caption(c) for c in captions], "none": [""] * clips}
    contexts = {k: model.text_encoder(tokenize(model.tokenizer, v).to(device)) for k, v in variants.items()}
    alphas = alphas_cumprod(model.config.scheduler).to(device)
    out = {}
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=g, device=device)
        noisy = alphas[t].sqrt() * latents + (1 - alphas[t]).sqrt() * noise
        steps = torch.full((clips,), t, device=device)
        err = {k: clip_errors(model.unet(noisy, steps, c), noise, weights).mean().item() for k, c in contexts.items()}
        out[t] = {k: err[k] / err["true"] for k in ("reversed", "axis", "none")}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a model folder in our format (e.g. runtime/assets/default_model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clips", type=int, default=256)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    model = load_converted(Path(args.model), torch.float32, args.device)
    result = {"model": args.model, "clips": args.clips, "error_ratio": probe(model, args.clips, args.device)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
