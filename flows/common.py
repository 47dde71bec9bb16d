"""What the flows share: the task runner for partitions, what build-tiles needs for a corpus region, and Prefect
artifacts of a run's outputs (kept out of the flow scripts, which Prefect loads as plain scripts for deployments:
a dataclass there cannot resolve its annotations)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from geojepa.config import Config
from geojepa.corpus import Corpus, CorpusRegion
from geojepa.lifecycle import StageResult

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples"


def task_runner(cfg: Config):
    """Threads on this machine, or prefect-dask: a running scheduler, else a local cluster of processes."""
    o = cfg.orchestration
    if o.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=cfg.tile.threads)
    from prefect_dask import DaskTaskRunner

    if o.dask_address:
        return DaskTaskRunner(address=o.dask_address)
    # Local workers report their task runs to this flow's API (the temporary local one included).
    from prefect.client.orchestration import get_client

    env = {"PREFECT_API_URL": str(get_client().api_url).rstrip("/")}
    return DaskTaskRunner(cluster_kwargs={"n_workers": o.dask_workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None, "env": env})


@dataclass(frozen=True)
class RegionBuild:
    """What build-tiles needs for one corpus region."""

    region: str  # a Geofabrik region's id (downloaded into its work directory), else the region's name
    pbf: str | None  # a bundled extract or a PBF path; None: downloaded
    imagery: str | list[str] | None
    work_dir: str

    @classmethod
    def of(cls, c: Corpus, r: CorpusRegion, root: Path) -> RegionBuild:
        pbf = c.pbf(r)
        return cls(c.geofabrik_id(r) or r.name, str(pbf) if pbf else None, r.imagery, str(c.work_dir(r, root).path))


def work_dir_for(region: str, work_root: str = "work") -> str:
    """A region's work directory: ``work_root/<region>`` ("europe/monaco" -> "europe-monaco")."""
    return str(Path(work_root) / region.replace("/", "-"))


def key(*parts: str) -> str:
    """An artifact key (lowercase letters, digits and dashes)."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


def outputs_artifact(name: str, rows: list[dict], description: str) -> None:
    create_table_artifact(key=key(name), table=[{k: str(v) for k, v in r.items()} for r in rows],
                          description=description)


def link_artifact(name: str, link: str, text: str) -> None:
    create_link_artifact(key=key(name), link=link, link_text=text)


def stage_row(region: str, stage: str, done: StageResult | None, result: str, output: Path | str,
              seconds: float) -> dict:
    """One line of a run's outputs table: ``result`` unless the stage was skipped (``done``: its result; None for
    a step that is not a stage, such as the corpus report)."""
    skipped = done is not None and done.skipped
    return {"region": region, "stage": stage, "result": "unchanged: skipped" if skipped else result,
            "seconds": round(seconds, 1), "output": _rel(Path(output))}


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
