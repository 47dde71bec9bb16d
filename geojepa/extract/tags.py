"""Tag rules: which closed ways are areas, and which entities a tag filter keeps.

The area rules follow OSM's conventions (wiki "Key:area" and the
polygon-feature lists of the major renderers): ``area=yes/no`` decides when
present; otherwise a closed way is an area when one of its tags is an area
feature. ``highway`` and ``barrier`` are never areas by themselves (only with
``area=yes``).
"""

from __future__ import annotations

# Keys whose closed ways are areas unless the value is one of the listed linear ones.
AREA_UNLESS: dict[str, frozenset[str]] = {
    k: frozenset(v)
    for k, v in {
        "building": (), "building:part": (), "landuse": (), "amenity": (), "shop": (), "office": (),
        "craft": (), "healthcare": (), "tourism": (), "place": (), "public_transport": (), "water": (),
        "wetland": (), "area:highway": (), "ruins": (), "indoor": (), "landcover": (), "parking": (),
        "leisure": ("track", "slipway"),
        "natural": ("coastline", "cliff", "ridge", "arete", "tree_row", "valley", "earth_bank", "gully"),
        "man_made": ("cutline", "embankment", "pipeline", "dyke", "breakwater", "groyne", "pier"),
        "aeroway": ("taxiway", "runway", "jet_bridge", "parking_position"),
        "historic": ("citywalls",),
        "military": ("trench",),
        "emergency": ("designated", "destination", "no", "official", "yes"),
    }.items()
}

# Keys whose closed ways are areas only for the listed values.
AREA_ONLY: dict[str, frozenset[str]] = {
    k: frozenset(v)
    for k, v in {
        "waterway": ("riverbank", "dock", "boatyard", "dam", "fuel"),
        "railway": ("station", "turntable", "roundhouse", "platform"),
        "power": ("plant", "substation", "generator", "transformer"),
        "boundary": ("protected_area", "national_park"),
        "golf": ("fairway", "green", "bunker", "tee", "rough", "water_hazard", "lateral_water_hazard"),
    }.items()
}


def is_area(tags: dict[str, str]) -> bool:
    """Whether a closed way with these (cleaned) tags is a polygon rather than a ring-shaped line."""
    area = tags.get("area")
    if area == "no":
        return False
    if area == "yes":
        return True
    for k, v in tags.items():
        linear = AREA_UNLESS.get(k)
        if linear is not None and v not in linear and v != "no":
            return True
        only = AREA_ONLY.get(k)
        if only is not None and v in only:
            return True
    return False


class TagFilter:
    """Keeps entities carrying any of the given ``key`` or ``key=value`` tags."""

    def __init__(self, spec: tuple[str, ...] | list[str]):
        self.keys = frozenset(s for s in spec if "=" not in s)
        self.pairs = frozenset(tuple(s.split("=", 1)) for s in spec if "=" in s)
        if not self.keys and not self.pairs:
            raise ValueError("tag filter is empty")

    def __call__(self, keys: list[str], values: list[str]) -> bool:
        return any(k in self.keys or (k, v) in self.pairs for k, v in zip(keys, values, strict=True))
