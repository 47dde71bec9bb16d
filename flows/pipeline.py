"""pipeline: one model over a corpus of regions. build-tiles and cache-tokens mapped over the regions
(concurrently), one frozen tokenizer fitted on the training regions, one training run on all their train
splits, evaluate mapped over every region (holdouts included), then the corpus report; all grouped under one
MLflow parent run. retrain: the same flow under its own name, which its deployment runs on a schedule (a
Geofabrik extract is downloaded again only when it changed; unchanged stages are skipped).

``python -m flows.pipeline`` is the README's demo: ``configs/corpus-demo.yaml``, offline, with Prefect's
temporary local API and MLflow on SQLite; it prints the outputs, the results and the ``mlflow ui`` command.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from data_contracts import EVAL_RESULTS, read_table
from flows.build_tiles import build_tiles
from flows.common import ROOT, RegionBuild, key, link_artifact, outputs_artifact, stage_row
from geojepa.corpus import Corpus, load_corpus, mark_region
from geojepa.evaluate.corpus import corpus_report
from geojepa.evaluate.report import headline
from geojepa.extract.fetch import GEOFABRIK_INDEX
from geojepa.tracking import log_to_run, mask_uri, parent_run, run_link, tracking_uri
from geojepa.workdir import ModelDir, WorkDir
from tasks.stages import config, evaluate, fit_tokenizer, tokens, train

DEMO = ROOT / "configs" / "corpus-demo.yaml"


@task(name="build-region", cache_policy=NO_CACHE)
def build_region(b: RegionBuild, config_path: str | None, overrides: list[str], index_url: str) -> list[dict]:
    """One region's build-tiles flow (its tile partitions stay mapped inside it)."""
    return build_tiles(region=b.region, pbf=b.pbf, imagery=b.imagery, work_dir=b.work_dir, config_path=config_path,
                       overrides=overrides, index_url=index_url)


def run_corpus(c: Corpus, root: Path, config_path: str | None, overrides: list[str], nproc: int,
               index_url: str = GEOFABRIK_INDEX) -> list[dict]:
    cfg = config(config_path, overrides)
    root.mkdir(parents=True, exist_ok=True)
    regions = {r.name: c.work_dir(r, root) for r in c.regions}
    for r in c.regions:
        mark_region(regions[r.name], c, r)
    train_dirs = [str(regions[r.name].path) for r in c.train_regions()]
    tokenizer, model = c.tokenizer_dir(root), c.model_dir(root)
    tags = {"prefect_flow_run": str(flow_run.get_id()), "corpus": c.name, "corpus_file": str(c.path)}
    # The parent run creates the tracking store before any region's stages start (no race on a fresh store).
    with parent_run(model, cfg, f"pipeline {c.name}", tags) as parent:
        ov = [*overrides, *([f"tracking.parent_run_id={parent}"] if parent else [])]
        builds = [RegionBuild.of(c, r, root) for r in c.regions]
        built = build_region.map(builds, unmapped(config_path), unmapped(ov), unmapped(index_url))
        rows = [row for f in built for row in f.result()]

        t0 = time.perf_counter()
        tk = fit_tokenizer(str(tokenizer), train_dirs, config_path, ov)
        rows.append(stage_row(c.name, "tokenizer", tk, f"digest {tk.summary.digest}, {tk.summary.vocab_entries} "
                              f"vocabulary entries, fitted on {', '.join(tk.summary.regions)}", tokenizer,
                              time.perf_counter() - t0))
        t0 = time.perf_counter()
        toks = tokens.map([str(regions[r.name].path) for r in c.regions], unmapped(config_path), unmapped(ov),
                          tokenizer=unmapped(str(tokenizer)))
        for r, f in zip(c.regions, toks, strict=True):
            tk = f.result()
            rows.append(stage_row(r.name, "tokens", tk, f"{tk.summary.tokens:,} tokens in {tk.summary.tiles} tiles",
                                  regions[r.name].tokens, time.perf_counter() - t0))

        t0 = time.perf_counter()
        tr = train(str(model), config_path, ov, nproc=nproc, data=train_dirs)
        rows.append(stage_row(c.name, "train", tr, f"{tr.summary.steps} steps on {', '.join(tr.summary.regions)}, "
                              f"loss {tr.summary.final_loss or 0:.3f}", tr.summary.checkpoint or model,
                              time.perf_counter() - t0))

        t0 = time.perf_counter()
        evals = evaluate.map([str(regions[r.name].path) for r in c.regions], unmapped(config_path), unmapped(ov),
                             model=unmapped(str(model)))
        for r, f in zip(c.regions, evals, strict=True):
            ev, w = f.result(), regions[r.name]
            results = read_table(w.eval.results, EVAL_RESULTS).to_pylist()
            line = f"{r.role}: " + headline(results, ev.summary.tasks)
            rows.append(stage_row(r.name, "evaluate", ev, line, w.eval.report, time.perf_counter() - t0))
            create_markdown_artifact(key=key("evaluation", c.name, r.name), markdown=w.eval.report.read_text(),
                                     description=f"evaluation report of {r.name} ({r.role})")

        pooled = corpus_report([regions[r.name] for r in c.regions], model, c.name)
        folder = ModelDir(model)
        report = folder.corpus_report
        log_to_run(model, cfg, parent, pooled, [report, folder.corpus_results, folder.corpus_comparisons])
        create_markdown_artifact(key=key("corpus-report", c.name), markdown=report.read_text(),
                                 description=f"corpus report of {c.name}")
        rows.append(stage_row(c.name, "report", None, f"{len(pooled) // 2} pooled figures", report, 0.0))
    outputs_artifact(f"pipeline-{c.name}", rows, f"pipeline outputs for corpus {c.name} in {root}")
    if parent:
        uri = mask_uri(tracking_uri(model, cfg.tracking))
        serve = "" if uri.startswith("http") else f" (serve it first: mlflow ui --backend-store-uri {uri})"
        link_artifact(
            f"mlflow-{c.name}", run_link(model, cfg, parent), f"MLflow: pipeline {c.name} and its runs{serve}"
        )
    return rows


@flow(name="pipeline")
def pipeline(corpus: str = str(DEMO), work_root: str = "work", config_path: str | None = None,
             overrides: list[str] | None = None, nproc: int = 1, index_url: str = GEOFABRIK_INDEX) -> list[dict]:
    """Every stage for every region of ``corpus`` (a corpus file) into ``work_root/<region>``; the tokenizer in
    ``work_root/<corpus>-tokenizer``, the model in ``work_root/<corpus>-model``."""
    return run_corpus(load_corpus(corpus), Path(work_root), config_path, list(overrides or []), nproc, index_url)


# The scheduled run (prefect.yaml): the same flow under its own name, so its runs and deployment stand apart.
retrain = pipeline.with_options(
    name="retrain",
    description="The scheduled run: Geofabrik regions are downloaded again when they changed, then every stage; "
    "stages whose inputs did not change are skipped (the tokenizer stays frozen), so an unchanged week costs seconds.")


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default=str(DEMO))
    p.add_argument("--work-root", default=str(ROOT / "work"))
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    p.add_argument("--nproc", type=int, default=1)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow", "urllib3", "httpx", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t0 = time.perf_counter()
    c = load_corpus(a.corpus)
    rows = pipeline(corpus=a.corpus, work_root=a.work_root, config_path=a.config, overrides=a.overrides,
                    nproc=a.nproc)
    console = Console()
    table = Table(title=f"GeoJEPA pipeline, corpus {c.name} ({time.perf_counter() - t0:.0f} s)")
    for col in ("region", "stage", "result", "seconds", "output"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*(str(r[k]) for k in ("region", "stage", "result", "seconds", "output")))
    console.print(table)
    for r in c.regions:
        console.print(f"Report for {r.name} ({r.role}): {WorkDir(Path(a.work_root) / r.name).eval.report}")
    console.print(f"Corpus report: {ModelDir(c.model_dir(a.work_root)).corpus_report}")
    uri = mask_uri(tracking_uri(c.model_dir(a.work_root), config(a.config, a.overrides).tracking))
    console.print(f"Browse the runs: [bold]mlflow ui --backend-store-uri {uri}[/] (then open http://127.0.0.1:5000)")


if __name__ == "__main__":
    main()
