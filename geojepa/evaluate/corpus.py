"""The corpus report: tasks x regions x models, each region's row and the regions pooled, with uncertainty.

Reads each region's ``eval/predictions.parquet`` (every probe's val and test predictions, per seed) and its
``eval`` summary. For each (setting, task, model, probe):

- *mean*: the MAE over the test tiles (pooled: over the union of the regions' test tiles), averaged over the
  probe seeds; *std*: its spread over the seeds;
- *ci_low, ci_high*: a 95% bootstrap interval over test tiles (``BOOTSTRAP`` resamples, each region's test
  tiles resampled within the region), the uncertainty that 10 to 50 test tiles a region leave, which the seed
  spread does not show;
- *val_mean*: the same MAE on the validation tiles.

The headline GeoJEPA encoder per task (EMA target or context encoder) is the one with the lower pooled
*validation* MAE of the masked MLP probe. Comparisons against the untrained twin and the baselines are paired:
the same bootstrap resamples of the same test tiles, so the interval is that of the MAE difference; the gain
(baseline MAE minus GeoJEPA MAE) is *better beyond the uncertainty* when its whole interval is above zero.
"""

from __future__ import annotations

import functools
import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_contracts import (
    CORPUS_RESULTS,
    PREDICTIONS,
    atomic_path,
    read_table,
    write_table,
)
from geojepa.errors import GeoJepaError
from geojepa.evaluate.report import ENCODERS
from geojepa.workdir import WorkDir

BOOTSTRAP = 2000
GROUPS = ("all", "trained", "holdout")
BASELINES = ("untrained", "tagpool", "bag_of_tags", "dummy")


def _region(w: WorkDir):
    path = w.eval / "predictions.parquet"
    if not path.exists():
        raise GeoJepaError(f"{path}: missing; run `geojepa evaluate {w.path} --model ...` first (again, if it was "
                           "evaluated before predictions were written)")
    summary = json.loads(w.manifest("evaluate").read_text()).get("summary", {})
    return read_table(path, PREDICTIONS).to_pandas(), summary


class _Errors:
    """Absolute errors of every (setting, task, model, probe) on each region's val and test tiles, aligned
    by tile id, with one set of bootstrap draws per (setting, task, region) shared by every model."""

    def __init__(self, frames: dict[str, object]):
        self.err: dict[tuple, dict[str, dict[str, np.ndarray]]] = {}  # key -> region -> split -> (tiles, seeds)
        self.draws: dict[tuple, np.ndarray] = {}  # (setting, task, region) -> (BOOTSTRAP, tiles) counts
        for region, df in frames.items():
            for key, g in df.groupby(["setting", "task", "model", "probe", "split"], sort=False):
                g = g.sort_values("tile_id")
                p = np.stack(g["pred"].to_numpy()).astype(np.float64)
                e = np.abs(p - g["label"].to_numpy()[:, None])
                self.err.setdefault(key[:4], {}).setdefault(region, {})[key[4]] = e
                if key[4] == "test" and (key[0], key[1], region) not in self.draws:
                    rng = np.random.default_rng(zlib.crc32(f"{key[0]}/{key[1]}/{region}".encode()))
                    n = len(e)
                    self.draws[key[0], key[1], region] = rng.multinomial(
                        n, np.full(n, 1 / n), size=BOOTSTRAP).astype(np.int32)

    @functools.cache  # noqa: B019 (one report's lifetime; the rows, the choice and the comparisons reuse it)
    def stats(self, key: tuple, regions: tuple[str, ...]) -> dict | None:
        """Pooled figures of ``key`` over ``regions`` (those that have it)."""
        have = [r for r in regions if r in self.err.get(key, {}) and "test" in self.err[key][r]]
        if not have:
            return None
        seeds = {self.err[key][r]["test"].shape[1] for r in have}
        if len(seeds) > 1:
            raise GeoJepaError(f"{key}: the regions were probed with different numbers of seeds ({sorted(seeds)}); "
                               "evaluate them with the same evaluate.seeds to pool them")
        test = np.concatenate([self.err[key][r]["test"] for r in have])
        val = [self.err[key][r]["val"] for r in have if "val" in self.err[key][r]]
        per_seed = test.mean(0)
        boot = self.boot(key, have)
        return {"mean": float(per_seed.mean()), "std": float(per_seed.std()), "seeds": test.shape[1],
                "n_test": len(test), "val_mean": float(np.concatenate(val).mean()) if val else None,
                "ci_low": float(np.percentile(boot, 2.5)), "ci_high": float(np.percentile(boot, 97.5)),
                "regions": len(have)}

    def boot(self, key: tuple, regions: list[str]) -> np.ndarray:
        """(BOOTSTRAP,) pooled test MAE of each resample (region-stratified)."""
        total, n = np.zeros(BOOTSTRAP), 0
        for r in regions:
            e = self.err[key][r]["test"].mean(1)
            total += self.draws[key[0], key[1], r] @ e
            n += len(e)
        return total / n


def corpus_report(regions: list[WorkDir], out: Path, title: str) -> dict:
    """Write ``out/corpus_report.md`` and ``out/corpus_results.parquet``; return the pooled metrics by name
    (``corpus.<group>.masked.<task>.<model>.<probe>.mae``, its ``_std``, and the headline comparisons
    ``corpus.<group>.masked.<task>.geojepa_vs_<baseline>.mae_gain`` with ``_ci_low``/``_ci_high``)."""
    frames, notes, seen, agreement = {}, {}, {}, {}
    for w in regions:
        frames[w.name], summary = _region(w)
        seen[w.name] = bool(summary.get("seen_in_training", True))
        notes[w.name] = summary.get("tasks", {})
        agreement[w.name] = summary.get("agreement", {})
    errs = _Errors(frames)
    names = [w.name for w in regions]
    members = {"all": names, "trained": [n for n in names if seen[n]], "holdout": [n for n in names if not seen[n]]}
    rows, metrics = [], {}
    for key in sorted(errs.err):
        setting, task, model, probe = key
        for region in [*names, *GROUPS]:
            s = errs.stats(key, tuple(members.get(region, [region])))
            if s is None:
                continue
            rows.append({"region": region, "setting": setting, "task": task, "model": model, "probe": probe,
                         "metric": "mae", **s})
            if region in GROUPS and setting == "masked" and probe in ("mlp", "median"):
                metrics[f"corpus.{region}.masked.{task}.{model}.{probe}.mae"] = s["mean"]
                metrics[f"corpus.{region}.masked.{task}.{model}.{probe}.mae_std"] = s["std"]
    tasks = sorted({k[1] for k in errs.err if k[0] == "masked"})
    chosen = {t: _chosen(errs, t, names) for t in tasks}
    comparisons = []
    for task in tasks:
        for group in GROUPS:
            if not members[group] or chosen[task] is None:
                continue
            ours = ("masked", task, chosen[task], "mlp")
            have = [r for r in members[group] if "test" in errs.err.get(ours, {}).get(r, {})]
            if not have:
                continue
            a = errs.boot(ours, have)
            mine = errs.stats(ours, tuple(have))["mean"]
            for base in BASELINES:
                other = ("masked", task, base, "median" if base == "dummy" else "mlp")
                if not all("test" in errs.err.get(other, {}).get(r, {}) for r in have):
                    continue
                gain = errs.stats(other, tuple(have))["mean"] - mine
                diff = errs.boot(other, have) - a
                lo, hi = (float(x) for x in np.percentile(diff, [2.5, 97.5]))
                comparisons.append({"task": task, "group": group, "encoder": chosen[task], "baseline": base,
                                    "geojepa": mine, "baseline_mae": mine + gain, "gain": gain, "ci_low": lo,
                                    "ci_high": hi, "better": lo > 0, "worse": hi < 0, "regions": len(have)})
                name = f"corpus.{group}.masked.{task}.geojepa_vs_{base}.mae_gain"
                metrics.update({name: gain, name + "_ci_low": lo, name + "_ci_high": hi})
    lines = _markdown(title, regions, seen, notes, tasks, rows, chosen, comparisons, agreement)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "corpus_report.md") as tmp:
        tmp.write_text("\n".join(lines))
    with atomic_path(out / "corpus_comparisons.json") as tmp:
        tmp.write_text(json.dumps({"chosen_encoder": chosen, "comparisons": comparisons}, indent=1))
    write_table(pa.Table.from_pylist(rows, CORPUS_RESULTS.schema), out / "corpus_results.parquet", CORPUS_RESULTS)
    return metrics


def _chosen(errs: _Errors, task: str, regions: list[str]) -> str | None:
    """The trained encoder with the lower pooled validation MAE (masked, MLP probe)."""
    val = {}
    for enc in ENCODERS:
        s = errs.stats(("masked", task, enc, "mlp"), tuple(regions))
        if s is not None and s["val_mean"] is not None:
            val[enc] = s["val_mean"]
    return min(val, key=val.get) if val else None


def _markdown(title, regions, seen, notes, tasks, rows, chosen, comparisons, agreement) -> list[str]:
    names = [w.name for w in regions]
    lines = [f"# GeoJEPA corpus report: {title}", "",
             "Masked setting (the task's label tags removed), test MAE of the MLP probe (Dummy: the training "
             "median): mean over probe seeds, ± their std, and [a 95% bootstrap interval over test tiles]. "
             "*pooled*: the MAE over the union of the regions' test tiles; *trained on* / *holdout*: whether the "
             "model saw the region's train split. *geojepa*: the EMA target encoder; *geojepa_context*: the "
             "context encoder; per task the headline takes the one with the lower pooled validation MAE.", "",
             "| region | role | " + " | ".join(f"test tiles ({t})" for t in tasks) + " |",
             "|---|---|" + "---|" * len(tasks)]
    for w in regions:
        counts = [str(notes[w.name].get(t, {}).get("test_tiles", "-")) if not notes[w.name].get(t, {}).get("skipped")
                  else "skipped" for t in tasks]
        lines.append(f"| {w.name} | {'trained on' if seen[w.name] else 'holdout'} | " + " | ".join(counts) + " |")
    if comparisons:
        lines += ["", "## Headline: GeoJEPA against the untrained twin and the baselines", "",
                  "MAE gain = baseline MAE - GeoJEPA MAE (positive: GeoJEPA better), with its paired 95% "
                  "bootstrap interval over test tiles; **better** / *worse*: beyond that uncertainty.", "",
                  "| task | group | encoder (val) | GeoJEPA MAE | baseline | baseline MAE | gain [95% CI] | |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in comparisons:
            verdict = "**better**" if c["better"] else ("*worse*" if c["worse"] else "within uncertainty")
            lines.append(f"| {c['task']} | {c['group']} ({c['regions']}) | {c['encoder']} | {c['geojepa']:.3f} | "
                         f"{c['baseline']} | {c['baseline_mae']:.3f} | {c['gain']:+.3f} [{c['ci_low']:+.3f}, "
                         f"{c['ci_high']:+.3f}] | {verdict} |")
    for task in tasks:
        here = [r for r in rows if r["setting"] == "masked" and r["task"] == task and r["probe"] in ("mlp", "median")]
        models = list(dict.fromkeys(r["model"] for r in here))
        lines += ["", f"## {task}" + (f" (headline encoder: {chosen[task]})" if chosen.get(task) else ""), "",
                  "| model | " + " | ".join(names + ["pooled: all", "pooled: trained on", "pooled: holdout"]) + " |",
                  "|---|" + "---|" * (len(names) + 3)]
        for model in models:
            cells = []
            for region in [*names, *GROUPS]:
                r = next((r for r in here if r["model"] == model and r["region"] == region), None)
                if r is None:
                    cells.append("-")
                    continue
                cell = f"{r['mean']:.2f} ± {r['std']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
                cells.append(f"**{cell}** ({r['regions']} regions, {r['n_test']} tiles)" if region in GROUPS
                             else cell)
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    if not tasks:
        lines += ["", "No task had enough tiles in any region: see each region's report."]
    models = list(dict.fromkeys(m for a in agreement.values() for m in a))
    if models:
        lines += ["", "## Retrieval agreement", "", "Mean tag-class histogram intersection between each tile and its "
                  "10 nearest tiles (unmasked tiles; 1: the same mix of buildings, roads, shops, ...).", "",
                  "| region | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
        for name, a in agreement.items():
            lines.append(f"| {name} | " + " | ".join(f"{a[m]:.3f}" if m in a else "-" for m in models) + " |")
    lines += ["", "Each region's full report: " + ", ".join(f"[{w.name}]({(w.eval / 'report.md').resolve()})"
                                                            for w in regions), ""]
    return lines
