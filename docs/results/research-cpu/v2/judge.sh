#!/usr/bin/env bash
# Read out a model on the arms loop's judge regions (Malta, trained on; Liechtenstein, held out; or the regions
# named after OUT.json) the loop's way: ridge, masked, protocol v2, every twin, through views (the regions' own
# eval/ untouched).
#   bash docs/results/research-cpu/v2/judge.sh work/research-v2-s0 docs/results/research-cpu/v2/judge-s0.json
#   bash docs/results/research-cpu/v2/judge.sh work/research-v2-s0 docs/results/research-cpu/v2/judge-s0-porto.json porto-centre
set -euo pipefail
MODEL=${1:?usage: judge.sh MODEL OUT.json [REGION...]}
OUT=${2:?usage: judge.sh MODEL OUT.json [REGION...]}
shift 2
.venv/bin/python - "$MODEL" "$OUT" "${@:-malta liechtenstein}" <<'PY'
import json, sys
from pathlib import Path
from geojepa.arms import JUDGE, judge
from geojepa.config import load_config
from geojepa.workdir import WorkDir
model, out = Path(sys.argv[1]), Path(sys.argv[2])
regions = " ".join(sys.argv[3:]).split()
cfg = load_config("configs/research-cpu-v2.yaml", [*JUDGE, "tracking.enabled=false"])
cells = judge(model, [WorkDir(f"work/research/{r}") for r in regions], Path("work/judge-views") / model.name, cfg)
out.write_text(json.dumps(cells, indent=1))
for cell, c in cells.items():
    better = all((c["value"] > t) if c["metric"] == "roc_auc" else (c["value"] < t) for t in c["twins"])
    print(f"{cell:32s} {c['value']:.3f}  twins {min(c['twins']):.3f} to {max(c['twins']):.3f}  "
          f"{'better than every twin' if better else ''}")
PY
