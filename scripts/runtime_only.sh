#!/usr/bin/env bash
# The install the project exists for, proven: the runtime alone (`pip install .`, no extras)
# in a fresh virtual environment, where torch, torchvision, transformers, timm and open_clip
# must not even be installed; then `sdrun check`, `sdrun run` and `sdrun score` on a bundle
# built by the full environment (scripts/setup.sh builds engines/tiny) and on synthetic pairs.
#
#   bash scripts/runtime_only.sh                 # BUNDLE=engines/tiny
#   BUNDLE=path/to/bundle RT_VENV=/tmp/rt-venv bash scripts/runtime_only.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PYTHON=${PYTHON:-python3}
BUNDLE=$(cd "${BUNDLE:-engines/tiny}" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/spotdiff-runtime-only.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
VENV=${RT_VENV:-$WORK/venv}

"$PYTHON" -m venv --clear "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$ROOT"   # no extras
"$VENV/bin/python" -m pip list --format=freeze | sed 's/^/  installed: /'

# Nothing of the export side, not even installed; and sdrun is the installed copy, not the checkout.
cd "$WORK"
"$VENV/bin/python" - "$VENV" <<'EOF'
import importlib.util
import sys
from pathlib import Path

found = [m for m in ("torch", "torchvision", "transformers", "timm", "open_clip")
         if importlib.util.find_spec(m) is not None]
if found:
    sys.exit(f"runtime-only install: {', '.join(found)} importable, must not be")
import sdrun

if Path(sys.argv[1]).resolve() not in Path(sdrun.__file__).resolve().parents:
    sys.exit(f"sdrun imported from {sdrun.__file__}, not from the runtime-only venv")
print(f"runtime-only venv: sdrun {sdrun.__version__}; torch, torchvision, transformers, timm, open_clip absent")
EOF

export SPOTDIFF_CACHE_DIR="$WORK/cache"   # a cold start: nothing remembered from another environment
SDRUN="$VENV/bin/sdrun"
"$SDRUN" check "$BUNDLE"
"$SDRUN" synth --out "$WORK/pairs" --pairs 6 --seed 1
"$SDRUN" run "$BUNDLE" --data "$WORK/pairs" --out "$WORK/submission.csv" --quiet
"$SDRUN" score "$WORK/submission.csv" "$WORK/pairs/labels.csv"
echo "runtime-only install: check, run and score passed on $BUNDLE"
