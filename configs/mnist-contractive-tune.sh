#!/usr/bin/env bash
# Issue 17, contractive AE + fine-tuning with both chosen on validation by `raeflow tune`: the contraction weight
# lambda and the fine-tuning learning rate, the full 3 x 3 grid (the hand grids of mnist-contractive-sgd.sh and
# -sgd-lambda.sh covered one row and one column of it). Each trial pretrains the CAE of configs/mnist-contractive.yaml
# (30 epochs, seed 0) with its lambda, then fine-tunes it with configs/finetune/mnist-contractive-sgd.yaml and its lr;
# the trial with the lowest validation error wins and only its classifier is evaluated on the test split, once.
# Trials with the same lambda share one CAE (trained once, under a file lock). Ray Tune walks the
# grid here with finetune.train.lr fastest, so the second trial of each lambda waits for the first one's pretraining.
# Fixed before it ran. Usage: bash configs/mnist-contractive-tune.sh OUT_DIR   (~60 min on 2 cores, 2 trials at once)
set -euo pipefail
R=${1:?output directory}
raeflow tune --config configs/mnist-contractive.yaml --finetune configs/finetune/mnist-contractive-sgd.yaml \
    --space 'finetune.train.lr=grid(0.01, 0.03, 0.1)' --space 'model.lam=grid(0.03, 0.1, 0.3)' \
    --metric val_error --cpus-per-trial 1 --max-concurrent 2 --evaluate classify -o "$R"   # the test: $R/test.json
