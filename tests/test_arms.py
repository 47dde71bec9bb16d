"""The fast learning loop (geojepa arms) on the Kotka sample: two tiny arms trained and read out through views of
the region, the table written, the region's own evaluation untouched; a bad spec is a one-line error."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from geojepa.arms import run_arms
from geojepa.errors import GeoJepaError

TINY = ["train.width=32", "train.depth=1", "train.heads=4", "train.mlp=64", "train.pred_width=16",
        "train.pred_depth=1", "train.pred_heads=2", "train.batch_tiles=8", "train.num_workers=0",
        "train.log_every=1", "train.checkpoint_every=100", "train.modalities=[tags,geometry]", "train.device=cpu",
        "tracking.enabled=false", "evaluate.tasks=[building_count]", "evaluate.twin_seeds=2", "evaluate.peers=[]"]


@pytest.mark.slow  # two trainings and two evaluations: about a minute on this 2-core machine
def test_two_arms_train_and_are_judged_through_views_of_the_region(tmp_path, tokenised):
    src, _ = tokenised
    w = tmp_path / "kotka"
    w.mkdir()
    for name in ("entities.parquet", "tiles.parquet", "tile_entities.parquet", "tile_images.parquet",
                 "tag_vocab.parquet", "tokens"):
        (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, w / name)
    spec = tmp_path / "arms.yaml"
    spec.write_text(yaml.safe_dump({"steps": 2, "seeds": [0], "data": [str(w)], "judge": [str(w)],
                                    "arms": {"control": [], "target": ["train.regulariser=target"]}}))
    rows = run_arms(spec, tmp_path / "out", None, TINY)
    assert [r["arm"] for r in rows] == ["control", "target"] and all(r["steps"] == 2 for r in rows)
    for r in rows:
        assert r["jepa_gain"] == pytest.approx(r["trivial"] - r["jepa"], abs=1e-6)
        assert 0 < r["within_share"] <= 1 and r["val_mean_cos"] is not None
        c = r["judge"]["kotka/building_count"]
        assert c["metric"] == "mae" and c["value"] > 0 and len(c["twins"]) == 2
    # the twins are the same for both arms (same architecture): the second arm's came from the region's cache
    assert rows[0]["judge"]["kotka/building_count"]["twins"] == rows[1]["judge"]["kotka/building_count"]["twins"]
    assert not (w / "eval").exists()  # each arm evaluated through its own view
    text = (tmp_path / "out" / "arms.md").read_text()
    assert "| control | 0 |" in text and "| target | 0 |" in text and "kotka/building_count" in text
    assert json.loads((tmp_path / "out" / "arms.json").read_text())["rows"][1]["overrides"] == [
        "train.regulariser=target"
    ]
    # the checkpoint to ship, chosen on the region's validation figures through the real read-out
    from geojepa.arms import JUDGE, select_checkpoint
    from geojepa.config import load_config
    from geojepa.workdir import WorkDir

    picked = select_checkpoint(tmp_path / "out" / "control-s0", [WorkDir(w)], tmp_path / "sel",
                               load_config(None, [*TINY, *JUDGE]))
    assert picked["chosen"].name == "step-00000002.pt" and len(picked["rows"]) == 1
    cell = picked["rows"][0]["cells"]["kotka/building_count"]
    assert cell["val"] > 0 and len(cell["twins_val"]) == 2 and cell["encoder"] in ("geojepa", "geojepa_context")
    assert not (w / "eval").exists()  # read out through a view


def test_a_spec_without_arms_is_a_clear_error(tmp_path):
    spec = tmp_path / "arms.yaml"
    spec.write_text("steps: 10\nseeds: [0]\n")
    with pytest.raises(GeoJepaError, match="arms.yaml: the arms spec needs data, judge, arms"):
        run_arms(spec, tmp_path / "out", None, [])
    spec.write_text("steps: 10\nseeds: [0]\ndata: [a]\njudge: [a]\narms: {x: []}\nchoose_on: tests\n")
    with pytest.raises(GeoJepaError, match="choose_on: validation or test, not 'tests'"):
        run_arms(spec, tmp_path / "out", None, [])


def _row(arm, seed, values, gain=0.1, overrides=()):
    return {"arm": arm, "seed": seed, "overrides": list(overrides), "steps": 2, "jepa": 1.0, "trivial": 1.0,
            "jepa_gain": gain, "within_share": 0.9, "val_within_share": 0.9, "val_mean_cos": 0.5,
            "judge": {cell: {"metric": "mae", "value": v, "twins": [2.0, 2.1]} for cell, v in values.items()}}


def test_the_choice_needs_every_seed_better_than_every_twin_and_ranks_the_holdout_first():
    from geojepa.arms import choice

    rows = [_row("a", 0, {"malta/x": 1.0, "holdout/x": 1.0}), _row("a", 1, {"malta/x": 1.0, "holdout/x": 3.0}),
            _row("b", 0, {"malta/x": 3.0, "holdout/x": 1.9}), _row("b", 1, {"malta/x": 3.0, "holdout/x": 1.5}),
            _row("c", 0, {"malta/x": 1.0, "holdout/x": 1.0}, gain=-0.5)]
    ranked = choice(rows, ["holdout", "malta"], "test")
    # b wins the holdout; a's second seed is worse than the twins there; c wins both with its one seed, but a
    # loop cut short ranks an arm with fewer seeds after the complete ones
    assert [a["arm"] for a in ranked] == ["b", "a", "c"] and [a["complete"] for a in ranked] == [True, True, False]
    assert ranked[0]["won"] == ["holdout/x"] and ranked[0]["by_region"] == [1, 0]
    assert ranked[1]["won"] == ["malta/x"]
    assert ranked[0]["gain_share"] == pytest.approx(0.1)
    tie = [_row("p", 0, {"malta/x": 3.0}, gain=0.0), _row("q", 0, {"malta/x": 3.0}, gain=-0.2)]
    assert [a["arm"] for a in choice(tie, ["malta"], "test")] == ["p", "q"]  # a zero gain share is a value
    # by default the rule reads the validation figures: the test figures above decide nothing
    for r, val in zip(rows, (3.0, 3.0, 1.0, 1.5, 1.0), strict=True):
        for c in r["judge"].values():
            c.update(val=val, twins_val=[2.0, 2.1])
    ranked = choice(rows, ["holdout", "malta"])
    assert [a["arm"] for a in ranked][0] == "b" and ranked[0]["won"] == ["holdout/x", "malta/x"]
    assert ranked[1]["arm"] == "a" and ranked[1]["won"] == []
    assert ranked[0]["gain_share"] is None  # on validation: the validation gain share (none in these rows)
    for r in rows:
        r.update(val_jepa_gain=0.3, val_trivial=1.0)
    assert choice(rows, ["holdout", "malta"])[0]["gain_share"] == pytest.approx(0.3)


def test_the_table_chosen_on_validation_gives_the_test_figures_beside(tmp_path):
    from geojepa.arms import _write

    row = _row("a", 0, {"malta/x": 1.0})
    row["judge"]["malta/x"].update(val=3.0, twins_val=[2.0, 2.1])
    spec = {"steps": 2, "seeds": [0], "data": ["malta"], "judge": ["malta"], "arms": {"a": []},
            "choose_on": "validation"}
    _write(tmp_path, spec, {}, [row], {}, ["malta"])
    text = (tmp_path / "arms.md").read_text()
    validation, test = text.split("The same on each region's test tiles")
    assert "| 3.000 (twins 2.000 to 2.100) |" in validation  # not bold: worse than the twins on validation
    assert "**1.000 (twins 2.000 to 2.100)**" in test.split("Choice")[0]
    assert "| 1 | a | 0 | 0 | - | - |" in text  # chosen on validation: no cell won


def test_a_loop_cut_short_keeps_its_finished_rows_and_writes_the_choice(tmp_path):
    regions = [tmp_path / "malta", tmp_path / "holdout"]
    for r in regions:
        (r / "tokens").mkdir(parents=True)
    spec = {"steps": 2, "seeds": [0], "data": [str(regions[0])], "judge": [str(r) for r in regions],
            "arms": {"a": [], "b": ["train.regulariser=target"]}, "choose_on": "test"}
    path = tmp_path / "arms.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    for arm in ("a", "b"):
        (out / f"{arm}-s0" / "checkpoints").mkdir(parents=True)
        (out / f"{arm}-s0" / "checkpoints" / "step-00000002.pt").write_bytes(b"")
    earlier = [_row("a", 0, {"malta/x": 1.0}), _row("b", 0, {"malta/x": 3.0}, overrides=["train.regulariser=target"])]
    base = {"config": None, "overrides": [], "data": ["malta"]}
    (out / "arms.json").write_text(json.dumps({"spec": spec, "base": base, "rows": earlier}))
    rows = run_arms(path, out, None, [])  # nothing trained or evaluated: both rows kept
    assert [r["arm"] for r in rows] == ["a", "b"] and rows[0]["judge"] == earlier[0]["judge"]
    text = (out / "arms.md").read_text()
    assert "| 1 | a | 0 | 0 | 1 |" in text and "malta/x" in text
    assert json.loads((out / "arms.json").read_text())["choice"][0]["arm"] == "a"
    # a changed arm is not kept: its overrides differ, so the loop would train it (here: no tokens, so it fails)
    spec["arms"]["b"] = ["train.regulariser=target", "train.pred_depth=4"]
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(GeoJepaError):  # training fails on the empty tokens folder
        run_arms(path, out, None, [])
    # the finished row is kept, and so is b's old row until b is trained again
    assert [r["arm"] for r in json.loads((out / "arms.json").read_text())["rows"]] == ["a", "b"]
    # another base config (here a global override) keeps no row: a is trained again (and fails here; with its
    # row kept the loop would have kept b's too and finished without training)
    spec["arms"]["b"] = ["train.regulariser=target"]
    path.write_text(yaml.safe_dump(spec))
    run_arms(path, out, None, [])  # the same base again: both kept, nothing trained
    with pytest.raises(GeoJepaError, match="training failed|no train"):
        run_arms(path, out, None, ["train.lr=0.002"])


def _cells(val: float, regions=("malta",)) -> dict:
    cells = {}
    for r in regions:
        cells[f"{r}/building_count"] = {"metric": "mae", "encoder": "geojepa", "value": 9.0, "twins": [9.0],
                                        "val": val, "twins_val": [2.0, 2.2]}
        cells[f"{r}/bridge"] = {"metric": "roc_auc", "encoder": "geojepa", "value": 0.1, "twins": [0.9],
                                "val": 0.8, "twins_val": [0.7, 0.75]}
    return cells


def test_the_checkpoint_is_chosen_on_validation_only_and_a_selection_resumes(tmp_path, monkeypatch):
    import mlflow

    import geojepa.arms as arms
    from geojepa.workdir import WorkDir

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for step in (250, 500, 750, 1000):
        (run / "checkpoints" / f"step-{step:08d}.pt").write_bytes(b"x")
    malta, gozo = WorkDir(tmp_path / "malta"), WorkDir(tmp_path / "gozo")
    for r in (malta, gozo):
        r.tokens.mkdir(parents=True)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = mlflow.MlflowClient(uri)
    train_run = client.create_run(client.create_experiment("geojepa")).info.run_id
    conf = {"mlflow_run_id": train_run, "tracking_uri": uri, "regions": ["malta", "gozo"], "out_dir": str(run)}
    (run / "checkpoints" / "train_config.json").write_text(json.dumps(conf))
    # validation MAE per checkpoint (twins 2.0 and 2.2): 500 and 1000 tie, the earlier is chosen
    val = {"step-00000250.pt": 2.3, "step-00000500.pt": 1.9, "step-00000750.pt": 2.1, "step-00001000.pt": 1.9}
    seen = []

    def judge(model, regions, views, cfg):
        seen.append(model.name)
        return _cells(val[model.name], [r.name for r in regions])  # test figures (value): never read

    monkeypatch.setattr(arms, "judge", judge)
    chosen = arms.select_checkpoint(run, [malta], tmp_path / "views", None, every=2)
    assert seen == ["step-00000500.pt", "step-00001000.pt"]  # every second, the last always among them
    assert chosen["chosen"].name == "step-00000500.pt"
    assert [r["won"] for r in chosen["rows"]] == [2, 2]
    written = json.loads((run / "checkpoints" / "selection.json").read_text())
    assert written["chosen"] == "step-00000500.pt" and [r["step"] for r in written["rows"]] == [500, 1000]
    assert all(set(r["cells"]["malta/building_count"]) == {"metric", "encoder", "val", "twins_val"}
               for r in written["rows"])  # validation figures only
    logged = client.get_metric_history(train_run, "select.val_cells_won")  # the training run's own curves
    assert sorted((m.step, m.value) for m in logged) == [(500, 2), (1000, 2)]
    assert client.get_run(train_run).data.tags["select.chosen"] == "step-00000500.pt"

    seen.clear()
    val["step-00000750.pt"] = 1.5  # the best on validation, read on the rerun with every checkpoint
    chosen = arms.select_checkpoint(run, [malta], tmp_path / "views", None, every=1)
    assert seen == ["step-00000250.pt", "step-00000750.pt"]  # 500 and 1000 read from selection.json
    assert chosen["chosen"].name == "step-00000750.pt"
    logged = client.get_metric_history(train_run, "select.val_cells_won")
    assert sorted(m.step for m in logged) == [250, 500, 750, 1000]  # the rerun logs only what it read

    seen.clear()
    (run / "checkpoints" / "step-00000500.pt").write_bytes(b"xy")  # written again (a resumed training run)
    arms.select_checkpoint(run, [malta], tmp_path / "views", None)
    assert seen == ["step-00000500.pt"]
    seen.clear()
    arms.select_checkpoint(run, [malta, gozo], tmp_path / "views", None)  # other regions: all read again
    assert len(seen) == 4

    copy = tmp_path / "copy"  # a copy of the run folder: its selection is its own, not the original run's
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "selection.json").unlink()
    arms.select_checkpoint(copy, [malta], tmp_path / "views", None)
    assert len(client.get_metric_history(train_run, "select.val_cells_won")) == 9  # 2 + 2 + 1 + 4, then none


def test_a_view_of_another_region_of_the_same_name_is_replaced(tmp_path):
    from geojepa.arms import view
    from geojepa.workdir import WorkDir

    one, two = WorkDir(tmp_path / "a" / "kotka"), WorkDir(tmp_path / "b" / "kotka")
    for r in (one, two):
        r.tokens.mkdir(parents=True)
        (r.path / "tiles.parquet").write_text(str(r.path))
    v = view(one, tmp_path / "views" / "kotka")
    v.eval.path.mkdir()  # an evaluation of the first region's view
    assert (v.path / "tiles.parquet").read_text() == str(one.path)
    v = view(two, tmp_path / "views" / "kotka")
    assert (v.path / "tiles.parquet").read_text() == str(two.path) and not v.eval.path.exists()
    assert (v.path / "tokens").resolve() == two.tokens.resolve()


def test_select_checkpoint_refuses_a_region_the_run_never_trained_on(tmp_path, monkeypatch):
    import geojepa.arms as arms
    from geojepa.workdir import WorkDir

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step-00000010.pt").write_bytes(b"x")
    (run / "checkpoints" / "train_config.json").write_text(json.dumps({"regions": ["malta"]}))
    holdout = WorkDir(tmp_path / "liechtenstein")
    holdout.tokens.mkdir(parents=True)
    monkeypatch.setattr(arms, "judge", lambda *a: pytest.fail("read out before the check"))
    with pytest.raises(GeoJepaError, match="liechtenstein: not among the regions .* trained on"):
        arms.select_checkpoint(run, [holdout], tmp_path / "views", None)


def test_select_checkpoint_without_checkpoints_is_a_clear_error(tmp_path):
    from geojepa.arms import select_checkpoint
    from geojepa.workdir import WorkDir

    with pytest.raises(GeoJepaError, match="nowhere: no such folder"):
        select_checkpoint(tmp_path / "nowhere", [WorkDir(tmp_path)], tmp_path / "views", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(GeoJepaError, match="no step-\\*.pt checkpoint"):
        select_checkpoint(tmp_path / "empty", [WorkDir(tmp_path)], tmp_path / "views", None)


def test_a_tokenizer_mismatch_through_a_view_names_the_region_the_link_stands_for(tmp_path):
    from geojepa.encoding.models import Trained, check_tokens

    region = tmp_path / "malta" / "tokens"
    region.mkdir(parents=True)
    (tmp_path / "view").mkdir()
    (tmp_path / "view" / "tokens").symlink_to(region)
    trained = Trained(tmp_path / "m.pt", {}, "aaa", ("tags",))
    with pytest.raises(GeoJepaError, match=f"view/tokens \\(a link to {region.resolve()}\\) were made with bbb"):
        check_tokens(trained, tmp_path / "view" / "tokens", "bbb", "tokenise it again")
