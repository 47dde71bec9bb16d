"""Vectorised geometry work for extraction: areas from rings, repairs, relations, sort keys."""

from __future__ import annotations

import numpy as np
import shapely

MULTI = {"Point": shapely.MultiPoint, "LineString": shapely.MultiLineString, "Polygon": shapely.MultiPolygon}


def polygons_from_rings(coords: np.ndarray, owner: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Polygons from one ring per object (``coords`` rows grouped by ``owner`` in 0..n-1), repaired.

    Returns (geometries, fix) where fix is None, "make_valid", or
    "collapsed_area_as_line" (a ring too short or thin to enclose anything,
    kept as its line).
    """
    counts = np.bincount(owner, minlength=n)
    out = np.empty(n, dtype=object)
    fix = np.full(n, None, dtype=object)
    ring = counts >= 3  # closed by linearrings when the last point differs from the first
    keep = ring[owner]
    compact = np.cumsum(ring) - 1
    if ring.any():
        out[ring] = shapely.polygons(shapely.linearrings(coords[keep], indices=compact[owner[keep]]))
    bad = np.flatnonzero(ring)[~shapely.is_valid(out[ring])] if ring.any() else np.array([], int)
    if len(bad):
        repaired = shapely.make_valid(out[bad], method="structure", keep_collapsed=False)
        empty = shapely.is_empty(repaired)
        out[bad[~empty]] = repaired[~empty]
        fix[bad[~empty]] = "make_valid"
        ring[bad[empty]] = False
    lines = ~ring & (counts >= 2)
    if lines.any():
        keep = lines[owner]
        out[lines] = shapely.linestrings(coords[keep], indices=(np.cumsum(lines) - 1)[owner[keep]])
        fix[lines] = "collapsed_area_as_line"
    return out, fix


def assemble_multipolygon(outer: list, inner: list) -> shapely.Geometry | None:
    """(Multi)polygon from member ways: rings may be split over several ways; inners are holes.

    Returns None when the outer ways close no ring (members missing from the extract).
    The result may be invalid; callers repair in bulk.
    """
    if not outer:
        return None
    if len(outer) == 1 and outer[0].is_closed and all(g.is_closed for g in inner):
        # The common case: one closed outer way, closed inner ways.
        if len(outer[0].coords) < 4:
            return None
        return shapely.Polygon(outer[0].coords, [g.coords for g in inner if len(g.coords) >= 4])
    outer_faces = shapely.get_parts(shapely.polygonize(outer))
    if len(outer_faces) == 0:
        return None
    # Nested outers (an island inside a lake's hole) are handled by symmetric difference.
    shell = outer_faces[0]
    for face in outer_faces[1:]:
        shell = shapely.symmetric_difference(shell, face)
    if inner:
        holes = shapely.get_parts(shapely.polygonize(inner))
        if len(holes):
            shell = shapely.difference(shell, shapely.union_all(holes))
    return None if shell.is_empty else shell


def collect(parts: list) -> shapely.Geometry:
    """The union of member geometries as one collection (Multi* when all parts share a type)."""
    flat = shapely.get_parts(np.asarray(parts, dtype=object))
    types = set(shapely.get_type_id(flat).tolist())
    if len(types) == 1:
        name = flat[0].geom_type
        if name in MULTI:
            return MULTI[name](list(flat))
    return shapely.GeometryCollection(list(flat))


def hilbert_key(x: np.ndarray, y: np.ndarray, bits: int = 20) -> np.ndarray:
    """Hilbert-curve index of lon/lat points on a 2^bits grid over the globe (vectorised)."""
    n = 1 << bits
    xi = np.clip(((x + 180.0) / 360.0 * n).astype(np.int64), 0, n - 1)
    yi = np.clip(((y + 90.0) / 180.0 * n).astype(np.int64), 0, n - 1)
    d = np.zeros(len(xi), dtype=np.int64)
    s = n >> 1
    while s > 0:
        rx = (xi & s) > 0
        ry = (yi & s) > 0
        d += s * s * ((3 * rx) ^ ry)
        # rotate the quadrant
        flip = ~ry
        swap_x = np.where(flip & rx, n - 1 - xi, xi)
        swap_y = np.where(flip & rx, n - 1 - yi, yi)
        xi = np.where(flip, swap_y, swap_x)
        yi = np.where(flip, swap_x, swap_y)
        s >>= 1
    return d
