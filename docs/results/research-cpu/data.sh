#!/usr/bin/env bash
# The twelve regions of the research-cpu run, extracted, tiled and tokenised with the shipped model's tokenizer
# (models/geojepa-cpu/tokenizer, the corpus tokenizer run.sh fitted), so the shipped model and any model trained
# on work/research evaluate on them without refitting. On the project's 2-core CPU machine: about 9 minutes.
#   bash docs/results/research-cpu/data.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
R=work/research
C=configs/research-cpu.yaml
source docs/results/research-cpu/regions.sh
for n in "${ALL[@]}"; do
  .venv/bin/geojepa extract "data/samples/${SRC[$n]}.osm.pbf" $R/$n --config $C
  .venv/bin/geojepa tile $R/$n --config $C
done
.venv/bin/python -c "
from geojepa.corpus import load_corpus, mark_region
c = load_corpus('configs/corpus.yaml')
for r in c.regions: mark_region(c.work_dir(r, '$R'), c, r)"
mkdir -p $R/corpus-tokenizer
cp -r models/geojepa-cpu/tokenizer/. $R/corpus-tokenizer/
for n in "${ALL[@]}"; do
  .venv/bin/geojepa tokens $R/$n --tokenizer $R/corpus-tokenizer --config $C
done
