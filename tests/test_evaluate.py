"""Evaluation on the Kotka sample: task labels, masking, embeddings, probes, retrieval, report, bad input; the
streaming pieces (entity scan, masking edits, bag-of-tags counts, stacked probes, chunked kNN) against the
whole-region reference functions they replace."""

from __future__ import annotations

import shutil

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely
import torch

from data_contracts import (
    EVAL_RESULTS,
    TASK_LABELS,
    TILE_ENTITIES,
    TILES,
    TOKENS,
    read_table,
)
from geojepa.config import load_config
from geojepa.encoding.neighbours import topk_cosine, topk_cosine_chunks
from geojepa.encoding.pooling import embed
from geojepa.encoding.shards import pieces_lonlat, tiles_meta, token_index
from geojepa.errors import GeoJepaError
from geojepa.evaluate import evaluate, peers
from geojepa.evaluate.features import unusable
from geojepa.evaluate.labels import TASKS, parse_speed, task_labels
from geojepa.evaluate.masking import (
    bag_of_tags,
    bag_of_tags_counts,
    kept_tag_vectors,
    mask_item,
    masked_items,
)
from geojepa.evaluate.probe import (
    ProbeSettings,
    fit_predict,
    fit_predict_seeds,
    metrics,
    standardise,
)
from geojepa.evaluate.region import scan_entities
from geojepa.evaluate.stage import _vocab
from geojepa.model.jepa import Encoder, ModelConfig
from geojepa.train.data import TokenRows
from geojepa.train.train import train

TINY = {"width": 32, "depth": 2, "heads": 4, "mlp": 64, "pred_width": 16, "pred_depth": 1, "pred_heads": 2,
        "batch_tiles": 8, "epochs": 1, "max_steps": 3, "num_workers": 0, "log_every": 1, "checkpoint_every": 100,
        "keep_last": 1, "modalities": ("tags", "geometry"), "device": "cpu"}
FAST = ["evaluate.seeds=2", "evaluate.max_epochs=40", "evaluate.patience=5", "evaluate.twin_seeds=2",
        "evaluate.gallery_queries=2"]


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
    return w, c, evaluate(w, c).as_dict()


def test_evaluation_writes_results_labels_report_and_geoparquet_embeddings(evaluated):
    w, _, summary = evaluated
    out = w / "eval"
    for name in ("report.md", "gallery_tiles.png", "gallery_tiles.html", "gallery_entities.png", "embedding_map.png",
                 "region_pca.png", "training_curves.png"):
        assert (out / name).stat().st_size > 0, name
    results = read_table(out / "results.parquet", EVAL_RESULTS).to_pylist()
    mae = {(r["model"], r["probe"]): r for r in results
           if r["setting"] == "masked" and r["task"] == "building_count" and r["metric"] == "mae"}
    for model in ("geojepa", "geojepa_context", "untrained", "untrained_1", "tagpool", "bag_of_tags"):
        assert mae[(model, "mlp")]["seeds"] == 2 and mae[(model, "mlp")]["mean"] > 0
        for probe in ("ridge", "knn"):  # closed form: one fit, its chosen setting named
            assert mae[(model, probe)]["seeds"] == 1 and mae[(model, probe)]["params"], (model, probe)
    assert ("dummy", "median") in mae
    assert {r["probe"] for r in results if r["setting"] == "unmasked" and r["model"] != "dummy"} == {"ridge"}
    assert summary["protocol"]["name"] == "v2" and "**Protocol: v2.**" in (out / "report.md").read_text()
    assert summary["tasks"]["building_count"]["choice"]["mode"] == "cv"  # Kotka: fewer than 100 val tiles
    assert summary["pictures"]["embedding_map_umap"] == "embedding_map.png"
    assert summary["tasks"]["traffic_signals"]["skipped"]  # Kotka has no traffic signals: said, not faked
    assert "| geojepa | ridge |" in (out / "report.md").read_text()

    tokens = read_table(w / "tokens", TOKENS, columns=["tile_id", "entity_id"])
    emb = gpd.read_parquet(out / "embeddings.parquet")
    assert emb.crs.to_epsg() == 4326
    tiles = emb[emb.level == "tile"]
    assert sorted(tiles.tile_id) == sorted(tokens["tile_id"].to_pylist())
    assert (emb.level == "entity").sum() == sum(len(e) for e in tokens["entity_id"].to_pylist())
    assert len(tiles.embedding.iloc[0]) == 2 * TINY["width"]  # concat(mean, max)
    assert (tiles.geometry.geom_type == "Polygon").all() and tiles.geometry.is_valid.all()
    assert set(summary["timing"]) == {"loading", "embedding", "peers", "probes", "probes_wall", "retrieval",
                                      "pictures", "writing"}
    # The SRAI peers beside them, probed the same way (or skipped, saying why, without the `peers` extra).
    if peers.missing():
        assert summary["peers"] == {"skipped": peers.missing()}
        return
    assert set(summary["peers"]["fitted"]) == {"count", "contextual_count", "hex2vec", "geovex"}
    for peer in summary["peers"]["fitted"]:
        assert mae[(peer, "mlp")]["seeds"] == 2 and mae[(peer, "mlp")]["mean"] > 0 and (peer, "ridge") in mae
        assert peer in summary["agreement"]
    assert "## Peers (SRAI)" in (out / "report.md").read_text()
    assert set(summary["timing"]["probes"]) == {"building_count"}
    assert "Time:" in (out / "report.md").read_text()


def test_predictions_give_back_the_results_and_the_validation_choice(evaluated):
    """predictions.parquet holds every probe's val and test predictions per seed: the results' test MAE and
    validation MAE are recomputed from it, on the task's own val and test tiles."""
    from data_contracts import PREDICTIONS, TASK_LABELS
    from geojepa.evaluate.report import chosen_encoders

    w, _, _ = evaluated
    results = read_table(w / "eval" / "results.parquet", EVAL_RESULTS).to_pylist()
    pred = read_table(w / "eval" / "predictions.parquet", PREDICTIONS).to_pandas()
    labels = read_table(w / "eval" / "task_labels.parquet", TASK_LABELS).to_pandas()
    lab = labels[labels.task == "building_count"]
    for r in results:
        if r["task"] != "building_count" or r["metric"] != "mae":
            continue
        rows = pred[(pred.setting == r["setting"]) & (pred.task == r["task"]) & (pred.model == r["model"])
                    & (pred.probe == r["probe"])]
        for split, want in (("test", r["mean"]), ("val", r["val_mean"])):
            part = rows[rows.split == split]
            assert sorted(part.tile_id) == sorted(lab[lab.split == split].tile_id)
            p = np.stack(part.pred.to_numpy())  # (tiles, seeds)
            assert p.shape[1] == r["seeds"]
            got = np.mean(np.abs(p - part.label.to_numpy()[:, None]), axis=0).mean()
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6), (r, split)
    chosen = chosen_encoders(results, "ridge")
    val = {r["model"]: r["val_mean"] for r in results if (r["setting"], r["task"], r["probe"], r["metric"])
           == ("masked", "building_count", "ridge", "mae")}
    assert chosen["building_count"] == min(("geojepa", "geojepa_context"), key=val.get)
    assert f"building_count: {chosen['building_count']}" in (w / "eval" / "report.md").read_text()


def test_the_encoder_is_chosen_on_validation_never_on_test():
    from geojepa.evaluate.report import chosen_encoders

    row = {"setting": "masked", "task": "building_count", "probe": "mlp", "metric": "mae"}
    results = [{**row, "model": "geojepa", "mean": 1.0, "val_mean": 5.0},
               {**row, "model": "geojepa_context", "mean": 9.0, "val_mean": 4.0},
               {**row, "model": "tagpool", "mean": 0.1, "val_mean": 0.1}]
    assert chosen_encoders(results) == {"building_count": "geojepa_context"}
    auc = [{**r, "task": "bridge", "metric": "roc_auc", "val_mean": r["val_mean"] / 10} for r in results]
    assert chosen_encoders(auc) == {"bridge": "geojepa"}  # ROC-AUC: higher is better


def test_rendered_images_are_left_out_of_the_masked_setting(tmp_path, tokenised, cfg):
    """Rendered tile images are drawn from the tags the masked setting removes: a model that takes images is
    evaluated there without them (said in the summary and the report); unmasked tiles keep them."""
    src, _ = tokenised
    _copy_region(src, tmp_path)
    train({**cfg.train.model_copy(update={**TINY, "modalities": ("tags", "geometry", "image"), "max_steps": 1})
           .model_dump(mode="json"), "work_dir": str(tmp_path)})
    c = load_config(overrides=["tracking.enabled=false", *FAST, "evaluate.tasks=[building_count]",
                               "evaluate.probes=[linear]", "evaluate.seeds=1", "evaluate.max_epochs=5",
                               "evaluate.pictures=false"])
    summary = evaluate(tmp_path, c).as_dict()
    assert summary["masked_images"] == "left out (rendered from the tags)"
    # evaluate.pictures=false: the figures and tables only, no gallery, map or curves drawn
    assert summary["pictures"] == {} and not list((tmp_path / "eval").glob("*.png"))
    assert (tmp_path / "eval" / "results.parquet").exists()
    assert "None drawn (evaluate.pictures=false" in (tmp_path / "eval" / "report.md").read_text()
    assert "Image tokens in the masked setting: left out" in (tmp_path / "eval" / "report.md").read_text()
    from data_contracts import PREDICTIONS, TILE_IMAGES, write_table

    def preds():
        p = read_table(tmp_path / "eval" / "predictions.parquet", PREDICTIONS).to_pandas()
        p = p[p.model == "geojepa"].sort_values(["setting", "split", "tile_id"])
        return {s: np.stack(g.pred.to_numpy()) for s, g in p.groupby("setting")}

    dropped = preds()
    # The same images said to be real: kept in the masked setting too; the unmasked setting is unchanged.
    images = read_table(tmp_path / "tile_images.parquet", TILE_IMAGES)
    shutil.rmtree(tmp_path / "tile_images.parquet", ignore_errors=True)  # a folder of partition files
    write_table(images.set_column(images.schema.get_field_index("source"), "source",
                                  pa.array(["naip.tif"] * images.num_rows)), tmp_path / "tile_images.parquet",
                TILE_IMAGES)
    kept = evaluate(tmp_path, c, force=True).as_dict()
    assert kept["masked_images"] == "kept (real imagery)"
    np.testing.assert_allclose(preds()["unmasked"], dropped["unmasked"], rtol=1e-5, atol=1e-5)
    assert not np.allclose(preds()["masked"], dropped["masked"])


def test_token_shards_whose_split_differs_from_the_tiles_are_refused_as_stale(evaluated, tmp_path):
    """The split is the tiles': a tile whose token rows carry another split (tokens from before a re-tiling)
    stops the evaluation with the file and a tile named, before anything is written."""
    from data_contracts import write_table

    w, c, _ = evaluated
    _copy_region(w, tmp_path)
    shutil.copytree(w / "checkpoints", tmp_path / "checkpoints")
    tiles = read_table(tmp_path / "tiles.parquet", TILES)
    split = tiles["split"].to_pylist()
    i = split.index("test")
    split[i] = "train"
    write_table(tiles.set_column(tiles.schema.get_field_index("split"), "split", pa.array(split)),
                tmp_path / "tiles.parquet", TILES)
    with pytest.raises(GeoJepaError, match=rf"tiles.parquet: 1 tiles have another split.*{tiles['tile_id'][i]}.*stale"):
        evaluate(tmp_path, c)
    assert not (tmp_path / "eval").exists()


def test_entity_rows_hold_their_piece_in_the_tile_not_the_whole_entity(evaluated):
    """Each entity row's geometry is its tile_entities piece taken to EPSG:4326 (independently, with pyproj),
    inside its tile's footprint; an entity crossing several tiles has a different piece in each."""
    from pyproj import Transformer

    w, _, _ = evaluated
    emb = gpd.read_parquet(w / "eval" / "embeddings.parquet")
    ents = emb[emb.level == "entity"].set_index(["tile_id", "entity_id"])
    foot = emb[emb.level == "tile"].set_index("tile_id").geometry
    tiles = read_table(w / "tiles.parquet", TILES).to_pandas().set_index("tile_id")
    te = read_table(
        w / "tile_entities.parquet", TILE_ENTITIES, columns=["tile_id", "entity_id", "geometry"]
    ).to_pandas()
    te = te[te.tile_id.isin(foot.index)].drop_duplicates(["tile_id", "entity_id"], keep=False)
    to_lonlat = Transformer.from_crs(tiles.crs.iloc[0], "EPSG:4326", always_xy=True)
    for r in te.sample(min(300, len(te)), random_state=0).itertuples():
        t = tiles.loc[r.tile_id]
        piece = shapely.transform(shapely.from_wkb(r.geometry),
                                  lambda c, t=t: np.column_stack(to_lonlat.transform(t.origin_x + c[:, 0] * t.size_m,
                                                                                     t.origin_y + c[:, 1] * t.size_m)))
        got = ents.loc[(r.tile_id, r.entity_id)].geometry
        assert shapely.equals_exact(got, piece, tolerance=1e-9), (r.tile_id, r.entity_id)
        assert foot[r.tile_id].buffer(1e-7).covers(got)
    crossing = te.groupby("entity_id").tile_id.nunique()
    eid = crossing[crossing > 1].index[0]
    pieces = ents.xs(eid, level="entity_id").geometry
    assert len(pieces) > 1 and not pieces.iloc[0].equals(pieces.iloc[1])


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
    assert evaluate(w, c).skipped
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


def test_a_folder_that_is_not_a_tokenised_region_is_named(tmp_path, cfg):
    for bad in (tmp_path / "missing", tmp_path):
        with pytest.raises(GeoJepaError, match=f"{bad}: not a tokenised region .no tokens/ folder"):
            evaluate(bad, cfg, model="models/geojepa-cpu")


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


@pytest.fixture(scope="module")
def region(tokenised):
    """Kotka as the streaming evaluation sees it (token index, entity scan over every task, vocabulary) and as
    the reference functions want it: every tile's items and its entities' (kind, tags), in token order."""
    w, _ = tokenised
    tok = token_index(w / "tokens")
    vocab = _vocab(w / "tag_vocab.parquet")
    scan = scan_entities(w / "tile_entities.parquet", tok, list(TASKS.values()), vocab)
    tables = [pq.read_table(f) for f in tok.shards]
    items = [
        it for t in tables for rows in [TokenRows(t, ("tags", "geometry"))] for it in map(rows.item, range(t.num_rows))
    ]
    te = read_table(w / "tile_entities.parquet", TILE_ENTITIES, columns=["tile_id", "entity_id", "kind", "tags"])
    te = te.sort_by([("tile_id", "ascending"), ("entity_id", "ascending")]).to_pylist()
    ents: dict[str, list] = {}
    for r in te:
        ents.setdefault(r["tile_id"], []).append((r["kind"], list(r["tags"])))
    tiles = [ents[t] for t in tok.ids]
    assert [len(t) for t in tiles] == tok.n_entities.tolist()
    return {"tok": tok, "vocab": vocab, "scan": scan, "items": items, "tiles": tiles}


@pytest.mark.parametrize("task", list(TASKS))
def test_streamed_labels_and_masking_equal_the_reference(region, task):
    """The entity scan's labels are ``Task.label`` of each tile's entities, and the masking edits give the
    items ``masked_items`` gives: label-defining tags gone, entities left without tags dropped, the others
    with the vectors of the tags they keep."""
    t, tok, scan, vocab = TASKS[task], region["tok"], region["scan"], region["vocab"]
    expected = [t.label([(k, dict(tags)) for k, tags in tile]) for tile in region["tiles"]]
    got = scan.raw[task]
    assert [None if np.isnan(v) else v for v in got] == expected
    tags = [[tags for _, tags in tile] for tile in region["tiles"]]
    ref_items, ref_tags = masked_items(region["items"], tags, t, vocab)
    assert not any(t.defines(k, v) for tile in ref_tags for ent in tile for k, v in ent)
    changed = 0
    for i, (item, ref) in enumerate(zip(region["items"], ref_items, strict=True)):
        ed = scan.edits[task].range(tok.ent_off[i], tok.ent_off[i + 1])
        new = mask_item(item, ed.pos - tok.ent_off[i], ed.keep, kept_tag_vectors(vocab.vectors, ed.ptr, ed.rows))
        for m in ("epos", "geometry"):
            np.testing.assert_array_equal(new[m], ref[m])
        np.testing.assert_allclose(new["tags"], ref["tags"], rtol=1e-5, atol=1e-5)
        changed += len(ed.pos) > 0
    assert scan.edits[task].dropped(tok).sum() == sum(len(a) - len(b) for a, b in zip(tags, ref_tags, strict=True))
    if task == "building_count":
        assert changed > 50  # the check above bites


def test_entity_scan_reads_only_what_labels_read(region):
    """An entity without any key its task reads adds nothing to the label (what lets the scan skip it)."""
    for task in TASKS.values():
        for tile in region["tiles"]:
            for kind, tags in tile:
                if not {k for k, _ in tags} & set(task.reads):
                    assert task.value(kind, dict(tags)) in (None, 0.0), (task.name, tags)


@pytest.mark.parametrize("masked", [False, True])
def test_bag_of_tags_from_counts_equals_the_list_version(region, masked):
    tok, scan = region["tok"], region["scan"]
    task = TASKS["building_count"]
    tags = [[tags for _, tags in tile] for tile in region["tiles"]]
    rows = np.arange(0, tok.n, 2)
    fit_on = np.flatnonzero(tok.split[rows] == "train")
    drop = scan.pairs.arrays()["defines"][list(TASKS).index(task.name)] if masked else None
    ref_tags = [[[(k, v) for k, v in e if not (masked and task.defines(k, v))] for e in tags[i]] for i in rows]
    for n_features in (1024, 7):
        want = bag_of_tags(ref_tags, fit_on, n_features)
        got = bag_of_tags_counts(scan.bag, rows, scan.pairs.keys, scan.pairs.values, fit_on, n_features, drop=drop)
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_pieces_are_placed_through_their_tiles_crs_and_origin(tokenised):
    w, _ = tokenised
    tok = token_index(w / "tokens")
    meta = tiles_meta(w / "tiles.parquet", tok)
    square = shapely.to_wkb(shapely.box(0, 0, 1, 1))
    geom, bbox = pieces_lonlat(pa.array([square] * 3, pa.binary()), np.array([0, 1, 2]), meta)
    for i, g in enumerate(shapely.from_wkb(geom.to_numpy(zero_copy_only=False))):
        footprint = shapely.from_wkb(meta["geometry"][i].as_py())
        assert footprint.buffer(1e-7).covers(g) and g.buffer(1e-7).covers(footprint.simplify(1e-9))
        assert bbox[i]["xmin"].as_py() == pytest.approx(g.bounds[0])


def test_padding_and_batch_neighbours_do_not_change_a_tiles_embedding(tokenised):
    w, _ = tokenised
    table = pq.read_table(sorted((w / "tokens").glob("train-*.parquet"))[0])
    rows = TokenRows(table, ("tags", "geometry"))
    items = [rows.item(i) for i in range(table.num_rows)]
    torch.manual_seed(0)
    enc = Encoder(ModelConfig(dims=(items[0]["tags"].shape[1], items[0]["geometry"].shape[1], 0), width=32, depth=2,
                              heads=4, mlp=64))
    alone = np.stack([embed(enc, [it], ("tags", "geometry")).concat()[0] for it in items[:3]])
    for pad in (False, True):
        together = embed(enc, items, ("tags", "geometry"), batch_tiles=len(items), pad_to_max=pad)
        np.testing.assert_allclose(together.concat()[:3], alone, atol=2e-5)
        assert [len(e) for e in together.entities] == [len(it["epos"]) for it in items]


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
        stacked = fit_predict_seeds(kind, [standardise(x, tr)], y, tr, va, te, [0, 1], ProbeSettings(max_epochs=200))
        for p in stacked[0]:
            m = metrics("count", y[te], p)
            assert m["mae"] < 0.25 * dummy and m["r2"] > 0.9, (kind, m)
    noise = rng.normal(size=(600, 24))  # no signal: no better than the median
    pred = fit_predict("linear", noise[tr], y[tr], noise[va], y[va], noise[te], seed=0)
    assert metrics("count", y[te], pred)["mae"] > 0.8 * dummy


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_stacked_probes_are_the_one_probe_fits(kind):
    """Each (feature set, seed) member of a stacked fit starts from the weights, draws the shuffles and stops
    when its one-probe fit does: the same predictions up to the order of floating-point sums. The two
    feature sets stop at different epochs (one is noise), so members leave the stack on their own."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 12)).astype(np.float32)
    noise = rng.normal(size=(300, 12)).astype(np.float32)
    y = np.maximum(0, x @ rng.normal(size=12) + rng.normal(size=300)).round()
    tr, va, te = np.arange(200), np.arange(200, 250), np.arange(250, 300)
    s = ProbeSettings(hidden=32, max_epochs=60, patience=8, batch=64)
    got = fit_predict_seeds(kind, [standardise(x, tr), standardise(noise, tr)], y, tr, va, te, [4, 5], s)
    for f, feats in enumerate((x, noise)):
        for j, seed in enumerate((4, 5)):
            ref = fit_predict(kind, feats[tr], y[tr], feats[va], y[va], feats[te], seed, s)
            np.testing.assert_allclose(got[f, j], ref, atol=1e-3 * np.abs(ref).max())


def test_unusable_tasks_are_named():
    sp = np.array(["train"] * 4 + ["val"] * 2 + ["test"] * 2)
    assert unusable(np.array([3.0] * 4 + [1, 2, 3, 4]), sp) == "every training label is 3"
    assert unusable(np.arange(8.0), np.where(sp == "val", "test", sp)) == "0 val tiles (need 2)"
    assert unusable(np.arange(8.0), sp) is None
    assert unusable(np.zeros(0), sp[:0]) == "no tile has a label for it"
    assert unusable(np.arange(8.0), np.where(sp == "test", "train", sp)) == "0 test tiles (need 2)"


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
    chunks = ((a, g[a : a + 64]) for a in range(0, len(g), 64))  # a gallery read a chunk at a time
    c_sims, c_idx = topk_cosine_chunks(g[:50], chunks, 5, exclude=np.arange(50))
    np.testing.assert_array_equal(c_idx, idx)
    np.testing.assert_allclose(c_sims, sims, rtol=1e-5)


def test_baseline_probes_are_cached_by_content_and_another_model_refits_only_its_own(tmp_path, monkeypatch):
    """probes.score with a cache: a second evaluation with other model features fits only the model's probes
    (every read-out) and gives the baselines' predictions bit for bit; other labels (a changed region) miss."""
    from concurrent.futures import ThreadPoolExecutor

    from geojepa.evaluate import probes, readouts
    from geojepa.evaluate.cache import Cache
    from geojepa.evaluate.protocol import protocol

    rng = np.random.default_rng(0)
    n = 160
    y = rng.integers(0, 30, n).astype(float)
    sp = np.array(["train"] * 100 + ["val"] * 30 + ["test"] * 30)
    groups = np.arange(n) // 4
    base = {"tagpool": rng.normal(size=(n, 6)).astype(np.float32) + y[:, None] / 10,
            "bag_of_tags": rng.poisson(2, size=(n, 9)).astype(np.float32)}
    section = load_config(overrides=["evaluate.seeds=2", "evaluate.max_epochs=5"]).evaluate
    proto = protocol(section)
    fitted = []
    for mod, name in ((probes, "fit_predict_seeds"), (readouts, "ridge"), (readouts, "knn")):
        real = getattr(mod, name)

        def spy(*a, real=real, name=name, **k):
            x = a[1] if name == "fit_predict_seeds" else a[0]
            fitted.append((name, (x[0] if isinstance(x, list) else x).shape[1]))
            return real(*a, **k)

        monkeypatch.setattr(mod, name, spy)
    cache = Cache(tmp_path / "cache")

    def score(labels, geojepa):
        feats = {"geojepa": geojepa, **base}
        pr = probes.TaskProbes(TASKS["building_count"], [("masked", feats, proto.probes, True)], labels, sp, groups,
                               np.array([f"t{i}" for i in range(n)]))
        fitted.clear()
        with ThreadPoolExecutor(2) as pool:
            rows, _, _, choice = probes.score([pr], proto, section, pool, cache)
        assert choice["building_count"]["mode"] == "cv"
        return {(r["model"], r["probe"], r["metric"]): r["mean"] for r in rows}, list(fitted)

    first, fits1 = score(y, rng.normal(size=(n, 4)).astype(np.float32))
    assert {d for _, d in fits1} == {4, 6, 9} and {f for f, _ in fits1} == {"fit_predict_seeds", "ridge", "knn"}
    second, fits2 = score(y, rng.normal(size=(n, 4)).astype(np.float32))
    assert {d for _, d in fits2} == {4} and {f for f, _ in fits2} == {f for f, _ in fits1}  # the rest: cached
    for model in ("tagpool", "bag_of_tags"):
        for probe in proto.probes:
            assert second[model, probe, "mae"] == first[model, probe, "mae"]
    assert second["geojepa", "mlp", "mae"] != first["geojepa", "mlp", "mae"]
    _, fits3 = score(y[::-1].copy(), rng.normal(size=(n, 4)).astype(np.float32))
    assert {d for _, d in fits3} == {4, 6, 9}  # other labels: other keys


@pytest.mark.parametrize("override, says", [
    ("evaluate.protocol=v3", "evaluate.protocol: Input should be 'v2' or 'reference'"),
    ("evaluate.probes=[ridge,svm]", "evaluate.probes.1: Input should be 'ridge', 'mlp', 'knn' or 'linear'"),
    ("evaluate.twin_seeds=0", "evaluate.twin_seeds: Input should be greater than or equal to 1"),
])
def test_a_protocol_or_read_out_that_does_not_exist_is_a_one_line_error(tmp_path, override, says):
    from typer.testing import CliRunner

    from geojepa.cli import app

    out = CliRunner().invoke(app, ["evaluate", str(tmp_path), "--set", override])
    assert out.exit_code == 1 and says in out.output and "Traceback" not in out.output


def test_ridge_is_sklearns_ridge_with_the_penalty_and_target_chosen_on_held_out_tiles():
    from sklearn.linear_model import Ridge

    from geojepa.evaluate import readouts

    rng = np.random.default_rng(4)
    n, d = 300, 12
    x = rng.normal(size=(n, d))
    y = np.round(np.exp(0.6 * x[:, 0] + 0.3 * x[:, 1] + 0.2 * rng.normal(size=n)))  # a count, log-linear
    sp = np.array(["train"] * 150 + ["val"] * 100 + ["test"] * 50)
    plan = readouts.plan(sp, None, min_val=100)
    assert plan.mode == "validation"
    r = readouts.ridge(x, y, "count", plan)
    alpha, target = (part.split("=")[1] for part in r.chosen.split(","))
    assert target == "log1p"  # the log-linear count is fitted better on log1p y
    fit = plan.final
    z = readouts.standardise_clipped(x, fit).astype(np.float64)
    alpha = readouts.ALPHAS[np.argmin(np.abs(np.log(readouts.ALPHAS / float(alpha))))]  # named to 3 digits
    ref = Ridge(alpha=alpha * len(fit)).fit(z[fit], np.log1p(y[fit]))
    want = np.clip(np.expm1(ref.predict(z[plan.test])), y[fit].min(), y[fit].max())
    np.testing.assert_allclose(r.test[0], want, rtol=1e-6, atol=3e-6)
    # the choice: no other penalty or target scores the validation tiles better
    tr, va = np.flatnonzero(sp == "train"), np.flatnonzero(sp == "val")
    zt = readouts.standardise_clipped(x, tr).astype(np.float64)
    for a in readouts.ALPHAS:
        for fwd, back in ((np.log1p, np.expm1), (lambda v: v, lambda v: v)):
            p = back(Ridge(alpha=a * len(tr)).fit(zt[tr], fwd(y[tr])).predict(zt[va]))
            p = np.clip(p, y[tr].min(), y[tr].max())
            assert np.mean(np.abs(p - y[va])) >= r.held_out_score - 1e-9


def test_cross_validation_folds_are_whole_spatial_groups_and_never_test_tiles():
    from geojepa.evaluate import readouts

    sp = np.array((["train"] * 6 + ["val"] * 1 + ["test"] * 3) * 20)
    groups = np.repeat(np.arange(50), 4)
    plan = readouts.plan(sp, groups, min_val=100, folds=5)
    assert plan.mode == "cv" and len(plan.rounds) == 5
    test = set(np.flatnonzero(sp == "test"))
    held = np.concatenate([o for _, o in plan.rounds])
    assert sorted(held) == sorted(plan.final) and not test & set(held)
    for fit, out in plan.rounds:
        assert not set(groups[fit]) & set(groups[out])  # no group on both sides of a fold
    with pytest.raises(ValueError, match="3 spatial groups in train \\+ validation"):
        readouts.plan(sp[:12], groups[:12], min_val=100, folds=5)


def test_a_task_too_small_for_cross_validation_is_a_named_skip(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from geojepa.evaluate import probes
    from geojepa.evaluate.cache import Cache
    from geojepa.evaluate.protocol import protocol

    section = load_config().evaluate
    sp = np.array(["train"] * 8 + ["val"] * 2 + ["test"] * 4)
    pr = probes.TaskProbes(TASKS["bridge"], [("masked", {"tagpool": np.eye(14, 3, dtype=np.float32)},
                                              ("ridge",), True)], np.arange(14.0) % 2, sp, np.zeros(14, int),
                           np.array([f"t{i}" for i in range(14)]))
    with ThreadPoolExecutor(1) as pool:
        rows, _, _, choice = probes.score([pr], protocol(section), section, pool, Cache(None))
    assert rows == [] and "too few tiles to choose read-out settings" in choice["bridge"]["skipped"]
    assert "1 spatial groups" in choice["bridge"]["skipped"]


def test_clipped_features_keep_a_rare_count_from_blowing_up():
    """A count on 2 of 200 training tiles, unrelated to the label: standardised without a bound, a test tile
    where it is common is hundreds of stds out and a plain ridge is far worse than Dummy; clipped at 5, with
    the predictions in the labels' range, the read-out stays near Dummy."""
    from sklearn.linear_model import Ridge

    from geojepa.evaluate import readouts
    from geojepa.evaluate.probe import standardise

    rng = np.random.default_rng(0)
    n = 300
    x = np.zeros((n, 2))
    x[:, 1] = rng.normal(size=n)
    x[[3, 7], 0] = 1.0  # rare on training tiles
    x[250:, 0] = 40.0  # and common, large, on the test tiles
    y = np.abs(rng.normal(10, 3, n))
    sp = np.array(["train"] * 200 + ["val"] * 50 + ["test"] * 50)
    z = readouts.standardise_clipped(x, np.arange(200))
    assert np.abs(z).max() <= readouts.CLIP
    dummy = np.mean(np.abs(y[250:] - np.median(y[:250])))
    plain = standardise(x, np.arange(250))
    blown = Ridge(alpha=1e-3).fit(plain[:250], y[:250]).predict(plain[250:])
    assert np.mean(np.abs(blown - y[250:])) > 3 * dummy  # what the clipping is for
    r = readouts.ridge(x, y, "regression", readouts.plan(sp, np.arange(n) // 4, min_val=100))
    assert np.mean(np.abs(r.test[0] - y[250:])) < 1.5 * dummy


def test_the_reference_protocol_still_runs_and_says_so(evaluated, tmp_path):
    """`evaluate.protocol: reference`: concat(mean, max), linear probes by AdamW, one twin, MAE everywhere."""
    w, _, _ = evaluated
    _copy_region(w, tmp_path)
    shutil.copytree(w / "checkpoints", tmp_path / "checkpoints")
    c = load_config(overrides=["tracking.enabled=false", "evaluate.protocol=reference", "evaluate.probes=[linear]",
                               "evaluate.seeds=1", "evaluate.max_epochs=5", "evaluate.peers=[]",
                               "evaluate.unmasked=false", "evaluate.gallery_queries=2"])
    summary = evaluate(tmp_path, c).as_dict()
    assert summary["protocol"]["name"] == "reference" and summary["protocol"]["pooling"] == "mean_max"
    results = read_table(tmp_path / "eval" / "results.parquet", EVAL_RESULTS).to_pylist()
    models = {r["model"] for r in results}
    assert {"geojepa", "untrained", "tagpool"} <= models and "untrained_1" not in models
    assert {r["probe"] for r in results} == {"linear", "median"}
    assert "**Protocol: reference**" in (tmp_path / "eval" / "report.md").read_text()


def test_another_model_reuses_the_regions_twins_peers_and_baseline_probes(evaluated, tmp_path):
    """A second model of the same architecture on the same region: the twins' vectors, the peers and every
    probe that is not the model's come from the region's cache, with the same numbers; the model's differ."""
    w, c, first = evaluated
    _copy_region(w, tmp_path)
    shutil.copytree(w / ".eval-cache", tmp_path / ".eval-cache")
    ckpt = sorted((w / "checkpoints").glob("step-*.pt"))[-1]
    state = torch.load(ckpt, weights_only=False)
    for k, v in state["model"].items():
        if v.is_floating_point():
            state["model"][k] = v + 0.05 * torch.randn_like(v)
    other = tmp_path / "other" / "checkpoints" / ckpt.name
    other.parent.mkdir(parents=True)
    torch.save(state, other)
    second = evaluate(tmp_path, c, checkpoint=other).as_dict()
    assert second["cache"]["twins_cached"] == ["untrained", "untrained_1"]
    assert second["cache"]["misses"] < second["cache"]["hits"]
    key = ("setting", "task", "model", "probe", "metric")
    rows = [{tuple(r[k] for k in key): r["mean"] for r in read_table(d / "eval" / "results.parquet",
                                                                     EVAL_RESULTS).to_pylist()}
            for d in (w, tmp_path)]
    for k, v in rows[0].items():
        if k[0] == "masked" and k[2] not in ("geojepa", "geojepa_context"):
            assert rows[1][k] == v, k  # bit for bit
    assert rows[1]["masked", "building_count", "geojepa", "ridge", "mae"] != \
        rows[0]["masked", "building_count", "geojepa", "ridge", "mae"]
    if first["peers"].get("fitted"):
        assert second["peers"]["cached"] is True


def test_tiles_are_embedded_in_chunks_of_similar_length_within_a_padding_budget():
    from geojepa.encoding.pooling import chunks

    lengths = np.random.default_rng(0).lognormal(np.log(120), 1.0, 500).astype(int) + 1
    got = chunks(lengths, 64, 4096)
    flat = np.concatenate(got)
    assert sorted(flat.tolist()) == list(range(500))  # every tile once
    assert np.all(np.diff(lengths[flat]) >= 0)  # shortest first
    for c in got:
        assert len(c) <= 64 and (len(c) == 1 or len(c) * lengths[c].max() <= 4096)
    padded = sum(len(c) * lengths[c].max() for c in got)
    before = sum(min(64, 500 - i) * lengths[i : i + 64].max() for i in range(0, 500, 64))
    assert padded < 0.5 * before  # the padding budget's point: far fewer padded slots than consecutive chunks
    assert [len(c) for c in chunks(lengths, 64, None)][:-1] == [64] * 7
