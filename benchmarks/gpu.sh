#!/usr/bin/env bash
# Benchmarks 1-3 (latency, cold start and memory, accuracy) on a CUDA machine: sdrun with
# onnxruntime's CUDA provider against the seed-style and the optimised PyTorch pipelines
# on the GPU. Meant to finish in under 8 minutes on one modern GPU.
#
#   bash benchmarks/gpu.sh                      # results in $OUT, else benchmarks/results/gpu
#   BUNDLE=engines/full-owl GDINO=none bash benchmarks/gpu.sh
#
# Needs: the venv (.venv, or PYTHON=...) with the export extra, PyTorch with CUDA and
# onnxruntime-gpu (in place of onnxruntime). Builds the full-random bundle first when
# $BUNDLE has none (no network needed; a few minutes on a many-core machine).
# Environment: OUT, BUNDLE (engines/full), GDINO (preset|none, for the build), PAIRS (3),
# REPEATS (3), BUDGET_S (470: the whole script's time limit in seconds).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT_DIR=${OUT:-benchmarks/results/gpu}
BUNDLE=${BUNDLE:-engines/full}
GDINO=${GDINO:-}
PAIRS=${PAIRS:-3}
REPEATS=${REPEATS:-3}
BUDGET_S=${BUDGET_S:-470}
export BENCH_THREADS=${BENCH_THREADS:-$(nproc)}
mkdir -p "$OUT_DIR"
end=$((SECONDS + BUDGET_S))
left() { local l=$((end - SECONDS)); [ "$l" -gt 10 ] || { echo "gpu.sh: out of time" >&2; exit 124; }; echo "$l"; }
log() { echo "[gpu.sh $(date -u +%H:%M:%S)] $*" | tee -a "$OUT_DIR/gpu.log" >&2; }

log "checking CUDA in PyTorch and onnxruntime"
"$PY" - <<'EOF' | tee "$OUT_DIR/gpu_env.txt"
import sys
import onnxruntime as ort
import torch
ok = True
if not torch.cuda.is_available():
    print("PyTorch sees no CUDA device", file=sys.stderr); ok = False
if "CUDAExecutionProvider" not in ort.get_available_providers():
    print("onnxruntime has no CUDAExecutionProvider: pip install onnxruntime-gpu "
          "(in place of onnxruntime)", file=sys.stderr); ok = False
if ok:
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
    print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}")
sys.exit(0 if ok else 3)
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT_DIR/gpu_env.txt" 2>/dev/null || true

if [ ! -f "$BUNDLE/manifest.json" ]; then
  log "building $BUNDLE (full-random${GDINO:+, gdino $GDINO})"
  gd=()
  [ -n "$GDINO" ] && gd=(--gdino "$GDINO")
  timeout "$(left)" "$PY" -m sdexport.cli build --preset full-random ${gd[@]+"${gd[@]}"} --out "$BUNDLE" \
    2>&1 | tail -n 25 | tee -a "$OUT_DIR/gpu.log"
fi

log "1. latency: reference, torch, sdrun (CUDA), $PAIRS pairs x $REPEATS repeats"
timeout "$(left)" "$PY" benchmarks/latency.py --bundle "$BUNDLE" --provider cuda \
  --contenders reference,torch,sdrun-fp32 --int8 none --no-flops \
  --pairs "$PAIRS" --repeats "$REPEATS" --out-dir "$OUT_DIR" --name latency_gpu

log "3. accuracy against the PyTorch reference (the latency run's answers)"
timeout "$(left)" "$PY" benchmarks/accuracy.py --bundle "$BUNDLE" \
  --from-latency "$OUT_DIR/latency_gpu.json" --out-dir "$OUT_DIR" --name accuracy_gpu

log "2. cold start and memory (CPU RSS; GPU memory is not included)"
timeout "$(left)" "$PY" benchmarks/coldstart.py --bundle "$BUNDLE" --provider cuda \
  --repeats 2 --variants sdrun,torch --out-dir "$OUT_DIR" --name coldstart_gpu

log "done: $OUT_DIR"
