"""Planning the tile stage: the region's grid and extent, and the partitions worth cutting.

Real extracts have bboxes far larger than their mapped land (ferry routes, long relations):
most partitions of the extent hold nothing but parts of a few very large entities, and a
tile is kept only with at least ``tile.min_entities`` entities. One pass over the entities
(their bbox column; the geometry only of entities wider than about 1 km) bounds, for every
tile, how many entities can have a piece in it:

- a *small* entity counts in every tile its projected bbox meets;
- a *wide* entity (a bbox over more than one partition's worth of tiles) is projected and
  simplified once, here, and counts only in the partitions (and, where that decides, the
  tiles) its simplified geometry meets.

Only partitions with a tile whose bound reaches ``min_entities`` are cut; the others cannot
hold a kept tile. The plan (a folder of plain files, so that partitions cut in other
processes, e.g. on a Dask cluster, read it from the shared work directory) lists each
partition's rows of ``entities.parquet`` in file order and holds the wide entities'
simplified UTM geometry, so a partition reads just its rows, from row groups cached per
process, and never projects, simplifies or reads a wide entity again.

The extent: the GeoParquet bbox of the entities, as before, unless it spans more than 180
degrees of longitude, as for a region across the antimeridian: then the longitudes are
taken around the circle (the largest empty arc is outside the region), so a Fiji island
is one small region in UTM zone 60 or 1, not a bbox around the globe.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from data_contracts import ENTITIES, open_artifact
from geojepa.errors import GeoJepaError
from geojepa.tile.clip import project
from geojepa.tile.grid import Grid, utm_epsg

SMALL_DEG = 0.01  # entities whose lon/lat bbox is at most this (about 1 km) are placed by their bbox's corners
PAD_M = 1.0  # margin on every bound: corner projection of a bbox under 1 km is off by millimetres
LON_BINS = 36_000  # 0.01 degree bins to find the empty arc of longitudes
PLAN_FILE, WIDE_FILE = "plan.npz", "wide.parquet"
CUT_COLUMNS = ["entity_id", "kind", "tags", "geometry"]


@dataclass
class Region:
    grid: Grid
    cols: tuple[int, int]  # [first, last + 1)
    rows: tuple[int, int]
    lonlat: tuple[float, float, float, float]  # lon1 may exceed 180 for a region across the antimeridian
    plan: Path | None = None  # the partition plan's folder (see plan_partitions)
    plan_id: str = ""


def _circular_lon_extent(pf: pq.ParquetFile) -> tuple[float, float]:
    """(lon0, lon1), lon1 > lon0 and possibly over 180: the smallest arc holding every bbox's
    xmin and xmax, i.e. the circle less its largest arc without any."""
    lo, hi = np.full(LON_BINS, np.inf), np.full(LON_BINS, -np.inf)
    for i in range(pf.num_row_groups):
        bb = pf.read_row_group(i, columns=["bbox"]).column("bbox").combine_chunks()
        lon = np.concatenate([bb.field("xmin").to_numpy(), bb.field("xmax").to_numpy()])
        lon = lon[np.isfinite(lon)]
        k = np.clip(((lon + 180) / 360 * LON_BINS).astype(np.int64), 0, LON_BINS - 1)
        np.minimum.at(lo, k, lon)
        np.maximum.at(hi, k, lon)
    occupied = np.flatnonzero(np.isfinite(lo))
    gap = (np.roll(occupied, -1) - occupied) % LON_BINS  # empty bins + 1 after each occupied bin
    i = int(np.argmax(gap))
    first, last = occupied[(i + 1) % len(occupied)], occupied[i]
    lon0, lon1 = float(lo[first]), float(hi[last])
    return (lon0, lon1 + 360.0) if lon1 < lon0 else (lon0, lon1)


def plan_region(entities: Path, cfg) -> Region:
    """The grid and the tile ranges covering the entities' extent."""
    pf = open_artifact(entities, ENTITIES)[0]
    geo = json.loads((pf.metadata.metadata or {}).get(b"geo", b"{}"))
    bbox = geo.get("columns", {}).get("geometry", {}).get("bbox")
    if not bbox or pf.metadata.num_rows == 0:
        raise GeoJepaError(f"{entities}: no entities (or no GeoParquet bbox); run `geojepa extract` first")
    lon0, lat0, lon1, lat1 = bbox
    if lon1 - lon0 > 180:  # across the antimeridian, or spread around the globe
        lon0, lon1 = _circular_lon_extent(pf)
        if lon1 - lon0 > 180:
            raise GeoJepaError(
                f"{entities}: the entities spread over {lon1 - lon0:.0f} degrees of longitude "
                f"({bbox[0]:.4f} to {bbox[2]:.4f}); a region must fit in one UTM zone's neighbourhood. "
                "Cut it into regions with `geojepa extract --bbox` and tile each on its own")
    grid = Grid(utm_epsg((lon0 + lon1) / 2, (lat0 + lat1) / 2), cfg.size_m, cfg.group_size, cfg.partition_groups)
    lon = np.array([lon0, lon1, lon1, lon0, (lon0 + lon1) / 2, (lon0 + lon1) / 2])
    lat = np.array([lat0, lat0, lat1, lat1, lat0, lat1])
    x, y = grid.to_utm().transform(lon, lat)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise GeoJepaError(f"{entities}: the extent ({lon0:.4f}, {lat0:.4f}, {lon1:.4f}, {lat1:.4f}) does not "
                           f"project to {grid.crs}; cut the region smaller with `geojepa extract --bbox`")
    width, height = x.max() - x.min(), y.max() - y.min()
    if width < cfg.size_m and height < cfg.size_m:
        raise GeoJepaError(f"{entities}: the region is {width:.0f} x {height:.0f} m, smaller than one "
                           f"{cfg.size_m:g} m tile")
    cols = (int(np.floor(x.min() / cfg.size_m)), int(np.floor(x.max() / cfg.size_m)) + 1)
    rows = (int(np.floor(y.min() / cfg.size_m)), int(np.floor(y.max() / cfg.size_m)) + 1)
    return Region(grid, cols, rows, (lon0, lat0, lon1, lat1))


def extent_partitions(region: Region) -> list[tuple[int, int]]:
    """Every partition of the extent, cut or not."""
    span = region.grid.partition_span()
    return [(pc, pr) for pc in range(region.cols[0] // span, (region.cols[1] - 1) // span + 1)
            for pr in range(region.rows[0] // span, (region.rows[1] - 1) // span + 1)]


def _explode(c_lo, c_hi, r_lo, r_hi):
    """(item, col, row) for every cell of each item's inclusive range (ranges must be non-empty)."""
    nc, nr = c_hi - c_lo + 1, r_hi - r_lo + 1
    count = nc * nr
    item = np.repeat(np.arange(len(c_lo)), count)
    k = np.arange(len(item)) - np.repeat(np.cumsum(count) - count, count)
    return item, c_lo[item] + k % nc[item], r_lo[item] + k // nc[item]


@dataclass
class Plan:
    parts: list[tuple[int, int]]  # the partitions to cut, in reading order
    extent: int  # partitions of the extent
    occupied: int  # partitions any entity's bbox meets
    wide: int  # wide entities
    refined: int = 0  # partitions decided tile by tile (where wide entities could make up the count)


class _Extent:
    """Tile and partition arithmetic of a region, clamped to its tile ranges."""

    def __init__(self, region: Region, size: float):
        self.size, self.span = size, region.grid.partition_span()
        (self.c0, self.c1), (self.r0, self.r1) = region.cols, region.rows
        self.pc0, self.pr0 = self.c0 // self.span, self.r0 // self.span
        self.npc = (self.c1 - 1) // self.span + 1 - self.pc0
        self.npr = (self.r1 - 1) // self.span + 1 - self.pr0

    def tile_ranges(self, b: np.ndarray):
        """Inclusive clamped tile ranges of padded UTM bounds (n, 4); valid: non-empty and finite."""
        with np.errstate(invalid="ignore"):
            lo = np.floor((b[:, :2] - PAD_M) / self.size)
            hi = np.floor((b[:, 2:] + PAD_M) / self.size)
        valid = np.isfinite(lo).all(1) & np.isfinite(hi).all(1)
        lo, hi = np.where(valid[:, None], lo, 0).astype(np.int64), np.where(valid[:, None], hi, -1).astype(np.int64)
        c_lo, r_lo = np.maximum(lo[:, 0], self.c0), np.maximum(lo[:, 1], self.r0)
        c_hi, r_hi = np.minimum(hi[:, 0], self.c1 - 1), np.minimum(hi[:, 1], self.r1 - 1)
        return c_lo, c_hi, r_lo, r_hi, valid & (c_lo <= c_hi) & (r_lo <= r_hi)

    def part_key(self, col, row):
        return (col // self.span - self.pc0) * self.npr + (row // self.span - self.pr0)

    def part_of_key(self, key) -> tuple[int, int]:
        return int(key // self.npr + self.pc0), int(key % self.npr + self.pr0)

    def part_tiles(self, key) -> tuple[int, int, int, int]:
        pc, pr = self.part_of_key(key)
        return (max(pc * self.span, self.c0), min((pc + 1) * self.span, self.c1),
                max(pr * self.span, self.r0), min((pr + 1) * self.span, self.r1))

    def boxes(self, c_lo, c_hi, r_lo, r_hi) -> np.ndarray:
        """Padded UTM boxes of tile ranges [c_lo, c_hi) x [r_lo, r_hi)."""
        s = self.size
        return shapely.box(c_lo * s - PAD_M, r_lo * s - PAD_M, c_hi * s + PAD_M, r_hi * s + PAD_M)


def _meets(geom, boxes: np.ndarray) -> np.ndarray:
    """Which boxes the geometry meets, part by part (a prepared collection is tested whole, slowly)."""
    hit = np.zeros(len(boxes), bool)
    hit[shapely.STRtree(shapely.get_parts(geom)).query(boxes, predicate="intersects")[0]] = True
    return hit


def _utm_bounds(bb: pa.StructArray, to_utm) -> tuple[np.ndarray, np.ndarray]:
    """UTM bounds (n, 4) of lon/lat bboxes from their corners, and which bboxes are too big for that."""
    xmin, ymin, xmax, ymax = (bb.field(k).to_numpy() for k in ("xmin", "ymin", "xmax", "ymax"))
    big = ~((xmax - xmin <= SMALL_DEG) & (ymax - ymin <= SMALL_DEG))
    x, y = to_utm.transform(np.concatenate([xmin, xmax, xmax, xmin]), np.concatenate([ymin, ymin, ymax, ymax]))
    x, y = x.reshape(4, -1), y.reshape(4, -1)
    return np.column_stack([x.min(0), y.min(0), x.max(0), y.max(0)]), big


def plan_partitions(entities: Path, region: Region, cfg, folder: Path) -> Plan:
    """Write the partition plan into ``folder`` (created) and point ``region`` at it."""
    ext, grid = _Extent(region, cfg.size_m), region.grid
    need = max(cfg.min_entities, 1)  # an empty tile is never kept
    to_utm = grid.to_utm()
    pf = pq.ParquetFile(entities)
    starts = np.concatenate([[0], np.cumsum([pf.metadata.row_group(i).num_rows
                                             for i in range(pf.num_row_groups)])]).astype(np.int64)
    keys, counts, pair_part, pair_row = [], [], [], []
    wide_rows, wide_geoms = [], []
    for rg in range(pf.num_row_groups):
        bounds, big = _utm_bounds(pf.read_row_group(rg, columns=["bbox"]).column("bbox").combine_chunks(), to_utm)
        geoms = None
        if big.any():
            wkb = pf.read_row_group(rg, columns=["geometry"]).column("geometry").combine_chunks()
            geoms = project(shapely.from_wkb(wkb.take(pa.array(np.flatnonzero(big))).to_numpy(zero_copy_only=False)),
                            to_utm)
            bounds[big] = shapely.bounds(geoms)
        c_lo, c_hi, r_lo, r_hi, valid = ext.tile_ranges(bounds)
        wide = valid & big & ((c_hi - c_lo + 1) * (r_hi - r_lo + 1) > ext.span * ext.span)
        if wide.any():
            at = np.flatnonzero(wide[big])
            wide_geoms.append(shapely.simplify(geoms[at], cfg.simplify_m, preserve_topology=True))
            wide_rows.append(starts[rg] + np.flatnonzero(wide))
        small = np.flatnonzero(valid & ~wide)
        item, col, row = _explode(c_lo[small], c_hi[small], r_lo[small], r_hi[small])
        u, n = np.unique((col - ext.c0) * (ext.r1 - ext.r0) + (row - ext.r0), return_counts=True)
        keys.append(u)
        counts.append(n)
        # (partition, row) pairs: each small entity in every partition its tile range meets
        span = ext.span
        item, pc, pr = _explode(c_lo[small] // span, c_hi[small] // span, r_lo[small] // span, r_hi[small] // span)
        pair_part.append((pc - ext.pc0) * ext.npr + (pr - ext.pr0))
        pair_row.append(starts[rg] + small[item])

    nparts = ext.npc * ext.npr
    # Per tile: how many small entities' bboxes meet it; per partition: the most in one of its tiles.
    tile_key, inv = np.unique(np.concatenate(keys), return_inverse=True)
    tile_n = np.bincount(inv, np.concatenate(counts)).astype(np.int64)
    tile_col = ext.c0 + tile_key // (ext.r1 - ext.r0)
    tile_row = ext.r0 + tile_key % (ext.r1 - ext.r0)
    small_max = np.zeros(nparts, np.int64)
    np.maximum.at(small_max, ext.part_key(tile_col, tile_row), tile_n)

    # Wide entities: the partitions their simplified geometry meets.
    wide_rows = np.concatenate(wide_rows) if wide_rows else np.zeros(0, np.int64)
    wide_geoms = np.concatenate(wide_geoms) if wide_geoms else np.zeros(0, object)
    wide_part, wide_item = [], []
    for w, g in enumerate(wide_geoms.tolist()):
        c_lo, c_hi, r_lo, r_hi, valid = ext.tile_ranges(np.array([shapely.bounds(g)]))
        if not valid[0]:
            continue
        _, pc, pr = _explode(c_lo // ext.span, c_hi // ext.span, r_lo // ext.span, r_hi // ext.span)
        for a in range(0, len(pc), 100_000):  # bounded memory for a line across a huge extent
            pcs, prs = pc[a:a + 100_000], pr[a:a + 100_000]
            hit = _meets(g, ext.boxes(np.maximum(pcs * ext.span, ext.c0), np.minimum((pcs + 1) * ext.span, ext.c1),
                                      np.maximum(prs * ext.span, ext.r0), np.minimum((prs + 1) * ext.span, ext.r1)))
            wide_part.append((pcs[hit] - ext.pc0) * ext.npr + (prs[hit] - ext.pr0))
            wide_item.append(np.full(int(hit.sum()), w))
    wide_part = np.concatenate(wide_part) if wide_part else np.zeros(0, np.int64)
    wide_item = np.concatenate(wide_item) if wide_item else np.zeros(0, np.int64)
    wide_n = np.bincount(wide_part, minlength=nparts)

    # Which partitions can hold a kept tile: surely where small entities alone reach `need` in a
    # tile; where only wide ones can make up the difference, count those per tile.
    keep = small_max >= need
    order = np.argsort(wide_part, kind="stable")
    wide_part, wide_item = wide_part[order], wide_item[order]
    refine = np.flatnonzero(~keep & (small_max + wide_n >= need))
    for key in refine.tolist():
        c0, c1, r0, r1 = ext.part_tiles(key)
        cols, rows = (a.ravel() for a in np.meshgrid(np.arange(c0, c1), np.arange(r0, r1), indexing="ij"))
        boxes = ext.boxes(cols, cols + 1, rows, rows + 1)
        ub = np.zeros(len(cols), np.int64)
        tk = (cols - ext.c0) * (ext.r1 - ext.r0) + (rows - ext.r0)
        at = np.minimum(np.searchsorted(tile_key, tk), max(len(tile_key) - 1, 0))
        if len(tile_key):
            ub += np.where(tile_key[at] == tk, tile_n[at], 0)
        a, b = np.searchsorted(wide_part, key), np.searchsorted(wide_part, key, side="right")
        for w in wide_item[a:b].tolist():
            ub += _meets(wide_geoms[w], boxes)
        keep[key] = ub.max() >= need

    # Each kept partition's small rows (file order) and wide entities.
    pair_part, pair_row = np.concatenate(pair_part), np.concatenate(pair_row)
    sel = keep[pair_part]
    pair_part, pair_row = pair_part[sel], pair_row[sel]
    order = np.lexsort((pair_row, pair_part))
    pair_part, pair_row = pair_part[order], pair_row[order]
    sel = keep[wide_part]
    wide_part, wide_item = wide_part[sel], wide_item[sel]
    used = np.unique(wide_item)  # wide entities some kept partition needs
    wide_item = np.searchsorted(used, wide_item)
    kept = np.flatnonzero(keep)
    row_ptr = np.searchsorted(pair_part, np.concatenate([kept, [nparts]]))
    wide_ptr = np.searchsorted(wide_part, np.concatenate([kept, [nparts]]))
    # Reading order: along the file (Hilbert order), so consecutive partitions share row groups.
    first = np.array([pair_row[row_ptr[i]] if row_ptr[i + 1] > row_ptr[i] else starts[-1]
                      for i in range(len(kept))], np.int64)
    read = np.argsort(first, kind="stable")

    folder.mkdir(parents=True, exist_ok=True)
    parts = np.array([ext.part_of_key(k) for k in kept.tolist()], np.int64).reshape(-1, 2)
    np.savez(folder / PLAN_FILE, parts=parts, row_ptr=row_ptr, rows=pair_row, wide_ptr=wide_ptr,
             wide=wide_item, starts=starts)
    _write_wide(pf, wide_rows[used], wide_geoms[used], folder / WIDE_FILE)
    region.plan, region.plan_id = folder, uuid.uuid4().hex
    return Plan([tuple(p) for p in parts[read].tolist()], nparts, int(((small_max > 0) | (wide_n > 0)).sum()),
                len(used), len(refine))


def _write_wide(pf: pq.ParquetFile, rows: np.ndarray, geoms: np.ndarray, path: Path) -> None:
    """The wide entities' rows (file order) with their simplified UTM geometry as WKB."""
    starts = np.concatenate([[0], np.cumsum([pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])])
    parts = []
    for rg in np.unique(np.searchsorted(starts, rows, side="right") - 1).tolist():
        at = rows[(rows >= starts[rg]) & (rows < starts[rg + 1])] - starts[rg]
        parts.append(pf.read_row_group(rg, columns=CUT_COLUMNS[:3]).take(pa.array(at)))
    schema = pf.schema_arrow
    table = (pa.concat_tables(parts) if parts
             else pa.table({c: pa.array([], schema.field(c).type) for c in CUT_COLUMNS[:3]}))
    table = table.append_column("geometry", pa.array(shapely.to_wkb(geoms) if len(geoms) else [], pa.binary()))
    pq.write_table(table.append_column("row", pa.array(rows, pa.int64())), path)


class _Cache:
    """A per-process LRU cache holding at most ``size`` items and about ``budget`` bytes (``nbytes``)."""

    def __init__(self, size: int, budget: float = float("inf")):
        self.size, self.budget, self.items, self.lock = size, budget, OrderedDict(), threading.Lock()

    def get(self, key, load):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = load()  # two threads may load the same item once each: harmless
        with self.lock:
            self.items[key] = value
            while len(self.items) > 1 and (len(self.items) > self.size or sum(
                    getattr(v, "nbytes", 0) for v in self.items.values()) > self.budget):
                self.items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


# Decoded row groups (25,000 entities each: about 5 MB in a town, more with big geometries): a
# partition's small entities mostly come from one or two, but entities up to a partition wide are
# sorted by their centre and may sit in any; partitions are read in file order, so few are re-read.
ROW_GROUPS, PLANS = _Cache(64, budget=256e6), _Cache(2)


def clear_caches() -> None:
    ROW_GROUPS.clear()
    PLANS.clear()


@dataclass
class _LoadedPlan:
    parts: dict[tuple[int, int], int]
    row_ptr: np.ndarray
    rows: np.ndarray
    wide_ptr: np.ndarray
    wide: np.ndarray
    starts: np.ndarray
    wide_table: pa.Table
    wide_geoms: np.ndarray  # simplified UTM geometries


def _load_plan(folder: Path) -> _LoadedPlan:
    with np.load(folder / PLAN_FILE) as z:
        arrays = {k: z[k] for k in z.files}
    wide = pq.read_table(folder / WIDE_FILE)
    return _LoadedPlan({tuple(p): i for i, p in enumerate(arrays.pop("parts").tolist())}, **arrays,
                       wide_table=wide.drop_columns(["geometry"]),
                       wide_geoms=shapely.from_wkb(wide.column("geometry").to_numpy(zero_copy_only=False)))


def read_partition(entities: Path, region: Region, part: tuple[int, int], simplify_m: float, to_utm
                   ) -> tuple[pa.Table, np.ndarray]:
    """A partition's planned entities in file order (entity_id, kind, tags) and their simplified UTM
    geometries."""
    plan = PLANS.get((str(region.plan), region.plan_id), lambda: _load_plan(region.plan))
    i = plan.parts.get(tuple(part))
    if i is None:
        return pa.table({c: pa.array([], plan.wide_table.schema.field(c).type) for c in CUT_COLUMNS[:3]}), \
            np.zeros(0, object)
    rows = plan.rows[plan.row_ptr[i]:plan.row_ptr[i + 1]]
    wide = plan.wide[plan.wide_ptr[i]:plan.wide_ptr[i + 1]]
    st = Path(entities).stat()
    ident = (str(entities), st.st_mtime_ns, st.st_size, st.st_ino)
    pf = None
    tables = []
    rg_of = np.searchsorted(plan.starts, rows, side="right") - 1
    for rg in np.unique(rg_of).tolist():
        def load(rg=rg):
            nonlocal pf
            pf = pf or pq.ParquetFile(entities)
            return pf.read_row_group(rg, columns=CUT_COLUMNS)
        t = ROW_GROUPS.get((*ident, rg), load)
        tables.append(t.take(pa.array(rows[rg_of == rg] - plan.starts[rg])))
    if tables:
        small = pa.concat_tables(tables)
        geoms = project(shapely.from_wkb(small.column("geometry").to_numpy(zero_copy_only=False)), to_utm)
        geoms = shapely.simplify(geoms, simplify_m, preserve_topology=True)
        small = small.drop_columns(["geometry"])
    else:
        small, geoms = plan.wide_table.select(CUT_COLUMNS[:3]).slice(0, 0), np.zeros(0, object)
    if len(wide) == 0:
        return small, geoms
    w = plan.wide_table.take(pa.array(wide))
    order = np.argsort(np.concatenate([rows, w.column("row").to_numpy()]), kind="stable")
    table = pa.concat_tables([small, w.select(CUT_COLUMNS[:3])]).take(pa.array(order))
    return table, np.concatenate([geoms, plan.wide_geoms[wide]])[order]
