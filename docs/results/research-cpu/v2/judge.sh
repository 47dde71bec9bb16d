#!/usr/bin/env bash
# Read out a model on the arms loop's judge regions (Malta, trained on; Liechtenstein, held out) the loop's
# way: ridge, masked, protocol v2, every twin, through views (the regions' own eval/ untouched).
#   bash docs/results/research-cpu/v2/judge.sh work/research-v2-s0 docs/results/research-cpu/v2/judge-s0.json
set -euo pipefail
MODEL=${1:?usage: judge.sh MODEL OUT.json}
OUT=${2:?usage: judge.sh MODEL OUT.json}
.venv/bin/python - "$MODEL" "$OUT" <<'PY'
import json, sys
from pathlib import Path
from geojepa.arms import JUDGE, judge
from geojepa.config import load_config
from geojepa.workdir import WorkDir
model, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = load_config("configs/research-cpu-v2.yaml", [*JUDGE, "tracking.enabled=false"])
cells = judge(model, [WorkDir("work/research/malta"), WorkDir("work/research/liechtenstein")],
              Path("work/judge-views") / model.name, cfg)
out.write_text(json.dumps(cells, indent=1))
for cell, c in cells.items():
    better = all((c["value"] > t) if c["metric"] == "roc_auc" else (c["value"] < t) for t in c["twins"])
    print(f"{cell:32s} {c['value']:.3f}  twins {min(c['twins']):.3f} to {max(c['twins']):.3f}  "
          f"{'better than every twin' if better else ''}")
PY
