"""pipeline: build-tiles, cache-tokens, train and evaluate for each region, grouped under one MLflow run per
region; retrain: the same on a schedule, refreshing a Geofabrik extract first.

``python -m flows.pipeline`` is the README's demo: both bundled samples, offline, with Prefect's temporary
local API and MLflow on SQLite; it prints the outputs, the results and the ``mlflow ui`` command.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from data_contracts import EVAL_RESULTS, read_table
from flows.build_tiles import GEOFABRIK_INDEX, build_tiles
from flows.cache_tokens import cache_tokens
from flows.common import ROOT, SAMPLES, link_artifact, outputs_artifact, stage_row, work_dir_for
from flows.evaluate import evaluate
from flows.train import train
from geojepa.evaluate.report import headline
from geojepa.tracking import parent_run, run_link, tracking_uri
from tasks.stages import config


def run_region(region: str, work_dir: str, pbf: str | None, imagery, config_path: str | None,
               overrides: list[str], nproc: int) -> list[dict]:
    cfg = config(config_path, overrides)
    w = Path(work_dir)
    with parent_run(w, cfg, f"pipeline {region}", {"prefect_flow_run": str(flow_run.get_id())}) as parent:
        ov = [*overrides, *([f"tracking.parent_run_id={parent}"] if parent else [])]
        rows = build_tiles(region=region, pbf=pbf, imagery=imagery, work_dir=work_dir, config_path=config_path,
                           overrides=ov)
        t0 = time.perf_counter()
        tk = cache_tokens(work_dir, config_path, ov)
        rows.append(stage_row(region, "tokens", tk, f"{tk.get('tokens', 0):,} tokens in {tk.get('tiles')} tiles",
                              w / "tokens", time.perf_counter() - t0))
        t0 = time.perf_counter()
        tr = train(work_dir, config_path, ov, nproc=nproc)
        rows.append(stage_row(region, "train", tr, f"{tr.get('steps')} steps, loss {tr.get('final_loss') or 0:.3f}",
                              tr.get("checkpoint", w / "checkpoints"), time.perf_counter() - t0))
        t0 = time.perf_counter()
        ev = evaluate(work_dir, config_path, ov)
        results = read_table(w / "eval" / "results.parquet", EVAL_RESULTS).to_pylist()
        line = ("unchanged: " if ev.get("skipped") else "") + headline(results, ev["tasks"])  # skipped or not
        rows.append(stage_row(region, "evaluate", {}, line, w / "eval" / "report.md", time.perf_counter() - t0))
    outputs_artifact(f"pipeline-{region}", rows, f"pipeline outputs for {region} in {work_dir}")
    if parent:
        link_artifact(f"mlflow-{region}", run_link(w, cfg, parent), f"MLflow: pipeline {region} and its stage runs")
    return rows


@flow(name="pipeline")
def pipeline(regions: list[str] = ["helsinki", "kotka"], work_root: str = "work",  # noqa: B006 (Prefect parameter)
             imagery: str | list[str] | None = "render", config_path: str | None = None,
             overrides: list[str] | None = None, nproc: int = 1) -> list[dict]:
    """Every stage for each region (a bundled sample or a Geofabrik region) into ``work_root/<region>``."""
    rows = []
    for region in regions:
        rows += run_region(region, work_dir_for(region, work_root), None, imagery, config_path,
                           list(overrides or []), nproc)
    return rows


@flow(name="retrain")
def retrain(region: str = "kotka", work_root: str = "work", imagery: str | list[str] | None = "render",
            config_path: str | None = None, overrides: list[str] | None = None, nproc: int = 1,
            index_url: str = GEOFABRIK_INDEX) -> list[dict]:
    """The scheduled run: the latest extract (Geofabrik regions are re-downloaded when they changed), then
    every stage; stages whose inputs did not change are skipped, so an unchanged week costs seconds."""
    w = work_dir_for(region, work_root)
    pbf = None
    if not (SAMPLES / f"{region}.osm.pbf").exists():
        from tasks.stages import fetch_osm

        pbf = fetch_osm(region, w, index_url)
    return run_region(region, w, pbf, imagery, config_path, list(overrides or []), nproc)


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--regions", nargs="+", default=sorted(f.name.removesuffix(".osm.pbf")
                                                         for f in SAMPLES.glob("*.osm.pbf")))
    p.add_argument("--work-root", default=str(ROOT / "work"))
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow", "urllib3", "httpx", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t0 = time.perf_counter()
    rows = pipeline(regions=a.regions, work_root=a.work_root, config_path=a.config, overrides=a.overrides)
    console = Console()
    table = Table(title=f"GeoJEPA pipeline ({time.perf_counter() - t0:.0f} s)")
    for col in ("region", "stage", "result", "seconds", "output"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*(str(r[c]) for c in ("region", "stage", "result", "seconds", "output")))
    console.print(table)
    for region in a.regions:
        console.print(f"Report for {region}: {Path(work_dir_for(region, a.work_root)) / 'eval' / 'report.md'}")
    uri = tracking_uri(Path(a.work_root) / "any", config(a.config, a.overrides).tracking)
    console.print(f"Browse the runs: [bold]mlflow ui --backend-store-uri {uri}[/] (then open http://127.0.0.1:5000)")


if __name__ == "__main__":
    main()
