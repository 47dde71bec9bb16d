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


def _fill(tags: dict[str, str]) -> tuple[int, int, int] | None:
    for key, values, colour in FILLS:
        if key in tags and (values is None or tags[key] in values):
            return colour
    return None


def _xy(geom, size: int) -> list[list[tuple[float, float]]]:
    """Pixel rings/paths of a geometry in tile coordinates (y up) -> image (row 0 north)."""
    out = []
    for part in shapely.get_parts(geom):
        rings = [part.exterior, *part.interiors] if part.geom_type == "Polygon" else [part]
        for ring in rings:
            c = np.asarray(ring.coords)
            if len(c):
                out.append([(x * size, (1 - y) * size) for x, y in c[:, :2]])
    return out


def render(tile_id: str, geoms: list, tags: list[dict[str, str]], size: int = 224, size_m: float = 300.0) -> np.ndarray:
    """(size, size, 3) uint8 image of one tile's entities (tile-normalised geometries)."""
    seed = int.from_bytes(hashlib.blake2b(tile_id.encode(), digest_size=4).digest(), "little")
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 9, (size, size, 1))
    base = np.clip(np.asarray(GROUND, float) + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(img)
    px_per_m = size / size_m
    polys = [(g, t) for g, t in zip(geoms, tags, strict=True) if shapely.get_dimensions(g) == 2]
    lines = [(g, t) for g, t in zip(geoms, tags, strict=True) if shapely.get_dimensions(g) == 1]
    for _, _, colour in FILLS:  # land cover and water, in FILLS order
        for g, t in polys:
            if "building" not in t and _fill(t) == colour:
                for ring in _xy(g, size)[:1]:
                    draw.polygon(ring, fill=colour)
    for g, t in lines:
        if t.get("waterway"):
            for path in _xy(g, size):
                draw.line(path, fill=(70, 110, 160), width=max(1, round(8 * px_per_m)))
    for g, t in lines:
        width = ROAD_WIDTH_M.get(t.get("highway", ""), 0) or (3 if "railway" in t else 0)
        if width:
            colour = (60, 55, 55) if "railway" in t else ROAD
            for path in _xy(g, size):
                draw.line(path, fill=colour, width=max(1, round(width * px_per_m)))
    for g, t in polys:
        if "building" in t:
            shade = int(rng.integers(-25, 25))
            roof = tuple(int(np.clip(c + shade, 0, 255)) for c in ROOF)
            rings = _xy(g, size)
            if rings:
                draw.polygon(rings[0], fill=roof, outline=(90, 80, 75))
                for hole in rings[1:]:
                    draw.polygon(hole, fill=GROUND)
    return np.asarray(img, dtype=np.uint8)
