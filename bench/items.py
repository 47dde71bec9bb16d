"""Training-data path: how fast ShardDataset hands tiles to the collator (DataLoader workers run this per tile).

    python bench/items.py [W]     (default W: work/helsinki, made by `make demo`)

Compares ``TokenRows.item`` (numpy views into the shards' flat Arrow buffers) with converting each row to
Python lists first (the obvious way, and this project's first version), in the same process.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from geojepa.train.data import TokenRows

MODALITIES = ("tags", "geometry")


def per_row(table, i: int) -> dict:
    row = table.slice(i, 1).to_pylist()[0]
    n = len(row["entity_id"])
    return {"epos": np.asarray(row["entity_position"], np.float32).reshape(n, 8),
            "tags": np.asarray(row["tag"], np.float32).reshape(n, -1),
            "geometry": np.asarray(row["geometry"], np.float32).reshape(n, -1)}


def rate(fn, n: int, min_seconds: float = 2.0) -> float:
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        for i in range(n):
            fn(i)
        done += n
    return done / (time.perf_counter() - t0)


def main() -> None:
    w = Path(sys.argv[1] if len(sys.argv) > 1 else "work/helsinki")
    if not list((w / "tokens").glob("train-*.parquet")):
        raise SystemExit(f"{w / 'tokens'}: no train token shards; run `make demo` (or `geojepa tokens {w}`) first")
    table = pq.read_table(sorted((w / "tokens").glob("train-*.parquet")))
    rows = TokenRows(table, MODALITIES)
    for i in range(table.num_rows):  # same arrays either way
        a, b = rows.item(i), per_row(table, i)
        assert all(np.array_equal(a[k], b[k]) for k in b)
    ents = int(rows.n_entities.mean())
    fast, slow = rate(rows.item, table.num_rows), rate(lambda i: per_row(table, i), table.num_rows)
    print(f"{w}: {table.num_rows} tiles, {ents} entities per tile on average")
    print(f"  TokenRows.item (views)       {fast:12,.0f} tiles/s")
    print(f"  per-row Python lists (base)  {slow:12,.0f} tiles/s")
    print(f"  ratio x{fast / slow:,.0f}")


if __name__ == "__main__":
    main()
