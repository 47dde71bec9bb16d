"""Entities of one partition -> their pieces in each tile, in tile-normalised coordinates.

Vectorised throughout (shapely 2, numpy): entities are projected to UTM once,
simplified, paired with every tile their bbox overlaps, cut at tile borders
only where they cross one, normalised to [0, 1] over the tile (origin at the
tile's lower-left corner, y up), and given their minimum rotated bounding box
(smallest side at least ``min_side`` metres) as 8 numbers: the corners
(c - u - v, c + u - v, c + u + v, c - u + v), u along the longer side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import shapely

PRECLIP_COORDS = 256  # geometries with more vertices, or collections with more parts than
MANY_PARTS = 8  # this, are cut to each tile from less than the whole: see _sources


@dataclass
class Pieces:
    """One row per (tile, entity) piece."""

    entity: np.ndarray  # index into the partition's entities
    col: np.ndarray
    row: np.ndarray
    geometry: np.ndarray  # tile-normalised shapely geometries
    vertices: pa.ListArray  # float32 (x, y) pairs per piece, flattened
    position: np.ndarray  # (n, 8) float32


def project(geoms: np.ndarray, transformer) -> np.ndarray:
    """Vectorised reprojection of shapely geometries with a pyproj transformer (always_xy)."""
    return shapely.transform(geoms, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))


def pieces(geoms_utm: np.ndarray, size: float, col_range: tuple[int, int], row_range: tuple[int, int],
           simplify_m: float | None, min_side: float) -> Pieces:
    """Cut UTM geometries into tile pieces for the tiles with col in [c0, c1) and row in [r0, r1).

    Geometries are simplified once, before cutting, so the pieces of an entity tile it exactly
    (``simplify_m=None``: they already are). Polygons and collections of more than ``PRECLIP_COORDS``
    vertices are cut to each tile from less than the whole (``_sources``); the pieces are the same
    geometries, but their coordinates may differ in the last bits and their rings or parts may start
    elsewhere.
    """
    if simplify_m is not None:
        geoms_utm = shapely.simplify(geoms_utm, simplify_m, preserve_topology=True)
    b = shapely.bounds(geoms_utm)
    c_lo = np.floor(b[:, 0] / size).astype(np.int64)
    c_hi = np.floor(b[:, 2] / size).astype(np.int64)
    r_lo = np.floor(b[:, 1] / size).astype(np.int64)
    r_hi = np.floor(b[:, 3] / size).astype(np.int64)
    c_lo, c_hi = np.maximum(c_lo, col_range[0]), np.minimum(c_hi, col_range[1] - 1)
    r_lo, r_hi = np.maximum(r_lo, row_range[0]), np.minimum(r_hi, row_range[1] - 1)
    nc, nr = np.maximum(c_hi - c_lo + 1, 0), np.maximum(r_hi - r_lo + 1, 0)
    count = nc * nr
    # Explode (entity, tile) pairs over each bbox's tile range.
    entity = np.repeat(np.arange(len(geoms_utm)), count)
    k = np.arange(len(entity)) - np.repeat(np.cumsum(count) - count, count)
    col = c_lo[entity] + k % np.repeat(np.maximum(nc, 1), count)
    row = r_lo[entity] + k // np.repeat(np.maximum(nc, 1), count)
    x0, y0 = col * size, row * size
    inside = (b[entity, 0] >= x0) & (b[entity, 2] <= x0 + size) & (b[entity, 1] >= y0) & (b[entity, 3] <= y0 + size)
    geom = geoms_utm[entity].copy()
    dims = shapely.get_dimensions(geom)
    # Lines are cut with GEOS's fast rectangle clipping; polygons (and collections) with a robust
    # intersection, keeping the entity's own dimension (a cut polygon may also touch the border with a line).
    lines = np.flatnonzero(~inside & (dims == 1) & (shapely.get_type_id(geom) != 7))
    if len(lines):  # GEOS's clip_by_rect; shapely's wrapper takes one rectangle, its ufunc one per geometry
        geom[lines] = shapely.lib.clip_by_rect(geom[lines], x0[lines].astype(float), y0[lines].astype(float),
                                               (x0[lines] + size).astype(float), (y0[lines] + size).astype(float))
    cross = np.flatnonzero(~inside & ((dims != 1) | (shapely.get_type_id(geom) == 7)))
    if len(cross):
        src = _sources(geoms_utm, entity[cross], col[cross], row[cross], size, col_range, row_range)
        boxes = shapely.box(x0[cross], y0[cross], x0[cross] + size, y0[cross] + size)
        # Only where the geometry meets the tile (a bbox overlap is not enough): an overlay costs more
        # than the predicate, and the others cut to nothing.
        meet = shapely.intersects(src, boxes)
        geom[cross] = shapely.GeometryCollection()
        at = cross[meet]
        geom[at] = _drop_lower_dimensions(shapely.intersection(src[meet], boxes[meet]), dims[at])
    keep = ~shapely.is_empty(geom)
    entity, col, row, geom, x0, y0 = entity[keep], col[keep], row[keep], geom[keep], x0[keep], y0[keep]
    position = rotated_bbox(geom, min_side)
    position[:, 0::2] = (position[:, 0::2] - x0[:, None]) / size
    position[:, 1::2] = (position[:, 1::2] - y0[:, None]) / size
    coords, idx = shapely.get_coordinates(geom, return_index=True)
    coords = np.clip((coords - np.column_stack([x0, y0])[idx]) / size, 0.0, 1.0)
    geom = shapely.set_coordinates(geom.copy(), coords)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(idx, minlength=len(geom)) * 2)]).astype(np.int32)
    vertices = pa.ListArray.from_arrays(pa.array(offsets), pa.array(coords.astype(np.float32).ravel()))
    return Pieces(entity, col, row, geom, vertices, position.astype(np.float32))


MULTI = {4: shapely.multipoints, 5: shapely.multilinestrings, 6: shapely.multipolygons,
         7: shapely.geometrycollections}


def _sources(geoms: np.ndarray, entity: np.ndarray, col: np.ndarray, row: np.ndarray, size: float,
             col_range: tuple[int, int], row_range: tuple[int, int]) -> np.ndarray:
    """The geometry to cut to each (entity, tile) pair's tile: ``geoms[entity]``, or for a heavy entity
    (more than ``PRECLIP_COORDS`` vertices or ``MANY_PARTS`` parts) the same set within the tile from
    less: narrowed to the block,
    then to the tile's column of it (once per column), then to the tile. Each narrowing keeps the parts
    of a collection (a relation's members) or multi-geometry whose bounds meet the box (an overlay of a
    collection unions all its parts first), and cuts what is left to the box if it is still large and
    reaches beyond it."""
    heavy = np.flatnonzero(_heavy(geoms)[entity])
    out = geoms[entity]
    if not len(heavy):
        return out
    e, c, r = entity[heavy], col[heavy], row[heavy]
    (c0, c1), (r0, r1) = col_range, row_range
    ents, of_ent = np.unique(e, return_inverse=True)
    block = _narrow(geoms[ents], np.tile([[c0 * size, r0 * size, c1 * size, r1 * size]], (len(ents), 1)))
    strips, of_strip = np.unique(of_ent * (c1 - c0) + (c - c0), return_inverse=True)
    s_col = c0 + strips % (c1 - c0)
    strip = _narrow(block[strips // (c1 - c0)],
                    np.column_stack([s_col * size, np.full(len(strips), r0 * size), (s_col + 1) * size,
                                     np.full(len(strips), r1 * size)]))
    tiles = np.column_stack([c * size, r * size, (c + 1) * size, (r + 1) * size])
    out[heavy] = _narrow(strip[of_strip], tiles, collections_only=True)
    return out


def _heavy(geoms: np.ndarray) -> np.ndarray:
    return (shapely.get_num_coordinates(geoms) > PRECLIP_COORDS) | (
        (shapely.get_num_geometries(geoms) > MANY_PARTS) & np.isin(shapely.get_type_id(geoms), list(MULTI)))


def _narrow(geoms: np.ndarray, boxes: np.ndarray, collections_only: bool = False) -> np.ndarray:
    """Each geometry as the same set within its box (x0, y0, x1, y1): its parts that meet the box; then,
    if still heavy and reaching beyond the box, cut to it (a collection part by part: an overlay of a
    whole collection unions its parts, the cost this avoids; other geometries only unless
    ``collections_only``, for the tile itself, which ``pieces`` cuts them to)."""
    out = _parts_meeting(geoms, boxes)
    b = shapely.bounds(out)
    big = _heavy(out) & (
        (b[:, 0] < boxes[:, 0]) | (b[:, 1] < boxes[:, 1]) | (b[:, 2] > boxes[:, 2]) | (b[:, 3] > boxes[:, 3]))
    collection = big & (shapely.get_type_id(out) == 7)
    cut = np.flatnonzero(big & ~collection & (not collections_only))
    out[cut] = shapely.intersection(out[cut], shapely.box(*boxes[cut].T))
    collection = np.flatnonzero(collection)
    if len(collection):
        parts, owner = shapely.get_parts(out[collection], return_index=True)
        parts = shapely.intersection(parts, shapely.box(*boxes[collection][owner].T))
        keep = ~shapely.is_empty(parts)
        made = np.full(len(collection), None, dtype=object)
        if keep.any():
            made = shapely.geometrycollections(parts[keep], indices=owner[keep], out=made)
        made[np.equal(made, None)] = shapely.GeometryCollection()
        out[collection] = made
    return out


def _parts_meeting(geoms: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """A heavy multi-geometry or collection (``_heavy``) as one of the same type holding its parts whose
    bounds meet the box (in their order; empty if none); other geometries as they are. One geometry
    may come with many boxes (the same object in several items)."""
    out = geoms.copy()
    kind = shapely.get_type_id(geoms)
    sel = np.flatnonzero(np.isin(kind, list(MULTI)) & (shapely.get_num_geometries(geoms) > 1) & _heavy(geoms))
    if not len(sel):
        return out
    same = np.array([id(g) for g in geoms[sel]])
    sel = sel[np.argsort(same, kind="stable")]
    firsts = np.flatnonzero(np.diff(np.sort(same), prepend=-1)).tolist()
    for a, b in zip(firsts, [*firsts[1:], len(sel)], strict=True):
        items = sel[a:b]
        parts = shapely.get_parts(geoms[items[0]])
        item, part = shapely.STRtree(parts).query(shapely.box(*boxes[items].T))  # bounds meet
        order = np.lexsort((part, item))  # each item's parts in their order
        made = np.full(len(items), None, dtype=object)
        if len(order):
            made = MULTI[int(kind[items[0]])](parts[part[order]], indices=item[order], out=made)
        made[np.equal(made, None)] = shapely.GeometryCollection()
        out[items] = made
    return out


def _drop_lower_dimensions(geom: np.ndarray, dim: np.ndarray) -> np.ndarray:
    out = geom.copy()
    # GeometryCollections from the intersection (rare: a polygon that also touches the border)
    mixed = np.flatnonzero((shapely.get_type_id(geom) == 7) & ~shapely.is_empty(geom))
    for i in mixed.tolist():
        parts = [p for p in shapely.get_parts(geom[i]) if shapely.get_dimensions(p) >= dim[i]]
        out[i] = shapely.union_all(parts) if parts else shapely.GeometryCollection()
    return out


def rotated_bbox(geoms: np.ndarray, min_side: float) -> np.ndarray:
    """(n, 8) corners of each geometry's minimum rotated rectangle, both sides at least ``min_side``."""
    env = geoms.copy()
    shaped = shapely.get_type_id(geoms) != 0  # a point is its own envelope
    env[shaped] = shapely.oriented_envelope(geoms[shaped])
    coords, idx = shapely.get_coordinates(env, return_index=True)
    first = np.searchsorted(idx, np.arange(len(geoms)))
    n = np.bincount(idx, minlength=len(geoms))
    p0 = coords[first]
    p1 = np.where((n >= 2)[:, None], coords[np.minimum(first + 1, len(coords) - 1)], p0)
    p2 = np.where((n >= 4)[:, None], coords[np.minimum(first + 2, len(coords) - 1)], p1)
    e1, e2 = p1 - p0, p2 - p1
    centre = np.where((n >= 4)[:, None], (p0 + p2) / 2, (p0 + p1) / 2)
    l1, l2 = np.hypot(*e1.T), np.hypot(*e2.T)
    swap = l2 > l1
    u_vec = np.where(swap[:, None], e2, e1)
    u_len = np.maximum(l1, l2)
    v_len = np.minimum(l1, l2)
    u_dir = np.where((u_len > 0)[:, None], u_vec / np.maximum(u_len, 1e-12)[:, None], [1.0, 0.0])
    u_dir = np.where((u_dir[:, 1] < 0) | ((u_dir[:, 1] == 0) & (u_dir[:, 0] < 0)), -1, 1)[:, None] * u_dir
    v_dir = np.column_stack([-u_dir[:, 1], u_dir[:, 0]])
    u = u_dir * (np.maximum(u_len, min_side) / 2)[:, None]
    v = v_dir * (np.maximum(v_len, min_side) / 2)[:, None]
    corners = [centre - u - v, centre + u - v, centre + u + v, centre - u + v]
    return np.column_stack([c for corner in corners for c in corner.T])
