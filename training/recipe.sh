#!/usr/bin/env bash
# Train the default model from scratch on one GPU (~69 min on an H100/H200) and install it as the shipped default.
#   bash training/recipe.sh [runs]        (run from the repository root)
# The stages are time-budgeted, so a rerun gives a model of the same kind, not the same bits.
set -euo pipefail
runs=${1:-runs}
python -m vidrd_rt.training.train --out "$runs/stage1" --device cuda --vae-minutes 2.0 --unet-minutes 5.6 \
    --object-weight 0
python -m vidrd_rt.training.train --out "$runs/stage2" --device cuda --vae-minutes 0 --unet-minutes 4.4 \
    --init "$runs/stage1/model" --save-every-minutes 1.5
# Stages 3-4: half the timesteps from the noisier half, where only the caption can say the direction.
python -m vidrd_rt.training.train --out "$runs/stage3" --device cuda --vae-minutes 0 --unet-minutes 6.8 \
    --init "$runs/stage2/model" --seed 3 --high-noise-share 0.5 --motion-share 0.75 --action-share 0.1
python -m vidrd_rt.training.train --out "$runs/stage4" --device cuda --vae-minutes 0 --unet-minutes 7.2 \
    --init "$runs/stage3/model" --seed 4 --high-noise-share 0.5 --motion-share 0.75 --action-share 0.1
# Stages 5-6: the time-reversal contrast teaches the sign of the direction words (README, "The default model"); a
# short EMA, and in stage 6 only noisy timesteps, where the caption must decide the motion.
python -m vidrd_rt.training.train --out "$runs/stage5" --device cuda --vae-minutes 0 --unet-minutes 6.6 \
    --init "$runs/stage4/model" --seed 6 --high-noise-share 0.5 --motion-share 0.75 --action-share 0.1 \
    --reversal-weight 0.1 --ema-decay 0.99
python -m vidrd_rt.training.train --out "$runs/stage6" --device cuda --vae-minutes 0 --unet-minutes 4.6 \
    --init "$runs/stage5/model" --seed 7 --high-noise-share 0.5 --motion-share 0.75 --action-share 0.1 \
    --reversal-weight 0.1 --ema-decay 0.99 --reversal-min-timestep 600
# Stages 7-8: stage 6's recipe, continued (fifth session).
python -m vidrd_rt.training.train --out "$runs/stage7" --device cuda --vae-minutes 0 --unet-minutes 6.3 \
    --init "$runs/stage6/model" --seed 8 --high-noise-share 0.5 --motion-share 0.75 --action-share 0.1 \
    --reversal-weight 0.1 --ema-decay 0.99 --reversal-min-timestep 600
python -m vidrd_rt.training.train --out "$runs/stage8" --device cuda --vae-minutes 0 --unet-minutes 5 \
    --init "$runs/stage7/model" --seed 9 --high-noise-share 0.5 --motion-share 0.75 --action-share 0.1 \
    --reversal-weight 0.1 --ema-decay 0.99 --reversal-min-timestep 600
# Stage 9: straight motion on a torus, so a long video's next clip can always go on the same way (eighth session).
python -m vidrd_rt.training.train --out "$runs/stage9" --device cuda --vae-minutes 0 --unet-minutes 6.5 \
    --init "$runs/stage8/model" --seed 11 --high-noise-share 0.5 --motion-share 0.9 --action-share 0.05 \
    --reversal-weight 0.1 --ema-decay 0.99 --reversal-min-timestep 600 --wrap yes
# Stage 10: continuations for clean held frames (ninth session), two halves: 1..M held frames at random, then all M.
python -m vidrd_rt.training.train --out "$runs/stage10a" --device cuda --vae-minutes 0 --unet-minutes 6 \
    --init "$runs/stage9/model" --seed 21 --high-noise-share 0.5 --motion-share 0.9 --action-share 0.05 \
    --reversal-weight 0.1 --ema-decay 0.99 --reversal-min-timestep 600 --wrap yes \
    --context-share 0.5 --context-random-held yes
python -m vidrd_rt.training.train --out "$runs/stage10" --device cuda --vae-minutes 0 --unet-minutes 6 \
    --init "$runs/stage10a/model" --seed 30 --high-noise-share 0.5 --motion-share 0.9 --action-share 0.05 \
    --reversal-weight 0.1 --ema-decay 0.99 --reversal-min-timestep 600 --wrap yes --context-share 0.5
rm -rf runtime/assets/default_model.new
cp -r "$runs/stage10/model" runtime/assets/default_model.new
cp runtime/assets/default_model/MODEL_CARD.md runtime/assets/default_model.new/ 2>/dev/null || true
rm -rf runtime/assets/default_model && mv runtime/assets/default_model.new runtime/assets/default_model
echo "installed runtime/assets/default_model"
