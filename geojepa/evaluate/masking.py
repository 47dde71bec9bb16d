"""The masked setting's inputs and the baselines' tile vectors.

The stage masks a tile from its task's ``Edits`` (``mask_item``: the same
result as ``masked_items`` on the tile's tags, which a test checks) and builds
bag-of-tags from the region's sparse (tile, tag, count) triples
(``bag_of_tags_counts``: the same matrix as ``bag_of_tags``).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from geojepa.evaluate.labels import Task, strip
from geojepa.tokens.vocab import Vocab


def masked_items(items: list[dict], entity_tags: list[list[list[tuple[str, str]]]], task: Task,
                 vocab: Vocab) -> tuple[list[dict], list[list[list[tuple[str, str]]]]]:
    """The items with the task's label-defining tags removed: changed entities get new tag vectors, entities
    left with no tags are dropped. Returns the new items and their entities' tags."""
    out_items, out_tags = [], []
    for it, tags in zip(items, entity_tags, strict=True):
        kept_tags = [strip(task, t) for t in tags]
        keep = np.array([len(t) > 0 for t in kept_tags], bool)
        changed = np.array([len(k) != len(t) for k, t in zip(kept_tags, tags, strict=True)], bool)
        new = {**it, "epos": it["epos"][keep]}
        if "tags" in it:
            vec = it["tags"].copy()
            if changed.any():
                vec[changed] = vocab.tag_vectors([kept_tags[i] for i in np.flatnonzero(changed)])
            new["tags"] = vec[keep]
        if "geometry" in it:
            new["geometry"] = it["geometry"][keep]
        out_items.append(new)
        out_tags.append([t for t, k in zip(kept_tags, keep, strict=True) if k])
    return out_items, out_tags


def kept_tag_vectors(vectors: np.ndarray, ptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(len(ptr) - 1, dim): per entity, the sum of the vocabulary rows ``rows[ptr[j]:ptr[j + 1]]`` of the tags it
    keeps (``Vocab.tag_vectors``'s rule; one sparse product for a whole batch)."""
    from scipy.sparse import csr_matrix

    n = len(ptr) - 1
    if not len(rows):
        return np.zeros((n, vectors.shape[1]), np.float32)
    counts = csr_matrix((np.ones(len(rows), np.float32), rows, ptr), shape=(n, len(vectors)))
    return np.asarray(counts @ vectors, np.float32)


def mask_item(item: dict, local: np.ndarray, keep: np.ndarray, new_vectors: np.ndarray) -> dict:
    """A tile's item with a task's edits applied: the entities ``local`` (indices in the tile) get
    ``new_vectors`` (the vectors of the tags they keep), those that keep none (``~keep``) are removed."""
    if not len(local):
        return item
    alive = np.ones(len(item["epos"]), bool)
    alive[local[~keep]] = False
    new = {**item, "epos": item["epos"][alive]}
    if "tags" in item:
        vec = item["tags"].copy()
        vec[local] = new_vectors
        new["tags"] = vec[alive]
    if "geometry" in item:
        new["geometry"] = item["geometry"][alive]
    return new


def without_images(item: dict) -> dict:
    """A tile's item without its image tokens (the masked setting with rendered images)."""
    if "image" not in item:
        return item
    return {**item, "image": item["image"][:0], "ppos": item["ppos"][:0]}


def tag_pool(items: list[dict]) -> np.ndarray:
    """TagPool baseline: the mean of the tile's entities' tag vectors."""
    return np.stack([it["tags"].mean(0) if len(it["tags"]) else np.zeros(it["tags"].shape[1], np.float32)
                     for it in items]).astype(np.float32)


def bag_of_tags(entity_tags: list[list[list[tuple[str, str]]]], fit_on: np.ndarray, n_features: int) -> np.ndarray:
    """Bag-of-tags baseline (the count-embedder idea): log(1 + count) of each key and key=value over the tile's
    entities, for the ``n_features`` most frequent ones among the ``fit_on`` tiles."""

    def features(tile):
        return [f for tags in tile for k, v in tags for f in (k, f"{k}={v}")]

    freq = Counter(f for i in fit_on for f in set(features(entity_tags[i])))
    vocab = {f: j for j, (f, _) in enumerate(sorted(freq.items(), key=lambda x: (-x[1], x[0]))[:n_features])}
    out = np.zeros((len(entity_tags), max(len(vocab), 1)), np.float32)
    for i, tile in enumerate(entity_tags):
        for f, n in Counter(features(tile)).items():
            if f in vocab:
                out[i, vocab[f]] = n
    return np.log1p(out)


def bag_of_tags_counts(triples: np.ndarray, tiles: np.ndarray, keys: list[str], values: list[str],
                       fit_on: np.ndarray, n_features: int, drop: np.ndarray | None = None) -> np.ndarray:
    """``bag_of_tags`` from sparse counts: ``triples`` (tile, pair, count) over the region's tiles, ``tiles`` the
    region tiles that make the rows (in order), pair ``p`` the tag (keys[p], values[p]); ``drop[p]``: the pair is
    removed (masked). The features, their order and the numbers are ``bag_of_tags``'s."""
    size = int(max(triples[:, 0].max(initial=-1), np.max(tiles, initial=-1))) + 1
    row_of = np.full(size, -1, np.int64)
    row_of[tiles] = np.arange(len(tiles))
    t = triples[row_of[triples[:, 0]] >= 0]
    if drop is not None and len(t):
        t = t[~drop[t[:, 1]]]
    rows, pair, count = row_of[t[:, 0]], t[:, 1], t[:, 2]
    # Features: the key and key=value of every pair, as strings (so a key "a=b" and the tag a=b are one).
    used = np.unique(pair)
    index: dict[str, int] = {}
    feat_k = np.empty(len(used), np.int64)
    feat_kv = np.empty(len(used), np.int64)
    for j, p in enumerate(used.tolist()):
        feat_k[j] = index.setdefault(keys[p], len(index))
        feat_kv[j] = index.setdefault(f"{keys[p]}={values[p]}", len(index))
    at = np.searchsorted(used, pair)
    rows2, feats, counts = np.concatenate([rows, rows]), np.concatenate([feat_k[at], feat_kv[at]]), np.tile(count, 2)
    n_rows, n_feats = len(tiles), max(len(index), 1)
    cell, inverse = np.unique(rows2 * n_feats + feats, return_inverse=True)
    cell_count = np.bincount(inverse, weights=counts) if len(cell) else np.zeros(0)
    cell_row, cell_feat = cell // n_feats, cell % n_feats
    train = np.zeros(n_rows, bool)
    train[fit_on] = True
    freq = np.bincount(cell_feat[train[cell_row]], minlength=n_feats)
    names = list(index)
    ranked = sorted((f for f in range(n_feats) if freq[f] > 0), key=lambda f: (-freq[f], names[f]))[:n_features]
    col = np.full(n_feats, -1)
    col[ranked] = np.arange(len(ranked))
    out = np.zeros((n_rows, max(len(ranked), 1)), np.float32)
    ok = col[cell_feat] >= 0
    out[cell_row[ok], col[cell_feat[ok]]] = cell_count[ok]
    return np.log1p(out)
