"""Tiling on the real samples: determinism, normalisation, area conservation, partitions, splits."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import shapely

from data_contracts import ENTITIES, TILE_ENTITIES, TILE_IMAGES, TILES, read_table
from geojepa.tile import tile
from geojepa.tile.clip import project, rotated_bbox
from geojepa.tile.grid import Grid, assign_splits, utm_epsg


def _cfg(cfg, **tile_updates):
    return cfg.model_copy(update={"tile": cfg.tile.model_copy(update=tile_updates)})


@pytest.fixture()
def w(tmp_path, extracted):
    """A fresh work directory holding the Helsinki entities."""
    shutil.copy(extracted["helsinki"] / "entities.parquet", tmp_path / "entities.parquet")
    return tmp_path


@pytest.fixture(scope="module")
def tiled(tmp_path_factory, extracted, cfg):
    """Helsinki tiled with rendered imagery and every occupied tile kept."""
    w = tmp_path_factory.mktemp("tiled")
    shutil.copy(extracted["helsinki"] / "entities.parquet", w / "entities.parquet")
    summary = tile(w, _cfg(cfg, min_entities=1, max_entities=100_000), imagery="render")
    return w, summary


def test_deterministic_and_stable_ids(tiled, tmp_path, extracted, cfg):
    w, summary = tiled
    shutil.copy(extracted["helsinki"] / "entities.parquet", tmp_path / "entities.parquet")
    tile(tmp_path, _cfg(cfg, min_entities=1, max_entities=100_000), imagery="render")
    for name, contract in [("tiles.parquet", TILES), ("tile_entities.parquet", TILE_ENTITIES),
                           ("tile_images.parquet", TILE_IMAGES)]:
        a, b = (read_table(d / name, contract).sort_by("tile_id") for d in (w, tmp_path))
        assert a.equals(b), name
    tiles = read_table(w / "tiles.parquet", TILES).to_pylist()
    assert summary["crs"] == "EPSG:32635" == tiles[0]["crs"]  # Helsinki is in UTM 35N
    for t in tiles:
        assert t["tile_id"] == f"EPSG32635-300m-c{t['col']}-r{t['row']}"
        assert t["origin_x"] == t["col"] * 300 and t["origin_y"] == t["row"] * 300


def test_entities_lie_in_the_unit_square(tiled):
    w, _ = tiled
    te = read_table(w / "tile_entities.parquet", TILE_ENTITIES)
    coords = shapely.get_coordinates(shapely.from_wkb(te["geometry"].to_numpy(zero_copy_only=False)))
    assert coords.min() >= 0.0 and coords.max() <= 1.0
    v = np.concatenate(te["vertices"].to_numpy(zero_copy_only=False))
    assert v.min() >= 0.0 and v.max() <= 1.0
    assert te["position"].type.list_size == 8


def test_clipped_polygon_areas_sum_to_the_original(tiled, extracted):
    w, _ = tiled
    te = read_table(w / "tile_entities.parquet", TILE_ENTITIES, columns=["entity_id", "kind", "geometry"])
    polys = te.filter(pc.equal(te["kind"], "polygon"))
    area = shapely.area(shapely.from_wkb(polys["geometry"].to_numpy(zero_copy_only=False))) * 300**2
    pieces: dict[str, float] = {}
    for eid, a in zip(polys["entity_id"].to_pylist(), area.tolist(), strict=True):
        pieces[eid] = pieces.get(eid, 0.0) + a
    ents = read_table(extracted["helsinki"] / "entities.parquet", ENTITIES, columns=["entity_id", "geometry"])
    ents = ents.filter(pc.is_in(ents["entity_id"], pa.array(list(pieces), pa.string())))
    grid = Grid(utm_epsg(24.94, 60.17), 300.0, 4, 8)
    orig = project(shapely.from_wkb(ents["geometry"].to_numpy(zero_copy_only=False)), grid.to_utm())
    simple = shapely.area(shapely.simplify(orig, 0.3, preserve_topology=True))
    by_id = dict(zip(ents["entity_id"].to_pylist(), zip(shapely.area(orig), shapely.length(orig), simple), strict=True))
    split = [e for e in pieces if te.filter(pc.equal(te["entity_id"], e)).num_rows > 1]
    assert len(split) > 20, "some polygons cross tile borders"
    for eid, total in pieces.items():
        area, perimeter, simplified = by_id[eid]
        # Cutting is exact; simplification (0.3 m) may move each edge by at most its tolerance.
        assert total == pytest.approx(simplified, rel=1e-6, abs=1e-6), eid
        assert abs(total - area) <= 0.3 * perimeter + 1e-6, eid


def test_partitions_do_not_change_the_result(tiled, w, cfg):
    tiled_w, _ = tiled
    summary = tile(w, _cfg(cfg, min_entities=1, max_entities=100_000, partition_groups=1), imagery="render")
    assert summary["partitions"] > 2
    a = read_table(tiled_w / "tile_entities.parquet", TILE_ENTITIES).sort_by([("tile_id", "ascending"), ("entity_id", "ascending")])
    b = read_table(w / "tile_entities.parquet", TILE_ENTITIES).sort_by([("tile_id", "ascending"), ("entity_id", "ascending")])
    assert a.equals(b)


def test_entity_count_limits_drop_tiles(w, cfg):
    summary = tile(w, _cfg(cfg, min_entities=5, max_entities=1250))
    tiles = read_table(w / "tiles.parquet", TILES)
    n = tiles["n_entities"].to_numpy()
    assert n.min() >= 5 and n.max() <= 1250
    assert summary["dropped_too_many"] >= 1  # the dense centre of Helsinki
    te = read_table(w / "tile_entities.parquet", TILE_ENTITIES, columns=["tile_id"])
    counts = {d["values"]: d["counts"] for d in pc.value_counts(te["tile_id"]).to_pylist()}
    assert counts == dict(zip(tiles["tile_id"].to_pylist(), n.tolist(), strict=True))
    images = read_table(w / "tile_images.parquet", TILE_IMAGES)
    assert set(images["source"].to_pylist()) == {"missing"}  # no imagery asked: explicit missing state
    assert images["pixels"].null_count == images.num_rows


def test_rotated_bbox_is_minimal_and_at_least_min_side():
    rect = shapely.affinity.rotate(shapely.box(0, 0, 40, 10), 30, origin=(0, 0))
    point = shapely.Point(5, 5)
    line = shapely.LineString([(0, 0), (30, 0)])
    pos = rotated_bbox(np.array([rect, point, line], dtype=object), 1.5)
    quads = [shapely.Polygon(p.reshape(4, 2)) for p in pos]
    assert quads[0].area == pytest.approx(400) and quads[0].symmetric_difference(rect).area < 1e-6
    assert quads[1].area == pytest.approx(1.5 * 1.5) and quads[1].centroid.equals_exact(point, 1e-9)
    assert quads[2].area == pytest.approx(30 * 1.5) and quads[2].contains(line)


def test_splits_keep_evaluation_tiles_away_from_training():
    col, row = (a.ravel() for a in np.meshgrid(np.arange(1000, 1060), np.arange(500, 560)))
    split = assign_splits(col, row, 4, (0.8, 0.1, 0.1), seed=42)
    where = dict(zip(zip(col.tolist(), row.tolist(), strict=True), split.tolist(), strict=True))
    for (c, r), s in where.items():
        near = {where.get((c + dc, r + dr)) for dc in (-1, 0, 1) for dr in (-1, 0, 1)}
        if s == "test":
            assert "train" not in near and "val" not in near
        if s == "val":
            assert "train" not in near
    # Group-level draws are 80/10/10 and the same for a sub-region (interior tiles).
    groups = {}
    for c, r, s in zip(col.tolist(), row.tolist(), split.tolist(), strict=True):
        if s != "gap":
            groups[(c // 4, r // 4)] = s
    share = {k: list(groups.values()).count(k) / len(groups) for k in ("train", "val", "test")}
    assert 0.7 < share["train"] < 0.9 and 0.04 < share["val"] < 0.16 and 0.04 < share["test"] < 0.16
    sub = (col >= 1020) & (col < 1040) & (row >= 520) & (row < 540)
    split_sub = assign_splits(col[sub], row[sub], 4, (0.8, 0.1, 0.1), seed=42)
    interior = (col[sub] > 1020) & (col[sub] < 1039) & (row[sub] > 520) & (row[sub] < 539)
    assert (split_sub[interior] == split[sub][interior]).all()
    assert (assign_splits(col, row, 4, (0.8, 0.1, 0.1), seed=7) != split).any()


def test_cli_tile_renders_and_skips_unchanged(w):
    from typer.testing import CliRunner

    from geojepa.cli import app

    args = ["tile", str(w), "--imagery", "render", "--set", "tracking.enabled=false"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    images = read_table(w / "tile_images.parquet", TILE_IMAGES).to_pylist()
    assert images and {i["source"] for i in images} == {"render (synthetic)"}
    assert all(len(i["pixels"]) == 224 * 224 * 3 and i["coverage"] == 1.0 for i in images)
    mtime = (w / "tiles.parquet").stat().st_mtime_ns
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and '"skipped": true' in again.output
    assert (w / "tiles.parquet").stat().st_mtime_ns == mtime
    missing = CliRunner().invoke(app, ["tile", str(w / "nowhere"), "--set", "tracking.enabled=false"])
    assert missing.exit_code == 1 and "nowhere/entities.parquet: entities artifact not found" in missing.output
