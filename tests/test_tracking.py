"""Every stage run lands in a real MLflow store: SQLite beside the work directories by default."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from geojepa.config import load_config
from geojepa.extract import extract
from tests.conftest import KOTKA


@pytest.fixture()
def clean_mlflow(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow.set_tracking_uri(None)


def test_extract_logs_params_metrics_and_artifacts(tmp_path, clean_mlflow):
    w = tmp_path / "kotka"
    summary = extract(KOTKA, w, load_config())
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["geojepa"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "extract"
    assert run.data.tags["input_sha256.pbf"] and run.data.tags["git_revision"]
    assert run.data.params["extract.read_block_mb"] == "4"
    assert run.data.metrics["entities"] == summary["entities"]
    assert run.data.metrics["seconds"] > 0
    local = Path(run.info.artifact_uri.removeprefix("file://"))
    assert local.is_relative_to(tmp_path / "mlartifacts")
    assert {p.name for p in local.iterdir()} >= {"config.json", "extract_summary.json"}


def test_failed_stage_is_marked_failed(tmp_path, clean_mlflow):
    cut = tmp_path / "cut.osm.pbf"
    cut.write_bytes(KOTKA.read_bytes()[:60_000])
    with pytest.raises(ValueError, match="truncated"):
        extract(cut, tmp_path / "w", load_config())
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = mlflow.search_runs(experiment_names=["geojepa"], output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_environment_variable_wins(tmp_path, monkeypatch, clean_mlflow):
    other = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    extract(KOTKA, tmp_path / "w", load_config())
    assert other.exists() and not (tmp_path / "mlruns.db").exists()
