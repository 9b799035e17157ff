#!/usr/bin/env bash
# Issue 17: the chosen contractive recipe (configs/mnist-contractive-tied.yaml: tied, lambda 0.3; validation 1.06%,
# test 1.35%) pretrained for 100 epochs instead of 30 (Rifai et al. trained far longer), fine-tuned exactly as before.
# Rule, fixed before it ran: it replaces the recipe only if its best validation error is below 1.06%; only then is
# its classifier evaluated on the test split, once. Usage: bash configs/mnist-contractive-tied-long.sh OUT_DIR
# (~25 min on one core)
set -euo pipefail
R=${1:?output directory}
raeflow train --local --config configs/mnist-contractive-tied.yaml --epochs 100 -o "$R/pretrain"
raeflow finetune --local --model "$R/pretrain" --dataset mnist --epochs 50 --dropout 0.3 \
    --set train.schedule=cosine -o "$R/finetune"
best=$(python -c "import json,sys; print(min(json.loads(l)['val_error'] for l in open(sys.argv[1])))" \
    "$R/finetune/metrics.jsonl")
echo "best validation error $best (the 30-epoch recipe's: 0.0106)"
if python -c "import sys; sys.exit(0 if float(sys.argv[1]) < 0.0106 else 1)" "$best"; then
    raeflow eval --model "$R/finetune" --task classify
else
    echo "the 30-epoch recipe stays"
fi
