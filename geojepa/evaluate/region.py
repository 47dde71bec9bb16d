"""One pass over a region's ``tile_entities`` for evaluation (a partition shard at a time, tags and kinds only):
each tile's task labels, its tag-class histogram and building count, the counts of its tags (bag-of-tags) as
sparse (tile, tag, count) triples, and per task the masking edits: which entities lose label-defining tags,
whether they keep any, and the vocabulary rows of the tags they keep. Python objects are made only for the
entities a label reads and for each distinct tag, once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_contracts import TILE_ENTITIES
from geojepa.encoding.classes import CLASSES
from geojepa.encoding.shards import TokenIndex, entity_batches
from geojepa.errors import GeoJepaError
from geojepa.evaluate.labels import Task
from geojepa.tokens.vocab import Vocab, value_token

log = logging.getLogger(__name__)
SEP = "\x1f"  # between key and value in a tag's text key (never in OSM keys)


class Pairs:
    """Every distinct (key, value) met, with what the evaluation needs of it, computed once."""

    def __init__(self, tasks: list[Task], vocab: Vocab):
        self.tasks, self.vocab = tasks, vocab
        self.id: dict[str, int] = {}
        self.keys: list[str] = []
        self.values: list[str] = []
        self.cls: list[int] = []
        self.building: list[bool] = []  # building other than no
        self.vrow: list[int] = []
        self.defines: list[list[bool]] = [[] for _ in tasks]
        self.reads: list[list[bool]] = [[] for _ in tasks]
        self._arrays: dict | None = None
        self.classes = {c: i for i, c in enumerate(CLASSES)}

    def ids(self, texts: list[str]) -> np.ndarray:
        out = np.empty(len(texts), np.int64)
        for i, s in enumerate(texts):
            j = self.id.get(s)
            if j is None:
                j = self.id[s] = len(self.keys)
                k, _, v = s.partition(SEP)
                self.keys.append(k)
                self.values.append(v)
                self.cls.append(self.classes.get(k, len(CLASSES)))
                self.building.append(k == "building" and v != "no")
                r = self.vocab.index.get((k, value_token(k, v)))
                r = self.vocab.index.get((k, None)) if r is None else r
                self.vrow.append(-1 if r is None else r)
                for t, task in enumerate(self.tasks):
                    self.defines[t].append(task.defines(k, v))
                    self.reads[t].append(k in task.reads)
                self._arrays = None
            out[i] = j
        return out

    def arrays(self) -> dict:
        if self._arrays is None:
            self._arrays = {"cls": np.array(self.cls, np.int64), "building": np.array(self.building, bool),
                            "vrow": np.array(self.vrow, np.int64),
                            "defines": [np.array(d, bool) for d in self.defines],
                            "reads": [np.array(r, bool) for r in self.reads]}
        return self._arrays


@dataclass
class Edits:
    """One task's masking of the region: the entities that lose label-defining tags (flat token positions,
    sorted), whether each keeps any tag (else it is removed), and the vocabulary rows of the tags it keeps
    (``rows[ptr[j]:ptr[j + 1]]``; a kept tag without an entry adds nothing, as in ``Vocab.tag_vectors``)."""

    pos: np.ndarray
    keep: np.ndarray
    ptr: np.ndarray
    rows: np.ndarray

    def range(self, lo: int, hi: int) -> Edits:
        """The edits of the entities at flat positions lo..hi (positions kept flat)."""
        a, b = np.searchsorted(self.pos, [lo, hi])
        return Edits(self.pos[a:b], self.keep[a:b], self.ptr[a : b + 1] - self.ptr[a],
                     self.rows[self.ptr[a] : self.ptr[b]])

    def dropped(self, tok: TokenIndex) -> np.ndarray:
        """Per tile, the entities the masking removes."""
        return np.bincount(tok.owner(self.pos[~self.keep])[0], minlength=tok.n)


@dataclass
class RegionScan:
    raw: dict[str, np.ndarray]  # task -> per tile label before subsampling (NaN: not in the task)
    hist: np.ndarray  # (tiles, classes + 1) share of the tile's entities per tag class
    buildings: np.ndarray  # entities with building other than no, per tile
    bag: np.ndarray  # (triples, 3): tile, pair id, count
    pairs: Pairs
    edits: dict[str, Edits]
    tasks: dict[str, Task]


def _flat_map(tags: pa.Array) -> tuple[np.ndarray, pa.Array, pa.Array]:
    """(zero-based offsets, keys, values) of a map column, whatever slice it is."""
    offs = tags.offsets.to_numpy().astype(np.int64)
    start, length = (int(offs[0]), int(offs[-1] - offs[0])) if len(offs) else (0, 0)
    return offs - start, tags.keys.slice(start, length), tags.items.slice(start, length)


def scan_entities(path: Path, tok: TokenIndex, tasks: list[Task], vocab: Vocab) -> RegionScan:
    """One pass over ``tile_entities``: see the module docstring."""
    pairs = Pairs(tasks, vocab)
    n, C = tok.n, len(CLASSES) + 1
    acc = {t.name: np.zeros(n) if t.reduce == "sum" else np.full(n, -np.inf) for t in tasks}
    has = {t.name: np.zeros(n, bool) for t in tasks}
    hist = np.zeros((n, C))
    buildings = np.zeros(n)
    seen = np.zeros(n, np.int64)
    bag, edits = [], {t.name: [] for t in tasks}
    for t, tiles, pos in entity_batches(path, TILE_ENTITIES, ["kind", "tags"], tok):
        seen += np.bincount(tiles, minlength=n)
        tags = pa.concat_arrays(t["tags"].chunks)
        offs, keys, values = _flat_map(tags)
        n_tags = np.diff(offs)
        texts = pc.binary_join_element_wise(keys, pc.fill_null(values, ""), SEP).dictionary_encode()
        pid = pairs.ids(texts.dictionary.to_pylist())[texts.indices.to_numpy()]
        ent = np.repeat(np.arange(len(n_tags)), n_tags)
        tile_of_tag = tiles[ent]
        a = pairs.arrays()

        # Tag-class histogram: an entity's class is the first class key it has.
        cls = np.full(len(n_tags), C - 1)
        nz = n_tags > 0
        if nz.any():
            cls[nz] = np.minimum.reduceat(a["cls"][pid], offs[:-1][nz])
        hist += np.bincount(tiles * C + cls, minlength=n * C).reshape(n, C)
        is_building = np.bincount(ent, weights=a["building"][pid], minlength=len(n_tags)) > 0
        buildings += np.bincount(tiles[is_building], minlength=n)

        # Bag of tags: (tile, pair) counts.
        key = (tile_of_tag << 32) | pid
        uk, cnt = np.unique(key, return_counts=True)
        bag.append(np.column_stack([uk >> 32, uk & 0xFFFFFFFF, cnt]))

        # Labels: only the entities with a key some task reads become Python dicts.
        reads = np.zeros(len(n_tags), bool)
        per_task = []
        for j in range(len(tasks)):
            r = np.bincount(ent, weights=a["reads"][j][pid], minlength=len(n_tags)) > 0
            per_task.append(r)
            reads |= r
        if reads.any():
            sel = np.flatnonzero(reads)
            kinds = t["kind"].take(pa.array(sel)).to_pylist()
            dicts = dict(zip(sel.tolist(), (dict(x) for x in tags.take(pa.array(sel)).to_pylist()), strict=True))
            kind_of = dict(zip(sel.tolist(), kinds, strict=True))
            for task, r in zip(tasks, per_task, strict=True):
                idx = np.flatnonzero(r)
                vals = [task.value(kind_of[i], dicts[i]) for i in idx.tolist()]
                ok = np.array([v is not None for v in vals], bool)
                if not ok.any():
                    continue
                v = np.array([x for x in vals if x is not None], float)
                tt = tiles[idx[ok]]
                if task.reduce == "sum":
                    acc[task.name] += np.bincount(tt, weights=v, minlength=n)
                else:
                    np.maximum.at(acc[task.name], tt, v)
                has[task.name][tt] = True

        # Masking edits per task.
        for j, task in enumerate(tasks):
            d = a["defines"][j][pid]
            n_def = np.bincount(ent, weights=d, minlength=len(n_tags)).astype(np.int64)
            changed = n_def > 0
            if not changed.any():
                continue
            kept_tag = ~d & changed[ent] & (a["vrow"][pid] >= 0)
            edits[task.name].append((pos[changed], (n_tags - n_def)[changed] > 0,
                                     np.bincount(ent[kept_tag], minlength=len(n_tags))[changed],
                                     a["vrow"][pid[kept_tag]]))
    missing = np.flatnonzero(seen != tok.n_entities)
    if len(missing):
        i = int(missing[0])
        raise GeoJepaError(f"{path}: tile {tok.ids[i]} has {seen[i]} entities, its token row "
                           f"{tok.n_entities[i]}; re-run `geojepa tokens` on the region")
    raw = {}
    for task in tasks:  # a tile without a value gets the task's empty label (None: not in the task)
        empty = np.nan if task.empty is None else task.empty
        raw[task.name] = np.where(has[task.name], acc[task.name], empty)
    hist /= np.maximum(hist.sum(1, keepdims=True), 1)
    return RegionScan(raw, hist, buildings, np.concatenate(bag) if bag else np.zeros((0, 3), np.int64), pairs,
                      {name: _edits(parts) for name, parts in edits.items()}, {t.name: t for t in tasks})



def _edits(parts: list) -> Edits:
    if not parts:
        z = np.zeros(0, np.int64)
        return Edits(z, np.zeros(0, bool), np.zeros(1, np.int64), z)
    pos, keep, count, rows = (np.concatenate(x) for x in zip(*parts, strict=True))
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    order = np.argsort(pos, kind="stable")
    count = count[order]
    ptr = np.concatenate([[0], np.cumsum(count)]).astype(np.int64)
    gather = np.repeat(start[order] - ptr[:-1], count) + np.arange(ptr[-1])
    return Edits(pos[order], keep[order], ptr, rows[gather])


