"""kNN retrieval speed: exact cosine top-k with torch (geojepa.encoding.neighbours) against scikit-learn's brute-force
NearestNeighbors (cosine) on the same random gallery, each in its own process (peak RSS from wait4).

    python bench/knn.py [--tiles 1000000] [--dim 768] [--queries 2000] [--k 10]

Prints queries per second, the projected time for a full kNN graph of the gallery (every tile queried), the
ratio to the baseline, peak memory, and whether both found the same neighbours.
"""

from __future__ import annotations

import argparse
import json

from common import run_child

CHILD = r"""
import json, sys, time
import numpy as np
n, dim, q, k, which = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rng = np.random.default_rng(0)
gallery = rng.standard_normal((n, dim), dtype=np.float32)
queries = gallery[rng.choice(n, q, replace=False)] + 0.1 * rng.standard_normal((q, dim), dtype=np.float32)
if which == "torch":
    from geojepa.encoding.neighbours import topk_cosine
else:
    from sklearn.neighbors import NearestNeighbors
t0 = time.perf_counter()
if which == "torch":
    _, idx = topk_cosine(queries, gallery, k, chunk=512)
else:
    _, idx = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(gallery).kneighbors(queries)
s = time.perf_counter() - t0
print(json.dumps({"search_s": s, "first": idx[:50].tolist()}))
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiles", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--k", type=int, default=10)
    a = p.parse_args()
    runs = {w: run_child(CHILD, a.tiles, a.dim, a.queries, a.k, w) for w in ("torch", "sklearn")}
    same = sum(set(x) == set(y) for x, y in zip(runs["torch"]["first"], runs["sklearn"]["first"], strict=True))
    out = {}
    for w, r in runs.items():
        qps = a.queries / r["search_s"]
        out[w] = {"queries_per_s": round(qps, 1), "full_knn_graph_h": round(a.tiles / qps / 3600, 2),
                  "peak_rss_mb": round(r["peak_rss_mb"])}
        print(f"{w:8s} {a.tiles:,} x {a.dim} gallery: {qps:,.0f} queries/s; every tile queried: "
              f"{a.tiles / qps / 3600:.2f} h; peak {r['peak_rss_mb']:,.0f} MB")
    ratio = out["torch"]["queries_per_s"] / out["sklearn"]["queries_per_s"]
    print(f"ratio torch / sklearn: x{ratio:.2f}; same neighbour sets for {same}/50 checked queries")
    print(json.dumps({**out, "ratio": round(ratio, 2), "same_neighbours_of_50": same}))


if __name__ == "__main__":
    main()
