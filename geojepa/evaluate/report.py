"""The evaluation report: one Markdown page with the results table, the task notes and the pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np

METRICS = ("mae", "r2", "accuracy", "roc_auc")


def _cell(r: dict | None) -> str:
    if r is None or r["mean"] is None:
        return "-"
    return f"{r['mean']:.3f}" + (f" ± {r['std']:.3f}" if r["seeds"] > 1 else "")


ENCODERS = ("geojepa", "geojepa_context")  # the trained model's EMA target and context encoders


def chosen_encoders(results: list[dict], probe: str = "mlp") -> dict[str, str]:
    """Per task, the trained encoder behind the headline: the one with the lower masked *validation* MAE of
    the ``probe`` (never chosen on the test split). Pooled over regions by ``geojepa.evaluate.corpus``."""
    best: dict[str, tuple[float, str]] = {}
    for r in results:
        if (r["setting"], r["probe"], r["metric"]) == ("masked", probe, "mae") and r["model"] in ENCODERS \
                and r.get("val_mean") is not None and r["val_mean"] < best.get(r["task"], (np.inf, ""))[0]:
            best[r["task"]] = (r["val_mean"], r["model"])
    return {t: m for t, (_, m) in sorted(best.items())}


def results_markdown(results: list[dict]) -> str:
    """One table per (setting, task): rows (model, probe), columns the metrics, test split, mean ± std over seeds,
    and the validation MAE (what the encoder is chosen on)."""
    out = []
    keys = sorted({(r["setting"], r["task"]) for r in results}, key=lambda k: (k[0] != "masked", k[1]))
    for setting, task in keys:
        rows = [r for r in results if r["setting"] == setting and r["task"] == task]
        metrics = [m for m in METRICS if any(r["metric"] == m for r in rows)]
        first = rows[0]
        out.append(f"### {task} ({setting}; {first['n_train']} train / {first['n_test']} test tiles)\n")
        out.append("| model | probe | " + " | ".join(metrics) + " | val mae |")
        out.append("|---|---|" + "---|" * (len(metrics) + 1))
        for model, probe in dict.fromkeys((r["model"], r["probe"]) for r in rows):
            cells = {r["metric"]: r for r in rows if r["model"] == model and r["probe"] == probe}
            val = cells.get("mae", {}).get("val_mean")
            out.append(f"| {model} | {probe} | " + " | ".join(_cell(cells.get(m)) for m in metrics)
                       + f" | {'-' if val is None else f'{val:.3f}'} |")
        out.append("")
    return "\n".join(out)


def _timing(timing: dict | None) -> list[str]:
    """The time split: one line, then a blank one (none without a split)."""
    if not timing:
        return []
    parts = []
    for k, v in timing.items():
        if isinstance(v, dict):
            parts.append(f"probes {sum(v.values()):.1f} s (" + ", ".join(f"{t} {s:.1f}" for t, s in v.items()) + ")"
                         if v else "probes 0 s")
        else:
            parts.append(f"{k} {v:.1f} s")
    return ["Time: " + "; ".join(parts) + ".", ""]


def _peers(notes: dict | None) -> list[str]:
    """The SRAI peers' section: what they are, each one's width, time and memory, or why they were skipped."""
    if not notes:
        return []
    lines = ["## Peers (SRAI)", ""]
    if notes.get("skipped"):
        return lines + [f"Skipped: {notes['skipped']}.", ""]
    lines += [f"SRAI {notes['srai']}'s embedders on this region's tiles: *count* (tag counts), *contextual_count* "
              "(with the neighbours' counts), *hex2vec* (a skip-gram over tile adjacency), *geovex* (a hexagonal "
              f"convolutional autoencoder, run on the square grid), counting the {notes['features']} key=value "
              f"pairs found on the most training tiles (at most {notes.get('feature_cap', '-')}); hex2vec and "
              f"geovex trained on this region's {notes['fitted_on_tiles']} training tiles (so, unlike GeoJEPA on a "
              "holdout region, they have seen the region). In the masked setting they see the same tags removed; "
              "they are probed in the masked setting only. Time: seconds on this machine, embedding = all passes "
              "(unmasked and each masked one); peak: the largest resident-memory (RSS) rise in a fit or pass.",
              "", "| peer | width | fit s | embedding s | peak RSS rise MB |", "|---|---|---|---|---|"]
    lines += [f"| {p} | {st['dim']} | {st['fit_seconds']:.1f} | {st['embed_seconds']:.1f} | {st['peak_mb']:.0f} |"
              for p, st in notes["fitted"].items()]
    return lines + [""]


def write_report(path: Path, results: list[dict], summary: dict, region: str) -> None:
    lines = [f"# GeoJEPA evaluation: {region}", "",
             f"Checkpoint `{summary['checkpoint']}`; {summary['tiles']} tiles, {summary['entities']} entity "
             f"embeddings; {summary['seconds']} s.", "", *_timing(summary.get("timing")),
             f"**Region {region}: {summary.get('role', 'trained on')}.** Tokenizer "
             f"`{summary.get('tokenizer_digest') or 'region-own'}`.", "",
             "*masked*: the task's label-defining tags were removed from every entity of its tiles before "
             "embedding (entities left without tags removed). *unmasked*: the original tiles, for reference only. "
             "Probes: mean ± std over seeds on the test split; *knn*: mean label of the k nearest training tiles; "
             "*untrained*: the same architecture at random initialisation. *geojepa* is the trained EMA target "
             "encoder, *geojepa_context* the trained context encoder; the headline takes, per task, the one with "
             "the lower masked validation MAE: "
             + (", ".join(f"{t}: {m}" for t, m in chosen_encoders(results).items()) or "none probed") + ".",
             *(["", f"Image tokens in the masked setting: {summary['masked_images']}."]
               if summary.get("masked_images") else []), "", "## Tasks", "",
             "| task | tiles | emptied by masking | train | val | test | skipped |", "|---|---|---|---|---|---|---|"]
    for name, n in summary["tasks"].items():
        lines.append(f"| {name} | {n['tiles']} | {n['emptied_by_masking']} | {n['train_tiles']} | {n['val_tiles']} | "
                     f"{n['test_tiles']} | {n['skipped'] or ''} |")
    lines += ["", "## Results (test split)", "", results_markdown(results) or "No task had enough tiles.", "",
              "## Retrieval", "", "Mean tag-class histogram intersection between each tile and its k nearest tiles "
              "(1: the same mix of buildings, roads, shops, ...).", "", "| model | agreement |", "|---|---|"]
    lines += [f"| {m} | {v:.3f} |" for m, v in summary["agreement"].items()]
    lines += ["", *_peers(summary.get("peers"))]
    lines += ["", "## Pictures", ""]
    lines += [f"![{name}]({file})" if file.endswith(".png") else f"[{name}]({file})"
              for name, file in summary["pictures"].items()]
    path.write_text("\n".join(lines) + "\n")


def headline(results: list[dict], tasks: dict) -> str:
    """One line for a summary table: the first probed task's masked test MAE per model (MLP probes and
    Dummy), or why no task was probed."""
    rows = [r for r in results if r["setting"] == "masked" and r["metric"] == "mae" and r["probe"] in ("mlp", "median")]
    done = sorted({r["task"] for r in rows})
    if not done:
        reasons = {n["skipped"] for n in tasks.values()}
        return f"no task probed ({'; '.join(sorted(reasons))}); retrieval and pictures only"
    t = done[0]
    maes = ", ".join(f"{r['model']} {r['mean']:.1f}" for r in rows if r["task"] == t)
    return f"{t} test MAE (MLP): {maes}; {len(done)}/{len(tasks)} tasks probed"
