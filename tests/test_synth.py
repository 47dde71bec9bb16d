"""The synthetic city: deterministic, readable by osmium, and holding what benchmarks and tasks need."""

from __future__ import annotations

from collections import Counter

import osmium
import pytest
import shapely

from data_contracts import ENTITIES, read_table
from geojepa.errors import GeoJepaError
from geojepa.extract import extract
from geojepa.manifest import file_sha256
from geojepa.synth import generate


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "city.osm.pbf"
    return out, generate(out, km2=2.0, seed=7)


def test_same_seed_same_bytes_other_seed_differs(city, tmp_path):
    path, _ = city
    again = generate(tmp_path / "again.osm.pbf", km2=2.0, seed=7)
    other = generate(tmp_path / "other.osm.pbf", km2=2.0, seed=8)
    assert file_sha256(again["output"]) == file_sha256(path)
    assert file_sha256(other["output"]) != file_sha256(path)


def test_reads_back_with_osmium(city):
    path, summary = city
    counts = Counter(o.type_str() for o in osmium.FileProcessor(str(path)))
    assert counts == {"n": summary["nodes"], "w": summary["ways"], "r": summary["relations"]}
    header = osmium.io.Reader(str(path), osmium.osm.NOTHING).header()
    assert "synthetic" in header.get("generator")
    assert header.box().valid()


def test_contains_the_features_tasks_need(city):
    path, _ = city
    tags = Counter()
    for o in osmium.FileProcessor(str(path)):
        t = dict((k, v) for k, v in o.tags)
        tags.update(f"{k}={v}" if k in {"highway", "bridge", "type", "route", "crossing"} else k for k, v in t.items())
        if "maxspeed" in t and t["maxspeed"].endswith("mph"):
            tags["maxspeed_mph"] += 1
    for needed in ["building", "building:levels", "addr:housenumber", "amenity", "shop", "name", "maxspeed",
                   "maxspeed_mph", "highway=traffic_signals", "crossing=traffic_signals", "bridge=yes",
                   "highway=footway", "highway=primary", "highway=residential", "type=multipolygon",
                   "type=route", "route=bus", "leisure", "landuse", "natural", "waterway"]:
        assert tags[needed] > 0, needed


def test_downtown_is_denser_than_suburbs(city, tmp_path, cfg):
    path, _ = city
    extract(path, tmp_path, cfg)
    t = read_table(tmp_path / "entities.parquet", ENTITIES, columns=["tags", "geometry"]).to_pylist()
    pts = shapely.centroid(shapely.from_wkb([r["geometry"] for r in t if "building" in dict(r["tags"])]))
    xs, ys = shapely.get_x(pts), shapely.get_y(pts)
    cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
    r = ((xs - cx) ** 2 + ((ys - cy) * 1.3) ** 2) ** 0.5
    inner, outer = (r < r.max() * 0.3).sum(), (r > r.max() * 0.7).sum()
    inner_area = 0.3**2
    outer_area = 1 - 0.7**2
    assert inner / inner_area > 1.5 * outer / outer_area
    # The courtyard multipolygons keep their holes.
    polys = [shapely.from_wkb(r["geometry"]) for r in t if "building" in dict(r["tags"])]
    assert any(len(p.interiors) == 1 for p in polys if p.geom_type == "Polygon")


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(GeoJepaError, match="km2"):
        generate(tmp_path / "x.osm.pbf", km2=0, seed=1)
    with pytest.raises(GeoJepaError, match="must end in .osm.pbf"):
        generate(tmp_path / "x.pbf", km2=1, seed=1)
