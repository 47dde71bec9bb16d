"""One ``@task`` per stage. Each loads the config from its path and overrides (plain strings, so deployments
and Dask workers can carry them), calls the stage, logs whether it ran or was skipped (manifests) and returns
its ``StageResult``. ``cut_partition`` is the exception: the tile stage hands it a ``geojepa.tile.PartitionJob``
(a picklable value: the region's plan, the settings and the staging folders, no closure), run once per partition,
on a Dask worker too.

Bad input (``GeoJepaError``, ``ContractError``) is never retried; network steps retry with backoff.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from data_contracts import ContractError
from geojepa.config import Config, load_config
from geojepa.errors import GeoJepaError, TransientError
from geojepa.lifecycle import StageResult

if TYPE_CHECKING:
    from geojepa.tile.stage import Cut, PartitionJob


def config(path: str | None, overrides: list[str] | None) -> Config:
    return load_config(path, overrides or [])


def _retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry failures that may pass on a second try (network, services, a lost worker), never bad input."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, TransientError) or not isinstance(error, GeoJepaError | ContractError)


def log_outcome(stage: str, result: StageResult) -> StageResult:
    logger = get_run_logger()
    if result.skipped:
        logger.info("%s: inputs, config and code unchanged since the last run: skipped", stage)
    else:
        logger.info("%s: done: %s", stage, {k: v for k, v in result.as_dict().items()
                                             if isinstance(v, int | float | str) and k != "skipped"})
    return result


@task(name="fetch-osm", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=30),
      retry_condition_fn=_retry_unless_bad_input)
def fetch_osm(region: str, work_dir: str, index_url: str) -> str:
    from geojepa.extract.fetch import fetch_region

    return str(fetch_region(region, work_dir, index_url=index_url))


@task(name="extract", cache_policy=NO_CACHE)
def extract(pbf: str, work_dir: str, config_path: str | None, overrides: list[str] | None) -> StageResult:
    from geojepa.extract import extract as run

    return log_outcome("extract", run(Path(pbf), Path(work_dir), config(config_path, overrides)))


@task(name="cut-partition", cache_policy=NO_CACHE, retries=1, retry_condition_fn=_retry_unless_bad_input)
def cut_partition(job: PartitionJob, part: tuple[int, int]) -> Cut:
    """One tile partition: the tile stage's ``job`` cuts it and writes its shards."""
    return job(part)


@task(name="tokens", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=30),
      retry_condition_fn=_retry_unless_bad_input)
def tokens(work_dir: str, config_path: str | None, overrides: list[str] | None, train_geometry: bool = False,
           tokenizer: str | None = None) -> StageResult:
    """Tokens (the Voyage API, when used, retries per request too; embedded texts are kept between tries)."""
    from geojepa.tokens import tokens as run

    return log_outcome("tokens", run(Path(work_dir), config(config_path, overrides), train_geometry=train_geometry,
                                     tokenizer=tokenizer))


@task(
    name="fit-tokenizer",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=30),
    retry_condition_fn=_retry_unless_bad_input,
)
def fit_tokenizer(folder: str, work_dirs: list[str], config_path: str | None,
                  overrides: list[str] | None) -> StageResult:
    """The corpus's frozen tokenizer (kept as it is when it exists)."""
    from geojepa.tokens.tokenizer import fit

    return log_outcome("tokenizer", fit(Path(folder), [Path(w) for w in work_dirs], config(config_path, overrides)))


@task(name="train", cache_policy=NO_CACHE)
def train(work_dir: str, config_path: str | None, overrides: list[str] | None, nproc: int = 1, resume: bool = False,
          nnodes: int = 1, rdzv_endpoint: str | None = None, data: list[str] | None = None) -> StageResult:
    """torchrun in a subprocess; its output streams into this task's log, a failure carries its last lines.
    ``work_dir`` is the model folder; ``data`` the regions (default: ``work_dir`` alone)."""
    from geojepa.launch import train as run

    logger = get_run_logger()
    result = run(Path(work_dir), config(config_path, overrides), data=data, nproc=nproc, nnodes=nnodes,
                 rdzv_endpoint=rdzv_endpoint, resume=resume, echo=logger.info)
    return log_outcome("train", result)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(work_dir: str, config_path: str | None, overrides: list[str] | None,
             checkpoint: str | None = None, model: str | None = None) -> StageResult:
    from geojepa.evaluate import evaluate as run

    return log_outcome("evaluate", run(Path(work_dir), config(config_path, overrides), checkpoint=checkpoint,
                                       model=model))
