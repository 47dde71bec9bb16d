"""Benchmark: `geojepa evaluate` under protocol v2, cold and warm, against the reference protocol in the same
process, each evaluation in its own child process: wall time, its phases, peak RSS (wait4).

    python bench/evaluate.py W --model M --other M2 [--config C] [--set k=v ...]

Runs, in this order, on a copy of the region's eval cache state:
1. reference: `evaluate.protocol=reference`, caches off (the protocol v2 replaces, as it ran before);
2. v2 cold: the default protocol with empty caches (twins, peers and baseline probes computed);
3. v2 warm: the same region evaluated again with another model ``M2`` of the same architecture and tokenizer
   (the twins' vectors, the peers and the baselines' probes from the cache; only M2's own work).
Prints each run's figures and the ratios to the reference run; the last line is JSON. The cache
(`W/.eval-cache`) is moved aside before and put back after; `W/eval/` is left with the last run's results.

For the issue's targets: W = work/research/isle-of-wight (docs/results/research-cpu/data.sh), M =
models/geojepa-cpu, C = configs/research-cpu.yaml, M2 a second model trained on the same tokens.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_child  # noqa: E402

CHILD = r"""
import json, sys
from pathlib import Path
from geojepa.config import load_config
from geojepa.evaluate import evaluate
w, model, config = Path(sys.argv[1]), sys.argv[2], sys.argv[3] or None
cfg = load_config(config, ["tracking.enabled=false", *[o for o in sys.argv[4].split(";") if o]])
s = evaluate(w, cfg, model=model, force=True).as_dict()
print(json.dumps({"total_s": s["seconds"], "timing": s["timing"], "tiles": s["tiles"], "cache": s["cache"],
                  "protocol": s["protocol"]["name"]}))
"""


def run(name: str, w: Path, model: str, config: str, overrides: list[str]) -> dict:
    r = run_child(CHILD, w, model, config or "", ";".join(overrides))
    t = r["timing"]
    phases = ", ".join(f"{k} {v:.1f}" for k, v in t.items() if not isinstance(v, dict))
    print(f"  {name:10s} {r['seconds']:7.1f} s wall, peak {r['peak_rss_mb']:7,.0f} MB  ({phases}); "
          f"cache hits {r['cache']['hits']}, misses {r['cache']['misses']}", flush=True)
    return {"seconds": round(r["seconds"], 1), "peak_rss_mb": round(r["peak_rss_mb"]), "timing": t,
            "cache": r["cache"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("region", type=Path)
    p.add_argument("--model", required=True)
    p.add_argument("--other", required=True, help="another model of the same architecture and tokenizer")
    p.add_argument("--config", default="")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args()
    import os

    print(f"machine: {len(os.sched_getaffinity(0))} cores; python {sys.version.split()[0]}; region {a.region}")
    cache = a.region / ".eval-cache"
    aside = a.region / ".eval-cache.bench-aside"
    if aside.exists():
        raise SystemExit(f"{aside}: left by an interrupted run; put it back as {cache} or remove it")
    if cache.exists():
        cache.rename(aside)
    try:
        out = {"reference": run("reference", a.region, a.model, a.config,
                                [*a.overrides, "evaluate.protocol=reference", "evaluate.cache=false"]),
               "v2_cold": run("v2 cold", a.region, a.model, a.config, a.overrides),
               "v2_warm": run("v2 warm", a.region, a.other, a.config, a.overrides)}
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if aside.exists():
            aside.rename(cache)
    base = out["reference"]["seconds"]
    for k in ("v2_cold", "v2_warm"):
        out[k]["ratio_to_reference"] = round(base / out[k]["seconds"], 2)
    print(f"  ratio reference / v2: cold x{out['v2_cold']['ratio_to_reference']:.2f}, warm "
          f"x{out['v2_warm']['ratio_to_reference']:.2f}; probes wall: reference "
          f"{out['reference']['timing']['probes_wall']:.1f} s, v2 cold {out['v2_cold']['timing']['probes_wall']:.1f} s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
