"""Exact cosine kNN with torch (queries in chunks against the whole gallery), and the retrieval scores.

A million 768-d tiles are 3 GB of float32: one chunk of queries times the
gallery (never copied), then ``topk``; ``bench/knn.py`` gives the speed and
peak memory.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

# Tag classes for the neighbour-agreement score: an entity's class is the first of these keys it has.
CLASSES = ("building", "highway", "railway", "amenity", "shop", "leisure", "landuse", "natural", "waterway",
           "public_transport", "man_made", "barrier", "tourism", "office", "power", "place", "boundary")


@torch.no_grad()
def topk_cosine(queries: np.ndarray, gallery: np.ndarray, k: int, exclude: np.ndarray | None = None,
                chunk: int | None = None, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(similarities, gallery indices) of each query's ``k`` nearest gallery rows, best first.
    ``exclude[i]``: a gallery row query i may not return (itself), -1 for none. ``chunk``: queries scored at
    a time (default: as many as keep one chunk's scores to 128 MB, at most 4,096)."""
    g = torch.as_tensor(gallery, dtype=torch.float32, device=device)  # no copy of a float32 array on the CPU
    chunk = chunk or max(1, min(4096, (1 << 25) // max(len(g), 1)))
    inv_norm = 1 / g.norm(dim=1).clamp_min(1e-12)  # scale the scores instead of copying a normalised gallery
    k = min(k, len(g) - (exclude is not None))
    sims, idx = [], []
    for start in range(0, len(queries), chunk):
        q = F.normalize(torch.as_tensor(queries[start : start + chunk], dtype=torch.float32, device=device), dim=1)
        s = (q @ g.T).mul_(inv_norm)
        if exclude is not None:
            ex = torch.as_tensor(exclude[start : start + chunk], device=device)
            rows = torch.nonzero(ex >= 0).squeeze(1)
            s[rows, ex[rows]] = -torch.inf
        v, i = s.topk(k, dim=1)
        sims.append(v.cpu())
        idx.append(i.cpu())
    return torch.cat(sims).numpy(), torch.cat(idx).numpy()


@torch.no_grad()
def topk_cosine_chunks(queries: np.ndarray, chunks, k: int, exclude: np.ndarray | None = None,
                       device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """``topk_cosine`` against a gallery that comes in ``(first row, rows)`` chunks (e.g. read from disk), never
    whole in memory: each chunk's best ``k`` are merged into the running best ``k``."""
    q = F.normalize(torch.as_tensor(queries, dtype=torch.float32, device=device), dim=1)
    best_s = torch.full((len(q), 0), -torch.inf, device=device)
    best_i = torch.zeros((len(q), 0), dtype=torch.long, device=device)
    for start, chunk in chunks:
        g = torch.as_tensor(chunk, dtype=torch.float32, device=device)
        s = (q @ g.T).mul_(1 / g.norm(dim=1).clamp_min(1e-12))
        if exclude is not None:
            ex = torch.as_tensor(np.asarray(exclude) - start, device=device)
            rows = torch.nonzero((ex >= 0) & (ex < len(g))).squeeze(1)
            s[rows, ex[rows]] = -torch.inf
        v, i = s.topk(min(k, len(g)), dim=1)
        best_s, order = torch.cat([best_s, v], 1).topk(min(k, best_s.shape[1] + v.shape[1]), dim=1)
        best_i = torch.cat([best_i, i + start], 1).gather(1, order)
    return best_s.cpu().numpy(), best_i.cpu().numpy()


def knn_regression_mae(emb: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, k: int) -> float:
    """MAE of predicting each test tile's label by the mean of its k nearest training tiles' labels."""
    _, idx = topk_cosine(emb[test], emb[train], k)
    return float(np.mean(np.abs(y[train][idx].mean(1) - y[test])))


def class_histograms(entity_tags: list[list[list[tuple[str, str]]]]) -> np.ndarray:
    """(tiles, classes + 1) share of the tile's entities per tag class (last column: none of them)."""
    out = np.zeros((len(entity_tags), len(CLASSES) + 1), np.float64)
    for i, tile in enumerate(entity_tags):
        for tags in tile:
            keys = {k for k, _ in tags}
            out[i, next((j for j, c in enumerate(CLASSES) if c in keys), len(CLASSES))] += 1
    return out / np.maximum(out.sum(1, keepdims=True), 1)


def class_of(tags: list[tuple[str, str]]) -> str:
    keys = {k for k, _ in tags}
    return next((c for c in CLASSES if c in keys), "other")


def neighbour_agreement(hist: np.ndarray, idx: np.ndarray) -> float:
    """Mean histogram intersection (1: identical class mix) between each tile and its neighbours."""
    return float(np.minimum(hist[:, None, :], hist[idx]).sum(-1).mean())
