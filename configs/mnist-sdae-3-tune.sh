#!/usr/bin/env bash
# Issue 17, SDAE-3 with Vincent et al.'s (2010) choices made on validation by `raeflow tune`: the masking-noise
# level (their grid: 0.10 / 0.25 / 0.40) and the fine-tuning learning rate, the full 3 x 3 grid around the
# declared recipe configs/mnist-sdae-3.yaml (3 x 1000, 10 denoising epochs a layer, 40 fine-tuning epochs, Adam
# with a cosine schedule, dropout 0.2, seed 0; its 1.37% is the grid's centre, noise 0.25 at lr 1e-3). The
# fine-tuning lr is model.finetune_optim's, so the pretraining keeps Adam at 1e-3 in every trial. Each trial is
# judged on its fine-tuning stage's validation error (the last 5,000 training images); only the winner's
# classifier is evaluated on the test split, once.
# Fixed before it ran. Usage: bash configs/mnist-sdae-3-tune.sh OUT_DIR   (~45 min on 2 quiet cores, 2 trials at once)
set -euo pipefail
R=${1:?output directory}
raeflow tune --config configs/mnist-sdae-3.yaml --set model.finetune_optim.kind=adam \
    --space 'model.corruption.level=grid(0.1, 0.25, 0.4)' --space 'model.finetune_optim.lr=grid(3e-4, 1e-3, 3e-3)' \
    --metric val_error --cpus-per-trial 1 --max-concurrent 2 --evaluate classify -o "$R"   # the test: $R/test.json
