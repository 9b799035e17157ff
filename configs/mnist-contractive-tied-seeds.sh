#!/usr/bin/env bash
# Issue 17, contractive AE: the row's figure as the mean over fine-tuning seeds, as the issue's test-set discipline asks
# ("if you run several seeds, report their mean - never the best"). Both validated fine-tunings of the tied CAE
# (configs/mnist-contractive-tied.yaml, 100 epochs, pretrained once with seed 0) run with seeds 0, 1 and 2.
# Seed 0 was meant to repeat the tune trials (SGD val 0.86% / test 1.43%, Adam val 0.88% / test 1.30%); its first
# run measured 1.34 and 1.46% instead, which found that `raeflow finetune` did not seed the classifier head (fixed in
# d2096be). The tune trials' heads were unseeded, so no run can repeat them; this script, restarted on the fix, gives
# three seeded runs of each recipe.
#   SGD  (the row's recipe, chosen by configs/mnist-contractive-tied-sgd-tune.sh): lr 0.03, batches of 32, momentum
#        0.9, no dropout, 50 epochs, cosine (configs/finetune/mnist-contractive-sgd.yaml)
#   Adam (reported beside it, configs/finetune/mnist-contractive-tied.yaml): lr 3e-3, batches of 128, dropout 0.1
# Rule, fixed before it ran: the recipes stay as chosen (the row is SGD's, by the rule of the grid that chose it); the
# row's figure becomes SGD's three-seed mean test error, Adam's three-seed mean is reported beside it. Both recipes'
# seed-0 test figures were already known when this was written, so the seeds cannot move which recipe is the row.
# Usage: OMP_NUM_THREADS=1 bash configs/mnist-contractive-tied-seeds.sh CAE_MODEL OUT_DIR   (~18 min on one core)
#   CAE_MODEL: the pretrained CAE, e.g. the pretrain/model of configs/mnist-contractive-tied-long.sh's run
set -euo pipefail
CAE=${1:?pretrained CAE model directory}
R=${2:?output directory}
for seed in 0 1 2; do
    raeflow finetune --local --model "$CAE" --dataset mnist -o "$R/sgd-$seed" --epochs 50 --lr 0.03 --batch-size 32 \
        --dropout 0.0 --set train.optimizer=sgd --set train.schedule=cosine --set train.seed=$seed
    raeflow eval --model "$R/sgd-$seed" --task classify
    raeflow finetune --local --model "$CAE" --dataset mnist -o "$R/adam-$seed" --epochs 50 --lr 3e-3 --batch-size 128 \
        --dropout 0.1 --set train.optimizer=adam --set train.schedule=cosine --set train.seed=$seed
    raeflow eval --model "$R/adam-$seed" --task classify
done
python - "$R" <<'PY'
import json, statistics, sys
from pathlib import Path
for recipe in ("sgd", "adam"):
    runs = sorted(Path(sys.argv[1]).glob(f"{recipe}-*"))
    val = [min(json.loads(l).get("val_error", 1) for l in open(r / "metrics.jsonl")) * 100 for r in runs]
    test = [json.loads((r / "eval" / "eval-mnist.json").read_text())["tasks"]["classify"]["test_error_percent"]
            for r in runs]
    print(f"{recipe}: validation % {val} mean {statistics.mean(val):.3f}; test % {test} mean {statistics.mean(test):.3f}")
PY
