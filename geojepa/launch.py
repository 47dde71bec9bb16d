"""``geojepa train OUT --data W1 W2 ...``: checks the inputs, writes the resolved config and runs torchrun.

The resolved config is a ``geojepa.train.settings.TrainRun`` (the ``train`` section as the training code's
own dataclasses, and the run's folders and tracking), written as ``checkpoints/train_config.json``.

Everything that can be wrong is checked here, before any process starts:
missing or empty token shards, shards of another schema version, modalities
the shards lack, more processes than GPUs. Training itself
(``geojepa.train``) runs as-is under torchrun.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq

from data_contracts import TOKENS, open_artifact
from geojepa import manifest
from geojepa.config import Config
from geojepa.errors import GeoJepaError
from geojepa.lifecycle import Lifecycle, StageResult, Summary
from geojepa.train.settings import TrainRun, is_compact
from geojepa.workdir import CheckpointsDir, ModelDir, WorkDir

log = logging.getLogger(__name__)


def check_inputs(regions: list[WorkDir], cfg: Config, nproc: int, nnodes: int = 1) -> str | None:
    """Everything that can be wrong with the inputs, before anything is touched; returns the regions' common
    tokenizer digest (None: one region with its own tokenizer)."""
    if not regions:
        raise GeoJepaError("train: no regions given (--data W1 W2 ...)")
    if compact := [w.path for w in regions if is_compact(w.path)]:
        raise GeoJepaError(f"{compact[0]}: a compact tokens file; `geojepa train` takes regions' work directories. "
                           "Train on it with `torchrun -m geojepa.train CONFIG.json` (\"data\": [the file]; "
                           "bench/gpu_sweep.py writes such configs)")
    names = [w.name for w in regions]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise GeoJepaError(f"train: region(s) {dup} listed twice")
    for w in regions:
        if w.role() == "holdout":
            raise GeoJepaError(f"{w.region_file}: region {w.name!r} is a holdout region; training must never see "
                               "its tiles (evaluate it instead)")
        shards = w.token_shards("train")
        if not shards:
            raise GeoJepaError(f"{w.tokens}: no train-*.parquet token shards; run `geojepa tokens {w.path}`")
        for f in shards:
            open_artifact(f, TOKENS)
            if pq.ParquetFile(f).metadata.num_rows == 0:
                raise GeoJepaError(f"{f}: token shard holds no tiles")
        dims = w.token_dims("train")
        for m in cfg.train.modalities:
            if dims[m] == 0:
                raise GeoJepaError(f"{shards[0]}: train.modalities asks for {m!r}, but the shards have no {m} tokens")
    digests = {w.name: w.tokenizer_digest() for w in regions}
    if len(regions) > 1 and (None in digests.values() or len(set(digests.values())) > 1):
        listing = ", ".join(f"{n}: {d or 'its own tokenizer'}" for n, d in digests.items())
        raise GeoJepaError("train: the regions were not tokenised with one tokenizer (" + listing + "); tokenise "
                           "each with `geojepa tokens W --tokenizer T` using the same T")
    dims = {w.name: {m: w.token_dims("train")[m] for m in cfg.train.modalities} for w in regions}
    if len({json.dumps(d, sort_keys=True) for d in dims.values()}) > 1:
        raise GeoJepaError(f"train: the regions' token widths differ: {dims}")
    world = nproc * nnodes
    if cfg.train.batch_tiles % (world * cfg.train.accumulate):
        raise GeoJepaError(f"train.batch_tiles={cfg.train.batch_tiles} is not divisible by {world} processes x "
                           f"{cfg.train.accumulate} accumulation steps")
    import torch

    cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise GeoJepaError("train.device=cuda, but no GPU is visible")
    if cuda and nproc > torch.cuda.device_count():
        raise GeoJepaError(f"--nproc {nproc} is larger than the {torch.cuda.device_count()} GPU(s) present")
    return next(iter(digests.values()))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSummary(Summary):
    """The train stage's figures the flows read (every other figure: ``figures``): the steps run, the last logged
    loss, the last checkpoint and the regions trained on."""

    steps: int
    final_loss: float | None
    checkpoint: str
    regions: list[str]


def train(out_dir: Path | str, cfg: Config, data: list[Path | str] | None = None, nproc: int = 1, nnodes: int = 1,
          rdzv_endpoint: str | None = None, resume: bool = False,
          echo: Callable[[str], object] | None = None) -> StageResult[TrainSummary]:
    """Run torchrun on the train shards of the ``data`` regions (default: ``out_dir`` itself, one region),
    checkpoints in ``out_dir/checkpoints``; each line torchrun prints goes to ``echo`` (default: this module's
    logger), and a non-zero exit raises with the last 40 lines."""
    out = ModelDir(out_dir)
    regions = [WorkDir(w) for w in (data or [out.path])]
    digest = check_inputs(regions, cfg, nproc, nnodes)
    ckpt = out.checkpoints_dir
    if resume and out.checkpoints():
        from geojepa.model.jepa import load_checkpoint

        try:
            load_checkpoint(out.checkpoints()[-1])
        except ValueError as e:
            log.warning("train: %s; --resume falls back to the last good checkpoint", e)
    inputs = {f"tokens.{w.name}": w.tokens for w in regions}
    life = Lifecycle("train", out.path, cfg, inputs, cfg.train.model_dump(mode="json"),
                     ("geojepa.model", "geojepa.train"), section="train")
    if not resume and (done := life.skipped(kind=TrainSummary)):
        return done
    ckpt.path.mkdir(parents=True, exist_ok=True)
    if not resume:
        _set_aside(ckpt)
    with life.run() as run:
        job = TrainRun(model=cfg.train.as_model_sizes(), settings=cfg.train.as_train_settings(),
                       out_dir=str(out.path.resolve()), data=tuple(str(w.path.resolve()) for w in regions),
                       regions=tuple(w.name for w in regions), tokenizer_digest=digest, resume=resume,
                       corpus=",".join(sorted({w.region().get("corpus", "") for w in regions} - {""})) or None)
        if cfg.tracking.enabled:
            import mlflow

            job = dataclasses.replace(job, tracking_uri=mlflow.get_tracking_uri(), mlflow_run_id=run.run_id,
                                      experiment=cfg.tracking.experiment)
            _log_datasets(regions, digest)
        config_path = ckpt.train_config
        config_path.write_text(json.dumps(job.to_json(), indent=2))
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}"]
        if rdzv_endpoint:
            cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
        else:
            cmd += ["--standalone"]
        cmd += ["-m", "geojepa.train", str(config_path)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        if cfg.train.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        log.info("train: %s", " ".join(cmd))
        tail: deque[str] = deque(maxlen=40)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            tail.append(line.rstrip())
            (echo or log.info)(line.rstrip())
        code = proc.wait()
        if code != 0:
            raise GeoJepaError(f"training failed (torchrun exit {code}); last lines:\n" + "\n".join(tail))
        history = json.loads(ckpt.history.read_text())
        last = history[-1] if history else {}
        checkpoints = out.checkpoints()
        run.dict({"history": history}, "train_history.json")
        version = None
        if cfg.tracking.enabled and checkpoints:
            version = _register(checkpoints[-1], cfg.tracking.experiment, job)
    summary = {"steps": last.get("step", 0), "final_loss": last.get("loss"), "checkpoint": str(checkpoints[-1]),
               "regions": [w.name for w in regions], "tokenizer_digest": digest, "model_version": version}
    return life.publish([checkpoints[-1]], TrainSummary.of(summary))


def _set_aside(ckpt: CheckpointsDir) -> None:
    """A fresh run starts from an empty folder: the previous run's checkpoints move to ``previous/`` (replacing
    the one before), so they are neither lost nor mistaken for this run's."""
    old = [*ckpt.all(), ckpt.history]
    old = [p for p in old if p.exists()]
    if not old:
        return
    previous = ckpt.previous
    shutil.rmtree(previous, ignore_errors=True)
    previous.mkdir()
    for p in old:
        p.rename(previous / p.name)
    log.info("train: the previous run's %d file(s) moved to %s", len(old), previous)


def _log_datasets(regions: list[WorkDir], digest: str | None) -> None:
    """The training data as MLflow inputs: one dataset per region (its train shards: where they are, their
    content digest, tiles and shards as tags, and the tokenizer digest)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for w in regions:
        shards = w.token_shards("train")
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in shards)
        dataset = MetaDataset(resolve_dataset_source(w.tokens.resolve().as_uri()), name=f"{w.name}/tokens/train",
                              digest=manifest.file_sha256(w.tokens)[:16])
        mlflow.log_input(dataset, context="training", tags={"region": w.name, "tokenizer_digest": digest or "",
                                                            "train_tiles": str(rows), "shards": str(len(shards))})


def _register(checkpoint: Path, name: str, job: TrainRun) -> str | None:
    """Register the final target encoder as an MLflow model version, tagged with its corpus, regions, tokenizer
    digest and git revision; the checkpoint itself is logged beside it (``evaluate --model models:/...``)."""
    import mlflow
    from mlflow import MlflowClient

    from geojepa.embeddings.pyfunc import log_embedder
    from geojepa.tracking import git_revision

    mlflow.log_artifact(str(checkpoint), artifact_path="checkpoint")
    info = log_embedder(checkpoint, f"{name}-encoder")
    version = getattr(info, "registered_model_version", None)
    if version is None:
        return None
    client = MlflowClient()
    tags = {"regions": ",".join(job.regions), "tokenizer_digest": job.tokenizer_digest or "",
            "corpus": job.corpus or "", "git_revision": git_revision(), "checkpoint": checkpoint.name,
            "steps": str(json.loads(CheckpointsDir(checkpoint.parent).history.read_text())[-1]["step"])}
    for k, v in tags.items():
        client.set_model_version_tag(f"{name}-encoder", str(version), k, v)
    client.update_model_version(f"{name}-encoder", str(version), description=(
        f"GeoJEPA target encoder ({job.model.width} x {job.model.depth}, modalities "
        f"{'+'.join(job.settings.modalities)}) trained on the train splits of {', '.join(job.regions)}; "
        f"tokenizer {job.tokenizer_digest or '(region-own)'}; checkpoint {checkpoint.name}."))
    return str(version)
