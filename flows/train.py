"""train: torchrun on the regions' train token shards (its log streams into this run; a failure carries its last
lines)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.common import link_artifact, outputs_artifact
from geojepa.lifecycle import StageResult
from geojepa.tracking import run_link
from tasks.stages import config
from tasks.stages import train as train_task


@flow(name="train")
def train(work_dir: str, config_path: str | None = None, overrides: list[str] | None = None, nproc: int = 1,
          resume: bool = False, nnodes: int = 1, rdzv_endpoint: str | None = None,
          data: list[str] | None = None) -> StageResult:
    """One model in ``work_dir`` (the model folder) on the train splits of the ``data`` regions (default: the
    region ``work_dir`` itself)."""
    result = train_task(work_dir, config_path, overrides, nproc=nproc, resume=resume, nnodes=nnodes,
                        rdzv_endpoint=rdzv_endpoint, data=data)
    region = Path(work_dir).name
    outputs_artifact(f"train-{region}", [{**result.summary.figures, "stage": result.stage, "skipped": result.skipped}],
                     f"training in {work_dir}")
    if result.mlflow_run_id:
        link_artifact(f"mlflow-train-{region}", run_link(Path(work_dir), config(config_path, overrides),
                                                          result.mlflow_run_id), "MLflow: the training run")
    return result
