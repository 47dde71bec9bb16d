"""Benchmark: every region of a corpus through extract, tile and tokens, as the corpus pipeline runs them.

Per region, in its own child process each: extract, tile (rendered imagery unless --no-imagery); then the
tokenizer fitted once on the corpus's training regions; then tokens for every region with it. Prints per
region and stage the seconds and the child's peak RSS, and the total against the issue's 15-minute target.

    python bench/corpus.py [--corpus configs/corpus.yaml] [--no-imagery] [--out bench/.data/corpus]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, ROOT, run_child  # noqa: E402

STAGE = """
import json, sys
from geojepa.config import load_config
cfg = load_config(overrides=["tracking.enabled=false"])
stage, args = sys.argv[1], sys.argv[2:]
if stage == "extract":
    from geojepa.extract import extract
    s = extract(args[0], args[1], cfg).as_dict()
elif stage == "tile":
    from geojepa.tile import tile
    s = tile(args[0], cfg, imagery=None if args[1] == "none" else args[1]).as_dict()
elif stage == "tokenizer":
    from geojepa.tokens.tokenizer import fit
    s = fit(args[0], args[1:], cfg).as_dict()
else:
    from geojepa.tokens import tokens
    s = tokens(args[0], cfg, tokenizer=args[1]).as_dict()
print(json.dumps({k: s.get(k) for k in ("entities", "tiles", "tokens", "vocab_embedded") if k in s}))
"""


def main() -> None:
    from geojepa.corpus import load_corpus

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default=str(ROOT / "configs" / "corpus.yaml"))
    p.add_argument("--no-imagery", action="store_true")
    p.add_argument("--out", default=str(DATA / "corpus"))
    a = p.parse_args()
    c = load_corpus(a.corpus)
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    rows, t0 = [], time.perf_counter()
    for r in c.regions:
        w = c.work_dir(r, out).path
        imagery = "none" if a.no_imagery or r.imagery is None else str(r.imagery)
        rows.append((r.name, "extract", run_child(STAGE, "extract", c.pbf(r), w)))
        rows.append((r.name, "tile", run_child(STAGE, "tile", w, imagery)))
    tok = out / "tokenizer"
    rows.append(("(corpus)", "tokenizer", run_child(STAGE, "tokenizer", tok,
                                                     *[c.work_dir(r, out).path for r in c.train_regions()])))
    for r in c.regions:
        rows.append((r.name, "tokens", run_child(STAGE, "tokens", c.work_dir(r, out).path, tok)))
    total = time.perf_counter() - t0
    print(f"{'region':<16} {'stage':<10} {'seconds':>8} {'peak MB':>8}  result")
    for name, stage, res in rows:
        extra = {k: v for k, v in res.items() if k not in ("seconds", "peak_rss_mb")}
        print(f"{name:<16} {stage:<10} {res['seconds']:>8.1f} {res['peak_rss_mb']:>8.0f}  {extra}")
    per = {}
    for name, _, res in rows:
        per[name] = per.get(name, 0.0) + res["seconds"]
    print("per region (s): " + ", ".join(f"{k} {v:.0f}" for k, v in per.items()))
    print(f"total {total:.0f} s = {total / 60:.1f} min (target: under 15 min on a 2-core machine); "
          f"peak {max(r['peak_rss_mb'] for _, _, r in rows):.0f} MB in one stage")


if __name__ == "__main__":
    main()
