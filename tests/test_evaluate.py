"""Evaluation on the Kotka sample: task labels, masking, embeddings, probes, retrieval, report, bad input."""

from __future__ import annotations

import shutil

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
import torch

from data_contracts import EVAL_RESULTS, TASK_LABELS, TILE_ENTITIES, TOKENS, read_table
from geojepa.config import load_config
from geojepa.errors import GeoJepaError
from geojepa.evaluate import evaluate
from geojepa.evaluate.embed import embed, masked_items
from geojepa.evaluate.knn import topk_cosine
from geojepa.evaluate.labels import TASKS, parse_speed, task_labels
from geojepa.evaluate.probe import ProbeSettings, fit_predict, metrics
from geojepa.evaluate.stage import _load
from geojepa.model.jepa import Encoder, ModelConfig
from geojepa.train.data import TokenRows
from geojepa.train.train import train

TINY = {"width": 32, "depth": 2, "heads": 4, "mlp": 64, "pred_width": 16, "pred_depth": 1, "pred_heads": 2,
        "batch_tiles": 8, "epochs": 1, "max_steps": 3, "num_workers": 0, "log_every": 1, "checkpoint_every": 100,
        "keep_last": 1, "modalities": ("tags", "geometry"), "device": "cpu"}
FAST = ["evaluate.seeds=2", "evaluate.max_epochs=80", "evaluate.patience=10", "evaluate.gallery_queries=2"]


def _copy_region(src, dst):
    for name in ("entities.parquet", "tiles.parquet", "tile_entities.parquet", "tile_images.parquet",
                 "tag_vocab.parquet", "tokens"):
        (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, dst / name)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tokenised, cfg):
    src, _ = tokenised
    w = tmp_path_factory.mktemp("evaluate")
    _copy_region(src, w)
    train({**cfg.train.model_copy(update=TINY).model_dump(mode="json"), "work_dir": str(w)})
    c = load_config(overrides=["tracking.enabled=false", *FAST])
    return w, c, evaluate(w, c)


def test_evaluation_writes_results_labels_report_and_geoparquet_embeddings(evaluated):
    w, _, summary = evaluated
    out = w / "eval"
    for name in ("report.md", "gallery_tiles.png", "gallery_tiles.html", "gallery_entities.png", "embedding_map.png",
                 "region_pca.png", "training_curves.png"):
        assert (out / name).stat().st_size > 0, name
    results = read_table(out / "results.parquet", EVAL_RESULTS).to_pylist()
    mae = {(r["model"], r["probe"]): r for r in results
           if r["setting"] == "masked" and r["task"] == "building_count" and r["metric"] == "mae"}
    for model in ("geojepa", "untrained", "tagpool", "bag_of_tags"):
        for probe in ("linear", "mlp"):
            assert mae[(model, probe)]["seeds"] == 2 and mae[(model, probe)]["mean"] > 0
        assert (model, "knn") in mae
    assert ("dummy", "median") in mae
    assert any(r["setting"] == "unmasked" for r in results)
    assert summary["pictures"]["embedding_map_umap"] == "embedding_map.png"
    assert summary["tasks"]["traffic_signals"]["skipped"]  # Kotka has no traffic signals: said, not faked
    assert "| geojepa | mlp |" in (out / "report.md").read_text()

    tokens = read_table(w / "tokens", TOKENS, columns=["tile_id", "entity_id"])
    emb = gpd.read_parquet(out / "embeddings.parquet")
    assert emb.crs.to_epsg() == 4326
    tiles = emb[emb.level == "tile"]
    assert sorted(tiles.tile_id) == sorted(tokens["tile_id"].to_pylist())
    assert (emb.level == "entity").sum() == sum(len(e) for e in tokens["entity_id"].to_pylist())
    assert len(tiles.embedding.iloc[0]) == 2 * TINY["width"]  # concat(mean, max)
    assert (tiles.geometry.geom_type == "Polygon").all() and tiles.geometry.is_valid.all()


def test_dummy_baseline_is_the_training_median(evaluated):
    w, _, _ = evaluated
    labels = read_table(w / "eval" / "task_labels.parquet", TASK_LABELS).to_pandas()
    lab = labels[labels.task == "building_count"]
    y_train, y_test = lab[lab.split == "train"].label, lab[lab.split == "test"].label
    results = read_table(w / "eval" / "results.parquet", EVAL_RESULTS).to_pandas()
    dummy = results[(results.task == "building_count") & (results.model == "dummy") & (results.metric == "mae")]
    assert dummy["mean"].item() == pytest.approx(np.mean(np.abs(y_test - np.median(y_train))))


def test_unchanged_inputs_skip_and_failures_keep_the_earlier_results(evaluated):
    w, c, _ = evaluated
    assert evaluate(w, c)["skipped"]
    before = (w / "eval" / "report.md").read_bytes()
    with pytest.raises(GeoJepaError, match="no such checkpoint"):
        evaluate(w, c, checkpoint=w / "checkpoints" / "missing.pt")
    wrong = w / "checkpoints" / "wrong.pt"
    state = torch.load(sorted((w / "checkpoints").glob("step-*.pt"))[-1], weights_only=True)
    for k in [k for k in state["model"] if k.endswith("proj.0.weight")]:
        state["model"][k] = torch.zeros(state["model"][k].shape[0], 7)
    torch.save(state, wrong)
    with pytest.raises(GeoJepaError, match="width 7"):
        evaluate(w, c, checkpoint=wrong)
    wrong.unlink()
    assert (w / "eval" / "report.md").read_bytes() == before
    assert not list(w.glob(".eval.tmp-*"))


def test_no_checkpoint_is_a_clear_error(tmp_path, tokenised, cfg):
    _copy_region(tokenised[0], tmp_path)
    with pytest.raises(GeoJepaError, match="no step-.*checkpoint.*geojepa train"):
        evaluate(tmp_path, cfg)


def test_building_labels_match_an_independent_count_from_entities(tokenised):
    """Label from the tiles' clipped entities == buildings whose original geometry meets the tile's interior."""
    w, _ = tokenised
    ents = gpd.read_parquet(w / "entities.parquet")
    buildings = ents[ents.tags.map(lambda t: dict(t).get("building", "no") != "no")]
    tiles = gpd.read_parquet(w / "tiles.parquet")
    te = read_table(w / "tile_entities.parquet", TILE_ENTITIES, columns=["tile_id", "kind", "tags"]).to_pylist()
    by_tile: dict[str, list] = {}
    for r in te:
        by_tile.setdefault(r["tile_id"], []).append((r["kind"], dict(r["tags"])))
    labels = task_labels(TASKS["building_count"], by_tile, 1.0, 0)
    tree = shapely.STRtree(buildings.geometry.values)
    checked = 0
    for tid, fp in zip(tiles.tile_id, tiles.geometry, strict=True):
        if tid not in labels:
            continue
        hits = buildings.geometry.values[tree.query(fp, predicate="intersects")]
        independent = int(np.sum(~shapely.touches(fp, hits)))
        assert labels[tid] == independent, tid
        checked += 1
    assert checked >= 50 and sum(labels.values()) > 1000


@pytest.mark.parametrize("task", list(TASKS))
def test_label_tags_are_absent_from_masked_task_tiles(tokenised, task):
    w, _ = tokenised
    enc = Encoder(ModelConfig(dims=(384, 64, 0), width=16, depth=1, heads=2, mlp=32))
    data = _load({"tokens": w / "tokens", "tile_entities": w / "tile_entities.parquet",
                     "tag_vocab": w / "tag_vocab.parquet", "tiles": w / "tiles.parquet",
                     "checkpoint": "test"}, ("tags", "geometry"), enc)
    t = TASKS[task]
    items, tags = masked_items(data["items"], data["tags"], t, data["vocab"])
    assert not any(t.defines(k, v) for tile in tags for ent in tile for k, v in ent)
    assert all(len(ent) for tile in tags for ent in tile)  # entities left with no tags are dropped
    for it, tile in zip(items, tags, strict=True):
        assert len(it["tags"]) == len(it["geometry"]) == len(it["epos"]) == len(tile)
        np.testing.assert_allclose(it["tags"], data["vocab"].tag_vectors(tile), rtol=1e-5, atol=1e-5)
    had = sum(any(t.defines(k, v) for ent in tile for k, v in ent) for tile in data["tags"])
    if task == "building_count":
        assert had > 50  # the check above bites


def test_padding_and_batch_neighbours_do_not_change_a_tiles_embedding(tokenised):
    w, _ = tokenised
    table = pq.read_table(sorted((w / "tokens").glob("train-*.parquet"))[0])
    rows = TokenRows(table, ("tags", "geometry"))
    items = [rows.item(i) for i in range(table.num_rows)]
    torch.manual_seed(0)
    enc = Encoder(ModelConfig(dims=(items[0]["tags"].shape[1], items[0]["geometry"].shape[1], 0), width=32, depth=2,
                              heads=4, mlp=64))
    alone = np.stack([embed(enc, [it], ("tags", "geometry"))[0][0] for it in items[:3]])
    for pad in (False, True):
        together, ents = embed(enc, items, ("tags", "geometry"), batch_tiles=len(items), pad_to_max=pad)
        np.testing.assert_allclose(together[:3], alone, atol=2e-5)
        assert [len(e) for e in ents] == [len(it["epos"]) for it in items]


def test_probe_recovers_a_planted_linear_signal():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 24))
    y = x @ rng.normal(size=24) + 0.05 * rng.normal(size=600)
    tr, va, te = np.arange(400), np.arange(400, 500), np.arange(500, 600)
    dummy = np.mean(np.abs(y[te] - np.median(y[tr])))
    for kind in ("linear", "mlp"):
        pred = fit_predict(kind, x[tr], y[tr], x[va], y[va], x[te], seed=0, s=ProbeSettings(max_epochs=200))
        m = metrics("count", y[te], pred)
        assert m["mae"] < 0.25 * dummy and m["r2"] > 0.9, (kind, m)
    noise = rng.normal(size=(600, 24))  # no signal: no better than the median
    pred = fit_predict("linear", noise[tr], y[tr], noise[va], y[va], noise[te], seed=0)
    assert metrics("count", y[te], pred)["mae"] > 0.8 * dummy


def test_binary_metrics_and_speed_parsing():
    m = metrics("binary", np.array([0, 0, 1, 1.0]), np.array([0.1, 0.6, 0.4, 0.9]))
    assert m["accuracy"] == 0.5 and m["roc_auc"] == 0.75
    assert metrics("binary", np.zeros(3), np.zeros(3))["roc_auc"] is None
    assert parse_speed("50") == 50 and parse_speed("30 mph") == 48 and parse_speed("40;60") == 60
    assert parse_speed("RU:urban") is None and parse_speed("none") is None


def test_sparse_tasks_keep_at_most_one_zero_tile_per_positive():
    tiles = {f"t{i}": [("point", {"bridge": "yes"})] if i < 3 else [("point", {"highway": "primary"})]
             for i in range(20)}
    labels = task_labels(TASKS["bridge"], tiles, 1.0, 0)
    assert sum(labels.values()) == 3 and len(labels) == 6
    assert labels == task_labels(TASKS["bridge"], tiles, 1.0, 0)  # seeded


def test_exact_cosine_knn_matches_brute_force():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(500, 16)).astype(np.float32)
    sims, idx = topk_cosine(g[:50], g, 5, exclude=np.arange(50), chunk=7)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    s = gn[:50] @ gn.T
    s[np.arange(50), np.arange(50)] = -np.inf
    np.testing.assert_array_equal(idx, np.argsort(-s, axis=1)[:, :5])
    np.testing.assert_allclose(sims, np.sort(s, axis=1)[:, ::-1][:, :5], rtol=1e-5)
