"""A region's token shards and tile artifacts, read a batch or a partition at a time (never the whole region):
what every use of a trained encoder reads (evaluation, ``geojepa embed``, the registered pyfunc).

- ``TokenIndex``: the tokenised tiles in token-shard order (the order every per-tile array follows), their
  splits and where each tile's entities sit in the flat token order; no token is read.
- ``token_batches``: the tiles' token items, a bounded batch at a time.
- ``entity_batches``: ``tile_entities`` a partition at a time, sorted as the tokens are, with each row's flat
  token position (checked against the token rows).
- ``tiles_meta`` and ``pieces_lonlat``: footprints, and tile pieces back to EPSG:4326.
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

from data_contracts import TILES, open_artifact, read_table
from geojepa.errors import GeoJepaError
from geojepa.workdir import WorkDir

log = logging.getLogger(__name__)


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


def token_index(tokens: Path, splits: tuple[str, ...] | None = None) -> TokenIndex:
    """The shards' tiles (of ``splits``; None: every shard, the gap tiles' too when they were tokenised)."""
    w = WorkDir(Path(tokens).parent)
    shards = sorted(p for p in Path(tokens).glob("*.parquet") if not p.name.startswith(".")
                    and (splits is None or p.name.split("-")[0] in splits))
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
    """The tokenised tiles' rows of ``tiles.parquet`` (spatial group, footprint, bbox, CRS, origin, size), in token
    order."""
    t = read_table(path, TILES, columns=["tile_id", "group_id", "split", "crs", "origin_x", "origin_y", "size_m",
                                         "geometry", "bbox"])
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
