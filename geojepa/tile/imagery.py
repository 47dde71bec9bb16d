"""Imagery clipped to tiles: local GeoTIFF / COG mosaics and NAIP through STAC.

Every source answers ``read(bounds, crs, size)`` for one tile: the tile's
footprint ``bounds`` (x0, y0, x1, y1) in the grid's ``crs`` resampled to
``size`` x ``size`` pixels, row 0 at the tile's north edge. Reads are windowed:
GDAL's warper fetches only the source blocks under the tile, never the whole
raster. Pixels no source covers stay 0 and count against ``coverage``.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.transform import from_bounds
from rasterio.warp import reproject, transform_bounds

from geojepa.errors import GeoJepaError

log = logging.getLogger(__name__)
BAND_NAMES = ("R", "G", "B", "NIR")


@dataclass
class TileImage:
    pixels: np.ndarray | None  # (H, W, C) uint8, None when nothing covers the tile
    bands: list[str]
    coverage: float
    source: str
    acquired: str | None


def _open(path: str, what: str) -> rasterio.DatasetReader:
    try:
        ds = rasterio.open(path)
    except RasterioError as e:
        raise GeoJepaError(f"{what}: not a readable raster: {e}") from None
    if ds.crs is None:
        raise GeoJepaError(f"{what}: raster has no CRS; georeference it (e.g. gdal_edit.py -a_srs)")
    if ds.count < 3:
        raise GeoJepaError(f"{what}: {ds.count} band(s); expected RGB or RGB+NIR")
    if ds.dtypes[0] != "uint8":
        raise GeoJepaError(
            f"{what}: bands are {ds.dtypes[0]}; expected 8-bit imagery (convert with gdal_translate -ot Byte -scale)"
        )
    return ds


class Mosaic:
    """Rasters (any CRS and resolution) mosaicked per tile; earlier datasets win where they overlap."""

    def __init__(self, datasets: list[tuple[rasterio.DatasetReader, str, str | None]]):
        self.datasets = datasets  # (dataset, label, acquisition date)
        self.channels = min(ds.count for ds, _, _ in datasets) if datasets else 3
        self.channels = min(self.channels, 4)

    @classmethod
    def from_paths(cls, source: str | Path | list) -> Mosaic:
        items = source if isinstance(source, list | tuple) else [source]
        paths: list[Path] = []
        for item in map(Path, items):
            if item.is_dir():
                paths += sorted(p for p in item.rglob("*") if p.suffix.lower() in {".tif", ".tiff", ".vrt"})
            elif item.exists():
                paths.append(item)
            else:
                raise GeoJepaError(f"{item}: imagery not found")
        if not paths:
            raise GeoJepaError(f"{source}: no GeoTIFF files found")
        datasets = []
        for p in paths:
            ds = _open(str(p), str(p))
            acquired = ds.tags().get("TIFFTAG_DATETIME") or ds.tags().get("ACQUISITION_DATE")
            datasets.append((ds, p.name, acquired.replace(":", "-", 2)[:10] if acquired else None))
        return cls(datasets)

    def lonlat_bounds(self) -> list[tuple[str, tuple[float, float, float, float]]]:
        return [(label, transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)) for ds, label, _ in self.datasets]

    def read(self, bounds: tuple[float, float, float, float], crs: str, size: int) -> TileImage:
        out = np.zeros((self.channels, size, size), dtype=np.uint8)
        filled = np.zeros((size, size), dtype=bool)
        used, dates = [], []
        transform = from_bounds(*bounds, size, size)
        for ds, label, acquired in self.datasets:
            try:
                sb = transform_bounds(crs, ds.crs, *bounds)
            except Exception:  # noqa: BLE001 (outside the source CRS's valid area)
                continue
            db = ds.bounds
            if sb[0] >= db.right or sb[2] <= db.left or sb[1] >= db.top or sb[3] <= db.bottom:
                continue
            # GDAL's warper reads only the source blocks under the tile; the extra band receives
            # validity (255 where a source pixel, not nodata, mapped). src_alpha=0: a 4th band is NIR.
            data = np.zeros((self.channels + 1, size, size), dtype=np.uint8)
            try:
                reproject(rasterio.band(ds, list(range(1, self.channels + 1))), data, dst_transform=transform,
                          dst_crs=crs, resampling=Resampling.bilinear, src_alpha=0, dst_alpha=self.channels + 1)
            except RasterioError as e:
                raise GeoJepaError(f"{label}: corrupt raster data: {e}") from None
            valid = (data[-1] > 0) & ~filled
            if valid.any():
                out[:, valid] = data[: self.channels, valid]
                filled |= valid
                used.append(label)
                dates.append(acquired)
            if filled.all():
                break
        coverage = float(filled.mean())
        if not used:
            return TileImage(None, list(BAND_NAMES[: self.channels]), 0.0, "missing", None)
        known = [d for d in dates if d]
        return TileImage(out.transpose(1, 2, 0).copy(), list(BAND_NAMES[: self.channels]), coverage,
                         "+".join(used), max(known) if known else None)


class StacNaip:
    """NAIP from a STAC API (Planetary Computer's ``naip`` collection by default), latest first.

    Items are searched once per partition; asset URLs are signed with the
    collection's SAS token and read through GDAL's HTTP range requests.
    """

    def __init__(self, api: str = "https://planetarycomputer.microsoft.com/api/stac/v1", collection: str = "naip",
                 sign_url: str | None = "https://planetarycomputer.microsoft.com/api/sas/v1/token",
                 asset: str = "image", timeout: float = 60.0):
        self.api, self.collection, self.sign_url, self.asset, self.timeout = (
            api.rstrip("/"),
            collection,
            sign_url,
            asset,
            timeout,
        )
        self._token: str | None = None

    def _get(self, url: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:  # noqa: S310
                return json.load(r)
        except OSError as e:
            raise GeoJepaError(f"{url}: STAC request failed: {e}") from None

    def _sign(self, href: str) -> str:
        if not self.sign_url:
            return href
        if self._token is None:
            self._token = self._get(f"{self.sign_url}/{self.collection}")["token"]
        return f"{href}{'&' if '?' in href else '?'}{self._token}"

    def for_area(self, lonlat_bbox: tuple[float, float, float, float]) -> Mosaic:
        """The items over an area (a partition) as a mosaic, newest first."""
        body = {"collections": [self.collection], "bbox": list(lonlat_bbox), "limit": 100,
                "sortby": [{"field": "properties.datetime", "direction": "desc"}]}
        items = self._get(f"{self.api}/search", body).get("features", [])
        items.sort(key=lambda it: it["properties"].get("datetime") or "", reverse=True)
        datasets = []
        for it in items:
            href = it["assets"][self.asset]["href"]
            ds = _open(self._sign(href), f"{it['id']} ({href})")
            datasets.append(
                (ds, f"{self.collection}:{it['id']}", (it["properties"].get("datetime") or "")[:10] or None)
            )
        return Mosaic(datasets)


def open_source(source: str | Path | list) -> Mosaic | StacNaip:
    """``naip`` or ``stac+https://api/...#collection``: STAC; anything else: GeoTIFF file(s) or folder."""
    if isinstance(source, str) and source == "naip":
        return StacNaip()
    if isinstance(source, str) and source.startswith("stac+"):
        url = urllib.parse.urlsplit(source.removeprefix("stac+"))
        api = urllib.parse.urlunsplit(url._replace(fragment="", query=""))
        params = dict(urllib.parse.parse_qsl(url.query))
        return StacNaip(api, collection=url.fragment or "naip", sign_url=params.get("sign"))
    return Mosaic.from_paths(source)
