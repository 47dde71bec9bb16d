"""Benchmark: `geojepa similar`'s exact search (``topk_cosine``) against FAISS at a million tiles: one query
(what `similar` does) and a batch of queries (what a kNN graph needs), each tool in its own child process
(peak RSS from wait4). FAISS is not a dependency: install ``faiss-cpu`` to run its rows.

    python bench/similar.py [--tiles 1000000] [--dim 256] [--queries 1000]

Rows: topk_cosine (exact; the gallery is used in place), FAISS IndexFlatIP on L2-normalised vectors (exact;
a normalised copy), FAISS IndexIVFFlat (approximate: 1,024 lists, nprobe 16; recall@10 against exact).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_child  # noqa: E402

SETUP = r"""
import json, sys, time
import numpy as np
n, dim, nq, tool = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = np.random.default_rng(0)
x = rng.standard_normal((n, dim), dtype=np.float32)
x[:, :8] += rng.standard_normal((n // 1000 + 1, 8), dtype=np.float32).repeat(1000, 0)[:n] * 3  # clusters
q_idx = rng.choice(n, nq, replace=False)
"""

TOOLS = {
    "topk_cosine": SETUP + r"""
from geojepa.encoding.neighbours import topk_cosine
t0 = time.perf_counter(); topk_cosine(x[q_idx[:1]], x, 10, exclude=q_idx[:1]); one = time.perf_counter() - t0
t0 = time.perf_counter(); _, idx = topk_cosine(x[q_idx], x, 10, exclude=q_idx); many = time.perf_counter() - t0
np.save(sys.argv[5], idx)
print(json.dumps({"build_s": 0.0, "one_query_s": one, "queries_per_s": nq / many}))
""",
    "faiss_flat": SETUP + r"""
import faiss
faiss.omp_set_num_threads(2)
t0 = time.perf_counter()
xn = x / np.linalg.norm(x, axis=1, keepdims=True); index = faiss.IndexFlatIP(dim); index.add(xn)
build = time.perf_counter() - t0
t0 = time.perf_counter(); index.search(xn[q_idx[:1]], 11); one = time.perf_counter() - t0
t0 = time.perf_counter(); _, idx = index.search(xn[q_idx], 11); many = time.perf_counter() - t0
print(json.dumps({"build_s": build, "one_query_s": one, "queries_per_s": nq / many}))
""",
    "faiss_ivf": SETUP + r"""
import faiss
faiss.omp_set_num_threads(2)
t0 = time.perf_counter()
xn = x / np.linalg.norm(x, axis=1, keepdims=True)
index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, 1024, faiss.METRIC_INNER_PRODUCT)
index.train(xn[rng.choice(n, min(n, 100_000), replace=False)]); index.add(xn); index.nprobe = 16
build = time.perf_counter() - t0
t0 = time.perf_counter(); index.search(xn[q_idx[:1]], 11); one = time.perf_counter() - t0
t0 = time.perf_counter(); _, idx = index.search(xn[q_idx], 11); many = time.perf_counter() - t0
exact = np.load(sys.argv[5])
got = [set(r[r != q][:10]) for r, q in zip(idx, q_idx)]
recall = float(np.mean([len(g & set(e)) / 10 for g, e in zip(got, exact)]))
print(json.dumps({"build_s": build, "one_query_s": one, "queries_per_s": nq / many, "recall_at_10": recall}))
""",
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiles", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=1000)
    a = p.parse_args()
    exact = Path("/tmp/geojepa-bench-similar-exact.npy")
    print(f"{a.tiles:,} tiles x {a.dim} float32, {a.queries:,} queries, k = 10; "
          f"{len(__import__('os').sched_getaffinity(0))} cores")
    out = {}
    for name, code in TOOLS.items():
        try:
            r = run_child(code, a.tiles, a.dim, a.queries, name, exact)
        except RuntimeError as e:
            print(f"  {name}: not run ({str(e).strip().splitlines()[-1]})")
            continue
        out[name] = r
        extra = f", recall@10 {r['recall_at_10']:.3f}" if "recall_at_10" in r else ""
        print(f"  {name:12s} build {r['build_s']:6.1f} s, one query {r['one_query_s'] * 1000:7.1f} ms, "
              f"{r['queries_per_s']:8.1f} queries/s, peak {r['peak_rss_mb']:6.0f} MB{extra}")
    if "faiss_flat" in out:
        base = out["topk_cosine"]["queries_per_s"]
        print(f"  ratio queries/s faiss_flat / topk_cosine: x{out['faiss_flat']['queries_per_s'] / base:.2f}"
              + (f"; faiss_ivf / topk_cosine: x{out['faiss_ivf']['queries_per_s'] / base:.2f}"
                 if "faiss_ivf" in out else ""))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
