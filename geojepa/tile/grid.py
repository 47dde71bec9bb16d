"""The tile grid: UTM zone of the region, global alignment, ids, groups, partitions and splits.

Tiles are ``size`` x ``size`` m squares of the UTM zone's own grid, aligned to
the zone's origin (false easting/northing 0), so re-runs and neighbouring
regions in one zone produce the same tiles. Indices: ``col = floor(x / size)``,
``row = floor(y / size)``. Groups are ``group`` x ``group`` tiles (the split
unit); partitions are blocks of groups processed independently (the unit of
work a cluster maps over).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

import numpy as np
from pyproj import CRS, Transformer


def utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the WGS84 UTM zone holding (lon, lat); lon may be past +-180 (a region across the
    antimeridian)."""
    if not -180 <= lon <= 180:
        lon = 180 - (180 - lon) % 360
    zone = int(np.clip((lon + 180) // 6 + 1, 1, 60))
    return (32600 if lat >= 0 else 32700) + zone


@dataclass(frozen=True)
class Grid:
    epsg: int
    size: float
    group: int
    partition_groups: int

    @property
    def crs(self) -> str:
        return f"EPSG:{self.epsg}"

    def to_utm(self) -> Transformer:
        return _transformer(4326, self.epsg)

    def to_lonlat(self) -> Transformer:
        return _transformer(self.epsg, 4326)

    def tile_id(self, col, row) -> np.ndarray:
        """Readable, stable ids: ``EPSG32635-300m-c8310-r22305``."""
        prefix = f"EPSG{self.epsg}-{self.size:g}m"
        return np.array(
            [f"{prefix}-c{c}-r{r}" for c, r in zip(np.ravel(col), np.ravel(row), strict=True)], dtype=object
        )

    def group_id(self, col, row) -> np.ndarray:
        gc, gr = np.floor_divide(col, self.group), np.floor_divide(row, self.group)
        prefix = f"EPSG{self.epsg}-{self.size:g}m-g{self.group}"
        return np.array([f"{prefix}-c{c}-r{r}" for c, r in zip(np.ravel(gc), np.ravel(gr), strict=True)], dtype=object)

    def partition_span(self) -> int:
        """Tiles per partition side."""
        return self.group * self.partition_groups

    def ring_lonlat(self, x0: float, y0: float, x1: float, y1: float, densify: int = 8) -> np.ndarray:
        """(4 * (densify + 1), 2) lon/lat points around a UTM box, edges densified (they are curves in lon/lat)."""
        return self.rings_lonlat(np.array([x0]), np.array([y0]), np.array([x1]), np.array([y1]), densify)[0]

    def rings_lonlat(self, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray,
                     densify: int = 8) -> np.ndarray:
        """``ring_lonlat`` of many boxes at once: (n, 4 * (densify + 1), 2)."""
        t = np.linspace(0, 1, densify + 1)[None, :]
        x0, y0, x1, y1 = (np.asarray(a, float)[:, None] for a in (x0, y0, x1, y1))
        ones = np.ones_like(t)
        xs = np.concatenate([x0 + (x1 - x0) * t, x1 * ones, x1 - (x1 - x0) * t, x0 * ones], axis=1)
        ys = np.concatenate([y0 * ones, y0 + (y1 - y0) * t, y1 * ones, y1 - (y1 - y0) * t], axis=1)
        lon, lat = self.to_lonlat().transform(xs.ravel(), ys.ravel())
        return np.stack([np.reshape(lon, xs.shape), np.reshape(lat, xs.shape)], axis=-1)

    def lonlat_bounds(self, x0: float, y0: float, x1: float, y1: float) -> tuple[float, ...]:
        """A lon/lat box holding the UTM box."""
        ring = self.ring_lonlat(x0, y0, x1, y1)
        return (*ring.min(0).tolist(), *ring.max(0).tolist())


_local = threading.local()


def _transformer(src: int, dst: int) -> Transformer:
    """A transformer between two EPSG codes (always_xy), made once per thread: making one costs
    about 0.4 ms, and one may not be shared between threads."""
    cache = _local.__dict__.setdefault("transformers", {})
    if (src, dst) not in cache:
        cache[src, dst] = Transformer.from_crs(CRS.from_epsg(src), CRS.from_epsg(dst), always_xy=True)
    return cache[src, dst]


def _uniform(seed: int, gc: int, gr: int) -> float:
    digest = hashlib.blake2b(f"{seed}:{gc}:{gr}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def assign_splits(col: np.ndarray, row: np.ndarray, group: int, fractions: tuple[float, float, float],
                  seed: int) -> np.ndarray:
    """Split per tile: train/val/test drawn per group (seeded, independent of the region's extent),
    then ``gap`` for train tiles touching a val or test tile and for val tiles touching a test tile,
    so that no evaluation tile touches a tile trained on."""
    gc, gr = np.floor_divide(col, group), np.floor_divide(row, group)
    edges = np.cumsum(fractions) / np.sum(fractions)
    u = np.array([_uniform(seed, int(c), int(r)) for c, r in zip(gc, gr, strict=True)])
    level = np.searchsorted(edges[:-1], u, side="right")  # 0 train, 1 val, 2 test
    # The highest level among each tile's 8 neighbours (tiles present in the region only).
    where = {(int(c), int(r)): int(lv) for c, r, lv in zip(col, row, level, strict=True)}
    neighbour_max = np.array([
        max((where.get((int(c) + dc, int(r) + dr), -1) for dc in (-1, 0, 1) for dr in (-1, 0, 1) if dc or dr),
            default=-1)
        for c, r in zip(col, row, strict=True)
    ])
    split = np.array(["train", "val", "test"], dtype=object)[level]
    split[((level == 0) & (neighbour_max >= 1)) | ((level == 1) & (neighbour_max == 2))] = "gap"
    return split
