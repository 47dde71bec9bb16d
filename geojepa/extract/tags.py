"""Tag rules: which closed ways are areas, and which entities a tag filter keeps.

The area rules follow OSM's conventions (wiki "Key:area" and the
polygon-feature lists of the major renderers): ``area=yes/no`` decides when
present; otherwise a closed way is an area when one of its tags is an area
feature. ``highway`` and ``barrier`` are never areas by themselves (only with
``area=yes``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from geojepa.errors import GeoJepaError
from geojepa.extract.opl import Tags

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


_UNLESS_KEYS = pa.array(sorted(AREA_UNLESS))
_UNLESS_LINEAR = pa.array(sorted({f"{k}={v}" for k, vs in AREA_UNLESS.items() for v in (*vs, "no")}))
_ONLY_KV = pa.array(sorted(f"{k}={v}" for k, vs in AREA_ONLY.items() for v in vs))


def area_mask(tags: Tags) -> np.ndarray:
    """Per object: whether a closed way with these (cleaned) tags is a polygon rather than a ring-shaped line."""
    kv = tags.kv()
    is_area_key = pc.equal(tags.keys, "area")
    area_yes = tags.any(pc.and_(is_area_key, pc.equal(tags.values, "yes")).to_numpy(zero_copy_only=False))
    area_no = tags.any(pc.and_(is_area_key, pc.equal(tags.values, "no")).to_numpy(zero_copy_only=False))
    feature = pc.or_(pc.and_(pc.is_in(tags.keys, _UNLESS_KEYS), pc.invert(pc.is_in(kv, _UNLESS_LINEAR))),
                     pc.is_in(kv, _ONLY_KV))
    return area_yes | (~area_no & tags.any(feature.to_numpy(zero_copy_only=False)))


class TagFilter:
    """Keeps entities carrying any of the given ``key`` or ``key=value`` tags."""

    def __init__(self, spec: tuple[str, ...] | list[str]):
        self.keys = frozenset(s for s in spec if "=" not in s)
        self.pairs = frozenset(s for s in spec if "=" in s)
        if not self.keys and not self.pairs:
            raise GeoJepaError("extract.tag_filter is empty: give key or key=value entries, or null")

    def mask(self, tags: Tags) -> np.ndarray:
        """Per object: whether it carries one of the filter's tags."""
        hit = pc.or_(pc.is_in(tags.keys, pa.array(sorted(self.keys), pa.string())),
                     pc.is_in(tags.kv(), pa.array(sorted(self.pairs), pa.string())))
        return tags.any(hit.to_numpy(zero_copy_only=False))
