#!/usr/bin/env bash
# The CUDA paths in one prepared script, for a session that is lent a GPU machine (they cannot run in CI):
#   1. the tests marked `gpu` (AMP, synchronised timing, peak GPU memory, NCCL DDP), which skip without CUDA;
#   2. the main job (`make run`'s protocol) with --device cuda;
#   3. a 1-GPU DDP smoke test: torchrun --nproc_per_node=1 with the NCCL backend.
# Everything it prints goes to bench/results/gpu_check.log and a JSON summary to bench/results/gpu_check.json
# (commit both). Run from the repository root, after `make install`:  bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=bench/results
LOG=$OUT/gpu_check.log
WORK=$(mktemp -d)
export MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow.db" GIT_PYTHON_REFRESH=quiet MLFLOW_DISABLE_TELEMETRY=true
mkdir -p "$OUT"
: > "$LOG"

step() {  # step NAME COMMAND...: run it, log it, remember its exit code and wall time
  local name=$1; shift
  echo "==> $name: $*" | tee -a "$LOG"
  local start=$SECONDS
  "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "    rc=$rc in $((SECONDS - start)) s" | tee -a "$LOG"
  RESULTS+=("{\"step\": \"$name\", \"rc\": $rc, \"wall_s\": $((SECONDS - start))}")
}

RESULTS=()
step nvidia-smi nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step torch-cuda "$BIN/python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"
step gpu-tests "$BIN/python" -m pytest -q -p no:cacheprovider -m gpu tests
step main-job-cuda "$BIN/graphtune" experiment --device cuda --output-dir "$WORK/cuda-run"
step ddp-1gpu "$BIN/python" -m torch.distributed.run --standalone --nproc_per_node=1 -m graphtune experiment \
  --device cuda --no-tracking --epochs 1 --fractions 1.0 --output-dir "$WORK/ddp-run"
cp "$WORK/cuda-run/results.json" "$OUT/gpu_check_results.json" 2>/dev/null || true
(IFS=,; echo "{\"steps\": [${RESULTS[*]}]}") > "$OUT/gpu_check.json"
cat "$OUT/gpu_check.json"
rm -rf "$WORK"
