#!/usr/bin/env bash
# Issue 17's "then the Fashion-MNIST table again": the two MNIST classification recipes that changed in issue 17
# (tied decoders: configs/mnist-contractive-tied.yaml and configs/mnist-sdae-3-tied-long.yaml) on Fashion-MNIST, with
# the same shortened schedules and heads as the table's earlier rows, so the rows compare recipe to recipe:
# contractive 10 pretraining + 15 fine-tuning epochs (dropout 0.3); SDAE-3 4 pretraining epochs a layer + 15
# fine-tuning epochs (dropout 0.5). Seed 0, nothing chosen on the test split (no choice is made at all).
# Usage: OMP_NUM_THREADS=1 bash configs/fmnist-tied.sh OUT_DIR   (~20 min on one core)
set -euo pipefail
R=${1:?output directory}
F="--set data.dataset=fashion-mnist"
raeflow train --local --config configs/mnist-contractive-tied.yaml $F --epochs 10 -o "$R/fmnist-cae-tied"
raeflow finetune --local --model "$R/fmnist-cae-tied" --dataset fashion-mnist --epochs 15 --dropout 0.3 \
    --set train.schedule=cosine -o "$R/fmnist-cae-tied-ft"
raeflow eval --model "$R/fmnist-cae-tied-ft" --task classify
raeflow train --local --config configs/mnist-sdae-3-tied-long.yaml $F --set model.dropout=0.5 \
    --set train.stage_epochs.pretrain=4 --set train.stage_epochs.finetune=15 -o "$R/fmnist-sdae-tied"
raeflow eval --model "$R/fmnist-sdae-tied" --task classify
