#!/usr/bin/env bash
# Issue 17, AAE Parzen: a run of configs/mnist-aae-parzen-select.sh trained on from epoch 50 to EPOCHS (the paper
# trained far longer; the validation Parzen score of the 312.8 run was still rising at epoch 45). The AAE recipes use
# a constant learning rate, so resuming is the same as a longer run. The checkpoints of epochs 5-50 are set aside
# while training (the run keeps its latest 10) and put back, so the epoch is chosen over every kept checkpoint, 5 to
# EPOCHS, by the same validation Parzen score as before. Rule, fixed before it ran: the test split is measured only
# if the chosen epoch's validation score beats BAR (the best validation score so far, over every recipe tried).
# Usage: OMP_NUM_THREADS=2 bash configs/mnist-aae-extend.sh RUN_DIR EPOCHS BAR
set -euo pipefail
R=${1:?run directory (of mnist-aae-parzen-select.sh)}
EPOCHS=${2:?total epochs}
BAR=${3:?validation score the chosen epoch must beat}
mkdir -p "$R/checkpoints-set-aside"
mv "$R"/checkpoints/epoch-* "$R/checkpoints-set-aside/"   # resume reads checkpoints/latest, which stays
raeflow train --local --resume --epochs "$EPOCHS" -o "$R"
mv "$R"/checkpoints-set-aside/epoch-* "$R/checkpoints/"
python jobs/parzen_select.py "$R" --json "$R/parzen-select-$EPOCHS.json" --bar "$BAR" \
    || { s=$?; [ "$s" -eq 3 ] && exit 0; exit "$s"; }     # 3: validation does not beat BAR, so no test
raeflow eval --model "$R/model-parzen" --task parzen
