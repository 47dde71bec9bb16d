"""Streaming PBF reading: tagged objects out as Arrow batches of entities.

1. Relations: libosmium (in a child process) writes the tagged relations as
   OPL text (relation blocks only), parsed with Arrow: their tags, members,
   and the ids of the nodes and ways whose geometry they need. A file without
   relations gives none.
2. Nodes and ways: a child process decodes the PBF in C++ and streams OPL
   lines with coordinates inline (``geojepa.extract.opl``); this process parses
   them in bulk with Arrow and builds geometries with shapely 2, a block of
   lines at a time. Tagged nodes become points, tagged ways lines or polygons;
   the geometries of relation members (tagged or not) are kept for step 3.
3. Relations are assembled from their members' geometries.

No Python code runs per node or way; relations are assembled one by one,
except the common multipolygons (one closed outer way), built in bulk.

Objects whose tags or roles are not valid UTF-8 make libosmium's OPL writer
fail ("invalid Unicode codepoint"); the child's message is reported, the
objects are found (one Python pass over the tagged objects, only then) and
``InvalidText`` names them, so the caller can re-read with them skipped.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
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
from geojepa.extract import opl
from geojepa.extract.sort import KEY
from geojepa.extract.tags import TagFilter, area_mask
from geojepa.parallel import bounded_map

log = logging.getLogger(__name__)

MEMBER_TYPE = {"n": "node", "w": "way", "r": "relation"}
AREA_RELATIONS = frozenset({"multipolygon", "boundary"})
# Batches carry the contract's columns plus the spatial sort key.
BATCH_SCHEMA = ENTITIES.schema.append(pa.field(KEY, pa.int64(), nullable=False))
Clip = tuple[float, float, float, float] | None


class InvalidText(GeoJepaError):
    """Objects of the PBF whose tags or member roles are not valid UTF-8 (``objects``: ``Skip``)."""

    def __init__(self, pbf: Path, objects: opl.Skip, details: list[str]):
        self.objects = objects
        self.count = sum(len(v) for v in objects.values())
        shown = ", ".join(details[:5]) + (f" and {self.count - 5} more" if self.count > 5 else "")
        super().__init__(f"{pbf}: {self.count} object(s) with text that is not valid UTF-8 "
                         f"(osmium: {opl.INVALID_TEXT}): {shown}")


def find_invalid_text(pbf: Path) -> tuple[opl.Skip, list[str]]:
    """The tagged objects whose tags (or, for relations, member roles) are not valid UTF-8, and a line
    naming each (``way/10: tag value ...``). Python per tagged object: only run after a failure."""
    bad: opl.Skip = {}
    details: list[str] = []
    for o in osmium.FileProcessor(str(pbf)).with_filter(osmium.filter.EmptyTagFilter()):
        try:
            for _ in o.tags:
                pass
            if o.is_relation():
                for _ in o.members:
                    pass
        except UnicodeDecodeError as e:
            letter = o.type_str()
            bad.setdefault(letter, []).append(o.id)
            details.append(f"{MEMBER_TYPE[letter]}/{o.id} ({e.reason} at byte {e.start} of "
                           f"{e.object[max(0, e.start - 12):e.end + 12]!r})")
    return bad, details


def _child_failed(pbf: Path, message: str, skip: opl.Skip | None) -> GeoJepaError:
    """The error for a failed child: ``InvalidText`` naming the objects libosmium could not write as
    text, else a corrupt or truncated PBF with the child's last message."""
    if opl.INVALID_TEXT in message and not skip:
        objects, details = find_invalid_text(pbf)
        if objects:
            return InvalidText(pbf, objects, details)
    return GeoJepaError(f"{pbf}: corrupt or truncated PBF: {message}")


def _last_line(text: str, code: int) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {code}"


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


def node_index_spec(pbf: Path, mode: str, disk_above_mb: float, tmp_dir: Path) -> str:
    """The osmium location-index spec: in memory for small files, on disk (sparse) for large ones."""
    on_disk = mode == "disk" or (mode == "auto" and pbf.stat().st_size > disk_above_mb * 1e6)
    if on_disk:
        return f"sparse_file_array,{tmp_dir / 'node_locations.idx'}"
    return "flex_mem"


def entity_batch(osm_type: str, ids: np.ndarray, tags: pa.MapArray, geoms: np.ndarray, kinds: np.ndarray,
                 fix: np.ndarray, clip: Clip, stats: Counter, members: list | None = None) -> pa.RecordBatch:
    """One Arrow batch of entities (contract columns plus the Hilbert sort key), clipped to ``clip``."""
    stats.update(f"fixed_{f}" for f in fix.tolist() if f is not None)
    keep = np.ones(len(ids), dtype=bool)
    if clip is not None and len(ids):
        box = shapely.box(*clip)
        inside = shapely.intersects(geoms, box)
        partial = inside & ~shapely.within(geoms, box)
        geoms = geoms.copy()
        geoms[partial] = shapely.intersection(geoms[partial], box)
        keep = inside & ~shapely.is_empty(geoms)
        stats["outside_bbox"] += int((~keep).sum())
    bounds = shapely.bounds(geoms)
    id_arr = pa.array(ids, pa.int64())
    type_arr = pa.array([osm_type] * len(ids), pa.string())
    arrays = [
        pc.binary_join_element_wise(type_arr, pc.cast(id_arr, pa.string()), "/"),
        type_arr,
        id_arr,
        pa.array(kinds.tolist(), pa.string()),
        tags,
        pa.array(members if members is not None else [None] * len(ids), ENTITIES.schema.field("members").type),
        pa.array(shapely.to_wkb(geoms), pa.binary()),
        pa.StructArray.from_arrays([pa.array(bounds[:, i]) for i in range(4)], names=["xmin", "ymin", "xmax", "ymax"]),
        pa.array(fix.tolist(), pa.string()),
        pa.array(geom.hilbert_key((bounds[:, 0] + bounds[:, 2]) / 2, (bounds[:, 1] + bounds[:, 3]) / 2), pa.int64()),
    ]
    batch = pa.RecordBatch.from_arrays(arrays, schema=BATCH_SCHEMA)
    return batch if keep.all() else batch.filter(pa.array(keep))


@dataclass
class _Parsed:
    """What one block of OPL lines gave: entity batches, counts, relation members' geometries."""

    batches: list[pa.RecordBatch] = field(default_factory=list)
    stats: Counter = field(default_factory=Counter)
    node_geoms: dict[int, shapely.Point] = field(default_factory=dict)
    way_geoms: dict[int, shapely.LineString] = field(default_factory=dict)


class _BlockParser:
    """Parses blocks of OPL lines into entity batches; no shared state, so blocks parse in parallel threads
    (Arrow, shapely and numpy release the GIL in their kernels)."""

    def __init__(self, drop_prefixes, tag_filter: TagFilter | None, clip: Clip, member_nodes: set[int],
                 member_ways: set[int]):
        self.drop_prefixes, self.tag_filter, self.clip = drop_prefixes, tag_filter, clip
        self.member_nodes = np.fromiter(member_nodes, np.int64, len(member_nodes))
        self.member_ways = np.fromiter(member_ways, np.int64, len(member_ways))

    def parse(self, lines: pa.Array) -> _Parsed:
        out = _Parsed()
        parts = pc.split_pattern(lines, " ")
        head = pc.list_element(parts, 0)
        ids = pc.cast(pc.utf8_slice_codeunits(head, 1, 64), pa.int64()).to_numpy()
        is_node = pc.starts_with(head, "n").to_numpy(zero_copy_only=False)
        tag_field = pc.list_element(parts, 1)
        tags = opl.parse_tags(tag_field, self.drop_prefixes)
        tagged = tags.count() > 0
        raw_tagged = pc.not_equal(tag_field, "T").to_numpy(zero_copy_only=False)
        out.stats["dropped_tags_all_cleaned"] += int((raw_tagged & ~tagged).sum())
        wanted = tagged
        if self.tag_filter is not None:
            wanted = tagged & self.tag_filter.mask(tags)
            out.stats["filtered_out"] += int((tagged & ~wanted).sum())
        nodes, ways = np.flatnonzero(is_node), np.flatnonzero(~is_node)
        if len(nodes):
            self._nodes(out, nodes, ids, parts, tags, wanted)
        if len(ways):
            self._ways(out, ways, ids, parts, tags, wanted)
        return out

    def _nodes(self, out: _Parsed, rows, ids, parts, tags, wanted) -> None:
        rows_arr = pa.array(rows)
        x = pc.utf8_slice_codeunits(pc.list_element(pc.take(parts, rows_arr), 2), 1, 64)
        y = pc.utf8_slice_codeunits(pc.list_element(pc.take(parts, rows_arr), 3), 1, 64)
        located = pc.and_(pc.not_equal(x, ""), pc.not_equal(y, "")).to_numpy(zero_copy_only=False)
        out.stats["skipped_no_location"] += int((~located & wanted[rows]).sum())
        rows, x, y = rows[located], pc.filter(x, located), pc.filter(y, located)
        points = shapely.points(pc.cast(x, pa.float64()).to_numpy(), pc.cast(y, pa.float64()).to_numpy())
        members = np.isin(ids[rows], self.member_nodes)
        out.node_geoms.update(zip(ids[rows][members].tolist(), points[members], strict=True))
        keep = wanted[rows]
        if keep.any():
            rows, points = rows[keep], points[keep]
            n = len(rows)
            out.batches.append(entity_batch("node", ids[rows], tags.take(rows), points, np.full(n, "point", object),
                                            np.full(n, None, object), self.clip, out.stats))

    def _ways(self, out: _Parsed, rows, ids, parts, tags, wanted) -> None:
        members = np.isin(ids[rows], self.member_ways)
        needed = wanted[rows] | members
        rows, members = rows[needed], members[needed]
        if not len(rows):
            return
        ways = opl.parse_way_nodes(ids[rows], pc.list_element(pc.take(parts, pa.array(rows)), 2))
        n_coords = np.bincount(ways.coord_owner, minlength=len(rows))
        ok = n_coords >= 2
        bad = ~ok & wanted[rows]
        out.stats["skipped_no_location"] += int((bad & (ways.missing > 0)).sum())
        out.stats["skipped_degenerate"] += int((bad & (ways.missing == 0)).sum())
        keep = ok & wanted[rows]
        area = keep & ways.closed & area_mask(tags)[rows]
        geoms = np.full(len(rows), None, dtype=object)
        fix = np.where(ways.missing > 0, "missing_nodes", None).astype(object)
        kinds = np.full(len(rows), "line", dtype=object)
        # Lines for non-area ways and for relation members; polygons straight from the rings.
        line = ok & (members | (keep & ~area))
        sel = line[ways.coord_owner]
        geoms[line] = shapely.linestrings(ways.coords[sel], indices=(np.cumsum(line) - 1)[ways.coord_owner[sel]])
        out.way_geoms.update(zip(ids[rows][members & ok].tolist(), geoms[members & ok], strict=True))
        if area.any():
            sel = area[ways.coord_owner]
            polys, area_fix = geom.polygons_from_rings(ways.coords[sel], (np.cumsum(area) - 1)[ways.coord_owner[sel]],
                                                       int(area.sum()))
            geoms[area] = polys
            kinds[area] = np.where(area_fix == "collapsed_area_as_line", "line", "polygon")
            idx = np.flatnonzero(area)
            changed = area_fix != None  # noqa: E711 (elementwise)
            fix[idx[changed]] = area_fix[changed]
        if keep.any():
            out.batches.append(entity_batch("way", ids[rows[keep]], tags.take(rows[keep]), geoms[keep],
                                            kinds[keep], fix[keep], self.clip, out.stats))


def _read_relations(pbf: Path, tmp_dir: Path, drop_prefixes: tuple[str, ...], tag_filter: TagFilter | None,
                    stats: Counter, skip_file: Path | None = None, skip: opl.Skip | None = None):
    """Tagged relations (after cleaning and filtering) and the ids of their node and way members."""
    path = tmp_dir / "relations.opl"
    # A child process: a libosmium failure can abort the process it runs in.
    done = subprocess.run([sys.executable, "-m", "geojepa.extract.opl", "relations", str(pbf), str(path),
                           *([str(skip_file)] if skip_file else [])], stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise _child_failed(pbf, _last_line(done.stderr, done.returncode), skip)
    relations: list[tuple[int, list[str], list[str], list[tuple[str, int, str]]]] = []
    with open(path, "rb") as stream:
        for lines in opl.read_lines(stream):
            parts = pc.split_pattern(lines, " ")
            ids = pc.cast(pc.utf8_slice_codeunits(pc.list_element(parts, 0), 1, 64), pa.int64()).to_numpy()
            tags = opl.parse_tags(pc.list_element(parts, 1), drop_prefixes)
            tagged = tags.count() > 0
            stats["dropped_tags_all_cleaned"] += int((~tagged).sum())
            wanted = tagged
            if tag_filter is not None:
                wanted = tagged & tag_filter.mask(tags)
                stats["filtered_out"] += int((tagged & ~wanted).sum())
            mtype, mref, mrole, mowner = opl.parse_members(pc.list_element(parts, 2))
            t_off = np.concatenate([[0], np.cumsum(tags.count())])
            m_off = np.concatenate([[0], np.cumsum(np.bincount(mowner, minlength=len(ids)))])
            keys, values = tags.keys.to_pylist(), tags.values.to_pylist()
            members = list(zip((MEMBER_TYPE[t] for t in mtype.to_pylist()), mref.tolist(), mrole.to_pylist(),
                               strict=True))
            for i in np.flatnonzero(wanted).tolist():
                relations.append((int(ids[i]), keys[t_off[i]:t_off[i + 1]], values[t_off[i]:t_off[i + 1]],
                                  members[m_off[i]:m_off[i + 1]]))
    path.unlink()
    member_nodes = {ref for r in relations for t, ref, _ in r[3] if t == "node"}
    member_ways = {ref for r in relations for t, ref, _ in r[3] if t == "way"}
    return relations, member_nodes, member_ways


def read_entities(pbf: Path, *, drop_prefixes: tuple[str, ...], node_index: str, tmp_dir: Path,
                  block_mb: int = 4, threads: int = 2, clip: Clip = None, tag_filter: TagFilter | None = None,
                  stats: Counter, progress: Callable[[int], None] | None = None,
                  skip: opl.Skip | None = None) -> Iterator[pa.RecordBatch]:
    """Stream the tagged entities of ``pbf`` as record batches of ``BATCH_SCHEMA``, leaving out the
    objects in ``skip``. Raises ``InvalidText`` (before any batch when the bad text is in a relation)
    when objects' text is not valid UTF-8: re-read with ``skip=error.objects``."""
    skip_file = None
    if skip:
        skip_file = tmp_dir / "skip.json"
        skip_file.write_text(json.dumps(skip))
    relations, member_nodes, member_ways = _read_relations(pbf, tmp_dir, drop_prefixes, tag_filter, stats,
                                                           skip_file, skip)
    members_file = tmp_dir / "member_nodes.npy"
    np.save(members_file, np.fromiter(member_nodes, np.int64, len(member_nodes)))
    parser = _BlockParser(drop_prefixes, tag_filter, clip, member_nodes, member_ways)
    node_geoms: dict[int, shapely.Point] = {}
    way_geoms: dict[int, shapely.LineString] = {}

    read_fd, write_fd = os.pipe()
    errors = tmp_dir / "producer.err"
    with open(errors, "wb") as err:
        child = subprocess.Popen([sys.executable, "-m", "geojepa.extract.opl", "nodes-ways", str(pbf), str(write_fd),
                                  node_index, str(members_file), *([str(skip_file)] if skip_file else [])],
                                 pass_fds=(write_fd,), stderr=err)
    os.close(write_fd)
    ok = False
    try:
        with os.fdopen(read_fd, "rb") as stream:
            for parsed in bounded_map(parser.parse, opl.read_lines(stream, block_size=block_mb << 20), threads):
                stats.update(parsed.stats)
                node_geoms.update(parsed.node_geoms)
                way_geoms.update(parsed.way_geoms)
                yield from parsed.batches
                pa.default_memory_pool().release_unused()
                if progress:
                    progress(sum(b.num_rows for b in parsed.batches))
        ok = True
    except Exception:
        # Output cut short by a failing child is not the parser's fault: report the child's reason.
        try:
            code = child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = 0
        if code != 0:
            raise _child_failed(pbf, _last_line(errors.read_text(errors="replace"), code), skip) from None
        raise
    finally:
        if not ok and child.poll() is None:
            child.kill()
        code = child.wait()
    if code != 0:
        raise _child_failed(pbf, _last_line(errors.read_text(errors="replace"), code), skip)

    rows = list(_assemble_relations(relations, node_geoms, way_geoms, stats))
    # Repair invalid relation geometries in bulk (assembled polygons, collections holding them).
    shapes = np.array([r[4] for r in rows], dtype=object)
    for i in np.flatnonzero(~shapely.is_valid(shapes)).tolist() if len(rows) else []:
        rel_id, keys, values, members, g, kind, _ = rows[i]
        if kind == "polygon":
            fixed = shapely.make_valid(g, method="structure", keep_collapsed=False)
            if fixed.is_empty:  # nothing enclosed: keep its rings as lines
                rows[i] = (rel_id, keys, values, members, shapely.boundary(g), "relation", "collapsed_area_as_line")
                continue
        else:
            fixed = shapely.make_valid(g)
        rows[i] = (rel_id, keys, values, members, fixed, kind, "make_valid")
    for start in range(0, len(rows), 50_000):
        chunk = rows[start : start + 50_000]
        ids, keys, values, members, geoms, kinds, fix = (list(col) for col in zip(*chunk, strict=True))
        tags = pa.array([list(zip(k, v, strict=True)) for k, v in zip(keys, values, strict=True)],
                        ENTITIES.schema.field("tags").type)
        yield entity_batch("relation", np.array(ids, np.int64), tags, np.array(geoms, dtype=object),
                           np.array(kinds, dtype=object), np.array(fix, dtype=object), clip, stats, members=members)
def _assemble_relations(relations, node_geoms, way_geoms, stats: Counter):
    """Geometry per relation: (multi)polygons for multipolygon/boundary, else the members' union.

    Relations that are members of other relations are resolved first (cycles are cut).
    """
    by_id = {r[0]: r for r in relations}
    done: dict[int, tuple] = {rel_id: (g, "polygon", None) for rel_id, g in _simple_multipolygons(relations, way_geoms)}
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


def _simple_multipolygons(relations, way_geoms) -> Iterator[tuple[int, shapely.Polygon]]:
    """Polygons of the common multipolygons, built in bulk: all members are present closed ways, one outer."""
    rel_ids, rings, owner = [], [], []
    for rel_id, keys, values, members in relations:
        if "type" not in keys or values[keys.index("type")] not in AREA_RELATIONS:
            continue
        found = [(way_geoms.get(ref), role) for t, ref, role in members if t == "way"]
        outer = [g for g, role in found if role != "inner"]
        if len(found) != len(members) or len(outer) != 1 or any(g is None for g, _ in found):
            continue
        rel_ids.append(rel_id)
        rings += outer + [g for g, role in found if role == "inner"]  # the shell first
        owner += [len(rel_ids) - 1] * len(found)
    if not rel_ids:
        return
    rings_arr, owner_arr = np.array(rings, dtype=object), np.array(owner)
    good = np.ones(len(rel_ids), dtype=bool)
    good[owner_arr[~(shapely.is_closed(rings_arr) & (shapely.get_num_coordinates(rings_arr) >= 4))]] = False
    sel = good[owner_arr]
    coords, ring_idx = shapely.get_coordinates(rings_arr[sel], return_index=True)
    polygons = shapely.polygons(shapely.linearrings(coords, indices=ring_idx),
                                indices=(np.cumsum(good) - 1)[owner_arr[sel]])
    yield from zip(np.array(rel_ids)[good].tolist(), polygons, strict=True)
