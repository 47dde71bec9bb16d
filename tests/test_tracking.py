"""Every stage run lands in a real MLflow store: SQLite beside the work directories by default."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from geojepa import tracking
from geojepa.config import load_config
from geojepa.errors import GeoJepaError
from geojepa.extract import extract
from geojepa.tracking import ensure_store, mask_uri, run_link, stage_run
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
    assert run.data.metrics["entities"] == summary.summary.entities
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


RACE = """
import sys, time
from pathlib import Path
import mlflow  # the slow imports before the start line, so both processes reach the store together
from geojepa.config import load_config
from geojepa.tracking import stage_run
root, name = Path(sys.argv[1]), sys.argv[2]
(root / f"ready-{name}").touch()
while not (root / "go").exists():
    time.sleep(0.005)
with stage_run("extract", root / name, load_config()) as run:
    run.metrics({"entities": 1.0})
"""


def test_stages_started_at_once_on_a_new_store_both_succeed(tmp_path, clean_mlflow):
    """Two regions' stages on an empty work root once killed one with alembic's CommandError."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), name], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for name in ("helsinki", "kotka")]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{n}").exists() for n in ("helsinki", "kotka")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    (tmp_path / "go").touch()
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = mlflow.search_runs(experiment_names=["geojepa"], output_format="list")
    assert sorted(r.info.run_name for r in runs) == ["extract helsinki", "extract kotka"]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_ensure_store_creates_it_once(tmp_path, clean_mlflow):
    cfg = load_config()
    uri = ensure_store(tmp_path / "root" / "a", cfg)
    assert uri == f"sqlite:///{tmp_path / 'root' / 'mlruns.db'}" and (tmp_path / "root" / "mlruns.db").is_file()
    assert ensure_store(tmp_path / "root" / "b", cfg) == uri
    assert (tmp_path / "root" / "mlartifacts").is_dir()
    assert ensure_store(tmp_path / "root" / "a", load_config(overrides=["tracking.enabled=false"])) is None


def test_a_store_that_cannot_be_created_is_named(tmp_path, clean_mlflow):
    """A work root that cannot hold the store (tests run as root, whom chmod does not stop: W's parent is a
    regular file here) once ended in SQLAlchemy's 'unable to open database file' traceback."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(GeoJepaError, match=rf"MLflow store {blocker / 'mlruns.db'}: cannot be created or opened"):
        with stage_run("tile", blocker / "w", load_config()):
            pass
    # A file in the store's place that is no database.
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "mlruns.db").write_text("not a database\n" * 100)
    with pytest.raises(GeoJepaError, match=r"root/mlruns\.db: cannot be created or opened \(.*not a database"):
        ensure_store(tmp_path / "root" / "w", load_config())


@pytest.mark.parametrize("uri,masked", [
    ("http://user:s3cret@mlflow.example:5000", "http://user:***@mlflow.example:5000"),
    ("https://tok3n@mlflow.example/path", "https://***@mlflow.example/path"),
    ("postgresql://geo:p@ss@db:5432/mlflow", "postgresql://geo:***@db:5432/mlflow"),
    ("http://mlflow.example:5000/?token=abc&x=1", "http://mlflow.example:5000/?token=***&x=1"),
    ("sqlite:////tmp/w/mlruns.db", "sqlite:////tmp/w/mlruns.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_mask_uri(uri, masked):
    assert mask_uri(uri) == masked


def test_credentials_never_reach_logs_or_artifacts(tmp_path, clean_mlflow, monkeypatch, caplog):
    secret_uri = "http://alice:s3cret@mlflow.example:5000"
    cfg = load_config(overrides=[f"tracking.uri={secret_uri}"])
    ensure_store(tmp_path / "w", load_config())  # the real store the runs land in
    monkeypatch.setattr(tracking, "_use_store", lambda work_dir, cfg: secret_uri)  # what stage_run logs
    with caplog.at_level(logging.INFO, logger="geojepa.tracking"):
        with stage_run("extract", tmp_path / "w", cfg) as run:
            run_id = run.run_id
    assert "alice:***@mlflow.example" in caplog.text and "s3cret" not in caplog.text
    run = mlflow.get_run(run_id)
    assert "s3cret" not in json.dumps(mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/config.json"))
    assert not [v for v in run.data.params.values() if "s3cret" in v]

    class Client:
        def __init__(self, uri):
            pass

        def get_experiment_by_name(self, name):
            return mlflow.entities.Experiment("7", name, "", "active")

    monkeypatch.setattr(mlflow, "MlflowClient", Client)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri sets it
    assert run_link(tmp_path / "w", cfg, "abc") == "http://mlflow.example:5000/#/experiments/7/runs/abc"
