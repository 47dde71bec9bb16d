"""MLflow tracking for every stage, with an embedded default store.

Default: a SQLite tracking store and an artifact folder beside the work
directories (``W/../mlruns.db``, ``W/../mlartifacts``), so all regions' runs
sit in one store; ``tracking.uri`` in the config, or the ``MLFLOW_TRACKING_URI``
variable (which wins), points elsewhere. mlflow is imported lazily: training
hosts without it still import the library.

A SQLite store is created under a lock file beside it (``mlruns.db.lock``), so
stages started at once on a new store (regions in parallel) do not race on
its creation; ``ensure_store`` does it once up front. URIs are logged and
written with their credentials masked (``mask_uri``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from geojepa.config import Config, TrackingConfig
from geojepa.errors import GeoJepaError

log = logging.getLogger(__name__)


def tracking_uri(work_dir: Path, cfg: TrackingConfig) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if cfg.uri:
        return cfg.uri
    return f"sqlite:///{(work_dir.resolve().parent / 'mlruns.db').as_posix()}"


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)@")
_SECRET_QUERY = re.compile(r"([?&][^=&#]*(?:pass|pwd|token|secret|key|sig|credential|auth)[^=&#]*=)[^&#]*", re.I)


def mask_uri(uri: str | None) -> str | None:
    """``uri`` fit for logs and files: a password in it (``user:password@``), a lone user name (often a
    token) and query values named like secrets (``?password=``, ``token``, ``key``...) become ``***``."""
    if not uri:
        return uri
    m = _USERINFO.match(uri)
    if m:
        user, sep, _ = m.group(2).partition(":")
        uri = f"{m.group(1)}{user + ':***' if sep else '***'}@{uri[m.end():]}"
    return _SECRET_QUERY.sub(r"\1***", uri)


def _without_credentials(uri: str) -> str:
    """``uri`` without its user name and password (for links: the browser asks for them)."""
    m = _USERINFO.match(uri)
    return mask_uri(f"{m.group(1)}{uri[m.end():]}" if m else uri)


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for other stores (or an in-memory database)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock file beside a SQLite store (nothing for other stores): MLflow creates its
    tables and runs its migrations on first connection, and two processes doing that at once fail
    (alembic CommandError, duplicate columns). Names the store when it cannot be created or opened."""
    db = _sqlite_path(uri)
    if db is None:
        yield
        return
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        lock = open(db.with_name(db.name + ".lock"), "a+b")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise _store_error(db, e.strerror or str(e)) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _store_error(db: Path, reason: str) -> GeoJepaError:
    return GeoJepaError(f"MLflow store {db}: cannot be created or opened ({reason}); point tracking.uri or "
                        f"MLFLOW_TRACKING_URI at a writable place, or turn tracking off with "
                        f"--set tracking.enabled=false")


def ensure_store(work_dir: Path, cfg: Config | TrackingConfig) -> str | None:
    """Create (once, safely under concurrency) and open the tracking store and experiment for ``work_dir``;
    returns its URI, or None when tracking is off. Call it before starting stages in parallel."""
    tracking = cfg.tracking if isinstance(cfg, Config) else cfg
    if not tracking.enabled:
        return None
    return _use_store(Path(work_dir), tracking)


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
        config["tracking"]["uri"] = mask_uri(config["tracking"]["uri"])
        mlflow.log_params(flatten(config[section] if section else config, f"{section}." if section else ""))
        mlflow.log_dict(config, "config.json")
        log.info("MLflow run for %s in %s", stage, mask_uri(uri))
        yield StageRun(mlflow)


def _use_store(work_dir: Path, cfg: TrackingConfig) -> str:
    """Point mlflow at the store and experiment (created with an artifact folder beside a SQLite store)."""
    import mlflow

    uri = tracking_uri(work_dir, cfg)
    db = _sqlite_path(uri)
    user_env = os.environ.get("MLFLOW_TRACKING_URI")
    with _store_lock(uri):
        try:
            mlflow.set_tracking_uri(uri)
            # mlflow also exports the URI as MLFLOW_TRACKING_URI, which tracking_uri() would then take for the
            # user's choice: the next work directory in this process (another root) would land in this store.
            if user_env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = user_env
            if mlflow.get_experiment_by_name(cfg.experiment) is None:
                location = None
                if db is not None:
                    artifacts = (db.parent / "mlartifacts").resolve()
                    artifacts.mkdir(parents=True, exist_ok=True)
                    location = artifacts.as_uri()
                mlflow.create_experiment(cfg.experiment, artifact_location=location)
            mlflow.set_experiment(cfg.experiment)
        except Exception as e:
            if db is None or isinstance(e, GeoJepaError):
                raise
            reason = e.strerror if isinstance(e, OSError) else str(getattr(e, "orig", None) or e).splitlines()[0]
            raise _store_error(db, reason) from None
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
    base = _without_credentials(uri) if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base.rstrip('/')}/#/experiments/{exp.experiment_id}/runs/{run_id}"


def record_skip(stage: str, work_dir: Path, cfg: Config, made_by: str | None) -> None:
    """Under a pipeline's parent run, a finished run saying the stage was skipped, linking to the run that made
    its artifacts, so the parent always shows its whole pipeline. Nothing outside a pipeline."""
    if not cfg.tracking.enabled or not cfg.tracking.parent_run_id:
        return
    from mlflow import MlflowClient

    uri = _use_store(work_dir, cfg.tracking)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    note = (f"Inputs, config and code unchanged since run {made_by}, which made the artifacts: skipped."
            if made_by else "Inputs, config and code unchanged: skipped (the run that made the artifacts is unknown).")
    run = client.create_run(exp.experiment_id, run_name=f"{stage} {work_dir.name} (skipped)", tags={
        "mlflow.parentRunId": cfg.tracking.parent_run_id, "stage": stage, "skipped": "true",
        "made_by_run": made_by or "", "work_dir": str(work_dir.resolve()), "mlflow.note.content": note})
    client.set_terminated(run.info.run_id, "FINISHED")


def log_to_run(work_dir: Path, cfg: Config, run_id: str | None, metrics: dict[str, float],
               files: list[Path]) -> None:
    """Metrics and files into an existing run (a pipeline's parent run: the corpus-level results)."""
    if not cfg.tracking.enabled or not run_id:
        return
    from mlflow import MlflowClient

    client = MlflowClient(_use_store(work_dir, cfg.tracking))
    for name, value in metrics.items():
        client.log_metric(run_id, name, float(value))
    for f in files:
        client.log_artifact(run_id, str(f))
