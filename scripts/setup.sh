#!/usr/bin/env bash
# Set up spotdiff on a fresh machine and run the main job on the built-in default:
# a virtual environment with the runtime + export side, the tiny-random bundle,
# its golden check against PyTorch.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[export,dev]'

BUNDLE=${BUNDLE:-engines/tiny}
.venv/bin/sdexport build --preset tiny-random --out "$BUNDLE"
.venv/bin/sdrun check "$BUNDLE"
