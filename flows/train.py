"""train: torchrun on the token shards (its log streams into this run; a failure carries its last lines)."""

from __future__ import annotations

from prefect import flow

from tasks.stages import train as train_task


@flow(name="train")
def train(work_dir: str, config_path: str | None = None, overrides: list[str] | None = None, nproc: int = 1,
          resume: bool = False, nnodes: int = 1, rdzv_endpoint: str | None = None) -> dict:
    return train_task(work_dir, config_path, overrides, nproc=nproc, resume=resume, nnodes=nnodes,
                      rdzv_endpoint=rdzv_endpoint)
