#!/usr/bin/env bash
# Set up spotdiff on a fresh machine and run the main job on the built-in default:
# a virtual environment with the runtime + export side, the tiny-random bundle and
# its golden check against PyTorch, synthetic pairs, and `sdrun run` on them.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[export,train,serve,ray,openvino,dev]'

BUNDLE=${BUNDLE:-engines/tiny}
DEMO=${DEMO:-engines/demo}
.venv/bin/sdexport build --preset tiny-random --out "$BUNDLE"
.venv/bin/sdrun check "$BUNDLE"
.venv/bin/sdrun synth --out "$DEMO" --pairs 20 --seed 0
.venv/bin/sdrun run "$BUNDLE" --data "$DEMO" --out "$DEMO/submission.csv" --viz "$DEMO/viz" --batch-pairs 4
echo "submission: $DEMO/submission.csv, details: $DEMO/submission.details.jsonl, pictures: $DEMO/viz/"
