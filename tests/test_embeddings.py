"""geojepa embed / similar / map on the Kotka sample with the shipped CPU model (models/geojepa-cpu)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_contracts import EMBEDDING_KEYS, embedding_dim, entity_embeddings, read_table
from geojepa.embeddings import embed_source, similar, write_map
from geojepa.errors import GeoJepaError
from tests.conftest import KOTKA, ROOT

MODEL = ROOT / "models" / "geojepa-cpu"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _tiles(out: Path) -> tuple[list[str], np.ndarray]:
    t = pq.read_table(out / "tile_embeddings.parquet", columns=["tile_id", "embedding"])
    e = t["embedding"].combine_chunks()
    return t["tile_id"].to_pylist(), e.values.to_numpy().reshape(len(e), -1)


def _digest(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, cfg):
    before = _digest(MODEL)
    out = tmp_path_factory.mktemp("embed") / "kotka"
    summary = embed_source(KOTKA, out, cfg, MODEL)
    assert _digest(MODEL) == before  # the shipped model folder is never written to (OUT has a tokenizer copy)
    return out, summary


def test_embed_writes_geoparquet_with_the_model_in_its_metadata_that_geopandas_and_duckdb_read(embedded):
    import duckdb
    import geopandas

    out, summary = embedded
    assert summary["tiles"] > 40 and summary["entity_pieces"] > 2000
    tiles = geopandas.read_parquet(out / "tile_embeddings.parquet")
    ents = geopandas.read_parquet(out / "entity_embeddings.parquet")
    assert tiles.crs.to_epsg() == 4326 and ents.crs.to_epsg() == 4326
    assert len(tiles) == summary["tiles"] and len(ents) == summary["entity_pieces"]
    assert set(tiles.geometry.geom_type) == {"Polygon"}
    assert tiles.total_bounds[0] == pytest.approx(26.93, abs=0.01) and 60.5 < tiles.total_bounds[1] < 60.55
    assert ents["class"].value_counts().index[0] == "building" and ents.tile_id.isin(tiles.tile_id).all()
    schema = pq.read_schema(out / "tile_embeddings.parquet")
    assert schema.field("embedding").type == pa.list_(pa.float32(), 256)  # concat(mean, max) of a 128-wide encoder
    assert embedding_dim(out / "entity_embeddings.parquet") == 128
    meta = {k.decode(): v.decode() for k, v in pq.read_metadata(out / "tile_embeddings.parquet").metadata.items()}
    assert meta["geojepa:tokenizer_digest"] == json.loads((MODEL / "export.json").read_text())["tokenizer_digest"]
    assert meta["geojepa:model_version"].startswith("step-00000800.pt sha256:") and set(EMBEDDING_KEYS) <= set(meta)
    assert json.loads(meta["geo"])["columns"]["geometry"]["crs"]["id"]["code"] == 4326
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    # every tile of the region, whatever its split: the evaluation's gap ring means nothing to a user
    region = pq.read_table(Path(summary["work_dir"]) / "tiles.parquet", columns=["tile_id", "split"])
    assert "gap" in region["split"].to_pylist() and set(tiles.tile_id) == set(region["tile_id"].to_pylist())
    assert "gap" in set(tiles["split"])

    con = duckdb.connect()
    ext = glob.glob(os.path.join(os.path.dirname(duckdb.__file__), "..", "duckdb_extension_spatial", "extensions",
                                 "*", "spatial.duckdb_extension"))[0]
    con.install_extension(ext)
    con.load_extension("spatial")
    n, kinds, width = con.sql(f"SELECT count(*), list_distinct(list(ST_GeometryType(geometry))), "
                              f"max(len(embedding)) FROM '{out / 'tile_embeddings.parquet'}'").fetchone()
    assert (n, kinds, width) == (summary["tiles"], ["POLYGON"], 256)


def test_embeddings_equal_the_evaluate_path_and_streaming_in_small_batches_changes_nothing(embedded, cfg,
                                                                                           tmp_path):
    from geojepa.evaluate import evaluate

    out, summary = embedded
    ids, x = _tiles(out)
    fast = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={
        "seeds": 1, "max_epochs": 3, "patience": 1, "map": "pca", "gallery_queries": 1, "tasks": ("building_count",),
        "unmasked": False})})
    evaluate(summary["work_dir"], fast, model=MODEL)
    ev = pq.read_table(Path(summary["work_dir"]) / "eval" / "embeddings.parquet",
                       filters=[("level", "=", "tile")], columns=["tile_id", "embedding"])
    at = {t: i for i, t in enumerate(ev["tile_id"].to_pylist())}
    # evaluation embeds train, val and test tiles; embed every tile, the gap ring's too
    mine = [i for i, t in enumerate(ids) if t in at]
    assert len(at) == len(mine) < len(ids)
    y = np.stack(ev["embedding"].to_numpy(zero_copy_only=False))[[at[ids[i]] for i in mine]]
    np.testing.assert_allclose(x[mine], y, rtol=0, atol=1e-5)
    # a tile a batch (the work directory as SOURCE: its tokens are reused, nothing re-made)
    one = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"embed_batch_tiles": 1})})
    again = embed_source(summary["work_dir"], tmp_path / "one", one, MODEL)
    assert again["work_dir"] == summary["work_dir"] and not (tmp_path / "one" / "work").exists()
    ids1, x1 = _tiles(tmp_path / "one")
    assert ids1 == ids
    np.testing.assert_allclose(x1, x, rtol=0, atol=1e-5)
    e0 = read_table(out / "entity_embeddings.parquet", entity_embeddings(128), columns=["embedding"])
    e1 = pq.read_table(tmp_path / "one" / "entity_embeddings.parquet", columns=["embedding"])
    np.testing.assert_allclose(np.stack(e1["embedding"].to_numpy(zero_copy_only=False)),
                               np.stack(e0["embedding"].to_numpy(zero_copy_only=False)), rtol=0, atol=1e-5)


def test_similar_equals_brute_force_cosine_and_finds_the_tile_of_a_point(embedded):
    import shapely

    out, _ = embedded
    ids, x = _tiles(out)
    q = 7
    got = similar(out, ids[q], k=5)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = unit @ unit[q]
    cos[q] = -np.inf
    want = np.argsort(-cos)[:5]
    assert [r["tile_id"] for r in got["neighbours"]] == [ids[i] for i in want]
    assert [r["cosine"] for r in got["neighbours"]] == pytest.approx(cos[want], abs=1e-4)
    assert Path(got["gallery"]["png"]).stat().st_size > 10_000 and Path(got["gallery"]["html"]).is_file()
    foot = shapely.from_wkb(pq.read_table(out / "tile_embeddings.parquet", columns=["geometry"])["geometry"]
                            .to_numpy(zero_copy_only=False)[q])
    c = shapely.get_coordinates(foot.centroid)[0]
    assert similar(out, f"{c[0]},{c[1]}", k=3, gallery=False)["query"] == ids[q]


def test_bad_queries_models_and_outputs_are_refused_naming_the_value_and_nothing_is_written(embedded, cfg, tmp_path):
    out, summary = embedded
    with pytest.raises(GeoJepaError, match="no-such-tile: no such tile in .*tile_embeddings.parquet"):
        similar(out, "no-such-tile")
    with pytest.raises(GeoJepaError, match=r"0.5,0.5: the point \(0.5, 0.5\) is in none of the"):
        similar(out, "0.5,0.5")
    # an OUT holding another model's embeddings: refused without --force, the file untouched
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(out / "tile_embeddings.parquet", other / "tile_embeddings.parquet")
    t = pq.read_table(other / "tile_embeddings.parquet")
    meta = {**t.schema.metadata, b"geojepa:model_version": b"step-00000001.pt sha256:0000000000000000"}
    pq.write_table(t.replace_schema_metadata(meta), other / "tile_embeddings.parquet")
    before = (other / "tile_embeddings.parquet").read_bytes()
    with pytest.raises(
        GeoJepaError, match=r"tile_embeddings.parquet: holds embeddings of another model \(step-00000001"
    ):
        embed_source(summary["work_dir"], other, cfg, MODEL)
    assert (other / "tile_embeddings.parquet").read_bytes() == before and not (
        other / "entity_embeddings.parquet"
    ).exists()
    # a checkpoint without its tokenizer, on a new PBF
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(next((MODEL / "checkpoints").glob("step-*.pt")), lone / "step-00000800.pt")
    with pytest.raises(GeoJepaError, match="no tokenizer folder is beside it: pass --tokenizer"):
        embed_source(KOTKA, tmp_path / "lone-out", cfg, lone / "step-00000800.pt")
    assert not (tmp_path / "lone-out").exists()
    with pytest.raises(GeoJepaError, match="no such PBF file"):
        embed_source(tmp_path / "missing.osm.pbf", tmp_path / "x", cfg, MODEL)
    with pytest.raises(GeoJepaError, match="smaller than one 300 m tile"):
        embed_source(KOTKA, tmp_path / "tiny", cfg.model_copy(update={"extract": cfg.extract.model_copy(
            update={"bbox": (26.95, 60.53, 26.9502, 60.5301)})}), MODEL)
    assert not (tmp_path / "tiny" / "tile_embeddings.parquet").exists()


def test_the_map_is_one_self_contained_page_that_a_real_browser_draws_without_errors(embedded, tmp_path):
    out, summary = embedded
    got = write_map(out, k=4)
    page = Path(got["map"]).read_text()
    assert got["tiles"] == summary["tiles"] and got["base_lines"] > 1000
    assert "http://" not in page and "https://" not in page and "<script src" not in page  # nothing fetched
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's): the page was not opened")
    ids, _ = _tiles(out)
    url = f"file://{got['map']}#tile={ids[3]}"
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,700"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    body = dom[dom.index("<body"): dom.index(">", dom.index("<body"))]
    assert f'data-drawn="{summary["tiles"]}"' in body and 'data-errors="0"' in body
    assert f'data-selected="{ids[3]}"' in body
    near = similar(out, ids[3], k=4, gallery=False)["neighbours"]
    table = dom[dom.index('<table id="neighbours"'):]
    for r in near:  # the page's neighbours are the exact ones, in order
        assert r["tile_id"] in table
    assert [table.index(r["tile_id"]) for r in near] == sorted(table.index(r["tile_id"]) for r in near)
    shot = tmp_path / "map.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    left = img[:, : img.shape[1] - 320]  # the map, without the side panel
    coloured = (left.max(2) - left.min(2)) > 40  # saturated pixels: drawn tiles, not the grey background
    assert coloured.mean() > 0.2
    assert ((img[..., 0] > 240) & (img[..., 1] > 210) & (img[..., 2] < 60)).sum() > 100  # the yellow outlines


def test_a_work_directory_tokenised_otherwise_is_only_read_its_tokens_made_in_out(tokenised, cfg, tmp_path):
    """A source whose shards come from its region-own tokenizer: OUT/work links its tile artifacts and gets the
    model's tokens; the source's files are not touched."""
    from geojepa.workdir import WorkDir

    w, _ = tokenised
    before = _digest(Path(w))
    got = embed_source(w, tmp_path / "out", cfg, MODEL)
    assert _digest(Path(w)) == before
    view = WorkDir(tmp_path / "out" / "work")
    assert got["work_dir"] == str(view.path) and view.tiles.is_symlink() and view.token_shards()
    assert view.tokenizer_digest() == json.loads((MODEL / "export.json").read_text())["tokenizer_digest"]
    assert got["tiles"] == len(_tiles(tmp_path / "out")[0]) > 40
