"""Extraction on the real sample extracts, checked against counts made here with osmium's own API."""

from __future__ import annotations

import glob
import json
import os

import duckdb
import geopandas as gpd
import numpy as np
import osmium
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import shapely

from data_contracts import ENTITIES, read_table
from geojepa.extract import extract
from geojepa.extract.geometry import hilbert_key
from geojepa.extract.tags import AREA_ONLY, AREA_UNLESS
from tests.conftest import HELSINKI, KOTKA

DROP = ("tiger:", "source", "import", "yh:", "created_by")


def _clean(tags) -> dict[str, str]:
    return {t.k: t.v for t in tags if not t.k.startswith(DROP)}


def _independent_counts(pbf) -> dict[str, int]:
    """Entities per OSM type, counted straight from the file with osmium."""
    located: dict[int, tuple[float, float]] = {}
    ways_ok: set[int] = set()
    points = ways = 0
    relations = []
    for o in osmium.FileProcessor(str(pbf)).with_locations():
        if o.is_node():
            located[o.id] = (o.location.lon, o.location.lat)
            points += bool(_clean(o.tags))
        elif o.is_way():
            coords = {(n.lon, n.lat) for n in o.nodes if n.location.valid()}
            if len(coords) >= 2:
                ways_ok.add(o.id)
                ways += bool(_clean(o.tags))
        elif _clean(o.tags):
            relations.append((o.id, [(m.type, m.ref) for m in o.members]))
    rel_members = dict(relations)

    def has_geometry(rel_id, seen=()):
        return any(
            (t == "n" and ref in located) or (t == "w" and ref in ways_ok)
            or (t == "r" and ref in rel_members and ref not in seen and has_geometry(ref, (*seen, rel_id)))
            for t, ref in rel_members[rel_id]
        )

    return {"node": points, "way": ways, "relation": sum(has_geometry(r) for r, _ in relations)}


@pytest.mark.parametrize("name,pbf", [("helsinki", HELSINKI), ("kotka", KOTKA)])
def test_counts_per_type_match_osmium(extracted, name, pbf):
    table = read_table(extracted[name] / "entities.parquet", ENTITIES, columns=["osm_type"])
    found = {t: table["osm_type"].to_pylist().count(t) for t in ("node", "way", "relation")}
    assert found == _independent_counts(pbf)


def test_area_rules_on_real_ways(extracted):
    columns = ["osm_type", "kind", "tags", "geometry_fix"]
    t = read_table(extracted["helsinki"] / "entities.parquet", ENTITIES, columns=columns).to_pylist()
    ways = [r for r in t if r["osm_type"] == "way"]
    buildings = [r for r in ways if "building" in dict(r["tags"])]
    assert len(buildings) > 100
    # Buildings are polygons, also those cut by the extract border, unless too little of them is left.
    collapsed = [r for r in buildings if r["geometry_fix"] == "collapsed_area_as_line"]
    assert len(collapsed) < 0.05 * len(buildings)
    assert all(r["kind"] == "polygon" for r in buildings if r not in collapsed)
    assert any(r["geometry_fix"] == "missing_nodes" for r in buildings if r["kind"] == "polygon")
    area_keys = AREA_UNLESS.keys() | AREA_ONLY.keys()
    roads = [r for r in ways if "highway" in dict(r["tags"]) and dict(r["tags"]).get("area") != "yes"
             and not set(dict(r["tags"])) & area_keys]
    assert len(roads) > 500
    assert all(r["kind"] == "line" for r in roads)
    assert all(r["kind"] == "point" for r in t if r["osm_type"] == "node")


def test_multipolygon_keeps_its_hole(extracted):
    """A complete multipolygon with an inner ring: our area equals outer minus inner, computed here."""
    ways: dict[int, list[tuple[float, float]]] = {}
    complete: dict[int, bool] = {}
    candidates = []
    for o in osmium.FileProcessor(str(HELSINKI)).with_locations():
        if o.is_way():
            ways[o.id] = [(n.lon, n.lat) for n in o.nodes if n.location.valid()]
            complete[o.id] = all(n.location.valid() for n in o.nodes) and o.is_closed()
        elif o.is_relation() and o.tags.get("type") == "multipolygon":
            members = [(m.ref, m.role) for m in o.members if m.type == "w"]
            if any(role == "inner" for _, role in members) and all(complete.get(ref) for ref, _ in members):
                candidates.append((o.id, members))
    assert candidates, "the sample has complete multipolygons with holes"
    rel_id, members = candidates[0]
    expected = shapely.Polygon(ways[next(r for r, role in members if role == "outer")])
    for ref, role in members:
        if role == "inner":
            expected = expected.difference(shapely.Polygon(ways[ref]))
    table = read_table(extracted["helsinki"] / "entities.parquet", ENTITIES,
                       filters=[("entity_id", "==", f"relation/{rel_id}")]).to_pylist()
    assert len(table) == 1 and table[0]["kind"] == "polygon"
    got = shapely.from_wkb(table[0]["geometry"])
    assert got.area == pytest.approx(expected.area, rel=1e-9)
    assert sum(len(p.interiors) for p in shapely.get_parts(got)) >= 1
    assert {m["role"] for m in table[0]["members"]} >= {"outer", "inner"}


def test_cleaned_tags_are_gone(extracted):
    table = read_table(extracted["helsinki"] / "entities.parquet", ENTITIES, columns=["entity_id", "tags"])
    keys = {k for row in table["tags"].to_pylist() for k, _ in row}
    assert keys, "entities have tags"
    assert not [k for k in keys if k.startswith(DROP)]
    assert all(len(row) > 0 for row in table["tags"].to_pylist())
    # An object that carried a source tag in the PBF keeps its other tags.
    for o in osmium.FileProcessor(str(HELSINKI), osmium.osm.NODE):
        raw = {t.k: t.v for t in o.tags}
        if any(k.startswith("source") for k in raw) and _clean(o.tags):
            node_id, cleaned = o.id, _clean(o.tags)
            break
    row = dict(table.filter(pc.equal(table["entity_id"], f"node/{node_id}"))["tags"][0].as_py())
    assert row == cleaned


def test_geoparquet_round_trips_through_geopandas_and_duckdb(extracted):
    path = extracted["helsinki"] / "entities.parquet"
    gdf = gpd.read_parquet(path)
    assert gdf.crs.to_epsg() == 4326
    assert gdf.geometry.is_valid.all()
    geo = json.loads(pq.read_metadata(path).metadata[b"geo"])
    assert geo["primary_column"] == "geometry"
    assert set(geo["columns"]["geometry"]["geometry_types"]) >= {"Point", "LineString", "Polygon"}
    minx, miny, maxx, maxy = gdf.total_bounds
    assert geo["columns"]["geometry"]["bbox"] == pytest.approx([minx, miny, maxx, maxy])

    con = duckdb.connect()
    ext = glob.glob(os.path.join(os.path.dirname(duckdb.__file__), "..", "duckdb_extension_spatial", "extensions",
                                 "*", "spatial.duckdb_extension"))[0]
    con.install_extension(ext)
    con.load_extension("spatial")
    n, area = con.sql(f"SELECT count(*), sum(ST_Area(geometry)) FROM '{path}'").fetchone()
    assert n == len(gdf)
    assert area == pytest.approx(gdf.geometry.area.sum(), rel=1e-9)


def test_rows_are_hilbert_ordered_and_row_groups_compact(tmp_path, cfg):
    cfg = cfg.model_copy(update={"extract": cfg.extract.model_copy(update={"row_group_rows": 2000})})
    extract(HELSINKI, tmp_path, cfg)
    pf = pq.ParquetFile(tmp_path / "entities.parquet")
    assert pf.metadata.num_row_groups >= 5
    bbox = pf.read(columns=["bbox"])["bbox"].combine_chunks().flatten()
    cx = (bbox[0].to_numpy() + bbox[2].to_numpy()) / 2
    cy = (bbox[1].to_numpy() + bbox[3].to_numpy()) / 2
    assert np.all(np.diff(hilbert_key(cx, cy)) >= 0)


def test_hilbert_key_visits_quadrants_in_curve_order():
    # On a 2 x 2 grid the curve runs (0,0) -> (0,1) -> (1,1) -> (1,0).
    x = np.array([-90.0, -90.0, 90.0, 90.0])
    y = np.array([-45.0, 45.0, 45.0, -45.0])
    assert hilbert_key(x, y, bits=1).tolist() == [0, 1, 2, 3]
    # On a 16 x 16 grid every cell gets its own index and consecutive indices are neighbouring cells.
    i, j = np.meshgrid(np.arange(16), np.arange(16))
    keys = hilbert_key(-180 + (i.ravel() + 0.5) * 360 / 16, -90 + (j.ravel() + 0.5) * 180 / 16, bits=4)
    assert sorted(keys.tolist()) == list(range(256))
    order = np.argsort(keys)
    steps = np.abs(np.diff(i.ravel()[order])) + np.abs(np.diff(j.ravel()[order]))
    assert np.all(steps == 1)


def test_bbox_clip_and_tag_filter(tmp_path, cfg):
    box = (24.940, 60.166, 24.948, 60.172)
    clip = cfg.model_copy(
        update={"extract": cfg.extract.model_copy(update={"bbox": box, "tag_filter": ("building", "amenity=cafe")})}
    )
    extract(HELSINKI, tmp_path, clip)
    t = read_table(tmp_path / "entities.parquet", ENTITIES).to_pylist()
    assert t
    for row in t:
        tags = dict(row["tags"])
        assert "building" in tags or tags.get("amenity") == "cafe"
        xmin, ymin, xmax, ymax = shapely.from_wkb(row["geometry"]).bounds
        assert box[0] - 1e-9 <= xmin and xmax <= box[2] + 1e-9 and box[1] - 1e-9 <= ymin and ymax <= box[3] + 1e-9


def test_disk_node_index_gives_the_same_entities(tmp_path, cfg, extracted):
    disk = cfg.model_copy(update={"extract": cfg.extract.model_copy(update={"node_index": "disk"})})
    summary = extract(KOTKA, tmp_path, disk)
    assert summary.as_dict()["node_index_on_disk"] == 1
    a = read_table(tmp_path / "entities.parquet", ENTITIES)
    b = read_table(extracted["kotka"] / "entities.parquet", ENTITIES)
    assert a.equals(b)


def test_unchanged_input_is_skipped_and_changes_rerun(tmp_path, cfg):
    first = extract(KOTKA, tmp_path, cfg)
    assert not first.skipped
    mtime = (tmp_path / "entities.parquet").stat().st_mtime_ns
    assert extract(KOTKA, tmp_path, cfg).skipped
    assert (tmp_path / "entities.parquet").stat().st_mtime_ns == mtime
    changed = cfg.model_copy(update={"extract": cfg.extract.model_copy(update={"row_group_rows": 1000})})
    assert not extract(KOTKA, tmp_path, changed).skipped
    assert not extract(KOTKA, tmp_path, changed, force=True).skipped
    # A hand-edited output is not trusted.
    (tmp_path / "entities.parquet").write_bytes(b"garbage")
    assert not extract(KOTKA, tmp_path, changed).skipped
    assert read_table(tmp_path / "entities.parquet", ENTITIES).num_rows == first.summary.entities
