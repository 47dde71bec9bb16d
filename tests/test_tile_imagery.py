"""Imagery clipped to tiles: exact image-vector alignment across CRSs, coverage states, STAC, bad input."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio.features import rasterize
from rasterio.transform import from_bounds
from rasterio.warp import transform_bounds

from data_contracts import ENTITIES, TILE_ENTITIES, TILE_IMAGES, TILES, read_table
from geojepa.errors import GeoJepaError
from geojepa.tile import tile
from geojepa.tile.clip import project
from geojepa.tile.grid import Grid, utm_epsg

PX = 224


def _cfg(cfg):
    return cfg.model_copy(update={"tile": cfg.tile.model_copy(update={"min_entities": 1, "max_entities": 100_000})})


def write_geotiff(path: Path, crs: str | None, bounds, data: np.ndarray) -> Path:
    """(bands, rows, cols) uint8 -> GeoTIFF with the given bounds (in ``crs``)."""
    bands, height, width = data.shape
    profile = {"driver": "GTiff", "width": width, "height": height, "count": bands, "dtype": "uint8",
               "transform": from_bounds(*bounds, width, height), "tiled": True, "blockxsize": 256,
               "blockysize": 256}
    if crs:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


@pytest.fixture()
def w(tmp_path, extracted):
    work = tmp_path / "w"
    work.mkdir()
    shutil.copy(extracted["helsinki"] / "entities.parquet", work / "entities.parquet")
    return work


def _grid():
    return Grid(utm_epsg(24.944, 60.171), 300.0, 4, 8)


def _image(w: Path, tile_id: str) -> dict:
    images = read_table(w / "tile_images.parquet", TILE_IMAGES)
    return images.filter(pc.equal(images["tile_id"], tile_id)).to_pylist()[0]


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            out |= np.roll(np.roll(mask, dr, 0), dc, 1)
    return out


def test_rectangle_burnt_in_web_mercator_lands_on_its_entity(w, tmp_path, cfg):
    """A building burnt into an EPSG:3857 raster falls on the entity's tile geometry within one pixel."""
    grid = _grid()
    ents = read_table(w / "entities.parquet", ENTITIES).filter(pc.equal(
        read_table(w / "entities.parquet", ENTITIES, columns=["kind"])["kind"], "polygon")).to_pylist()
    geoms = shapely.from_wkb([e["geometry"] for e in ents])
    utm = project(geoms, grid.to_utm())
    b = shapely.bounds(utm)
    inside = (np.floor(b[:, 0] / 300) == np.floor(b[:, 2] / 300)) & (np.floor(b[:, 1] / 300) == np.floor(b[:, 3] / 300))
    area = shapely.area(utm)
    pick = int(np.argmax(np.where(inside & np.array(["building" in dict(e["tags"]) for e in ents]), area, 0)))
    target, col, row = geoms[pick], int(b[pick, 0] // 300), int(b[pick, 1] // 300)
    tile_id = f"EPSG32635-300m-c{col}-r{row}"
    # A raster in EPSG:3857 over the target tile plus 200 m, 0.5 m ground resolution.
    x0, y0 = col * 300 - 200, row * 300 - 200
    bounds3857 = transform_bounds(grid.crs, "EPSG:3857", x0, y0, x0 + 700, y0 + 700)
    width = int((bounds3857[2] - bounds3857[0]) / 1.0)
    height = int((bounds3857[3] - bounds3857[1]) / 1.0)
    shape3857 = project(np.array([target]), _transformer("EPSG:4326", "EPSG:3857"))[0]
    burnt = rasterize([(shape3857, 255)], out_shape=(height, width),
                      transform=from_bounds(*bounds3857, width, height), dtype="uint8")
    tif = write_geotiff(tmp_path / "mercator.tif", "EPSG:3857", bounds3857, np.stack([burnt] * 3))

    tile(w, _cfg(cfg), imagery=[str(tif)])
    img = _image(w, tile_id)
    assert img["coverage"] == pytest.approx(1.0) and img["bands"] == ["R", "G", "B"]
    pixels = np.frombuffer(img["pixels"], np.uint8).reshape(PX, PX, 3)
    seen = pixels[..., 0] > 127
    te = read_table(w / "tile_entities.parquet", TILE_ENTITIES)
    piece = te.filter(pc.and_(pc.equal(te["tile_id"], tile_id), pc.equal(te["entity_id"], ents[pick]["entity_id"])))
    shape = shapely.from_wkb(piece["geometry"][0].as_py())
    drawn = rasterize([(shape, 1)], out_shape=(PX, PX), transform=Affine(1 / PX, 0, 0, 0, -1 / PX, 1)).astype(bool)
    assert drawn.sum() > 50
    assert not (seen & ~_dilate(drawn)).any()
    assert not (drawn & ~_dilate(seen)).any()

    # Tiles beyond the raster keep an explicit missing state; tiles at its edge are partial.
    images = read_table(w / "tile_images.parquet", TILE_IMAGES).to_pylist()
    missing = [i for i in images if i["source"] == "missing"]
    assert missing and all(i["pixels"] is None and i["coverage"] == 0 for i in missing)
    assert any(0 < i["coverage"] < 1 and i["pixels"] is not None for i in images)
    assert len(images) == read_table(w / "tiles.parquet", TILES).num_rows


def _transformer(src, dst):
    from pyproj import Transformer

    return Transformer.from_crs(src, dst, always_xy=True)


def test_lonlat_raster_is_reprojected_to_the_tile_grid(w, tmp_path, cfg):
    """Edges at a known longitude and latitude in an EPSG:4326 raster land where UTM puts them."""
    grid = _grid()
    lon_edge, lat_edge = 24.9445, 60.1712
    bounds = (24.930, 60.160, 24.960, 60.185)
    width, height = 3000, 2500
    lon = np.linspace(bounds[0], bounds[2], width, endpoint=False) + (bounds[2] - bounds[0]) / width / 2
    lat = np.linspace(bounds[3], bounds[1], height, endpoint=False) - (bounds[3] - bounds[1]) / height / 2
    red = np.broadcast_to(np.where(lon > lon_edge, 255, 0).astype(np.uint8), (height, width))
    green = np.broadcast_to(np.where(lat > lat_edge, 255, 0).astype(np.uint8)[:, None], (height, width))
    tif = write_geotiff(tmp_path / "lonlat.tif", "EPSG:4326", bounds, np.stack([red, green, np.zeros_like(red)]))
    tile(w, _cfg(cfg), imagery=[str(tif)])

    x, y = grid.to_utm().transform(lon_edge, lat_edge)
    col, row = int(x // 300), int(y // 300)
    img = np.frombuffer(_image(w, f"EPSG32635-300m-c{col}-r{row}")["pixels"], np.uint8).reshape(PX, PX, 3)
    px_x, px_y = (x - col * 300) / 300 * PX, (1 - (y - row * 300) / 300) * PX
    r, c = int(px_y), int(px_x)
    red_row = img[r, :, 0].astype(int)
    green_col = img[:, c, 1].astype(int)
    edge_x = np.argmax(red_row > 127)  # first red pixel, left to right
    edge_y = np.argmax(green_col < 128)  # first non-green pixel, top to bottom
    assert abs(edge_x - px_x) <= 1.5
    assert abs(edge_y - px_y) <= 1.5


def _no_outputs(w: Path):
    assert sorted(p.name for p in w.iterdir()) == ["entities.parquet"]


def test_raster_without_crs(w, tmp_path, cfg):
    tif = write_geotiff(tmp_path / "nocrs.tif", None, (0, 0, 10, 10), np.zeros((3, 10, 10), np.uint8))
    with pytest.raises(GeoJepaError, match="nocrs.tif: raster has no CRS"):
        tile(w, _cfg(cfg), imagery=[str(tif)])
    _no_outputs(w)


def test_corrupt_raster(w, tmp_path, cfg):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    with pytest.raises(GeoJepaError, match="broken.tif: not a readable raster"):
        tile(w, _cfg(cfg), imagery=[str(bad)])
    _no_outputs(w)


def test_imagery_elsewhere(w, tmp_path, cfg):
    tif = write_geotiff(
        tmp_path / "paris.tif", "EPSG:4326", (2.30, 48.80, 2.40, 48.90), np.zeros((3, 20, 20), np.uint8)
    )
    with pytest.raises(GeoJepaError, match="paris.tif: imagery does not overlap the region"):
        tile(w, _cfg(cfg), imagery=[str(tif)])
    _no_outputs(w)


def test_entities_with_the_wrong_schema(tmp_path, cfg):
    import pyarrow as pa
    import pyarrow.parquet as pq

    w = tmp_path / "w"
    w.mkdir()
    pq.write_table(pa.table({"entity_id": ["node/1"], "geom": [b"x"]}), w / "entities.parquet")
    with pytest.raises(ValueError, match=r"entities.parquet.*schema_version none"):
        tile(w, _cfg(cfg))
    assert sorted(p.name for p in w.iterdir()) == ["entities.parquet"]


def test_region_smaller_than_a_tile(tmp_path, cfg):
    from geojepa.extract import extract

    small = cfg.model_copy(
        update={"extract": cfg.extract.model_copy(update={"bbox": (24.9440, 60.1700, 24.9450, 60.1705)})}
    )
    w = tmp_path / "w"
    extract(Path(__file__).parent.parent / "data" / "samples" / "helsinki.osm.pbf", w, small)
    with pytest.raises(GeoJepaError, match=r"entities.parquet: the region is \d+ x \d+ m, smaller than one 300 m tile"):
        tile(w, _cfg(cfg))
    assert not (w / "tiles.parquet").exists()


class _Stac(http.server.ThreadingHTTPServer):
    def __init__(self, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), _StacHandler)
        self.files = files
        self.items: list[dict] = []
        self.signed: list[str] = []


class _StacHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, body: bytes, status=200, ctype="application/octet-stream", head=False):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self._send(json.dumps({"type": "FeatureCollection", "features": self.server.items}).encode(),
                   ctype="application/json")

    def do_HEAD(self):  # noqa: N802
        self.do_GET(head=True)

    def do_GET(self, head=False):  # noqa: N802
        path, _, query = self.path.partition("?")
        if path == "/sas/naip":
            self._send(json.dumps({"token": "sv=1&sig=test"}).encode(), ctype="application/json", head=head)
            return
        data = self.server.files.get(path)
        if data is None:
            self._send(b"", 404, head=head)
            return
        self.server.signed.append(query)
        rng = self.headers.get("Range")
        if rng and not head:
            start, _, end = rng.removeprefix("bytes=").partition("-")
            start, end = int(start), min(int(end or len(data) - 1), len(data) - 1)
            body = data[start : end + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self._send(data, head=head)


def test_naip_through_stac_takes_the_latest_acquisition(w, tmp_path, cfg, monkeypatch):
    monkeypatch.setenv("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")
    bounds = (24.930, 60.160, 24.960, 60.185)
    old = write_geotiff(tmp_path / "old.tif", "EPSG:4326", bounds, np.full((4, 200, 200), 50, np.uint8))
    new = write_geotiff(tmp_path / "new.tif", "EPSG:4326", bounds, np.full((4, 200, 200), 200, np.uint8))
    srv = _Stac({"/data/old.tif": old.read_bytes(), "/data/new.tif": new.read_bytes()})
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    srv.items = [
        {"id": f"naip_{year}", "type": "Feature", "bbox": list(bounds),
         "properties": {"datetime": f"{year}-07-01T00:00:00Z"},
         "assets": {"image": {"href": f"{base}/data/{name}.tif"}}}
        for year, name in ((2019, "old"), (2022, "new"))
    ]
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        tile(w, _cfg(cfg), imagery=f"stac+{base}/api?sign={base}/sas#naip")
    finally:
        srv.shutdown()
        srv.server_close()
    images = read_table(w / "tile_images.parquet", TILE_IMAGES).to_pylist()
    covered = [i for i in images if i["coverage"] == 1.0]
    assert covered
    for i in covered:
        assert i["source"] == "naip:naip_2022" and i["acquired"] == "2022-07-01"
        assert i["bands"] == ["R", "G", "B", "NIR"]
        assert set(np.frombuffer(i["pixels"], np.uint8).tolist()) == {200}
    assert srv.signed and all("sig=test" in q for q in srv.signed)
