"""The tag vocabulary: one embedded text per (key, value) pair and per key; entity tag vectors.

Which values get their own entry (so the vocabulary does not explode):
- free-text keys (names, addresses, refs, URLs, phones, dates, notes, ids):
  key only, the value is ignored;
- numeric keys (maxspeed, height, levels, lanes, width, ...): the value is
  bucketed (``maxspeed 50-59 km/h``; mph converted with x1.6 as the
  reference does); a value that does not parse (``walk``, ``signals``) keeps
  its own entry;
- every other key: one entry per value, up to ``max_values_per_key`` most
  frequent values in the vocabulary's input; rarer values fall back to the key.

An entity's tag vector is the sum of its tags' vectors, a tag whose value has
no entry counting as its key's vector (the reference's rule).
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable

import numpy as np

FREE_TEXT = re.compile(
    r"^(name|alt_name|old_name|official_name|short_name|loc_name|int_name|reg_name|addr|ref|local_ref|"
    r"website|url|phone|fax|email|contact|wikidata|wikipedia|wikimedia_commons|brand:wikidata|"
    r"operator:wikidata|opening_hours|collection_times|description|note|fixme|check_date|start_date|"
    r"survey|image|mapillary|source|level:ref|branch|inscription|heritage:ref|ref:)"
    r"([:_].*)?$", re.IGNORECASE)
NUMERIC_EDGES: dict[str, tuple[list[float], str]] = {
    "maxspeed": ([0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 120, 140], "km/h"),
    "height": ([0, 3, 6, 10, 15, 20, 30, 50, 100, 200], "m"),
    "min_height": ([0, 3, 6, 10, 20, 50], "m"),
    "building:levels": ([0, 1, 2, 3, 4, 5, 7, 10, 15, 25, 40], "levels"),
    "levels": ([0, 1, 2, 3, 4, 5, 7, 10, 15, 25, 40], "levels"),
    "roof:levels": ([0, 1, 2, 3], "levels"),
    "building:min_level": ([0, 1, 2, 3, 5, 10], "levels"),
    "lanes": ([0, 1, 2, 3, 4, 5, 6, 8], "lanes"),
    "width": ([0, 1, 2, 3, 5, 8, 12, 20, 50], "m"),
    "ele": ([-100, 0, 10, 50, 100, 250, 500, 1000, 2000], "m"),
    "capacity": ([0, 5, 10, 25, 50, 100, 250, 1000], ""),
    "layer": ([-5, -2, -1, 0, 1, 2, 3, 5], ""),
}
_NUMBER = re.compile(r"^\s*(-?\d+(?:[.,]\d+)?)\s*(mph|km/h|kmh|m|ft)?\s*$", re.IGNORECASE)


def parse_number(key: str, value: str) -> float | None:
    m = _NUMBER.match(value)
    if not m:
        return None
    x = float(m.group(1).replace(",", "."))
    unit = (m.group(2) or "").lower()
    if unit == "mph":
        x *= 1.6
    elif unit == "ft":
        x *= 0.3048
    return x


@functools.lru_cache(maxsize=1 << 20)
def value_token(key: str, value: str) -> str | None:
    """The vocabulary value for a tag: the value, a numeric bucket, or None (key only)."""
    if FREE_TEXT.match(key):
        return None
    numeric = NUMERIC_EDGES.get(key)
    if numeric is None:
        return value
    x = parse_number(key, value)
    if x is None:
        return value
    edges, unit = numeric
    i = int(np.searchsorted(edges, x, side="right")) - 1
    if i < 0:
        label = f"< {edges[0]:g}"
    elif i >= len(edges) - 1:
        label = f">= {edges[-1]:g}"
    else:
        lo, hi = edges[i], edges[i + 1]
        label = f"{lo:g}" if hi - lo == 1 else f"{lo:g}-{hi - (1 if float(hi).is_integer() else 0):g}"
    return f"{label} {unit}".strip()


def entry_text(key: str, token: str | None) -> str:
    """What is embedded: ``amenity: fast food``, or the key alone."""
    k = key.replace("_", " ")
    return k if token is None else f"{k}: {token.replace('_', ' ')}"


def wanted_entries(tag_lists: Iterable[list[tuple[str, str]]], max_values_per_key: int) -> set[tuple[str, str | None]]:
    """Vocabulary entries needed for these tags: every key, and the kept (key, value token) pairs."""
    pairs: Counter = Counter()
    keys: set[str] = set()
    for tags in tag_lists:
        for k, v in tags:
            keys.add(k)
            t = value_token(k, v)
            if t is not None:
                pairs[(k, t)] += 1
    per_key: dict[str, list[tuple[int, str]]] = {}
    for (k, t), n in pairs.items():
        per_key.setdefault(k, []).append((n, t))
    entries: set[tuple[str, str | None]] = {(k, None) for k in keys}
    for k, values in per_key.items():
        values.sort(key=lambda nt: (-nt[0], nt[1]))
        entries.update((k, t) for _, t in values[:max_values_per_key])
    return entries


class Vocab:
    """Embedded entries, looked up by (key, value token)."""

    def __init__(self, keys: list[str], values: list[str | None], vectors: np.ndarray):
        self.index = {(k, v): i for i, (k, v) in enumerate(zip(keys, values, strict=True))}
        self.vectors = vectors

    def tag_vectors(self, tag_lists: list[list[tuple[str, str]]]) -> np.ndarray:
        """(n, dim): per entity, the sum of its tags' vectors (unknown value -> its key; no tags -> 0)."""
        rows, owners = [], []
        for i, tags in enumerate(tag_lists):
            for k, v in tags:
                j = self.index.get((k, value_token(k, v)))
                if j is None:
                    j = self.index.get((k, None))
                if j is not None:
                    rows.append(j)
                    owners.append(i)
        out = np.zeros((len(tag_lists), self.vectors.shape[1]), dtype=np.float32)
        if rows:  # a sparse (entities x vocabulary) count matrix times the vectors
            import torch

            counts = torch.sparse_coo_tensor(np.stack([owners, rows]), np.ones(len(rows), np.float32),
                                             (len(tag_lists), len(self.vectors)), check_invariants=True)
            out = torch.sparse.mm(counts, torch.from_numpy(self.vectors)).numpy()
        return out
