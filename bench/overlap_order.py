"""Experiment, not a product option: FNR/DSG with the previous clip's frames in forward order instead of reversed.

The paper (Eq. 6-8) hands clip k+1 the last M frames of clip k reversed (new frame j <- old frame N-1-j), so the
new clip's first M frames move backwards. Does that reversal cause the seam jumps that `vidrd-rt eval` measures?
This runs the eval with the order swapped for a cyclic shift (new frame j <- old frame (j - M) mod N: the last M
frames in their own order, PNS frames j >= M mixing old frame j - M), always with --drop-overlap (the first M frames
of a new clip repeat the old ones). It swaps two functions of runtime/reuse.py and runtime/sampler.py for this
process only.

    python -m vidrd_rt.bench.overlap_order --order forward --alpha 0 --json forward-a0.json   (CPU, 4-7 min a row)
"""

from __future__ import annotations

import argparse

import torch

from ..runtime import reuse, sampler
from ..runtime.weights import ModelSource
from . import eval_shapes


def shifted_frames(x: torch.Tensor, overlap: int) -> torch.Tensor:
    """[B, C, N, H, W] -> the same, new frame j <- old frame (j - M) mod N (replaces Eq. 6's reversal)."""
    return x.roll(overlap, dims=2)


def last_frames(x: torch.Tensor, overlap: int) -> torch.Tensor:
    """[B, C, N, H, W] -> [B, C, M, H, W]: the last M frames in their own order (replaces the reversed head)."""
    return x[:, :, x.shape[2] - overlap :]


def use_forward_order(overlap: int) -> None:
    """Swap the reversal for the cyclic shift, in this process (PNS and the DSG heads read these names)."""
    reuse.reversed_frames = lambda x: shifted_frames(x, overlap)
    sampler.reversed_head = last_frames


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--order", choices=("forward", "reversed"), default="forward")
    p.add_argument("--alpha", type=float, default=4.0)
    p.add_argument("--beta", type=float, default=0.4)
    p.add_argument("--clips", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    row = eval_shapes.EvalConfig(f"{args.order}/alpha={args.alpha:g}/beta={args.beta:g}/drop-overlap",
                                 alpha=args.alpha, beta=args.beta, drop_overlap=True)
    if args.order == "forward":
        use_forward_order(row.overlap)
    eval_shapes.run_eval(ModelSource(), [row], eval_shapes.eval_prompts(), clips=args.clips, seed=args.seed,
                         device=args.device, dtype="fp32", out_json=args.json, log=print)


if __name__ == "__main__":
    main()
