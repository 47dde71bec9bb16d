"""Which trained model to run: a checkpoint file, a model folder, or a registered MLflow model version; its
checkpoint loaded, and the checks that its tokens match (tokenizer digest, token widths)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from geojepa.config import Config
from geojepa.errors import GeoJepaError
from geojepa.workdir import ModelDir, checkpoints_in

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
        folder = ModelDir(path)
        found = folder.checkpoints() or checkpoints_in(path)
        if not found:
            raise GeoJepaError(f"{path}: a folder without checkpoints (expected {folder.checkpoints_dir}/step-*.pt); "
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


@dataclass(frozen=True)
class Trained:
    """A resolved training checkpoint: where it is, its resolved train config, its tokenizer digest (None: the
    region-own tokenizer of the region it was trained on) and its modalities."""

    checkpoint: Path
    config: dict
    digest: str | None
    modalities: tuple[str, ...]

    def encoder(self, which: str = "target", untrained: bool = False, seed: int = 0):
        from geojepa.model.jepa import encoder_from_checkpoint

        return encoder_from_checkpoint(self.checkpoint, untrained=untrained, seed=seed, which=which)[0]


def load_trained(spec: str | Path, cfg: Config, cache: Path) -> Trained:
    """``resolve_model`` and the checkpoint's config; a damaged or foreign file is a ``GeoJepaError``."""
    from geojepa.model.jepa import load_checkpoint

    ckpt = resolve_model(spec, cfg, cache)
    if not ckpt.is_file():
        raise GeoJepaError(f"{ckpt}: checkpoint not found")
    try:
        config = load_checkpoint(ckpt)["config"]
    except ValueError as e:
        raise GeoJepaError(str(e)) from None
    return Trained(ckpt, config, config.get("tokenizer_digest"), tuple(config["modalities"]))


def _shown(tokens) -> str:
    """A tokens folder as an error names it: a link (an arms or selection view's) with the folder it stands for."""
    p = Path(tokens)
    return f"{p} (a link to {p.resolve()})" if p.is_symlink() else str(p)


def check_tokens(trained: Trained, tokens: Path, made_with: str | None, hint: str) -> None:
    """The token shards in ``tokens`` (made with tokenizer ``made_with``) must be the model's; ``hint``: how to
    make them."""
    if trained.digest != made_with:
        raise GeoJepaError(f"{trained.checkpoint}: the model was trained on tokens of tokenizer "
                           f"{trained.digest or '(region-own)'}, but {_shown(tokens)} were made with "
                           f"{made_with or 'the region-own tokenizer'}; {hint}")


def check_widths(dims: dict[str, int], modalities: tuple[str, ...], encoder, checkpoint, tokens) -> None:
    """The encoder's input widths must be the shards' (``dims``: width per modality)."""
    for i, m in enumerate(("tags", "geometry", "image")):
        want = getattr(encoder.proj[i], "in_features", 0)
        if m in modalities and want != dims[m]:
            raise GeoJepaError(f"{checkpoint}: the encoder takes {m} tokens of width {want}, the shards in "
                               f"{_shown(tokens)} hold width {dims[m]}; use the tokens it was trained on")
