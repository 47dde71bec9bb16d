"""``geojepa train W``: checks the inputs, writes the resolved config and runs torchrun.

Everything that can be wrong is checked here, before any process starts:
missing or empty token shards, shards of another schema version, modalities
the shards lack, more processes than GPUs. Training itself
(``geojepa.train``) runs as-is under torchrun.
"""

from __future__ import annotations

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
from geojepa.tracking import stage_run

log = logging.getLogger(__name__)


def check_inputs(work_dir: Path, cfg: Config, nproc: int) -> None:
    shards = sorted((work_dir / "tokens").glob("train-*.parquet"))
    if not shards:
        raise GeoJepaError(f"{work_dir / 'tokens'}: no train-*.parquet token shards; run `geojepa tokens {work_dir}`")
    for f in shards:
        open_artifact(f, TOKENS)
        if pq.ParquetFile(f).metadata.num_rows == 0:
            raise GeoJepaError(f"{f}: token shard holds no tiles")
    meta = pq.read_schema(shards[0]).metadata
    for m, key in (("image", b"image_dim"), ("geometry", b"geometry_dim"), ("tags", b"tag_dim")):
        if m in cfg.train.modalities and int(meta.get(key, b"0")) == 0:
            raise GeoJepaError(f"{shards[0]}: train.modalities asks for {m!r}, but the shards have no {m} tokens")
    import torch

    cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise GeoJepaError("train.device=cuda, but no GPU is visible")
    if cuda and nproc > torch.cuda.device_count():
        raise GeoJepaError(f"--nproc {nproc} is larger than the {torch.cuda.device_count()} GPU(s) present")


def train(work_dir: Path | str, cfg: Config, nproc: int = 1, nnodes: int = 1, rdzv_endpoint: str | None = None,
          resume: bool = False, echo: Callable[[str], object] | None = None) -> dict:
    """Run torchrun on ``work_dir``'s shards; each line it prints goes to ``echo`` (default: this module's
    logger), and a non-zero exit raises with the last 40 lines."""
    work_dir = Path(work_dir)
    manifest.recover(work_dir)
    check_inputs(work_dir, cfg, nproc)
    ckpt = work_dir / "checkpoints"
    expected = manifest.expected_manifest("train", {"tokens": work_dir / "tokens"}, cfg.train.model_dump(mode="json"),
                                          manifest.code_version("geojepa.model", "geojepa.train"))
    if not resume and manifest.is_fresh(work_dir, expected):
        log.info("train: %s is up to date with the tokens and config, skipping", ckpt)
        return {**json.loads(manifest.manifest_path(work_dir, "train").read_text())["summary"], "skipped": True}
    ckpt.mkdir(parents=True, exist_ok=True)
    if not resume:
        _set_aside(ckpt)
    with stage_run("train", work_dir, cfg, section="train", inputs=expected["inputs"]) as run:
        resolved = {**cfg.train.model_dump(mode="json"), "work_dir": str(work_dir.resolve()), "resume": resume}
        if cfg.tracking.enabled:
            import mlflow

            resolved.update(tracking_uri=mlflow.get_tracking_uri(), mlflow_run_id=run.run_id,
                            experiment=cfg.tracking.experiment)
        config_path = ckpt / "train_config.json"
        config_path.write_text(json.dumps(resolved, indent=2))
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
        history = json.loads((ckpt / "history.json").read_text())
        last = history[-1] if history else {}
        checkpoints = sorted(ckpt.glob("step-*.pt"))
        run.dict({"history": history}, "train_history.json")
        if cfg.tracking.enabled and checkpoints:
            _register(checkpoints[-1], cfg.tracking.experiment)
    summary = {"steps": last.get("step", 0), "final_loss": last.get("loss"), "checkpoint": str(checkpoints[-1]),
               "mlflow_run_id": run.run_id}
    manifest.write_manifest(work_dir, expected, [f"checkpoints/{checkpoints[-1].name}"], summary=summary)
    return {**summary, "skipped": False}


def _set_aside(ckpt: Path) -> None:
    """A fresh run starts from an empty folder: the previous run's checkpoints move to ``previous/`` (replacing
    the one before), so they are neither lost nor mistaken for this run's."""
    old = [*ckpt.glob("step-*.pt"), ckpt / "history.json"]
    old = [p for p in old if p.exists()]
    if not old:
        return
    previous = ckpt / "previous"
    shutil.rmtree(previous, ignore_errors=True)
    previous.mkdir()
    for p in old:
        p.rename(previous / p.name)
    log.info("train: the previous run's %d file(s) moved to %s", len(old), previous)


def _register(checkpoint: Path, name: str) -> None:
    """Register the final target encoder as an MLflow model (state dict and config as artifacts)."""
    import mlflow

    from geojepa.model.jepa import encoder_from_checkpoint

    encoder, _ = encoder_from_checkpoint(checkpoint)
    mlflow.pytorch.log_model(encoder, name="target_encoder", registered_model_name=f"{name}-encoder",
                             serialization_format="pickle")
