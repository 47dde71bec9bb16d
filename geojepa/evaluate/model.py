"""Which model to evaluate: a checkpoint file, a model folder, or a registered MLflow model version."""

from __future__ import annotations

import logging
from pathlib import Path

from geojepa.config import Config
from geojepa.errors import GeoJepaError
from geojepa.workdir import WorkDir, checkpoints_in

log = logging.getLogger(__name__)


def resolve_model(spec: str | Path, cfg: Config, cache: Path) -> Path:
    """The checkpoint behind ``spec``: a ``step-*.pt`` file; a model folder (``OUT`` with ``checkpoints/``, or a
    folder of ``step-*.pt``: the last); or ``models:/geojepa-encoder/N`` (``/latest`` too), whose checkpoint is
    fetched from the version's training run into ``cache``."""
    text = str(spec)
    if text.startswith("models:/"):
        return _registered(text, cfg, cache)
    path = Path(spec)
    if path.is_file():
        return path
    if path.is_dir():
        found = WorkDir(path).checkpoints() or checkpoints_in(path)
        if not found:
            raise GeoJepaError(f"{path}: a folder without checkpoints (expected {path}/checkpoints/step-*.pt); "
                               f"train one with `geojepa train {path} --data W ...`")
        return found[-1]
    raise GeoJepaError(f"{path}: no such checkpoint or model folder")


def _registered(uri: str, cfg: Config, cache: Path) -> Path:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from geojepa.tracking import tracking_uri

    parts = uri.removeprefix("models:/").strip("/").split("/")
    if len(parts) != 2:
        raise GeoJepaError(f"{uri}: expected models:/<name>/<version> (or /latest)")
    name, version = parts
    client = MlflowClient(tracking_uri(cache, cfg.tracking))
    try:
        if version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise GeoJepaError(f"{uri}: no version of model {name!r} is registered")
            mv = max(versions, key=lambda v: int(v.version))
        else:
            mv = client.get_model_version(name, version)
        target = cache / f"{name}-v{mv.version}"
        found = checkpoints_in(target / "checkpoint") if target.exists() else []
        if not found:
            target.mkdir(parents=True, exist_ok=True)
            client.download_artifacts(mv.run_id, "checkpoint", str(target))
            found = checkpoints_in(target / "checkpoint")
    except MlflowException as e:
        raise GeoJepaError(f"{uri}: {e.message}") from None
    if not found:
        raise GeoJepaError(f"{uri}: version {mv.version}'s run {mv.run_id} logged no checkpoint")
    log.info("evaluate: %s is %s", uri, found[-1])
    return found[-1]
