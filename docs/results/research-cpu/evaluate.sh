#!/usr/bin/env bash
# Evaluate a model on the twelve regions of the research-cpu run (protocol v2 unless overridden) and write the
# corpus report. Needs `bash docs/results/research-cpu/data.sh` first (the regions, tokenised with the shipped
# model's tokenizer).
#   bash docs/results/research-cpu/evaluate.sh MODEL OUT [--set section.key=value ...]
#   bash docs/results/research-cpu/evaluate.sh models/geojepa-cpu docs/results/research-cpu
set -euo pipefail
cd "$(dirname "$0")/../../.."
MODEL=$1; OUT=$2; shift 2
R=work/research
C=configs/research-cpu.yaml
G="/usr/bin/time -f %C:%e_s_%M_KB"
source docs/results/research-cpu/regions.sh
for n in "${ALL[@]}"; do
  $G .venv/bin/geojepa evaluate $R/$n --model "$MODEL" --config $C "$@"
done
.venv/bin/geojepa corpus-report "$OUT" --data "${ALL[@]/#/$R/}" --title research-cpu
