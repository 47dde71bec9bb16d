"""Streaming PBF reading with pyosmium: tagged objects out as Arrow batches.

Two passes over the file, both streamed:

1. relations only: tagged relations and the ids of their members;
2. nodes and ways with a node-location index: tagged nodes become points,
   tagged ways lines or polygons; the geometries of relation members (tagged
   or not) are kept for step 3. Untagged objects never reach Python except
   untagged member ways (a C++ filter drops the rest).
3. relations are assembled from their members' geometries.

Python touches each tagged object once to clean its tags; geometry building,
repair and encoding are vectorised per batch (shapely 2, pyarrow).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import osmium
import pyarrow as pa
import pyarrow.compute as pc
import shapely

from data_contracts import ENTITIES
from geojepa.errors import GeoJepaError
from geojepa.extract import geometry as geom
from geojepa.extract.tags import TagFilter, is_area

log = logging.getLogger(__name__)

MEMBER_TYPE = {"n": "node", "w": "way", "r": "relation"}
AREA_RELATIONS = frozenset({"multipolygon", "boundary"})
# Batches carry the contract's columns plus the spatial sort key.
BATCH_SCHEMA = ENTITIES.schema.append(pa.field("_sort_key", pa.int64(), nullable=False))


def check_pbf(path: Path) -> osmium.osm.Box:
    """Fail early, naming the file, unless it looks like an OSM PBF; return its header bbox."""
    if not path.is_file():
        raise GeoJepaError(f"{path}: PBF file not found")
    with open(path, "rb") as f:
        head = f.read(64)
    # A PBF starts with a 4-byte header length then a BlobHeader whose type is "OSMHeader".
    if len(head) < 16 or b"OSMHeader" not in head[4:32]:
        raise GeoJepaError(f"{path}: not an OSM PBF file (no OSMHeader block at the start)")
    try:
        return osmium.io.Reader(str(path), osmium.osm.NOTHING).header().box()
    except RuntimeError as e:
        raise GeoJepaError(f"{path}: unreadable PBF header: {e}") from None


@dataclass
class _Buffer:
    """Column buffers for one batch of entities (Python lists, converted per batch)."""

    osm_type: list[str] = field(default_factory=list)
    osm_id: list[int] = field(default_factory=list)
    tag_offsets: list[int] = field(default_factory=lambda: [0])
    keys: list[str] = field(default_factory=list)
    values: list[str] = field(default_factory=list)

    def add_tags(self, keys: list[str], values: list[str]) -> None:
        self.keys += keys
        self.values += values
        self.tag_offsets.append(len(self.keys))

    def __len__(self) -> int:
        return len(self.osm_id)


class _Batcher:
    """Accumulates points and ways, emitting Arrow batches of ``rows`` entities."""

    def __init__(self, rows: int, clip: tuple[float, float, float, float] | None, stats: Counter):
        self.rows, self.clip, self.stats = rows, clip, stats
        self._reset()

    def _reset(self) -> None:
        self.buf = _Buffer()
        self.geoms: list = []  # shapely geometries for points/relations, WKB (hex) for ways
        self.kinds: list[str] = []
        self.fix: list[str | None] = []
        self.members: list = []
        self.is_wkb: list[bool] = []
        self.want_area: list[bool] = []

    def add(self, osm_type: str, osm_id: int, keys, values, geometry, kind: str, fix=None, members=None,
            wkb=False, want_area=False) -> None:
        self.buf.osm_type.append(osm_type)
        self.buf.osm_id.append(osm_id)
        self.buf.add_tags(keys, values)
        self.geoms.append(geometry)
        self.kinds.append(kind)
        self.fix.append(fix)
        self.members.append(members)
        self.is_wkb.append(wkb)
        self.want_area.append(want_area)

    def full(self) -> bool:
        return len(self.buf) >= self.rows

    def flush(self) -> pa.RecordBatch | None:
        if not len(self.buf):
            return None
        geoms = np.empty(len(self.geoms), dtype=object)
        wkb = np.asarray(self.is_wkb)
        geoms[~wkb] = [g for g, w in zip(self.geoms, self.is_wkb, strict=True) if not w]
        if wkb.any():
            geoms[wkb] = shapely.from_wkb([g for g, w in zip(self.geoms, self.is_wkb, strict=True) if w])
        kinds = np.asarray(self.kinds, dtype=object)
        fix = np.asarray(self.fix, dtype=object)
        areas = np.flatnonzero(np.asarray(self.want_area))
        if len(areas):
            polys, area_fix = geom.rings_to_polygons(geoms[areas])
            geoms[areas] = polys
            kinds[areas] = np.where(area_fix == "collapsed_area_as_line", "line", "polygon")
            set_fix = area_fix != None  # noqa: E711 (elementwise)
            fix[areas[set_fix]] = area_fix[set_fix]
        self.stats.update(f"fixed_{f}" for f in fix if f is not None)
        keep = np.ones(len(geoms), dtype=bool)
        if self.clip is not None:
            geoms, keep = self._clip(geoms)
        batch = self._to_arrow(geoms, kinds, fix, keep)
        self._reset()
        return batch

    def _clip(self, geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        box = shapely.box(*self.clip)
        inside = shapely.intersects(geoms, box)
        clipped = geoms.copy()
        partial = inside & ~shapely.within(geoms, box)
        clipped[partial] = shapely.intersection(geoms[partial], box)
        keep = inside & ~shapely.is_empty(clipped)
        self.stats["outside_bbox"] += int((~keep).sum())
        return clipped, keep

    def _to_arrow(self, geoms, kinds, fix, keep) -> pa.RecordBatch:
        b = self.buf
        osm_type = pa.array(b.osm_type, pa.string())
        osm_id = pa.array(b.osm_id, pa.int64())
        tags = pa.MapArray.from_arrays(pa.array(b.tag_offsets, pa.int32()), pa.array(b.keys, pa.string()),
                                       pa.array(b.values, pa.string()))
        bounds = shapely.bounds(geoms)
        bbox = pa.StructArray.from_arrays([pa.array(bounds[:, i]) for i in range(4)], names=["xmin", "ymin", "xmax", "ymax"])
        key = geom.hilbert_key((bounds[:, 0] + bounds[:, 2]) / 2, (bounds[:, 1] + bounds[:, 3]) / 2)
        arrays = [
            pc.binary_join_element_wise(osm_type, pc.cast(osm_id, pa.string()), "/"),
            osm_type,
            osm_id,
            pa.array(kinds.tolist(), pa.string()),
            tags,
            pa.array(self.members, ENTITIES.schema.field("members").type),
            pa.array(shapely.to_wkb(geoms), pa.binary()),
            bbox,
            pa.array(fix.tolist(), pa.string()),
            pa.array(key, pa.int64()),
        ]
        batch = pa.RecordBatch.from_arrays(arrays, schema=BATCH_SCHEMA)
        return batch if keep.all() else batch.filter(pa.array(keep))


class _MemberWays:
    """Keeps the geometry of untagged ways that are relation members (C++ filter hands them over)."""

    def __init__(self, wanted: set[int], store: dict[int, object], stats: Counter):
        self.wanted, self.store, self.stats = wanted, store, stats
        self.factory = osmium.geom.WKBFactory()

    def way(self, w) -> None:
        if w.id in self.wanted:
            self.store[w.id] = _way_wkb(w, self.factory, self.stats)[0]


def _way_wkb(w, factory, stats: Counter) -> tuple[object | None, str | None]:
    """A way's linestring (hex WKB, or a shapely line when nodes were missing) and its fix."""
    try:
        return factory.create_linestring(w), None
    except (osmium.InvalidLocationError, RuntimeError):  # nodes outside the extract, or < 2 distinct points
        coords = [(n.lon, n.lat) for n in w.nodes if n.location.valid()]
    distinct = len(set(coords))
    if distinct >= 2:
        return shapely.LineString(coords), "missing_nodes" if len(coords) < len(w.nodes) else None
    stats["skipped_no_location" if len(coords) < len(w.nodes) else "skipped_degenerate"] += 1
    return None, None


def node_index_spec(pbf: Path, mode: str, disk_above_mb: float, tmp_dir: Path) -> str:
    """The osmium location-index spec: in memory for small files, on disk (sparse) for large ones."""
    on_disk = mode == "disk" or (mode == "auto" and pbf.stat().st_size > disk_above_mb * 1e6)
    if on_disk:
        return f"sparse_file_array,{tmp_dir / 'node_locations.idx'}"
    return "flex_mem"


def read_entities(pbf: Path, *, drop_prefixes: tuple[str, ...], node_index: str, batch_rows: int,
                  clip: tuple[float, float, float, float] | None = None, tag_filter: TagFilter | None = None,
                  stats: Counter, progress: Callable[[int], None] | None = None) -> Iterator[pa.RecordBatch]:
    """Stream the tagged entities of ``pbf`` as record batches of ``BATCH_SCHEMA``."""
    path = str(pbf)

    def clean(tag_list) -> tuple[list[str], list[str]]:
        keys, values = [], []
        for k, v in tag_list:
            if not k.startswith(drop_prefixes):
                keys.append(k)
                values.append(v)
        return keys, values

    # Pass 1: relations.
    relations: list[tuple[int, list[str], list[str], list[tuple[str, int, str]]]] = []
    member_nodes: set[int] = set()
    member_ways: set[int] = set()
    for r in osmium.FileProcessor(path, osmium.osm.RELATION).with_filter(osmium.filter.EmptyTagFilter()):
        keys, values = clean(r.tags)
        if not keys:
            stats["dropped_tags_all_cleaned"] += 1
            continue
        if tag_filter and not tag_filter(keys, values):
            stats["filtered_out"] += 1
            continue
        members = [(MEMBER_TYPE[m.type], m.ref, m.role) for m in r.members]
        for mtype, ref, _ in members:
            if mtype == "node":
                member_nodes.add(ref)
            elif mtype == "way":
                member_ways.add(ref)
        relations.append((r.id, keys, values, members))

    # Pass 2: nodes and ways.
    batcher = _Batcher(batch_rows, clip, stats)
    member_geoms: dict[int, object] = {}  # way id -> hex WKB or shapely line
    factory = osmium.geom.WKBFactory()
    fp = (osmium.FileProcessor(path, osmium.osm.NODE | osmium.osm.WAY).with_locations(node_index)
          .with_filter(osmium.filter.EmptyTagFilter()))
    if member_ways:
        fp.handler_for_filtered(_MemberWays(member_ways, member_geoms, stats))
    seen = 0
    for obj in fp:
        seen += 1
        if progress and seen % 20_000 == 0:
            progress(20_000)
        keys, values = clean(obj.tags)
        is_node = obj.is_node()
        if is_node:
            if not keys:
                stats["dropped_tags_all_cleaned"] += 1
                continue
            if tag_filter and not tag_filter(keys, values):
                stats["filtered_out"] += 1
                continue
            loc = obj.location
            if not loc.valid():
                stats["skipped_no_location"] += 1
                continue
            batcher.add("node", obj.id, keys, values, shapely.Point(loc.lon, loc.lat), "point")
        else:
            wanted = bool(keys) and not (tag_filter and not tag_filter(keys, values))
            if not wanted and obj.id not in member_ways:
                stats["dropped_tags_all_cleaned" if not keys else "filtered_out"] += 1
                continue
            line, fix = _way_wkb(obj, factory, stats)
            if line is None:
                continue
            if obj.id in member_ways:
                member_geoms[obj.id] = line
            if not wanted:
                continue
            # Closed by node ids; a ring cut by the extract border closes over its remaining nodes.
            closed = obj.is_closed() and len(obj.nodes) >= 4
            area = closed and is_area(dict(zip(keys, values, strict=True)))
            batcher.add("way", obj.id, keys, values, line, "line", fix=fix, wkb=isinstance(line, str), want_area=area)
        if batcher.full():
            yield from _nonempty(batcher.flush())
    if progress:
        progress(seen % 20_000)

    # Pass 3: relations from their members.
    locations = fp.node_location_storage
    node_geoms = {}
    for ref in member_nodes:
        try:
            loc = locations.get(ref)
            node_geoms[ref] = shapely.Point(loc.lon, loc.lat)
        except (KeyError, osmium.InvalidLocationError):
            pass
    hex_ids = [k for k, v in member_geoms.items() if isinstance(v, str)]
    way_geoms = dict(zip(hex_ids, shapely.from_wkb([member_geoms[k] for k in hex_ids]), strict=True))
    way_geoms.update((k, v) for k, v in member_geoms.items() if not isinstance(v, str))
    del member_geoms
    for rel_id, keys, values, members, geometry, kind, fix in _assemble_relations(relations, node_geoms, way_geoms, stats):
        batcher.add("relation", rel_id, keys, values, geometry, kind, fix=fix, members=members)
        if batcher.full():
            yield from _nonempty(batcher.flush())
    yield from _nonempty(batcher.flush())


def _nonempty(batch: pa.RecordBatch | None) -> Iterator[pa.RecordBatch]:
    if batch is not None and batch.num_rows:
        yield batch


def _assemble_relations(relations, node_geoms, way_geoms, stats: Counter):
    """Geometry per relation: (multi)polygons for multipolygon/boundary, else the members' union.

    Relations that are members of other relations are resolved first (cycles are cut).
    """
    by_id = {r[0]: r for r in relations}
    done: dict[int, tuple] = {}
    visiting: set[int] = set()

    def resolve(rel_id: int):
        if rel_id in done:
            return done[rel_id]
        _, keys, values, members = by_id[rel_id]
        visiting.add(rel_id)
        parts, outer, inner, missing = [], [], [], 0
        for mtype, ref, role in members:
            g = None
            if mtype == "node":
                g = node_geoms.get(ref)
            elif mtype == "way":
                g = way_geoms.get(ref)
            elif ref in by_id and ref not in visiting:
                g = resolve(ref)[0]
            if g is None:
                missing += 1
                continue
            parts.append(g)
            if mtype == "way":
                (inner if role == "inner" else outer).append(g)
        visiting.discard(rel_id)
        kind, fix, geometry = "relation", "missing_members" if missing else None, None
        tags = dict(zip(keys, values, strict=True))
        if tags.get("type") in AREA_RELATIONS:
            geometry = geom.assemble_multipolygon(outer, inner)
            if geometry is not None:
                kind = "polygon"
            else:
                fix = "unclosed_rings"
        if geometry is None and parts:
            geometry = geom.collect(parts)
        done[rel_id] = (geometry, kind, fix)
        return done[rel_id]

    for rel_id, keys, values, members in relations:
        geometry, kind, fix = resolve(rel_id)
        if geometry is None or geometry.is_empty:
            stats["skipped_relation_no_member_geometry"] += 1
            continue
        yield rel_id, keys, values, members, geometry, kind, fix
