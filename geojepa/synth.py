"""A deterministic synthetic city as an OSM PBF, for benchmarks and tests.

SYNTHETIC DATA: every file carries ``generator=geojepa synth (synthetic)`` in
its header and ``synthetic=yes`` is never needed on objects because no real
data is mixed in. The city is a jittered street grid (primary, secondary and
residential streets with ``maxspeed``, some in mph), a meandering river (a
multipolygon split over two ways, plus its centreline) crossed by road and foot
bridges, blocks of buildings (dense and tall downtown, sparse houses in the
suburbs) with levels and addresses, POIs with names, traffic signals and
crossings at intersections, parks, grass and forests (some forests as
multipolygons with a clearing as hole, some apartment blocks with a courtyard),
and bus-route relations along the primary streets. The same seed gives the same
bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import osmium

from geojepa.config import SynthConfig
from geojepa.errors import GeoJepaError

M_PER_DEG_LAT = 111_320.0
AMENITIES = ["restaurant", "cafe", "bank", "pharmacy", "fast_food", "bar", "school", "post_office"]
SHOPS = ["supermarket", "bakery", "clothes", "convenience", "hairdresser", "books"]
NAMES = ["Oak", "Maple", "Cedar", "Pine", "Elm", "Birch", "Willow", "Aspen", "Harbor", "Summit", "Union", "Liberty"]


@dataclass
class _City:
    """Objects in the order they are generated; ids are allocated sequentially."""

    lon0: float
    lat0: float
    xy: list[tuple[float, float]] = field(default_factory=list)  # node i has id i + 1
    node_tags: dict[int, dict[str, str]] = field(default_factory=dict)
    ways: list[tuple[list[int], dict[str, str]]] = field(default_factory=list)  # way i has id i + 1
    relations: list[tuple[list[tuple[str, int, str]], dict[str, str]]] = field(default_factory=list)

    def node(self, x: float, y: float, tags: dict[str, str] | None = None) -> int:
        self.xy.append((x, y))
        if tags:
            self.node_tags[len(self.xy)] = tags
        return len(self.xy)

    def way(self, nodes: list[int], tags: dict[str, str]) -> int:
        self.ways.append((nodes, tags))
        return len(self.ways)

    def ring(self, pts: list[tuple[float, float]], tags: dict[str, str]) -> int:
        ids = [self.node(x, y) for x, y in pts]
        return self.way(ids + ids[:1], tags)

    def relation(self, members: list[tuple[str, int, str]], tags: dict[str, str]) -> int:
        self.relations.append((members, tags))
        return len(self.relations)


def _rect(cx: float, cy: float, w: float, h: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + dx * c - dy * s, cy + dx * s + dy * c)
            for dx, dy in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2))]


def _speed(rng: np.random.Generator, kmh: int, mph: int) -> str:
    return f"{mph} mph" if rng.random() < 0.3 else str(kmh)


def generate(out: Path | str, km2: float, seed: int, cfg: SynthConfig = SynthConfig()) -> dict:
    """Write a synthetic city of about ``km2`` square kilometres to ``out`` (an .osm.pbf)."""
    out = Path(out)
    if km2 <= 0:
        raise GeoJepaError(f"synth: --km2 must be positive, got {km2}")
    if not out.name.endswith(".osm.pbf"):
        raise GeoJepaError(f"{out}: output must end in .osm.pbf")
    rng = np.random.default_rng(seed)
    side = math.sqrt(km2) * 1000.0
    block = cfg.block_m
    n = max(2, int(side // block))
    city = _City(cfg.centre_lon, cfg.centre_lat)
    half = side / 2

    def radius(x: float, y: float) -> float:  # 0 downtown .. 1 at the corners
        return math.hypot(x - half, y - half) / (half * math.sqrt(2))

    # The river: a band of width 50 m around x = river_x(y).
    river_w = 50.0

    def river_x(y: float) -> float:
        return side * 0.58 + side * 0.06 * math.sin(2 * math.pi * y / max(side * 0.8, 1.0))

    # Street grid: intersections (i, j) at jittered positions; tags decided before any way.
    gx = np.arange(n + 1) * block + rng.uniform(-6, 6, size=(n + 1, n + 1))
    gy = (np.arange(n + 1) * block)[None, :] + rng.uniform(-6, 6, size=(n + 1, n + 1))

    def street_class(k: int) -> str:
        return "primary" if k % 8 == 4 else "secondary" if k % 4 == 2 else "residential"

    in_river = np.abs(gx - np.vectorize(river_x)(gy)) < river_w / 2 + 4
    inter = np.zeros((n + 1, n + 1), dtype=np.int64)
    for i in range(n + 1):
        for j in range(n + 1):
            if in_river[i, j]:
                continue
            ci, cj = street_class(i), street_class(j)
            tags = None
            u = rng.random()
            if "primary" in (ci, cj) and u < 0.8 or ci == cj == "secondary" and u < 0.6:
                tags = {"highway": "traffic_signals"}
            elif u < 0.15:
                tags = {"highway": "crossing", "crossing": "traffic_signals" if u < 0.05 else "uncontrolled"}
            inter[i, j] = city.node(gx[i, j], gy[i, j], tags)

    # Streets: vertical lines i (x = const), horizontal lines j (y = const); split into ways of <= 4 segments.
    routes: dict[int, list[int]] = {}

    def street(k: int, points: list[int], horizontal: bool) -> None:
        cls = street_class(k)
        kmh, mph = {"primary": (50, 35), "secondary": (40, 30), "residential": (30, 25)}[cls]
        name = f"{NAMES[k % len(NAMES)]} {'Avenue' if horizontal else 'Street'} {k}"
        base = {"highway": cls, "name": name}
        if cls != "residential" or rng.random() < 0.6:
            base["maxspeed"] = _speed(rng, kmh, mph)
        if cls != "residential":
            base["lanes"] = "4" if cls == "primary" else "2"
        run: list[int] = []

        def flush() -> None:
            if len(run) > 1:
                routes.setdefault(k, []).append(city.way(list(run), dict(base)))
            run.clear()

        for a, b in zip(points[:-1], points[1:], strict=True):
            if not a or not b:  # an intersection fell into the river: the street ends there
                flush()
                continue
            (ax, ay), (bx, by) = city.xy[a - 1], city.xy[b - 1]
            if horizontal and min(ax, bx) < river_x(ay) < max(ax, bx):  # its own way: a road bridge
                flush()
                routes.setdefault(k, []).append(city.way([a, b], {**base, "bridge": "yes", "layer": "1"}))
                continue
            if cls == "residential" and rng.random() < 0.45 * radius((ax + bx) / 2, (ay + by) / 2):
                flush()  # suburbs: fewer streets
                continue
            if not run:
                run.append(a)
            run.append(b)
            if len(run) == 5:
                flush()
                run.append(b)
        flush()

    for i in range(n + 1):
        street(i, [int(inter[i, j]) for j in range(n + 1)], horizontal=False)
    for j in range(n + 1):
        street(j, [int(inter[i, j]) for i in range(n + 1) if inter[i, j]], horizontal=True)  # bridges span the river

    # The river: centreline, and a multipolygon whose outer ring is split over two bank ways.
    ys = np.linspace(-20, side + 20, max(8, int(side // 40)))
    centre = [city.node(river_x(y), y) for y in ys]
    city.way(centre, {"waterway": "river", "name": "Synthetic River"})
    left = [city.node(river_x(y) - river_w / 2, y) for y in ys]
    right = [city.node(river_x(y) + river_w / 2, y) for y in ys[::-1]]
    w_left = city.way(left + [right[0]], {})
    w_right = city.way(right + [left[0]], {})
    city.relation([("w", w_left, "outer"), ("w", w_right, "outer")],
                  {"type": "multipolygon", "natural": "water", "water": "river", "name": "Synthetic River"})
    for y in ys[2:-2:15]:  # footbridges
        a = city.node(river_x(y) - river_w / 2 - 5, y + 7)
        b = city.node(river_x(y) + river_w / 2 + 5, y + 7)
        city.way([a, b], {"highway": "footway", "bridge": "yes", "layer": "1"})

    # Blocks.
    buildings = pois = 0
    for i in range(n):
        for j in range(n):
            x0, y0 = i * block + 12, j * block + 12
            size = block - 24
            cx, cy = x0 + size / 2, y0 + size / 2
            if abs(cx - river_x(cy)) < river_w / 2 + block / 2 + 4:
                if rng.random() < 0.5:
                    city.ring(
                        _rect(cx, cy, size * 0.6, size * 0.6, 0), {"leisure": "park", "name": f"Riverside Park {i}-{j}"}
                    )
                continue
            r = radius(cx, cy)
            u = rng.random()
            if u < 0.05:
                city.ring(
                    _rect(cx, cy, size, size, 0), {"leisure": "park", "name": f"{NAMES[(i + j) % len(NAMES)]} Park"}
                )
                continue
            if u < 0.08:
                city.ring(_rect(cx, cy, size, size, 0), {"landuse": "grass"})
                continue
            if r > 0.55 and u < 0.18:
                outer = city.ring(_rect(cx, cy, size, size, 0), {})
                members = [("w", outer, "outer")]
                if rng.random() < 0.5:
                    members.append(("w", city.ring(_rect(cx, cy, size * 0.3, size * 0.3, 0.3), {}), "inner"))
                city.relation(members, {"type": "multipolygon", "landuse": "forest"})
                continue
            street_name = f"{NAMES[j % len(NAMES)]} Avenue {j}"
            if r < 0.3:  # downtown: 3 x 3 tall buildings, shops and amenities
                per, kinds, levels = 3, ["commercial", "office", "apartments", "retail"], (4, 30)
            elif r < 0.6:
                per, kinds, levels = 4, ["apartments", "residential", "house", "retail"], (2, 6)
            else:
                per, kinds, levels = 4, ["house", "detached", "residential", "garage"], (1, 3)
            cell = size / per
            for a in range(per):
                for b in range(per):
                    if r >= 0.6 and (0 < a < per - 1 and 0 < b < per - 1 or rng.random() < r * 0.7):
                        continue  # suburbs: houses along the edges, sparser outwards
                    bx, by = x0 + (a + 0.5) * cell, y0 + (b + 0.5) * cell
                    w = cell * rng.uniform(0.55, 0.85)
                    h = cell * rng.uniform(0.55, 0.85)
                    angle = rng.uniform(-0.08, 0.08)
                    tags = {"building": kinds[int(rng.integers(len(kinds)))],
                            "building:levels": str(int(rng.integers(*levels))),
                            "addr:street": street_name, "addr:housenumber": str(1 + 2 * (a * per + b))}
                    buildings += 1
                    if r < 0.6 and rng.random() < 0.04:  # courtyard building: multipolygon with a hole
                        outer = city.ring(_rect(bx, by, w, h, angle), {})
                        inner = city.ring(_rect(bx, by, w * 0.4, h * 0.4, angle), {})
                        city.relation([("w", outer, "outer"), ("w", inner, "inner")], {"type": "multipolygon", **tags})
                    else:
                        city.ring(_rect(bx, by, w, h, angle), tags)
                    if r < 0.45:
                        for _ in range(int(rng.integers(0, 3 if r < 0.3 else 2))):
                            px, py = bx + rng.uniform(-w / 3, w / 3), by + rng.uniform(-h / 3, h / 3)
                            if rng.random() < 0.55:
                                tags = {"amenity": AMENITIES[int(rng.integers(len(AMENITIES)))]}
                            else:
                                tags = {"shop": SHOPS[int(rng.integers(len(SHOPS)))]}
                            tags["name"] = f"{NAMES[int(rng.integers(len(NAMES)))]} {next(iter(tags.values())).title()}"
                            city.node(px, py, tags)
                            pois += 1

    # Bus routes along primary streets.
    for k, ways in sorted(routes.items()):
        if street_class(k) == "primary" and len(ways) > 1:
            city.relation([("w", w, "") for w in ways],
                          {"type": "route", "route": "bus", "ref": str(k), "name": f"Bus {k}"})

    _write(out, city, side)
    return {"output": str(out), "synthetic": True, "km2": km2, "seed": seed, "nodes": len(city.xy),
            "ways": len(city.ways), "relations": len(city.relations), "buildings": buildings, "pois": pois,
            "bytes": out.stat().st_size}


def _write(out: Path, city: _City, side: float) -> None:
    """Write nodes, ways, relations (each sorted by id) atomically, with a header bbox."""
    m_per_deg_lon = M_PER_DEG_LAT * math.cos(math.radians(city.lat0))
    lon_min = city.lon0 - side / 2 / m_per_deg_lon
    lat_min = city.lat0 - side / 2 / M_PER_DEG_LAT
    xy = np.asarray(city.xy)
    lon = np.round(lon_min + xy[:, 0] / m_per_deg_lon, 7)
    lat = np.round(lat_min + xy[:, 1] / M_PER_DEG_LAT, 7)
    header = osmium.io.Header()
    header.set("generator", "geojepa synth (synthetic)")
    header.add_box(osmium.osm.Box(osmium.osm.Location(float(lon.min()), float(lat.min())),
                                  osmium.osm.Location(float(lon.max()), float(lat.max()))))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.osm.pbf")
    tmp.unlink(missing_ok=True)
    try:
        with osmium.SimpleWriter(str(tmp), header=header) as w:
            mutable = osmium.osm.mutable
            tags = city.node_tags
            for i, (x, y) in enumerate(zip(lon.tolist(), lat.tolist(), strict=True), start=1):
                w.add_node(mutable.Node(id=i, location=(x, y), tags=tags.get(i, {}), version=1))
            for i, (nodes, t) in enumerate(city.ways, start=1):
                w.add_way(mutable.Way(id=i, nodes=nodes, tags=t, version=1))
            for i, (members, t) in enumerate(city.relations, start=1):
                w.add_relation(mutable.Relation(id=i, members=members, tags=t, version=1))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
