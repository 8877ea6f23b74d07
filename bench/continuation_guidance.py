"""Experiment, not a product option: DSG plus reconstruction guidance (Ho et al. 2022, "Video Diffusion Models",
section 3.1) on the overlap frames.

DSG (Eq. 8) only overwrites the new clip's first M latents; the other frames see them through the UNet's temporal
layers and are otherwise free, so `vidrd-rt eval` measures seam jumps 8-10x the within-clip steps. Ho et al. found
the same of their "replacement" sampler and fixed it by also moving the free frames along the gradient that makes
the model's estimate of the conditioning frames match them:

    x0_b <- x0_b - (w_r * sqrt(abar_t) / 2) * grad_{z_b} || x_a - x0_a(z_t) ||^2

with x_a the previous clip's final (clean) latents of its last M frames, in the order DSG hands them over, and
z_b the new clip's frames M..N-1. The DDIM update keeps the model's eps and uses the guided x0 (a variant of their
sampler). It needs a backward pass through the UNet per guided step, so it runs only on the eager torch backend.
This swaps runtime/pipeline.py's sequential sampler for this process only, and reuses the sampler's private helpers
(an experiment, not an interface).

    python -m vidrd_rt.bench.continuation_guidance --weight 0.25 --order forward --prompts quick --json rg.json
"""

from __future__ import annotations

import argparse

import torch

from ..runtime import pipeline as pipeline_module
from ..runtime import sampler as sampler_module
from ..runtime.reuse import dsg_overwrite
from ..runtime.sampler import _check_shapes, _dsg_plan, _start_latents, guided_output
from ..runtime.weights import ModelSource
from . import eval_shapes, overlap_order


def make_guided_sampler(weight: float, guided_steps: int | None):
    """A drop-in for runtime/sampler.py sample_clip that adds reconstruction guidance on clips after the first."""

    def sample_clip(denoise, table, state, context, cfg, noise, callback=None):
        mask, active, depth = _dsg_plan(cfg.steps, cfg.overlap, cfg.beta, state.prev_heads.device)
        _check_shapes(table, state, cfg, depth)
        if table.prediction_type != "epsilon" or table.clip_sample:
            raise ValueError("continuation guidance is written for epsilon prediction without clip_sample")
        reuse, M = state.clips_done > 0, cfg.overlap
        # The previous clip's final latents of its last M frames in DSG's order [B, C, M, h, w], kept on the state
        # (a state resumed from disk has none, and its next clip runs unguided).
        target = getattr(state, "guidance_target", None) if reuse else None
        unet, dtype = denoise.unet, denoise.dtype
        grad_denoise = lambda s, t, c: unet(s.to(dtype), t, c.to(dtype)).to(s.dtype)  # noqa: E731
        context = context.clone()  # a normal tensor: the encoder ran under inference_mode
        x = _start_latents(state, cfg, noise).clone()  # [B, C, N, h, w]
        limit = cfg.steps if guided_steps is None else guided_steps
        for i in range(cfg.steps):
            if reuse and active[i]:
                x = dsg_overwrite(x, state.prev_heads[i], mask[i])
            if i < depth:
                state.prev_heads[i].copy_(sampler_module.reversed_head(x, M))
            if i == 0:
                state.prev_initial.copy_(x)
            t = table.timesteps[i]
            sqrt_a, sqrt_1ma, sqrt_a_prev, sqrt_1ma_prev = table.coef[i].float().tolist()
            if target is not None and weight > 0 and i < limit:
                xg = x.detach().requires_grad_(True)
                with torch.enable_grad():
                    eps = guided_output(grad_denoise, xg, t, context, cfg.guidance)  # [B, C, N, h, w]
                    x0_head = (xg[:, :, :M] - sqrt_1ma * eps[:, :, :M]) / sqrt_a  # [B, C, M, h, w]
                    loss = (x0_head - target).square().sum()
                    (grad,) = torch.autograd.grad(loss, xg)
                eps = eps.detach()
                x0 = (x - sqrt_1ma * eps) / sqrt_a  # [B, C, N, h, w]
                step = (weight * sqrt_a / 2) * grad
                step[:, :, :M] = 0  # the conditioning frames follow DSG (and are dropped from the video)
                x0 = x0 - step
            else:
                with torch.inference_mode():
                    eps = guided_output(denoise, x, t, context, cfg.guidance)
                eps = eps.clone()
                x0 = (x - sqrt_1ma * eps) / sqrt_a
            x = (sqrt_a_prev * x0 + sqrt_1ma_prev * eps).detach()  # DDIM, eta 0 (runtime/ddim.py)
            if callback is not None:
                callback({"clip": state.clips_done, "step": i, "latents": x})
        state.guidance_target = sampler_module.reversed_head(x, M).clone()  # in the order the next clip's DSG uses
        state.clips_done += 1
        return x

    return sample_clip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weight", type=float, default=0.25, help="w_r; 0 = plain DSG through this loop")
    p.add_argument("--guided-steps", type=int, default=None, help="guide the first S steps (default all)")
    p.add_argument("--order", choices=("forward", "reversed"), default="forward")
    p.add_argument("--alpha", type=float, default=4.0)
    p.add_argument("--beta", type=float, default=0.4)
    p.add_argument("--drop-overlap", choices=("yes", "no"), default="yes")
    p.add_argument("--prompts", choices=("quick", "all"), default="quick")
    p.add_argument("--clips", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    drop = args.drop_overlap == "yes"
    steps = f"/steps={args.guided_steps}" if args.guided_steps is not None else ""
    name = f"rg={args.weight:g}/{args.order}/alpha={args.alpha:g}/beta={args.beta:g}{steps}"
    name += "/drop-overlap" if drop else ""
    row = eval_shapes.EvalConfig(name, alpha=args.alpha, beta=args.beta, drop_overlap=drop)
    if args.order == "forward":
        overlap_order.use_forward_order(row.overlap)
    pipeline_module.sample_clip = make_guided_sampler(args.weight, args.guided_steps)
    eval_shapes.run_eval(ModelSource(model=args.model), [row],
                         eval_shapes.eval_prompts(quick=args.prompts == "quick"), clips=args.clips, seed=args.seed, device=args.device, dtype="fp32", out_json=args.json,
                         log=print)


if __name__ == "__main__":
    main()
