#!/usr/bin/env bash
# The research-cpu run of docs/RESULTS.md, stage by stage (what `python -m flows.pipeline --corpus
# configs/corpus.yaml --config configs/research-cpu.yaml --work-root work/research` does, without Prefect, so
# each stage's time and peak memory can be read). On the project's 2-core CPU machine: about 4 min extract and
# tile, 5 min tokenizer, 5 min tokens, 40 min training, then evaluation.
#   bash docs/results/research-cpu/run.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/../../.."
R=work/research
C=configs/research-cpu.yaml
STEPS=${1:-800}
G="/usr/bin/time -f %C:%e_s_%M_KB"
source docs/results/research-cpu/regions.sh
for n in "${ALL[@]}"; do
  $G .venv/bin/geojepa extract "data/samples/${SRC[$n]}.osm.pbf" $R/$n --config $C
  $G .venv/bin/geojepa tile $R/$n --config $C
done
.venv/bin/python -c "
from geojepa.corpus import load_corpus, mark_region
c = load_corpus('configs/corpus.yaml')
for r in c.regions: mark_region(c.work_dir(r, '$R'), c, r)"
$G .venv/bin/geojepa tokenizer fit $R/corpus-tokenizer --data "${TRAIN[@]/#/$R/}" --config $C
for n in "${ALL[@]}"; do
  $G .venv/bin/geojepa tokens $R/$n --tokenizer $R/corpus-tokenizer --config $C
done
OMP_NUM_THREADS=2 $G .venv/bin/geojepa train $R/corpus-model --data "${TRAIN[@]/#/$R/}" --config $C \
  --set train.max_steps="$STEPS"
for n in "${ALL[@]}"; do
  $G .venv/bin/geojepa evaluate $R/$n --model $R/corpus-model --config $C
done
.venv/bin/geojepa corpus-report $R/corpus-model --data "${ALL[@]/#/$R/}" --title research-cpu
