"""Exact cosine kNN with torch (queries in chunks against the whole gallery).

A million 768-d tiles are 3 GB of float32: one chunk of queries times the
gallery (never copied), then ``topk``; ``bench/knn.py`` gives the speed and
peak memory.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F


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
