#!/usr/bin/env bash
# Issue 17, contractive AE: the validated recipes' final models trained on all 60,000 training images. Every choice
# (tied weights, lambda 0.3, 100 pretraining epochs, both fine-tunings) was made on the last 5,000 training images
# by the grids named in configs/mnist-contractive-tied.yaml; those 5,000 were then left out of every model that was
# tested. Training the final model on the training and validation images together, with the choices and schedules
# fixed, is the usual last step once nothing is left to choose; it gives the test figure 9% more labelled data.
# What changes against configs/mnist-contractive-tied-seeds.sh, and nothing else: data.val_size=0 for the
# pretraining (same config, seed 0) and for the fine-tunings. With no validation split the trainer keeps the epoch
# with the lowest training twin of the selection metric, the earliest of equals: the pretraining's lowest training
# loss (the last epochs of a cosine schedule), the fine-tunings' lowest training error (for SGD, which fits the
# training images exactly by epoch 20-30, the first epoch at zero). With a validation split they kept epochs 24-42.
# Rule, fixed before it ran: the row's figure becomes the SGD recipe's (the row's, by its grid's rule) mean test error
# over fine-tuning seeds 0, 1 and 2 of this script, whatever it measures; the Adam recipe's mean is reported beside
# it, as before. No other choice is made from these runs.
# Measured: SGD 1.33 / 1.31 / 1.32%, mean 1.32% (the row); Adam 1.43 / 1.33 / 1.31%, mean 1.36% (RESULTS.md).
# Usage: OMP_NUM_THREADS=1 bash configs/mnist-contractive-tied-full.sh OUT_DIR   (~40 min on one core)
set -euo pipefail
R=${1:?output directory}
raeflow train --local --config configs/mnist-contractive-tied.yaml --set data.val_size=0 -o "$R/pretrain"
CAE="$R/pretrain/model"
for seed in 0 1 2; do
    raeflow finetune --local --model "$CAE" --dataset mnist -o "$R/sgd-$seed" --epochs 50 --lr 0.03 --batch-size 32 \
        --dropout 0.0 --set train.optimizer=sgd --set train.schedule=cosine --set train.seed=$seed \
        --set data.val_size=0
    raeflow eval --model "$R/sgd-$seed" --task classify
    raeflow finetune --local --model "$CAE" --dataset mnist -o "$R/adam-$seed" --epochs 50 --lr 3e-3 --batch-size 128 \
        --dropout 0.1 --set train.optimizer=adam --set train.schedule=cosine --set train.seed=$seed \
        --set data.val_size=0
    raeflow eval --model "$R/adam-$seed" --task classify
done
python - "$R" <<'PY'
import json, statistics, sys
from pathlib import Path
for recipe in ("sgd", "adam"):
    runs = sorted(Path(sys.argv[1]).glob(f"{recipe}-*"))
    test = [json.loads((r / "eval" / "eval-mnist.json").read_text())["tasks"]["classify"]["test_error_percent"]
            for r in runs]
    print(f"{recipe}: test % {test} mean {statistics.mean(test):.3f}")
PY
