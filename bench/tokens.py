"""Benchmark: `geojepa tokens` on the Helsinki sample and a synthetic 100 km2 city (CPU).

Two runs per region, each in its own child process: the first embeds the tag
vocabulary (MiniLM, offline) and trains the shape encoder; the second, with
both in place and the token shards removed, measures steady-state
tokenisation (tag vectors, shape-encoder inference, pixel patches, shards).
Prints tiles/s, tokens/s, the vocabulary dedup ratio (entity tags per
embedded text) and peak memory. Imagery is the synthetic `render`.

    python bench/tokens.py
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, ROOT, run_child, synth_pbf  # noqa: E402

PREPARE = """
import json, sys
from geojepa.config import load_config
from geojepa.extract import extract
from geojepa.tile import tile
cfg = load_config(overrides=["tracking.enabled=false"])
extract(sys.argv[1], sys.argv[2], cfg)
tile(sys.argv[2], cfg, imagery="render")
print(json.dumps({}))
"""

TOKENS = """
import json, sys
from geojepa.config import load_config
from geojepa.tokens import tokens
s = tokens(sys.argv[1], load_config(overrides=["tracking.enabled=false"]), force=True).as_dict()
print(json.dumps({k: s.get(k) for k in ("tiles", "tiles_tokenised", "tokens", "entities", "vocab_entries",
                                         "vocab_embedded", "entities_per_vocab_text", "seconds",
                                         "geometry_train_seconds", "geometry_val_loss",
                                         "geometry_val_loss_untrained")}))
"""


def main() -> None:
    print(f"machine: {os.cpu_count()} cores, CPU only; python {sys.version.split()[0]}")
    for label, pbf in [("helsinki (real)", ROOT / "data" / "samples" / "helsinki.osm.pbf"),
                       ("synthetic 100 km2", synth_pbf(100))]:
        w = DATA / f"tokens-{pbf.name.split('.')[0]}"
        if not (w / "tiles.parquet").exists():
            run_child(PREPARE, pbf, w)
        for f in ("tag_vocab.parquet", "geometry_encoder.pt"):
            (w / f).unlink(missing_ok=True)
        shutil.rmtree(w / "tokens", ignore_errors=True)
        first = run_child(TOKENS, w)
        shutil.rmtree(w / "tokens")
        steady = run_child(TOKENS, w)
        print(f"{label}: {first['tiles']} tiles, {first['entities']:,} entities, {first['tokens']:,} tokens; "
              f"vocabulary {first['vocab_entries']:,} texts, {first['entities_per_vocab_text']} entity tags per text")
        print(f"  first run  {first['seconds']:7.1f} s (embedding {first['vocab_embedded']:,} texts, shape encoder "
              f"trained in {first['geometry_train_seconds']:.1f} s: val loss {first['geometry_val_loss']:.3f} vs "
              f"{first['geometry_val_loss_untrained']:.3f} untrained)  peak {first['peak_rss_mb']:5.0f} MB")
        print(
            f"  tokenise   {steady['seconds']:7.1f} s  {steady['tiles_tokenised'] / steady['seconds']:7.1f} tiles/s  "
            f"{steady['tokens'] / steady['seconds']:9,.0f} tokens/s  peak {steady['peak_rss_mb']:5.0f} MB",
            flush=True,
        )


if __name__ == "__main__":
    main()
