"""Benchmark: `geojepa embed` (streaming: a batch of tiles at a time, entity vectors spilled to disk) against
embedding the whole region at once (every tile's tokens read, then embedded; what the evaluate stage did
before it streamed), each in its own child process: tiles per second and peak RSS (wait4).

    python bench/embed.py                 # synthetic regions of 100 and 1,000 km2 (prepared by bench/evaluate.py)
    python bench/embed.py --km2 100       # one of them
    python bench/embed.py W [W ...]       # prepared work directories with tokens and a model of their own

The synthetic regions are made (extract, tile, tokens, a demo-size model) under bench/.data/ the first time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_child, synth_pbf  # noqa: E402
from evaluate_streaming import prepare  # noqa: E402

STREAM = r"""
import json, sys, time
from geojepa.config import load_config
from geojepa.embeddings import embed_source
w, out = sys.argv[1], sys.argv[2]
cfg = load_config(overrides=["tracking.enabled=false"])
t0 = time.perf_counter()
s = embed_source(w, out, cfg, w)
print(json.dumps({"tiles": s["tiles"], "entity_pieces": s["entity_pieces"], "embed_s": time.perf_counter() - t0}))
"""

WHOLE = r"""
import json, sys, time
import pyarrow.parquet as pq
from geojepa.encoding.pooling import embed
from geojepa.encoding.shards import token_index
from geojepa.model.jepa import encoder_from_checkpoint
from geojepa.train.data import TokenRows
from geojepa.workdir import WorkDir
w = WorkDir(sys.argv[1])
t0 = time.perf_counter()
ckpt = w.model.checkpoints()[-1]
encoder, tcfg = encoder_from_checkpoint(ckpt)
modalities = tuple(tcfg["modalities"])
tok = token_index(w.tokens)
have = tuple(m for m in ("tags", "geometry", "image") if tok.dims[m] and m in modalities)
items = []
for shard in tok.shards:
    rows = TokenRows(pq.read_table(shard, columns=["entity_position", "patch_position",
                                                   *(TokenRows.COLUMNS[m] for m in have)]), have)
    items += [rows.item(i) for i in range(len(rows.n_entities))]
pooled = embed(encoder, items, modalities, 64)
print(json.dumps({"tiles": len(pooled.mean), "entity_pieces": int(sum(len(e) for e in pooled.entities)),
                  "embed_s": time.perf_counter() - t0}))
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("regions", nargs="*", help="work directories (default: synthetic regions)")
    p.add_argument("--km2", type=float, nargs="+", default=[100, 1000])
    a = p.parse_args()
    targets = [(Path(r).name, Path(r)) for r in a.regions] or [
        (f"synthetic {km:g} km2", prepare(f"synth-{km:g}km2", synth_pbf(km), False)) for km in a.km2]
    print(f"machine: {len(__import__('os').sched_getaffinity(0))} cores; python {sys.version.split()[0]}")
    out = {}
    for name, w in targets:
        with tempfile.TemporaryDirectory() as tmp:
            s = run_child(STREAM, w, Path(tmp) / "out")
        b = run_child(WHOLE, w)
        assert (s["tiles"], s["entity_pieces"]) == (b["tiles"], b["entity_pieces"]), (s, b)
        print(f"{name}: {s['tiles']:,} tiles, {s['entity_pieces']:,} entity pieces")
        print(f"  geojepa embed (streaming, both GeoParquet files written): {s['seconds']:6.1f} s wall "
              f"({s['tiles'] / s['embed_s']:6.1f} tiles/s in embed_source), peak {s['peak_rss_mb']:6.0f} MB")
        print(f"  whole region at once (embeddings in memory, nothing written): {b['seconds']:6.1f} s wall "
              f"({b['tiles'] / b['embed_s']:6.1f} tiles/s), peak {b['peak_rss_mb']:6.0f} MB")
        print(f"  peak ratio whole / streaming: x{b['peak_rss_mb'] / s['peak_rss_mb']:.2f}")
        out[name] = {"stream": s, "whole": b}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
