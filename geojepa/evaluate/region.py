"""A region's tiles for evaluation, read a partition or a batch at a time (never the whole region at once).

- ``TokenIndex``: the tokenised tiles in token-shard order (the order every per-tile array of the evaluation
  follows), their splits and where each tile's entities sit in the flat token order; no token is read.
- ``scan_entities``: one pass over ``tile_entities`` (a partition shard at a time, tags and kinds only) that
  gives each tile's task labels, its tag-class histogram and building count, the counts of its tags
  (bag-of-tags) as sparse (tile, tag, count) triples, and per task the masking edits: which entities lose
  label-defining tags, whether they keep any, and the vocabulary rows of the tags they keep. Python objects
  are made only for the entities a label reads and for each distinct tag, once.
- ``pieces_lonlat``: tile pieces (tile coordinates) -> WKB in EPSG:4326 through their tile's CRS and origin.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_contracts import TILE_ENTITIES, TILES, open_artifact, read_table
from geojepa.errors import GeoJepaError
from geojepa.evaluate.knn import CLASSES
from geojepa.evaluate.labels import Task
from geojepa.tokens.vocab import Vocab, value_token
from geojepa.workdir import WorkDir

log = logging.getLogger(__name__)
SEP = "\x1f"  # between key and value in a tag's text key (never in OSM keys)


@dataclass
class TokenIndex:
    shards: list[Path]
    ids: np.ndarray  # tile ids (object), token order: shards sorted by name, rows as stored
    split: np.ndarray
    ent_off: np.ndarray  # tile i's entities are flat token positions ent_off[i] : ent_off[i + 1]
    entity_ids: pa.Array  # flat, token order
    dims: dict[str, int]
    where: dict[str, int] = field(default_factory=dict)

    n_patches: np.ndarray = None  # image tokens per tile
    shard_start: np.ndarray = None  # shard k holds tiles shard_start[k] : shard_start[k + 1]

    def __post_init__(self):
        self.where = {t: i for i, t in enumerate(self.ids)}

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def n_entities(self) -> np.ndarray:
        return np.diff(self.ent_off)

    def owner(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tile, index within the tile) of flat entity positions."""
        tile = np.searchsorted(self.ent_off, flat, side="right") - 1
        return tile, flat - self.ent_off[tile]


def token_index(tokens: Path) -> TokenIndex:
    w = WorkDir(Path(tokens).parent)
    shards = sorted(p for p in Path(tokens).glob("*.parquet") if not p.name.startswith("."))
    ids, split, counts, eids, length, rows = [], [], [], [], [], [0]
    for f in shards:
        t = pq.read_table(f, columns=["tile_id", "split", "length", "entity_id"])
        length.append(t["length"].to_numpy())
        rows.append(rows[-1] + t.num_rows)
        ids += t["tile_id"].to_pylist()
        split += t["split"].to_pylist()
        col = pa.concat_arrays(t["entity_id"].chunks) if t.num_rows else pa.array([], pa.list_(pa.string()))
        offs = col.offsets.to_numpy()
        counts.append(np.diff(offs))
        eids.append(col.values.slice(offs[0], offs[-1] - offs[0]) if len(offs) else pa.array([], pa.string()))
    n_ent = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    flat = pa.concat_arrays(eids) if eids else pa.array([], pa.string())
    patches = (np.concatenate(length) if length else np.zeros(0, np.int64)) - n_ent
    return TokenIndex(shards, np.array(ids, dtype=object), np.array(split, dtype=object),
                      np.concatenate([[0], np.cumsum(n_ent)]).astype(np.int64), flat, w.token_dims(),
                      n_patches=patches, shard_start=np.array(rows, np.int64))


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


EMBED_TOKENS = 8_192  # entity (and image) tokens read and embedded at a time, at most (one tile at least)


def token_batches(tok: TokenIndex, modalities: tuple[str, ...], batch_tiles: int
                  ) -> Iterator[tuple[np.ndarray, list[dict]]]:
    """The token shards' tiles in token order, at most ``batch_tiles`` (and ``EMBED_TOKENS`` tokens) at a time:
    (their token indices, their items with ``modalities``' tokens). One batch in memory: the column chunks
    are read a page at a time (no pre-buffering)."""
    from geojepa.train.data import TokenRows

    columns = ["entity_position", "patch_position", *(TokenRows.COLUMNS[m] for m in modalities)]
    lengths = tok.n_entities + (tok.n_patches if "image" in modalities else 0)
    row = 0
    for k, shard in enumerate(tok.shards):
        # Shards are sorted by length: batches of their longest tiles hold fewer of them.
        longest = int(lengths[tok.shard_start[k] : tok.shard_start[k + 1]].max(initial=1))
        size = max(1, min(batch_tiles, EMBED_TOKENS // max(longest, 1)))
        for batch in pq.ParquetFile(shard, pre_buffer=False).iter_batches(batch_size=size, columns=columns,
                                                                          use_threads=False):
            token_rows = TokenRows(pa.Table.from_batches([batch]), modalities)
            items = [token_rows.item(i) for i in range(batch.num_rows)]
            yield np.arange(row, row + len(items)), items
            row += len(items)


def entity_batches(path: Path, contract, columns: list[str], tok: TokenIndex) -> Iterator[tuple[pa.Table, np.ndarray,
                                                                                                  np.ndarray]]:
    """Each shard of ``tile_entities`` (a partition: its tiles whole) restricted to the tokenised tiles and sorted
    as the tokens are (tile, then entity id), with each row's tile index and flat token position; checks
    that the rows are the token rows' entities."""
    ids = pa.array(list(tok.ids), pa.string())
    for pf in open_artifact(path, contract):
        t = pf.read(columns=list(dict.fromkeys(["tile_id", "entity_id", *columns])))
        tile = pc.index_in(t["tile_id"], value_set=ids)
        t = t.append_column("_tile", tile).filter(pc.is_valid(tile))
        if not t.num_rows:
            continue
        t = t.sort_by([("_tile", "ascending"), ("entity_id", "ascending")])
        tiles = t["_tile"].to_numpy().astype(np.int64)
        first = np.flatnonzero(np.r_[True, tiles[1:] != tiles[:-1]])
        rank = np.arange(len(tiles)) - np.repeat(first, np.diff(np.r_[first, len(tiles)]))
        pos = tok.ent_off[tiles] + rank
        bad = pos >= tok.ent_off[tiles + 1]
        if not bad.any():
            same = pc.equal(tok.entity_ids.take(pa.array(pos)), t["entity_id"].combine_chunks())
            bad = ~same.to_numpy(zero_copy_only=False)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise GeoJepaError(f"{path}: tile {tok.ids[tiles[i]]}'s entities differ from its token row in "
                               f"{tok.shards[0].parent}; re-run `geojepa tokens` on the region")
        yield t, tiles, pos
        del t
        release()


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


def release() -> None:
    """Hand freed memory back to the system: Arrow's pool keeps it for reuse, and glibc's heap keeps the freed
    blocks of the embedding batches' tensors (of every size up to tens of MB), so without this the resident
    size creeps up batch after batch (2.9 GB instead of 1.7 GB after the 9,000 tiles of a 1,000 km2 city)."""
    pa.default_memory_pool().release_unused()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # glibc only
    except OSError:
        return None


_LIBC = _libc()


def tiles_meta(path: Path, tok: TokenIndex) -> pa.Table:
    """The tokenised tiles' rows of ``tiles.parquet`` (footprint, bbox, CRS, origin, size), in token order."""
    t = read_table(path, TILES, columns=["tile_id", "split", "crs", "origin_x", "origin_y", "size_m", "geometry",
                                         "bbox"])
    at = pc.index_in(pa.array(list(tok.ids), pa.string()), t["tile_id"])
    if at.null_count:
        i = int(np.flatnonzero(~pc.is_valid(at).to_numpy(zero_copy_only=False))[0])
        raise GeoJepaError(f"{path}: tile {tok.ids[i]} of the token shards is not in the tiles")
    t = t.take(at)
    # The split is the tiles' (tiles.parquet); token shards that disagree are stale (a re-tiling since).
    stale = np.flatnonzero(t["split"].to_numpy(zero_copy_only=False) != np.asarray(tok.split).astype(str))
    if len(stale):
        raise GeoJepaError(f"{path}: {len(stale)} tiles have another split than in the token shards (e.g. "
                           f"{tok.ids[stale[0]]}: {t['split'][int(stale[0])]} vs {tok.split[stale[0]]}); the "
                           f"tokens are stale: run `geojepa tokens` again")
    return t.drop_columns(["split"])


def pieces_lonlat(wkb: pa.Array, tile: np.ndarray, tiles: pa.Table) -> tuple[pa.Array, pa.Array]:
    """(WKB in EPSG:4326, bbox structs) of tile pieces (WKB in tile coordinates [0, 1]) of tiles ``tile``
    (indices into ``tiles``, a ``tiles_meta`` table): x = origin_x + u * size_m, y likewise, in the tile's CRS."""
    import shapely
    from pyproj import Transformer

    geoms = shapely.from_wkb(wkb.to_numpy(zero_copy_only=False))
    xy, gi = shapely.get_coordinates(geoms, return_index=True)
    t = tile[gi]
    size = tiles["size_m"].to_numpy()[t]
    x = tiles["origin_x"].to_numpy()[t] + xy[:, 0] * size
    y = tiles["origin_y"].to_numpy()[t] + xy[:, 1] * size
    crs = tiles["crs"].to_numpy(zero_copy_only=False)[t]
    lon, lat = np.empty_like(x), np.empty_like(y)
    for c in np.unique(crs):
        m = crs == c
        lon[m], lat[m] = Transformer.from_crs(c, "EPSG:4326", always_xy=True).transform(x[m], y[m])
    geoms = shapely.set_coordinates(geoms, np.column_stack([lon, lat]))
    b = shapely.bounds(geoms)
    bbox = pa.StructArray.from_arrays([pa.array(b[:, i]) for i in range(4)], names=["xmin", "ymin", "xmax", "ymax"])
    return pa.array(shapely.to_wkb(geoms), pa.binary()), bbox
