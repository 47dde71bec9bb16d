"""Benchmark: `geojepa extract` against QuackOSM on the same PBF files, in one run.

For the Helsinki sample and synthetic cities of 10, 100 and 1,000 km2 (made by
`geojepa synth`, labelled synthetic), each converter runs in its own child
process on a warm page cache; we report entities per second, input MB per
second, wall time and the child's peak resident memory (from wait4), then the
ratios. MLflow logging is off for the measurement (it is a fixed cost of about
a second per stage).

    python bench/extract.py                      # all sizes, with QuackOSM (pip install -e '.[bench]')
    python bench/extract.py --sizes 1 --baseline none   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, ROOT, run_child, synth_pbf  # noqa: E402

OURS = """
import json, sys
from geojepa.config import load_config
from geojepa.extract import extract
s = extract(sys.argv[1], sys.argv[2], load_config(overrides=["tracking.enabled=false"]), force=True).as_dict()
print(json.dumps({"entities": s["entities"]}))
"""

QUACKOSM = """
import json, sys
import pyarrow.parquet as pq
import quackosm
out = quackosm.convert_pbf_to_parquet(sys.argv[1], working_directory=sys.argv[2], ignore_cache=True,
                                      verbosity_mode="silent")
print(json.dumps({"entities": pq.read_metadata(out).num_rows}))
"""


def inputs(sizes: list[float], helsinki: bool) -> list[tuple[str, Path]]:
    files = [("helsinki (real)", ROOT / "data" / "samples" / "helsinki.osm.pbf")] if helsinki else []
    return files + [(f"synthetic {km2:g} km2", synth_pbf(km2)) for km2 in sizes]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="*", default=[10, 100, 1000], help="synthetic sizes in km2")
    ap.add_argument("--no-helsinki", action="store_true")
    ap.add_argument("--baseline", choices=["quackosm", "none"], default="quackosm")
    args = ap.parse_args()

    tools = [("geojepa", OURS)] + ([("quackosm", QUACKOSM)] if args.baseline == "quackosm" else [])
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}")
    rows = []
    for label, pbf in inputs(args.sizes, not args.no_helsinki):
        pbf.read_bytes()  # warm the page cache for both tools alike
        for tool, code in tools:
            with tempfile.TemporaryDirectory(dir=DATA) as tmp:
                r = run_child(code, pbf, Path(tmp))
            mb = pbf.stat().st_size / 1e6
            r.update(entities_per_s=r["entities"] / r["seconds"], mb_per_s=mb / r["seconds"])
            rows.append({"input": label, "mb": mb, "tool": tool, **r})
            print(f"{label:22s} {pbf.stat().st_size / 1e6:8.1f} MB  {tool:9s} {r['entities']:>10,} entities "
                  f"{r['seconds']:8.2f} s {r['entities_per_s']:>11,.0f} ent/s {r['mb_per_s']:7.2f} MB/s "
                  f"peak {r['peak_rss_mb']:7.0f} MB", flush=True)
        if len(tools) == 2:
            ours, base = rows[-2], rows[-1]
            print(
                f"{'':22s} ratio geojepa/quackosm: throughput x{ours['entities_per_s'] / base['entities_per_s']:.2f}, "
                f"peak memory x{ours['peak_rss_mb'] / base['peak_rss_mb']:.2f}",
                flush=True,
            )
    (DATA / "extract_results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
