"""Benchmark: embedding a region's tiles off the GPU in chunks of similar length within a padding budget
(``geojepa.encoding.pooling.chunks``) against consecutive chunks of 64 tiles (how the evaluation embedded
before), in one process, one torch thread, the same encoder and tiles; prints seconds, the ratio and the
largest difference of the tile vectors.

    python bench/embed_chunks.py W [--model models/geojepa-cpu] [--tiles 768]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from geojepa.encoding.pooling import embed
from geojepa.encoding.shards import token_batches, token_index
from geojepa.model.jepa import encoder_from_checkpoint
from geojepa.workdir import ModelDir, WorkDir


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("region", type=Path)
    p.add_argument("--model", default="models/geojepa-cpu")
    p.add_argument("--tiles", type=int, default=768)
    a = p.parse_args()
    torch.set_num_threads(1)
    enc, cfg = encoder_from_checkpoint(ModelDir(a.model).checkpoints()[-1])
    mods = tuple(m for m in cfg["modalities"] if m in ("tags", "geometry"))
    items: list[dict] = []
    for _, its in token_batches(token_index(WorkDir(a.region).tokens), mods, 256):
        items += its
        if len(items) >= a.tiles:
            break
    items = items[: a.tiles]
    lengths = [sum(len(it[m]) for m in mods) for it in items]
    print(f"{a.region}: {len(items)} tiles, median {int(np.median(lengths))} tokens, longest {max(lengths)}; "
          f"model {a.model}; 1 torch thread")
    runs = {"consecutive chunks of 64 (before)": (64, 64, None), "sorted, budget 8,192": (256, 256, 8192),
            "sorted, budget 4,096 (default)": (256, 256, 4096)}
    out = {}
    for name, (read, batch, budget) in runs.items():
        t0 = time.perf_counter()
        means = [embed(enc, items[i : i + read], mods, batch, token_budget=budget).mean
                 for i in range(0, len(items), read)]
        out[name] = (time.perf_counter() - t0, np.concatenate(means))
    base_s, base = out["consecutive chunks of 64 (before)"]
    for name, (s, m) in out.items():
        print(f"  {name:36s} {s:6.2f} s   x{base_s / s:.2f}   max |difference| {np.abs(m - base).max():.1e}")


if __name__ == "__main__":
    main()
