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

    uri = tracking_uri(work_dir, cfg.tracking)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location)
    mlflow.set_experiment(cfg.tracking.experiment)
    tags = {"stage": stage, "work_dir": str(work_dir.resolve()), "git_revision": git_revision()}
    tags.update({f"input_sha256.{k}": v for k, v in (inputs or {}).items()})
    with mlflow.start_run(run_name=f"{stage} {work_dir.name}", nested=mlflow.active_run() is not None, tags=tags):
        config = cfg.model_dump(mode="json")
        mlflow.log_params(flatten(config[section] if section else config, f"{section}." if section else ""))
        mlflow.log_dict(config, "config.json")
        log.info("MLflow run for %s in %s", stage, uri)
        yield StageRun(mlflow)
