#!/usr/bin/env bash
# GPU check for TensorRT engines (issue 6), on one CUDA machine, in under 8 minutes:
#   1. environment + the GPU's measured bf16 matrix rate
#   2. tiny-random bundle -> fp16 engines (golden check, fp32 pinning) -> sdrun check on them
#   3. full-random bundle -> fp16 engines for OWL-ViT image, Siamese, CLIP (+ Grounding DINO
#      with FULL_GDINO=full-random) -> golden check recorded in the manifest
#   4. image encoders' achieved TFLOP/s at batch 32 (OWL-ViT, CLIP) vs the matrix rate
#   5. per-pair latency, batch 1 and 8 pairs: TensorRT fp16 vs onnxruntime CUDA vs PyTorch
#      eager fp32 and fp16 autocast (+ sdrun end to end)
#   6. label agreement of TensorRT fp16 with an fp32 reference on 64 synthetic pairs
#   7. summary.md
# Each stage has its own time limit and writes its JSON as soon as it is done; a failed or
# timed-out stage is recorded in stages.tsv and the script goes on. The whole run stops
# starting stages once BUDGET_S (default 470 s) is spent.
#
# Usage (repository root or anywhere):  bash benchmarks/gpu_trt.sh [RESULTS_DIR]
#   RESULTS_DIR defaults to $OUT (the device tool's folder) or benchmarks/results/gpu_trt.
# Environment knobs:
#   PYTHON=python3        the interpreter (it needs torch with CUDA for stages 1, 4, 5)
#   WHEELHOUSE=.whl       wheels to install first (--no-index) when tensorrt/onnxruntime-gpu/
#                         cuda-python/open_clip are missing; else pip from the index is tried
#   TRT_SPEC=tensorrt-cu13==10.16.1.11   what to pip install for TensorRT (10.x: TensorRT 11
#                         has no weak typing, and sdexport then converts the ONNX to fp16)
#   TINY_BUNDLE=/path  FULL_BUNDLE=/path   reuse bundles instead of exporting them
#   FULL_GDINO=none|full-random            Grounding DINO in the full bundle (default none:
#                         its export + engine build alone take most of the 8 minutes)
#   FULL_OPT_LEVEL=2      TensorRT builder optimisation level for the full engines
#   BUDGET_S=470          seconds after which no new stage starts
#   NO_INSTALL=1          install nothing (dry runs)
#
# Needs: an NVIDIA GPU and driver; python with numpy, onnx, onnxruntime(-gpu), torch (CUDA),
# transformers, timm, open_clip (to export the bundles), tensorrt + cuda-python (or CuPy).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RESULTS="${1:-${OUT:-$ROOT/benchmarks/results/gpu_trt}}"
WORK="${WORK:-/tmp/gpu_trt}"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-470}"
WHEELHOUSE="${WHEELHOUSE:-$ROOT/.whl}"
TRT_SPEC="${TRT_SPEC:-tensorrt-cu13==10.16.1.11}"
FULL_GDINO="${FULL_GDINO:-none}"
FULL_OPT_LEVEL="${FULL_OPT_LEVEL:-2}"
mkdir -p "$RESULTS" "$WORK"
cd "$ROOT"

export PYTHONPATH="$ROOT/runtime:$ROOT/export${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false
LOG="$RESULTS/log.txt"
STAGES="$RESULTS/stages.tsv"
: >"$LOG"
printf 'stage\tstatus\tseconds\tlimit\n' >"$STAGES"
START=$SECONDS
DEADLINE=$((START + BUDGET_S))

log() { echo "[$(date -u +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$LOG"; }

# stage NAME LIMIT_S CMD...: run CMD with a timeout (never past the deadline); record it.
stage() {
  local name=$1 limit=$2 left rc t0 status
  shift 2
  left=$((DEADLINE - SECONDS))
  if ((left < 15)); then
    log "SKIP $name: out of time (${left}s left)"
    printf '%s\tskipped (out of time)\t0\t%s\n' "$name" "$limit" >>"$STAGES"
    return 0
  fi
  if ((limit > left)); then limit=$left; fi
  log "START $name (limit ${limit}s): $*"
  t0=$SECONDS
  set +e
  timeout --signal=TERM --kill-after=15 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  set -e
  case $rc in
    0) status=ok ;;
    124 | 137) status="timeout" ;;
    *) status="failed (exit $rc)" ;;
  esac
  log "END $name: $status in $((SECONDS - t0))s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$limit" >>"$STAGES"
  return 0
}

has() { "$PY" -c "import $1" >/dev/null 2>&1; }

# ---- 0. what is missing gets installed (wheelhouse first, then the index) ---------------------
install_missing() {
  local want=()
  has tensorrt || want+=("$TRT_SPEC")
  has cuda.bindings.runtime || has cupy || want+=("cuda-python")
  "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
    >/dev/null 2>&1 || want+=("onnxruntime-gpu")
  has open_clip || want+=("open_clip_torch")
  if ((${#want[@]} == 0)); then
    log "all backends import"
    return 0
  fi
  log "missing: ${want[*]}"
  mkdir -p /tmp/gpu_trt_site
  if compgen -G "$WHEELHOUSE/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_trt_site \
      "$WHEELHOUSE"/*.whl >>"$LOG" 2>&1 || log "wheelhouse install failed"
  else
    timeout 150 "$PY" -m pip install -q --target /tmp/gpu_trt_site "${want[@]}" >>"$LOG" 2>&1 ||
      log "pip install ${want[*]} failed (no network?); stages needing them will report it"
  fi
  export PYTHONPATH="/tmp/gpu_trt_site:$PYTHONPATH"
}

log "spotdiff GPU TensorRT check -> $RESULTS (budget ${BUDGET_S}s)"
(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true) \
  | tee "$RESULTS/nvidia-smi.txt" >>"$LOG"
T0=$SECONDS
if [ -n "${NO_INSTALL:-}" ]; then log "NO_INSTALL set: installing nothing"; else
  install_missing || log "install step failed"
fi
printf 'install\tdone\t%s\t170\n' "$((SECONDS - T0))" >>"$STAGES"

stage env 60 "$PY" benchmarks/gpu_trt.py env --out "$RESULTS/env.json"
stage matmul 60 "$PY" benchmarks/gpu_trt.py matmul --out "$RESULTS/matmul.json"

# ---- tiny-random: engines, pinning, golden check ------------------------------------------------
TINY="${TINY_BUNDLE:-$WORK/tiny}"
if [ -z "${TINY_BUNDLE:-}" ]; then
  stage tiny_build 120 "$PY" -m sdexport.cli build --preset tiny-random --gdino-size 256 \
    --out "$TINY" --no-check
fi
stage tiny_engines 150 "$PY" -m sdexport.cli engines "$TINY" --precision fp16 --max-batch 8 \
  --opt-level 1
stage tiny_check 60 "$PY" -m sdrun.cli check "$TINY" --provider tensorrt:fp16 --json
[ -f "$TINY/manifest.json" ] && cp "$TINY/manifest.json" "$RESULTS/tiny_manifest.json"

# ---- full-random: the real architectures -------------------------------------------------------
FULL="${FULL_BUNDLE:-$WORK/full}"
if [ -z "${FULL_BUNDLE:-}" ]; then
  stage full_build 240 "$PY" -m sdexport.cli build --preset full-random --gdino "$FULL_GDINO" \
    --out "$FULL" --no-check
fi
ENGINE_MODELS=(--model owlvit/image --model siamese --model clip)
[ "$FULL_GDINO" != none ] && ENGINE_MODELS+=(--model gdino)
stage full_engines 300 "$PY" -m sdexport.cli engines "$FULL" --precision fp16 --max-batch 8 \
  --opt-level "$FULL_OPT_LEVEL" "${ENGINE_MODELS[@]}"
[ -f "$FULL/manifest.json" ] && cp "$FULL/manifest.json" "$RESULTS/full_manifest.json"

stage tflops 90 "$PY" benchmarks/gpu_trt.py tflops "$FULL" --out "$RESULTS/tflops.json" \
  --matmul "$RESULTS/matmul.json" --batch 32 --backends trt-fp16 torch-fp16 torch-fp32
stage latency 180 "$PY" benchmarks/gpu_trt.py latency "$FULL" --out "$RESULTS/latency.json" \
  --work "$WORK" --pairs 1 8 --e2e-pairs 16
stage agree 90 "$PY" benchmarks/gpu_trt.py agree "$FULL" --out "$RESULTS/agree.json" \
  --work "$WORK" --pairs 64

# ---- summary -----------------------------------------------------------------------------------
"$PY" - "$RESULTS" <<'PYEOF' || log "summary failed"
import json, sys
from pathlib import Path

r = Path(sys.argv[1])
def load(name):
    p = r / name
    try:
        return json.loads(p.read_text())
    except Exception:
        return None

lines = ["# TensorRT GPU check (benchmarks/gpu_trt.sh)", ""]
env = load("env.json") or {}
lines += [f"- GPU: {env.get('gpu')}, engine key {env.get('engine_key_fp16')}",
          f"- tensorrt {env.get('tensorrt')}, onnxruntime {env.get('onnxruntime')} "
          f"{env.get('onnxruntime_providers')}, torch {env.get('torch')}", ""]
lines += ["## Stages", "", "| stage | status | s |", "|---|---|---|"]
for row in (r / "stages.tsv").read_text().splitlines()[1:]:
    name, status, secs, _ = row.split("\t")
    lines.append(f"| {name} | {status} | {secs} |")
for tag in ("tiny", "full"):
    m = load(f"{tag}_manifest.json")
    if not m or not m.get("engines"):
        continue
    lines += ["", f"## {tag} engines (golden check vs PyTorch)", "",
              "| key | graph | stage | pinned fp32 | max rel_l2 | ok |", "|---|---|---|---|---|---|"]
    for key, sec in m["engines"].items():
        for g, e in sec.get("graphs", {}).items():
            c = e.get("check", {})
            lines.append(f"| {key} | {g} | {e.get('stage')} | {', '.join(e.get('pinned_fp32', [])) or '-'}"
                         f" ({e.get('pinned_layers', 0)}) | {c.get('max_rel_l2')} | {c.get('ok')} |")
mm = load("matmul.json")
if mm:
    lines += ["", f"bf16 matmul {mm['n']}^3: **{mm['tflops']:.0f} TFLOP/s**"]
tf = load("tflops.json")
if tf:
    lines += ["", f"## Image encoders at batch {tf['batch']}", "",
              "| encoder | backend | ms | TFLOP/s | share of matmul rate |", "|---|---|---|---|---|"]
    for enc, e in tf.get("encoders", {}).items():
        for b, v in e.get("backends", {}).items():
            if "error" in v:
                lines.append(f"| {enc} | {b} | error: {v['error'][:80]} | | |")
            else:
                share = v.get("share_of_matmul_rate")
                lines.append(f"| {enc} | {b} | {v['median_ms']:.2f} | {v['tflops']:.0f} | "
                             f"{'-' if share is None else f'{share:.0%}'} |")
lat = load("latency.json")
if lat:
    lines += ["", "## Per-pair latency (ms)", "", "| backend | what | 1 pair | 8 pairs |", "|---|---|---|---|"]
    for what, table in (("model forward", lat.get("forward_per_pair_ms", {})),
                        ("end to end", lat.get("end_to_end", {}))):
        for b, v in table.items():
            lines.append(f"| {b} | {what} | {v.get('1', float('nan')):.1f} | {v.get('8', float('nan')):.1f} |")
    lines += ["", f"speed-up TensorRT fp16 vs PyTorch fp32: {lat.get('speedup_trt_fp16_vs_torch_fp32')}"
              " (target >= 4x end to end)"]
    if lat.get("errors"):
        lines += ["", "errors: " + json.dumps(lat["errors"])[:2000]]
ag = load("agree.json")
if ag:
    lines += ["", f"## Agreement: {ag.get('identical')}/{ag.get('pairs')} pairs identical "
              f"({ag.get('identical_share')}) vs {ag.get('reference')} (target >= 99%)"]
    if ag.get("errors"):
        lines += ["errors: " + json.dumps(ag["errors"])[:1000]]
(r / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
log "done in $((SECONDS - START))s; results in $RESULTS"
