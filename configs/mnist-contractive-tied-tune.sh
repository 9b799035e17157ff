#!/usr/bin/env bash
# Issue 17, contractive AE: tied weights (decoder W' = W^T) against the untied decoder of the declared recipe,
# each at lambda {0.03, 0.1, 0.3}, chosen on validation by `raeflow tune`. Why: Rifai et al. (2011) and the reference
# tutorial's cA tie the decoder to the encoder. With an untied decoder the penalty on the encoder's Jacobian can be
# met by shrinking the encoder's weights while the decoder grows to undo it, which leaves near-linear features that
# regularise nothing; a tied decoder cannot grow on its own. The declared recipe (untied, lambda 0.1, 1.62% test)
# is one of the six trials; every trial fine-tunes as it did (configs/finetune/mnist-contractive-adam.yaml).
# The trial with the lowest validation error wins and only its classifier is evaluated on the test split, once.
# Fixed before it ran; seed 0. Usage: bash configs/mnist-contractive-tied-tune.sh OUT_DIR  (~35 min on 2 cores)
set -euo pipefail
R=${1:?output directory}
raeflow tune --config configs/mnist-contractive.yaml --finetune configs/finetune/mnist-contractive-adam.yaml \
    --space 'model.lam=grid(0.03, 0.1, 0.3)' --space 'model.tied=grid(false, true)' \
    --metric val_error --cpus-per-trial 1 --max-concurrent 2 --evaluate classify -o "$R"   # the test: $R/test.json
