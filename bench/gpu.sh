#!/usr/bin/env bash
# The GPU checks and sweep, one prepared script for a lent H100/H200 (15 minutes of device time a session, all
# tries together; docs/benchmarks.md). It needs torch, numpy and pyarrow only, and a compact corpus made here:
#   .venv/bin/geojepa compact work/gpu/corpus.npz work/research/{helsinki,kotka,...}     # the training regions
# then, through the device tool, from the repository root (the corpus carried, under 64 MiB):
#   bash bench/gpu.sh work/gpu/corpus.npz "$OUT" 5
# Writes to OUT (default work/gpu/out): device.txt, bench-train.txt (packed vs padded steps, the chip's bf16
# matmul rate), sweep.txt and sweep.json, and per arm model.pt (fp16, the full tokens' widths), history.json,
# train.log, train_config.json. Wall time: about 1.5 min of device facts and benchmark, the training budget,
# and 15 to 30 s an arm of start-up. Back here: geojepa evaluate REGION --model OUT/<arm>/model.pt.
# Test it on this CPU with tiny arms: GEOJEPA_GPU_TINY=1 PYTHON=.venv/bin/python bash bench/gpu.sh work/gpu/corpus.npz /tmp/gpu 1
set -uo pipefail
CORPUS=${1:?usage: bash bench/gpu.sh CORPUS.npz [OUT] [MINUTES]}
OUT=${2:-${OUT:-work/gpu/out}}
MINUTES=${3:-5}  # whole minutes: the sweep's training budget
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}  # here: PYTHON=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # geojepa from this checkout (not installed on the host)
if [ ! -f "$CORPUS" ]; then echo "error: $CORPUS: no such compact tokens file (carry it: it is under work/, ignored by git)" >&2; exit 2; fi
mkdir -p "$OUT"
TINY=()
BENCH=(--full --steps 6)
if [ -n "${GEOJEPA_GPU_TINY:-}" ]; then TINY=(--tiny); BENCH=(--steps 2 --tiles 64); fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
} 2>&1 | tee "$OUT/device.txt"
# 1. the training step benchmark (packed vs padded), at most 90 s; a failure is recorded, not fatal
timeout 90 $PY bench/train.py "${BENCH[@]}" 2>&1 | tee "$OUT/bench-train.txt" || echo "bench/train.py: exit $?" | tee -a "$OUT/bench-train.txt"
# 2. the sweep: its budget is the arms' training; each arm is cut to fit its share
timeout $(( MINUTES * 60 + 4 * 60 )) $PY bench/gpu_sweep.py "$CORPUS" "$OUT" --minutes "$MINUTES" "${TINY[@]}" 2>&1 | tee "$OUT/sweep.txt"
status=${PIPESTATUS[0]}
du -sh "$OUT"/* 2>/dev/null
exit "$status"
