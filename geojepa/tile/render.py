"""A pseudo-aerial image drawn from a tile's own OSM layers (SYNTHETIC imagery).

For the offline demo and tests, which have no aerial imagery: land cover and
water as fills, roads by class at their real width, buildings as roofs with
edges, over a textured ground. Tiles rendered here carry the source
``render (synthetic)`` in ``tile_images.parquet``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import shapely
from PIL import Image, ImageDraw

SOURCE = "render (synthetic)"
GROUND = (196, 188, 170)
FILLS = [  # (tag key, values or None for any, colour); first match wins, drawn in this order
    ("natural", {"water"}, (70, 110, 160)),
    ("waterway", None, (70, 110, 160)),
    ("landuse", {"forest"}, (52, 92, 48)),
    ("natural", {"wood", "scrub"}, (60, 100, 52)),
    ("leisure", {"park", "garden", "pitch"}, (92, 140, 72)),
    ("landuse", {"grass", "meadow", "recreation_ground", "cemetery"}, (110, 150, 80)),
    ("landuse", None, (176, 170, 150)),
    ("amenity", {"parking"}, (150, 150, 150)),
]
ROAD_WIDTH_M = {"motorway": 18, "trunk": 16, "primary": 13, "secondary": 11, "tertiary": 9, "residential": 7,
                "unclassified": 6, "service": 4, "living_street": 5, "pedestrian": 4, "footway": 2, "cycleway": 2,
                "path": 1.5, "steps": 2}
ROAD = (88, 88, 90)
ROOF = (150, 120, 110)
SHADES = range(-25, 25)  # a building's roof is ROOF shaded by a draw from this range
ROOFS = {shade: tuple(min(max(c + shade, 0), 255) for c in ROOF) for shade in SHADES}
TAG_KEYS = tuple(dict.fromkeys(["building", "highway", "railway", *(key for key, _, _ in FILLS)]))  # all read here


def _fill(tags: dict[str, str]) -> tuple[int, int, int] | None:
    for key, values, colour in FILLS:
        if key in tags and (values is None or tags[key] in values):
            return colour
    return None


def _xy(geom, size: int) -> list[list[tuple[float, float]]]:
    """Pixel rings/paths of a geometry in tile coordinates (y up) -> image (row 0 north)."""
    return _paths(np.array([geom], dtype=object), size)[0]


def _paths(geoms: np.ndarray, size: int) -> list[list[list[float]]]:
    """``_xy`` of many geometries at once, each path a flat [x0, y0, x1, y1, ...] list: the parts of each
    geometry in order, a polygon part as its exterior then its holes, paths without points left out."""
    parts, part_of = shapely.get_parts(geoms, return_index=True)
    poly = shapely.get_type_id(parts) == 3
    rings, ring_of = shapely.get_rings(parts[poly], return_index=True)
    # One path per ring of a polygon part and per other part, in part order, rings in order.
    n_paths = np.where(poly, 0, 1)
    n_paths[poly] = np.bincount(ring_of, minlength=int(poly.sum()))
    paths = np.empty(int(n_paths.sum()), dtype=object)
    first = np.cumsum(n_paths) - n_paths
    is_ring = np.zeros(len(paths), bool)
    is_ring[first[poly][ring_of] + (np.arange(len(rings)) - np.searchsorted(ring_of, ring_of))] = True
    paths[is_ring] = rings
    paths[~is_ring] = parts[~poly]
    path_of = np.repeat(part_of, n_paths)
    coords, idx = shapely.get_coordinates(paths, return_index=True)
    xy = np.column_stack([coords[:, 0] * size, (1 - coords[:, 1]) * size]).ravel().tolist()
    bounds = np.searchsorted(idx, np.arange(len(paths) + 1)) * 2
    out: list[list[list[float]]] = [[] for _ in range(len(geoms))]
    for i, (a, b) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)):
        if b > a:
            out[path_of[i]].append(xy[a:b])
    return out


def _ground(tile_id: str, size: int) -> tuple[np.ndarray, np.random.Generator]:
    """The textured ground of a tile (seeded by its id) and the generator, for the roofs' shades."""
    seed = int.from_bytes(hashlib.blake2b(tile_id.encode(), digest_size=4).digest(), "little")
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 9, (size, size, 1))[..., 0]
    base = np.empty((size, size, 3), np.uint8)
    for c, value in enumerate(GROUND):  # clip(GROUND + noise) cast to uint8, a channel at a time
        base[..., c] = np.clip(noise + float(value), 0, 255)
    return base, rng


def render(tile_id: str, geoms: list, tags: list[dict[str, str]], size: int = 224, size_m: float = 300.0) -> np.ndarray:
    """(size, size, 3) uint8 image of one tile's entities (tile-normalised geometries)."""
    return render_tiles([tile_id], np.asarray(geoms, dtype=object).reshape(-1), tags, [0, len(geoms)], size,
                        size_m)[0]


def render_tiles(tile_ids: list[str], geoms: np.ndarray, tags: list[dict[str, str]], offsets, size: int = 224,
                 size_m: float = 300.0) -> list[np.ndarray]:
    """``render`` of consecutive tiles at once: tile i's entities are ``geoms[offsets[i]:offsets[i + 1]]``
    (the geometries' paths, dimensions and fills are worked out once, for all)."""
    dims = shapely.get_dimensions(geoms).tolist() if len(geoms) else []
    paths = _paths(geoms, size) if len(geoms) else []
    fills = [None if d != 2 or "building" in t else _fill(t) for t, d in zip(tags, dims, strict=True)]
    return [_draw(tile_id, paths[a:b], tags[a:b], dims[a:b], fills[a:b], size, size_m)
            for tile_id, a, b in zip(tile_ids, offsets[:-1], offsets[1:], strict=True)]


def _draw(tile_id: str, paths: list, tags: list[dict[str, str]], dims: list[int], fills: list, size: int,
          size_m: float) -> np.ndarray:
    base, rng = _ground(tile_id, size)
    img = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(img)
    px_per_m = size / size_m
    polys = [(p, t, f) for p, t, d, f in zip(paths, tags, dims, fills, strict=True) if d == 2]
    lines = [(p, t) for p, t, d in zip(paths, tags, dims, strict=True) if d == 1]
    for colour in dict.fromkeys(colour for _, _, colour in FILLS):  # land cover and water, in FILLS order
        for rings, _, fill in polys:  # (FILLS names one colour twice: drawing it again changes nothing)
            if fill == colour:
                for ring in rings[:1]:
                    draw.polygon(ring, fill=colour)
    for rings, t in lines:
        if t.get("waterway"):
            for path in rings:
                draw.line(path, fill=(70, 110, 160), width=max(1, round(8 * px_per_m)))
    for rings, t in lines:
        width = ROAD_WIDTH_M.get(t.get("highway", ""), 0) or (3 if "railway" in t else 0)
        if width:
            colour = (60, 55, 55) if "railway" in t else ROAD
            for path in rings:
                draw.line(path, fill=colour, width=max(1, round(width * px_per_m)))
    buildings = [rings for rings, t, _ in polys if "building" in t]
    # one draw per building, in order (the same numbers as one call each)
    shades = rng.integers(SHADES.start, SHADES.stop, size=len(buildings)).tolist() if buildings else []
    for rings, shade in zip(buildings, shades, strict=True):
        if rings:
            draw.polygon(rings[0], fill=ROOFS[shade], outline=(90, 80, 75))
            for hole in rings[1:]:
                draw.polygon(hole, fill=GROUND)
    return np.asarray(img, dtype=np.uint8)
