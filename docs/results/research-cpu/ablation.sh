#!/usr/bin/env bash
# An ablation arm of the research-cpu run (docs/RESULTS.md): the same corpus, tokens and configuration with
# overrides, trained into work/research/ablation-NAME-model and evaluated on all twelve regions through views
# of the regions (work/ablation-NAME/REGION: links to the region's artifacts, its own eval/ and manifests), so
# the reference run's evaluations stay. Needs `bash docs/results/research-cpu/run.sh` first (the tokens).
#   bash docs/results/research-cpu/ablation.sh NAME [--set section.key=value ...]
#   bash docs/results/research-cpu/ablation.sh box --set train.masks.target_box=true
#   bash docs/results/research-cpu/ablation.sh 192x6 --set train.width=192 --set train.depth=6 ...
# Then: geojepa ablation-report OUT reference=work/research NAME=work/ablation-NAME --region ...
set -euo pipefail
cd "$(dirname "$0")/../../.."
NAME=$1; shift
R=work/research
A=work/ablation-$NAME
M=$R/ablation-$NAME-model
C=configs/research-cpu.yaml
G="/usr/bin/time -f %C:%e_s_%M_KB"
source docs/results/research-cpu/regions.sh
# (skipped when the arm is already trained with these settings)
OMP_NUM_THREADS=2 $G .venv/bin/geojepa train "$M" --data "${TRAIN[@]/#/$R/}" --config $C "$@"
for n in "${ALL[@]}"; do
  mkdir -p "$A/$n/manifests" "$R/$n/.eval-cache"
  # what does not depend on the model (the peers, the baselines' probes; twins of the same architecture) is
  # the same for every arm: one cache per region (geojepa/evaluate/cache.py)
  for f in "$R/$n"/* "$R/$n/.eval-cache"; do
    case "$(basename "$f")" in eval|manifests) ;; *) ln -sfn "$(realpath "$f")" "$A/$n/$(basename "$f")" ;; esac
  done
  for f in "$R/$n"/manifests/*.json; do
    [ "$(basename "$f")" = evaluate.json ] || cp "$f" "$A/$n/manifests/"
  done
  # The masked setting is what the ablation compares: the unmasked probes are left out (same seeds and fits).
  # EVAL_SET: more evaluate overrides, e.g. EVAL_SET="--set evaluate.twin_seeds=1" for a larger arm's cheaper twins
  # shellcheck disable=SC2086
  $G .venv/bin/geojepa evaluate "$A/$n" --model "$M" --config $C --set evaluate.unmasked=false ${EVAL_SET:-}
done
