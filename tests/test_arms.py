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


def test_a_spec_without_arms_is_a_clear_error(tmp_path):
    spec = tmp_path / "arms.yaml"
    spec.write_text("steps: 10\nseeds: [0]\n")
    with pytest.raises(GeoJepaError, match="arms.yaml: the arms spec needs data, judge, arms"):
        run_arms(spec, tmp_path / "out", None, [])
