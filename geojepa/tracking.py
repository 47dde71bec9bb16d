"""MLflow tracking for every stage, with an embedded default store.

Default: a SQLite tracking store and an artifact folder beside the work
directories (``W/../mlruns.db``, ``W/../mlartifacts``), so all regions' runs
sit in one store; ``tracking.uri`` in the config, or the ``MLFLOW_TRACKING_URI``
variable (which wins), points elsewhere. mlflow is imported lazily: training
hosts without it still import the library.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from geojepa.config import Config, TrackingConfig

log = logging.getLogger(__name__)


def tracking_uri(work_dir: Path, cfg: TrackingConfig) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if cfg.uri:
        return cfg.uri
    return f"sqlite:///{(work_dir.resolve().parent / 'mlruns.db').as_posix()}"


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


class StageRun:
    """What a stage logs into: metrics, and small files as artifacts. A no-op when tracking is off."""

    def __init__(self, mlflow: Any | None = None):
        self._mlflow = mlflow
        self.run_id = mlflow.active_run().info.run_id if mlflow else None

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        if self._mlflow:
            self._mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def artifact(self, path: Path | str, folder: str | None = None) -> None:
        if self._mlflow:
            self._mlflow.log_artifact(str(path), artifact_path=folder)

    def dict(self, data: dict[str, Any], name: str) -> None:
        if self._mlflow:
            self._mlflow.log_dict(data, name)


@contextlib.contextmanager
def stage_run(stage: str, work_dir: Path, cfg: Config, section: str | None = None,
              inputs: dict[str, str] | None = None) -> Iterator[StageRun]:
    """An MLflow run for one stage on one work directory; nested under an active parent run."""
    if not cfg.tracking.enabled:
        yield StageRun()
        return
    import mlflow  # lazy: absent on training hosts

    uri = _use_store(work_dir, cfg.tracking)
    tags = {"stage": stage, "work_dir": str(work_dir.resolve()), "git_revision": git_revision()}
    tags.update({f"input_sha256.{k}": v for k, v in (inputs or {}).items()})
    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_name=f"{stage} {work_dir.name}", nested=nested, tags=tags,
                          parent_run_id=None if nested else cfg.tracking.parent_run_id):
        config = cfg.model_dump(mode="json")
        mlflow.log_params(flatten(config[section] if section else config, f"{section}." if section else ""))
        mlflow.log_dict(config, "config.json")
        log.info("MLflow run for %s in %s", stage, uri)
        yield StageRun(mlflow)


def _use_store(work_dir: Path, cfg: TrackingConfig) -> str:
    """Point mlflow at the store and experiment (created with an artifact folder beside a SQLite store)."""
    import mlflow

    uri = tracking_uri(work_dir, cfg)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(cfg.experiment) is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(cfg.experiment, artifact_location=location)
    mlflow.set_experiment(cfg.experiment)
    return uri


@contextlib.contextmanager
def parent_run(work_dir: Path, cfg: Config, name: str, tags: dict[str, str] | None = None) -> Iterator[str | None]:
    """An MLflow run that groups one pipeline run's stage runs (pass its id as ``tracking.parent_run_id``);
    FINISHED or FAILED with the block. Yields None when tracking is off."""
    if not cfg.tracking.enabled:
        yield None
        return
    from mlflow import MlflowClient

    uri = _use_store(work_dir, cfg.tracking)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    run = client.create_run(exp.experiment_id, run_name=name,
                            tags={"stage": "pipeline", "git_revision": git_revision(), **(tags or {})})
    status = "FAILED"
    try:
        yield run.info.run_id
        status = "FINISHED"
    finally:
        client.set_terminated(run.info.run_id, status)


def run_link(work_dir: Path, cfg: Config, run_id: str) -> str:
    """The run's page in the MLflow UI (``mlflow ui``/``mlflow server`` on port 5000 unless the store is
    a server)."""
    from mlflow import MlflowClient

    uri = tracking_uri(work_dir, cfg.tracking)
    exp = MlflowClient(uri).get_experiment_by_name(cfg.tracking.experiment)
    base = uri if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base.rstrip('/')}/#/experiments/{exp.experiment_id}/runs/{run_id}"
