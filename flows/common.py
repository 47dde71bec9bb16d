"""What the flows share: the task runner for partitions, and Prefect artifacts of a run's outputs."""

from __future__ import annotations

import re
from pathlib import Path

from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from geojepa.config import Config

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


def stage_row(region: str, stage: str, summary: dict, result: str, output: Path | str, seconds: float) -> dict:
    """One line of a run's outputs table."""
    skipped = bool(summary.get("skipped"))
    return {"region": region, "stage": stage, "result": "unchanged: skipped" if skipped else result,
            "seconds": round(seconds, 1), "output": _rel(Path(output))}


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
