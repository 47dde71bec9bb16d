"""The tile stage: ``W/entities.parquet`` -> ``W/tiles.parquet``, ``W/tile_entities.parquet/``,
``W/tile_images.parquet/``.

The region is cut into partitions (blocks of tile groups, ``tile.partition_groups``
groups a side). A plan (``geojepa.tile.plan``, one pass over the entities) keeps only
the partitions where some tile can reach ``tile.min_entities`` entities and lists each
one's entities; each partition reads only those rows (row groups of the Hilbert-sorted
entities, cached per process), cuts them into tiles, drops tiles with too few or too
many entities, attaches imagery and writes one Parquet shard per artifact. Memory is
bounded by one partition, a few row groups and the plan. The counts of occupied and
dropped tiles cover the partitions cut (a skipped partition's tiles would all have been
dropped for too few entities). ``tile_entities.parquet`` and ``tile_images.parquet`` are Parquet
datasets (folders of shards, readable as one table by pyarrow, DuckDB and
geopandas); ``tiles.parquet`` is one file with the split.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import rasterio
import shapely

from data_contracts import TILE_ENTITIES, TILE_IMAGES, TILES, write_table
from geojepa.config import Config, TileConfig
from geojepa.errors import GeoJepaError
from geojepa.lifecycle import Lifecycle, StageResult, Summary
from geojepa.parallel import bounded_map
from geojepa.tile import plan as planner
from geojepa.tile import render as renderer
from geojepa.tile.clip import pieces
from geojepa.tile.grid import assign_splits
from geojepa.tile.imagery import Mosaic, StacNaip, TileImage, open_source
from geojepa.tile.plan import Region, extent_partitions, plan_region
from geojepa.workdir import WorkDir

log = logging.getLogger(__name__)
# Dictionary-encode the small columns of tile_images, not the pixels (unique blobs: hashing them only to
# fall back to plain encoding cost 40% of writing them).
IMAGE_DICTIONARY = ["tile_id", "bands", "source", "acquired"]


@dataclass(frozen=True, kw_only=True)
class TileSummary(Summary):
    """The tile stage's figures: the tiles kept, and how many in each split (every other figure: ``figures``)."""

    tiles: int
    splits: dict[str, int]

    @classmethod
    def of(cls, figures: dict) -> TileSummary:
        return cls(figures=dict(figures), tiles=figures.get("tiles"),
                   splits={k.removeprefix("split_"): v for k, v in figures.items() if k.startswith("split_")})


def partitions(region: Region) -> list[tuple[int, int]]:
    """Every partition of the region's extent (``tile`` cuts only those its plan keeps)."""
    return extent_partitions(region)


def _check_overlap(source, region: Region) -> None:
    if not isinstance(source, Mosaic):
        return
    lon0, lat0, lon1, lat1 = region.lonlat
    boxes = source.lonlat_bounds()
    if not any(b[0] + shift < lon1 and b[2] + shift > lon0 and b[1] < lat1 and b[3] > lat0
               for _, b in boxes for shift in (0, 360)):  # lon1 > 180 across the antimeridian
        names = ", ".join(label for label, _ in boxes)
        raise GeoJepaError(f"{names}: imagery does not overlap the region ({lon0:.5f}, {lat0:.5f}, {lon1:.5f}, "
                           f"{lat1:.5f})")


@dataclass
class Cut:
    """One partition cut into tiles: its tile_entities rows and its kept tiles."""

    part: tuple[int, int]
    lonlat: tuple[float, float, float, float]  # bounds of the partition's tiles
    entities: pa.Table | None
    tiles: list[dict]
    stats: Counter


def cut_partition(entities: Path, region: Region, part: tuple[int, int], cfg: TileConfig) -> Cut:
    """Cut one partition's entities into tiles and drop tiles with too few or too many (thread-safe;
    ``region`` carries the plan from ``plan.plan_partitions``)."""
    grid, size, stats = region.grid, cfg.size_m, Counter()
    span = grid.partition_span()
    c0, r0 = max(part[0] * span, region.cols[0]), max(part[1] * span, region.rows[0])
    c1, r1 = min((part[0] + 1) * span, region.cols[1]), min((part[1] + 1) * span, region.rows[1])
    lon0, lat0, lon1, lat1 = grid.lonlat_bounds(c0 * size, r0 * size, c1 * size, r1 * size)
    table, geoms = planner.read_partition(entities, region, part, cfg.simplify_m, grid.to_utm())
    if table.num_rows == 0:
        return Cut(part, (lon0, lat0, lon1, lat1), None, [], stats)
    p = pieces(geoms, size, (c0, c1), (r0, r1), None, cfg.min_side_m)
    key = (p.col - c0) * (r1 - r0) + (p.row - r0)
    counts = np.bincount(key, minlength=(c1 - c0) * (r1 - r0))
    occupied = counts > 0
    keep_tile = occupied & (counts >= cfg.min_entities) & (counts <= cfg.max_entities)
    stats["tiles_with_entities"] += int(occupied.sum())
    stats["dropped_too_few"] += int((occupied & (counts < cfg.min_entities)).sum())
    stats["dropped_too_many"] += int((counts > cfg.max_entities).sum())
    kept = keep_tile[key]
    if not kept.any():
        return Cut(part, (lon0, lat0, lon1, lat1), None, [], stats)
    sel = np.flatnonzero(kept)[np.lexsort((p.entity[kept], key[kept]))]  # by tile, then entity
    cells = np.flatnonzero(keep_tile)
    cols, rows = c0 + cells // (r1 - r0), r0 + cells % (r1 - r0)
    ids = grid.tile_id(cols, rows)
    tile_of_cell = np.full(len(counts), -1)
    tile_of_cell[cells] = np.arange(len(cells))
    ent = pa.array(p.entity[sel])
    stats["pieces"] += len(sel)
    te = pa.table({
        "tile_id": pa.array(ids, pa.string()).take(pa.array(tile_of_cell[key[sel]])),
        "entity_id": table.column("entity_id").take(ent),
        "kind": table.column("kind").take(ent),
        "tags": table.column("tags").take(ent),
        "geometry": pa.array(shapely.to_wkb(p.geometry[sel]), pa.binary()),
        "vertices": p.vertices.take(pa.array(sel)),
        "position": pa.FixedSizeListArray.from_arrays(pa.array(p.position[sel].ravel()), 8),
    })
    tiles = [{"tile_id": t, "col": int(c), "row": int(r), "n_entities": int(counts[k])}
             for t, c, r, k in zip(ids, cols, rows, cells, strict=True)]
    return Cut(part, (lon0, lat0, lon1, lat1), te, tiles, stats)


def _shard(part: tuple[int, int]) -> str:
    return f"part-{part[0]}-{part[1]}.parquet"


@dataclass(frozen=True)
class PartitionJob:
    """Cutting one partition and writing its shards (images too, unless they come from rasters, which stay on
    the stage's thread: GDAL handles are not thread-safe): what ``tile`` hands ``map_partitions``, a plain
    picklable value (the region with its plan, the settings, the staging folders), so a Dask worker can run
    it; W must then be shared storage."""

    entities: Path
    region: Region
    cfg: TileConfig
    imagery: str | None  # "render" or None: imagery drawn here; rasters are read by the stage itself
    rasters: bool
    tile_entities: Path  # the staging folders of the two datasets
    tile_images: Path

    def __call__(self, part: tuple[int, int]) -> Cut:
        c = cut_partition(self.entities, self.region, part, self.cfg)
        if c.entities is not None:
            write_table(c.entities, self.tile_entities / _shard(part), TILE_ENTITIES, row_group_rows=50_000)
            if not self.rasters:
                images = _images(c.tiles, self.region, self.cfg, self.imagery, c.entities, None)
                write_table(_images_table(c.tiles, images, self.cfg.image_px, c.stats), self.tile_images / _shard(part),
                            TILE_IMAGES, use_dictionary=IMAGE_DICTIONARY)
        return c


def _images(tiles: list[dict], region: Region, cfg: TileConfig, imagery, te: pa.Table, lonlat) -> list[TileImage]:
    px, size, grid = cfg.image_px, cfg.size_m, region.grid
    if imagery is None:
        return [TileImage(None, [], 0.0, "missing", None) for _ in tiles]
    if imagery == "render":  # te holds the tiles' entities tile after tile, in the order of ``tiles``
        geoms = shapely.from_wkb(te.column("geometry").to_numpy(zero_copy_only=False))
        tags = _tags(te.column("tags"), renderer.TAG_KEYS)
        offsets = np.concatenate([[0], np.cumsum([t["n_entities"] for t in tiles])]).tolist()
        images = renderer.render_tiles([t["tile_id"] for t in tiles], geoms, tags, offsets, px, size)
        return [TileImage(pixels, ["R", "G", "B"], 1.0, renderer.SOURCE, None) for pixels in images]
    mosaic = imagery.for_area(lonlat) if isinstance(imagery, StacNaip) else imagery
    with rasterio.Env(GDAL_CACHEMAX=cfg.gdal_cache_mb):
        return [mosaic.read((t["col"] * size, t["row"] * size, (t["col"] + 1) * size, (t["row"] + 1) * size),
                            grid.crs, px) for t in tiles]


def _tags(column: pa.ChunkedArray, keys) -> list[dict[str, str]]:
    """Each row's tags as a dict, holding only ``keys`` (all the renderer reads)."""
    tags = column.combine_chunks()
    offsets = tags.offsets.to_numpy()
    names = tags.keys
    at = np.flatnonzero(pc.is_in(names, pa.array(list(keys), pa.string())).to_numpy(zero_copy_only=False))
    out: list[dict[str, str]] = [{} for _ in range(len(tags))]
    rows = np.searchsorted(offsets, at + offsets[0], side="right") - 1
    for row, key, value in zip(rows.tolist(), names.take(pa.array(at)).to_pylist(),
                               tags.items.take(pa.array(at)).to_pylist(), strict=True):
        out[row][key] = value
    return out


def _images_table(tiles: list[dict], out: list[TileImage], px: int, stats: Counter) -> pa.Table:
    stats["images_missing"] += sum(i.pixels is None for i in out)
    stats["images_partial"] += sum(i.pixels is not None and i.coverage < 1 for i in out)
    return pa.table({
        "tile_id": pa.array([t["tile_id"] for t in tiles], pa.string()),
        "pixels": _pixels_array(out),
        "height": pa.array([px] * len(out), pa.int32()),
        "width": pa.array([px] * len(out), pa.int32()),
        "bands": pa.array([i.bands for i in out], pa.list_(pa.string())),
        "coverage": pa.array([i.coverage for i in out], pa.float32()),
        "source": pa.array([i.source for i in out], pa.string()),
        "acquired": pa.array([i.acquired for i in out], pa.string()),
    })


def _pixels_array(out: list[TileImage]) -> pa.Array:
    """The images' pixels as one binary array (null where missing), built on one contiguous buffer."""
    have = [i.pixels is not None for i in out]
    if not any(have):
        return pa.nulls(len(out), pa.binary())
    sizes = np.array([i.pixels.nbytes if h else 0 for i, h in zip(out, have, strict=True)], np.int64)
    if sizes.sum() >= 2**31:  # past 32-bit offsets: let Arrow chunk it
        return pa.array([i.pixels.tobytes() if h else None for i, h in zip(out, have, strict=True)], pa.binary())
    data = np.concatenate([i.pixels.reshape(-1) for i, h in zip(out, have, strict=True) if h]).view(np.uint8)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    valid = pa.array(have).buffers()[1] if not all(have) else None
    return pa.Array.from_buffers(pa.binary(), len(out), [valid, pa.py_buffer(offsets), pa.py_buffer(data)])


def _tiles_table(region: Region, rows: list[dict], cfg: TileConfig) -> pa.Table:
    grid, size = region.grid, cfg.size_m
    col = np.array([r["col"] for r in rows], np.int64)
    row = np.array([r["row"] for r in rows], np.int64)
    split = assign_splits(col, row, cfg.group_size, cfg.split, cfg.seed)
    footprints = grid.rings_lonlat(col * size, row * size, (col + 1) * size, (row + 1) * size, densify=4)
    polys = shapely.polygons(footprints) if len(col) else np.array([], dtype=object)
    bounds = shapely.bounds(polys) if len(polys) else np.zeros((0, 4))
    return pa.table({
        "tile_id": pa.array(grid.tile_id(col, row), pa.string()),
        "group_id": pa.array(grid.group_id(col, row), pa.string()),
        "split": pa.array(split, pa.string()),
        "crs": pa.array([grid.crs] * len(col), pa.string()),
        "col": pa.array(col), "row": pa.array(row),
        "origin_x": pa.array(col * size, pa.float64()), "origin_y": pa.array(row * size, pa.float64()),
        "size_m": pa.array([size] * len(col), pa.float64()),
        "n_entities": pa.array([r["n_entities"] for r in rows], pa.int32()),
        "geometry": pa.array(shapely.to_wkb(polys), pa.binary()),
        "bbox": pa.StructArray.from_arrays([pa.array(bounds[:, i]) for i in range(4)],
                                           names=["xmin", "ymin", "xmax", "ymax"]),
    })


def _imagery_spec(imagery) -> dict:
    """What identifies the imagery for the manifest: files by name, size and mtime (not hashed: too big)."""
    if imagery is None or imagery in ("render", "naip") or (isinstance(imagery, str) and imagery.startswith("stac+")):
        return {"imagery": imagery}
    items = imagery if isinstance(imagery, list | tuple) else [imagery]
    files = []
    for item in map(Path, items):
        for f in sorted(item.rglob("*")) if item.is_dir() else [item]:
            if f.is_file():
                st = f.stat()
                files.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return {"imagery": [str(i) for i in items], "files": files}


def tile(work_dir: Path | str, cfg: Config, imagery: str | list | None = None, force: bool = False,
         map_partitions: Callable[[PartitionJob, list], Iterable[Cut]] | None = None) -> StageResult[TileSummary]:
    """Tile ``work_dir/entities.parquet``; ``imagery``: None, "render", "naip", "stac+URL#collection",
    or GeoTIFF path(s) / a folder. ``map_partitions(job, parts)`` runs the ``PartitionJob`` over the partitions
    and yields the results in order (default: ``tile.threads`` threads; the Prefect flow passes mapped tasks,
    locally or on a Dask cluster: the job writes its shards itself, so W must be shared storage)."""
    w = WorkDir(work_dir)
    work_dir = w.path
    section = cfg.tile
    entities = w.entities
    region = plan_region(entities, section)
    source = None if imagery in (None, "render") else open_source(imagery)
    if source is not None:
        _check_overlap(source, region)
    life = Lifecycle("tile", work_dir, cfg, {"entities": entities},
                     {**section.model_dump(mode="json"), **_imagery_spec(imagery)}, ("geojepa.tile", "data_contracts"),
                     section="tile")
    if done := life.skipped(force, TileSummary):
        return done

    stats: Counter = Counter()
    t0 = time.perf_counter()
    tmp_p = work_dir / f".tile_plan.tmp-{os.getpid()}"
    try:
        with life.run() as run, life.staging(w.tile_entities) as tmp_e, life.staging(w.tile_images) as tmp_i:
            shutil.rmtree(tmp_p, ignore_errors=True)
            tiles: list[dict] = []
            plan = planner.plan_partitions(entities, region, section, tmp_p)
            parts = plan.parts
            log.info("tile: %d of the extent's %d partitions can hold a tile of %d+ entities (%d hold any; "
                     "%d wide entities)", len(parts), plan.extent, max(section.min_entities, 1), plan.occupied,
                     plan.wide)
            rasters = source is not None
            job = PartitionJob(entities, region, section, None if rasters else imagery, rasters, tmp_e, tmp_i)
            run_all = map_partitions or (lambda fn, items: bounded_map(fn, items, section.threads))
            for c in run_all(job, parts):
                pa.default_memory_pool().release_unused()
                stats.update(c.stats)
                if c.entities is None:
                    continue
                if rasters:
                    images = _images(c.tiles, region, section, source, c.entities, c.lonlat)
                    write_table(_images_table(c.tiles, images, section.image_px, stats), tmp_i / _shard(c.part),
                                TILE_IMAGES, use_dictionary=IMAGE_DICTIONARY)
                tiles += c.tiles
            if not tiles:
                raise GeoJepaError(f"{entities}: no tile has between {section.min_entities} and "
                                   f"{section.max_entities} entities; nothing written")
            span = region.grid.partition_span()  # the order of the extent's partitions, then col, row
            tiles.sort(key=lambda t: (t["col"] // span, t["row"] // span, t["col"], t["row"]))
            table = _tiles_table(region, tiles, section)
            write_table(table, w.tiles, TILES)
            seconds = time.perf_counter() - t0
            splits = Counter(table.column("split").to_pylist())
            summary = {"tiles": len(tiles), "partitions": len(parts), "partitions_skipped": plan.extent - len(parts),
                       "wide_entities": plan.wide, "crs": region.grid.crs,
                       **{f"split_{k}": v for k, v in sorted(splits.items())}, **dict(sorted(stats.items())),
                       "seconds": round(seconds, 3), "tiles_per_s": round(len(tiles) / seconds, 1),
                       "pieces_per_s": round(stats["pieces"] / seconds, 1)}
            run.metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})
            run.dict(summary, "tile_summary.json")
    finally:
        planner.clear_caches()
        shutil.rmtree(tmp_p, ignore_errors=True)
    log.info("tile: %d tiles (%s) in %.1fs; dropped %d with < %d and %d with > %d entities", len(tiles),
             dict(splits), seconds, stats["dropped_too_few"], section.min_entities, stats["dropped_too_many"],
             section.max_entities)
    return life.publish([w.tiles, w.tile_entities, w.tile_images], TileSummary.of(summary))
