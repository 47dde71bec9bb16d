"""The corpus report: tasks x regions x models, each region's row and the regions pooled.

Reads each region's ``eval/results.parquet`` and ``eval`` summary (its manifest). Pooled MAE is the MAE over
the union of the regions' test tiles (each region's mean MAE weighted by its test tiles); its ± combines the
regions' seed spreads the same way. Rows are split by whether the model saw the region in training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa

from data_contracts import CORPUS_RESULTS, EVAL_RESULTS, atomic_path, read_table, write_table
from geojepa.errors import GeoJepaError
from geojepa.workdir import WorkDir

PROBES = ("mlp", "median")  # the headline probe, and Dummy's rule


def _region_rows(w: WorkDir) -> tuple[list[dict], dict]:
    path = w.eval / "results.parquet"
    if not path.exists():
        raise GeoJepaError(f"{path}: missing; run `geojepa evaluate {w.path} --model ...` first")
    summary = json.loads(w.manifest("evaluate").read_text()).get("summary", {})
    return read_table(path, EVAL_RESULTS).to_pylist(), summary


def pool(rows: list[dict]) -> tuple[float, float, int]:
    """(MAE over the union of the regions' test tiles, its seed spread, test tiles)."""
    n = sum(r["n_test"] for r in rows)
    mean = sum(r["mean"] * r["n_test"] for r in rows) / n
    std = math.sqrt(sum((r["std"] or 0.0) ** 2 * r["n_test"] ** 2 for r in rows)) / n
    return mean, std, n


def corpus_report(regions: list[WorkDir], out: Path, title: str) -> dict:
    """Write ``out/corpus_report.md`` and ``out/corpus_results.parquet``; return the pooled metrics by name
    (``corpus.<group>.masked.<task>.<model>.mlp.mae``, group ``all``, ``trained`` or ``holdout``)."""
    table, seen, notes = [], {}, {}
    for w in regions:
        rows, summary = _region_rows(w)
        seen[w.name] = bool(summary.get("seen_in_training", True))
        notes[w.name] = summary.get("tasks", {})
        for r in rows:
            if r["setting"] == "masked" and r["metric"] == "mae" and r["probe"] in PROBES and r["mean"] is not None:
                table.append({**r, "region": w.name, "seen": seen[w.name]})
    tasks = sorted({r["task"] for r in table})
    models = list(dict.fromkeys(r["model"] for r in table))
    pooled, pooled_rows = {}, []
    lines = [f"# GeoJEPA corpus report: {title}", "",
             "Masked setting (the task's label tags removed), test MAE of the MLP probe (Dummy: the training "
             "median), mean ± std over seeds. *pooled*: the MAE over the union of the regions' test tiles; "
             "*trained on* / *holdout*: whether the model saw the region's train split.", "",
             "| region | role | " + " | ".join(f"tiles ({t})" for t in tasks) + " |",
             "|---|---|" + "---|" * len(tasks)]
    for w in regions:
        counts = [str(notes[w.name].get(t, {}).get("test_tiles", "-")) if not notes[w.name].get(t, {}).get("skipped")
                  else "skipped" for t in tasks]
        lines.append(f"| {w.name} | {'trained on' if seen[w.name] else 'holdout'} | " + " | ".join(counts) + " |")
    for task in tasks:
        lines += ["", f"## {task}", "", "| model | " + " | ".join(
            [w.name for w in regions] + ["pooled: all", "pooled: trained on", "pooled: holdout"]) + " |",
                  "|---|" + "---|" * (len(regions) + 3)]
        for model in models:
            cells, here = [], [r for r in table if r["task"] == task and r["model"] == model]
            if not here:
                continue
            for w in regions:
                r = next((r for r in here if r["region"] == w.name), None)
                cells.append("-" if r is None else f"{r['mean']:.2f} ± {r['std'] or 0:.2f}")
            for group, keep in (("all", lambda r: True), ("trained", lambda r: r["seen"]),
                                ("holdout", lambda r: not r["seen"])):
                sel = [r for r in here if keep(r)]
                if not sel:
                    cells.append("-")
                    continue
                mean, std, n = pool(sel)
                probe = sel[0]["probe"]
                pooled[f"corpus.{group}.masked.{task}.{model}.{probe}.mae"] = mean
                pooled[f"corpus.{group}.masked.{task}.{model}.{probe}.mae_std"] = std
                pooled_rows.append({"group": group, "task": task, "model": model, "probe": probe, "mae": mean,
                                    "std": std, "n_test": n, "regions": len(sel)})
                cells.append(f"**{mean:.2f} ± {std:.2f}** ({len(sel)} regions, {n} tiles)")
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    if not tasks:
        lines += ["", "No task had enough tiles in any region: see each region's report."]
    lines += ["", "Each region's full report: " + ", ".join(f"[{w.name}]({(w.eval / 'report.md').resolve()})"
                                                            for w in regions), ""]
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "corpus_report.md") as tmp:
        tmp.write_text("\n".join(lines))
    write_table(pa.Table.from_pylist(pooled_rows, CORPUS_RESULTS.schema), out / "corpus_results.parquet",
                CORPUS_RESULTS)
    return pooled
