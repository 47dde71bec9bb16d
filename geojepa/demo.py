"""The README's main job: run the pipeline on the bundled sample regions, offline.

Stages present so far: extraction, tiling with pseudo-aerial imagery rendered
from OSM (synthetic; no aerial imagery of the samples can be had offline), and
tokens (offline MiniLM tag vocabulary, shape encoder trained on the region,
pixel-patch image tokens), a short training run of a small GeoJEPA-GT on
each region's train tiles, and evaluation (probes against baselines where the
region has tiles in every split, retrieval galleries, maps, a report) (the reference's model is 12 x 384 trained 300 epochs
on a GPU; `geojepa train W` runs that with the default config). Each region gets a work directory under ``work/``; all runs go to
one MLflow store at ``work/mlruns.db``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from geojepa.config import Config, load_config
from geojepa.evaluate import evaluate
from geojepa.extract import extract
from geojepa.launch import train
from geojepa.tile import tile
from geojepa.tokens import tokens
from geojepa.tracking import tracking_uri

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples"
log = logging.getLogger(__name__)


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def run_demo(work: Path = ROOT / "work", cfg: Config | None = None) -> list[dict]:
    cfg = cfg or load_config()
    results = []
    for pbf in sorted(SAMPLES.glob("*.osm.pbf")):
        region = pbf.name.removesuffix(".osm.pbf")
        w = work / region
        t0 = time.perf_counter()
        summary = extract(pbf, w, cfg)
        results.append({"region": region, "stage": "extract", "seconds": round(time.perf_counter() - t0, 2),
                        "skipped": summary["skipped"], "result": f"{summary.get('entities', '-')} entities",
                        "output": _rel(w / "entities.parquet")})
        t0 = time.perf_counter()
        summary = tile(w, cfg, imagery="render")
        splits = ", ".join(f"{k.removeprefix('split_')} {v}" for k, v in summary.items() if k.startswith("split_"))
        results.append({"region": region, "stage": "tile", "seconds": round(time.perf_counter() - t0, 2),
                        "skipped": summary["skipped"],
                        "result": f"{summary['tiles']} tiles ({splits})" if not summary["skipped"] else "-",
                        "output": _rel(w / "tiles.parquet")})
        t0 = time.perf_counter()
        summary = tokens(w, cfg)
        results.append({"region": region, "stage": "tokens", "seconds": round(time.perf_counter() - t0, 2),
                        "skipped": summary["skipped"],
                        "result": (f"{summary['tokens']:,} tokens in {summary['tiles']} tiles; vocabulary "
                                   f"{summary['vocab_entries']:,} texts" if not summary["skipped"] else "-"),
                        "output": _rel(w / "tokens")})
        t0 = time.perf_counter()
        summary = train(w, demo_train_config(cfg))
        results.append({"region": region, "stage": "train", "seconds": round(time.perf_counter() - t0, 2),
                        "skipped": summary["skipped"],
                        "result": f"{summary['steps']} steps, loss {summary['final_loss']:.3f}",
                        "output": _rel(Path(summary["checkpoint"]))})
        t0 = time.perf_counter()
        summary = evaluate(w, cfg)
        results.append({"region": region, "stage": "evaluate", "seconds": round(time.perf_counter() - t0, 2),
                        "skipped": summary["skipped"], "result": headline(summary, w),
                        "output": _rel(w / "eval" / "report.md")})
    return results


def headline(summary: dict, w: Path) -> str:
    """The masked building_count MAE of the MLP probes, or why there is none."""
    from data_contracts import EVAL_RESULTS, read_table

    rows = [r for r in read_table(w / "eval" / "results.parquet", EVAL_RESULTS).to_pylist()
            if r["setting"] == "masked" and r["metric"] == "mae" and r["probe"] in ("mlp", "median")]
    tasks = summary["tasks"]
    done = sorted({r["task"] for r in rows})
    if not done:
        return f"probes skipped ({next(iter(tasks.values()))['skipped']}); retrieval and pictures only"
    t = done[0]
    maes = ", ".join(f"{r['model']} {r['mean']:.1f}" for r in rows if r["task"] == t)
    return f"{t} test MAE: {maes}; {len(done)}/{len(tasks)} tasks probed"


def demo_train_config(cfg: Config) -> Config:
    """A model and run small enough for a laptop CPU in seconds."""
    small = {"modalities": ("tags", "geometry"), "width": 64, "depth": 2, "heads": 4, "mlp": 256, "pred_width": 32,
             "pred_depth": 1, "pred_heads": 4, "batch_tiles": 4, "max_steps": 25, "num_workers": 0, "log_every": 5,
             "device": "cpu"}
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=small)})


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    work = ROOT / "work"
    cfg = load_config()
    results = run_demo(work, cfg)
    table = Table(title="GeoJEPA demo (bundled OSM samples)")
    columns = ("region", "stage", "result", "skipped", "seconds", "output")
    for col in columns:
        table.add_column(col, overflow="fold")
    for r in results:
        table.add_row(*(str(r[c]) for c in columns))
    console = Console()
    console.print(table)
    uri = tracking_uri(work / "any", cfg.tracking)
    console.print(f"Browse the runs: [bold]mlflow ui --backend-store-uri {uri}[/] (then open http://127.0.0.1:5000)")


if __name__ == "__main__":
    main()
