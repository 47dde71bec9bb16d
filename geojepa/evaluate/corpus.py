"""The corpus report: tasks x regions x models, each region's row and the regions pooled, with uncertainty.

Reads each region's ``eval/predictions.parquet`` (every probe's val and test predictions, per seed) and its
``eval`` summary. For each (setting, task, model, probe):

- *mean*: the MAE over the test tiles (pooled: over the union of the regions' test tiles), averaged over the
  probe seeds; *std*: its spread over the seeds;
- *ci_low, ci_high*: a 95% bootstrap interval over test tiles (``BOOTSTRAP`` resamples, each region's test
  tiles resampled within the region), the uncertainty that 10 to 50 test tiles a region leave, which the seed
  spread does not show;
- *val_mean*: the same MAE on the validation tiles.

The baselines include the field's own embedders (SRAI's Count, ContextualCount, Hex2Vec, GeoVeX) when the
regions were evaluated with them, and the *best peer*: per task and group, the peer with the lowest pooled
validation MAE (chosen on validation, like the headline encoder; its test MAE is reported, never chosen on).

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
import pandas as pd
import pyarrow as pa

from data_contracts import (
    CORPUS_RESULTS,
    PREDICTIONS,
    atomic_path,
    read_table,
    write_table,
)
from geojepa.errors import GeoJepaError
from geojepa.evaluate.peers import PEERS
from geojepa.evaluate.report import ENCODERS
from geojepa.workdir import WorkDir

BOOTSTRAP = 2000
GROUPS = ("all", "trained", "holdout")
BASELINES = ("untrained", "tagpool", "bag_of_tags", *PEERS, "dummy")
BEST_PEER = "best_peer"  # per task the peer with the lowest pooled validation MAE, compared like a baseline


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

    def covers(self, key: tuple, regions: list[str]) -> bool:
        """Whether ``key`` has test predictions in every one of ``regions``."""
        return all("test" in self.err.get(key, {}).get(r, {}) for r in regions)

    def gain(self, ours: tuple, other: tuple, regions: list[str]) -> tuple[float, float, float] | None:
        """(``other``'s pooled test MAE minus ``ours``, and the 2.5 and 97.5 percentiles of that difference over
        the shared bootstrap resamples) on ``regions``; None when ``other`` lacks one of them."""
        if not self.covers(other, regions):
            return None
        gain = self.stats(other, tuple(regions))["mean"] - self.stats(ours, tuple(regions))["mean"]
        lo, hi = np.percentile(self.boot(other, regions) - self.boot(ours, regions), [2.5, 97.5])
        return gain, float(lo), float(hi)

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
    frames, notes, seen, agreement, peer_notes = {}, {}, {}, {}, {}
    for w in regions:
        frames[w.name], summary = _region(w)
        seen[w.name] = bool(summary.get("seen_in_training", True))
        notes[w.name] = summary.get("tasks", {})
        agreement[w.name] = summary.get("agreement", {})
        peer_notes[w.name] = summary.get("peers") or {"skipped": "evaluated before the peers existed"}
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
            mine = errs.stats(ours, tuple(have))["mean"]
            best = _best_peer(errs, task, have)
            for base in (*BASELINES, BEST_PEER):
                model = best if base == BEST_PEER else base
                other = ("masked", task, model, "median" if base == "dummy" else "mlp")
                if model is None or (paired := errs.gain(ours, other, have)) is None:
                    continue
                gain, lo, hi = paired
                comparisons.append({"task": task, "group": group, "encoder": chosen[task],
                                    "baseline": f"{BEST_PEER} ({best})" if base == BEST_PEER else base,
                                    "geojepa": mine, "baseline_mae": mine + gain, "gain": gain, "ci_low": lo,
                                    "ci_high": hi, "better": lo > 0, "worse": hi < 0, "regions": len(have)})
                name = f"corpus.{group}.masked.{task}.geojepa_vs_{base}.mae_gain"
                metrics.update({name: gain, name + "_ci_low": lo, name + "_ci_high": hi})
    lines = _markdown(title, regions, seen, notes, tasks, rows, chosen, comparisons, agreement, peer_notes)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "corpus_report.md") as tmp:
        tmp.write_text("\n".join(lines))
    with atomic_path(out / "corpus_comparisons.json") as tmp:
        tmp.write_text(json.dumps({"chosen_encoder": chosen, "comparisons": comparisons}, indent=1))
    write_table(pa.Table.from_pylist(rows, CORPUS_RESULTS.schema), out / "corpus_results.parquet", CORPUS_RESULTS)
    return metrics


def _chosen(errs: _Errors, task: str, regions: list[str], run: str = "") -> str | None:
    """The trained encoder with the lower pooled validation MAE (masked, MLP probe); ``run``: its models are
    named ``run/encoder`` (an ablation report's runs)."""
    val = {}
    for enc in ENCODERS:
        s = errs.stats(("masked", task, f"{run}/{enc}" if run else enc, "mlp"), tuple(regions))
        if s is not None and s["val_mean"] is not None:
            val[enc] = s["val_mean"]
    return min(val, key=val.get) if val else None


def _best_peer(errs: _Errors, task: str, regions: list[str]) -> str | None:
    """The SRAI peer with the lowest pooled validation MAE (masked, MLP probe) on ``regions``, which must all
    have it; None when no peer was evaluated on all of them."""
    val = {}
    for peer in PEERS:
        key = ("masked", task, peer, "mlp")
        if errs.covers(key, regions) and (v := errs.stats(key, tuple(regions))["val_mean"]) is not None:
            val[peer] = v
    return min(val, key=val.get) if val else None


def _peer_lines(peer_notes: dict) -> list[str]:
    """Each region's peers: fit and embedding time and peak memory, or why they were skipped."""
    if not any(n.get("fitted") for n in peer_notes.values()):
        reasons = sorted({n.get("skipped", "") for n in peer_notes.values()})
        return ["", "## Peers (SRAI)", "", "Not evaluated: " + "; ".join(reasons) + "."]
    names = [p for p in PEERS if any(p in n.get("fitted", {}) for n in peer_notes.values())]
    version = next(n["srai"] for n in peer_notes.values() if n.get("fitted"))
    lines = ["", "## Peers (SRAI)", "", f"SRAI {version}'s embedders, fitted per region on its training tiles "
             "(each region's report says how). Per peer: fit + embedding seconds on the evaluating machine, and "
             "the peak resident-memory rise (MB).", "",
             "| region | tiles fitted on | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for region, n in peer_notes.items():
        if not n.get("fitted"):
            lines.append(f"| {region} | skipped: {n.get('skipped', '')} |" + " |" * len(names))
            continue
        f = n["fitted"]
        lines.append(f"| {region} | {n['fitted_on_tiles']} | " + " | ".join(
            f"{f[p]['fit_seconds'] + f[p]['embed_seconds']:.1f} s, {f[p]['peak_mb']:.0f} MB" if p in f else "-"
            for p in names) + " |")
    return lines


def _markdown(title, regions, seen, notes, tasks, rows, chosen, comparisons, agreement, peer_notes) -> list[str]:
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
    lines += _peer_lines(peer_notes)
    lines += ["", "Each region's full report: " + ", ".join(f"[{w.name}]({(w.eval / 'report.md').resolve()})"
                                                            for w in regions), ""]
    return lines


def compare_runs(runs: dict[str, list[WorkDir]], out: Path, title: str) -> dict:
    """The ablation report: several models (``runs``: name -> its evaluated region work directories, the same
    regions and tiles in each) side by side, the first the reference. Per masked task and run: the run's
    validation-chosen encoder (masked MLP probe, pooled), its pooled test MAE with the bootstrap interval, and
    paired gains (the same resamples of the same test tiles) over the reference run and over the run's own
    untrained twin. Writes ``out/ablation_report.md`` and ``out/ablation.json``; returns the metrics by name
    (``ablation.<group>.<task>.<run>.mae``, ``..._vs_reference.mae_gain`` with ``_ci_low``/``_ci_high``)."""
    names = list(runs)
    if len(names) < 2:
        raise GeoJepaError("an ablation needs two runs or more (name=DIR each)")
    regions = [w.name for w in runs[names[0]]]
    for run, ws in runs.items():
        if sorted(w.name for w in ws) != sorted(regions):
            raise GeoJepaError(f"run {run}: regions {sorted(w.name for w in ws)} differ from {names[0]}'s "
                               f"{sorted(regions)}; evaluate every run on the same regions")
    frames, seen = {}, {}
    for run in names:
        for w in runs[run]:
            df, summary = _region(w)
            seen.setdefault(w.name, bool(summary.get("seen_in_training", True)))
            if run != names[0]:  # the baselines do not depend on the model: the reference's are kept
                df = df[df.model.isin([*ENCODERS, "untrained"])]
            df = df.assign(model=[f"{run}/{m}" if m in (*ENCODERS, "untrained") else m for m in df.model])
            if w.name in frames:
                if bool(summary.get("seen_in_training", True)) != seen[w.name]:
                    raise GeoJepaError(f"{w.path}: run {run} was {'not ' if not seen[w.name] else ''}trained on "
                                       f"{w.name} unlike run {names[0]}; compare runs trained on the same regions")
                ref = frames[w.name]
                labelled = {key: dict(zip(g.tile_id, g.label, strict=True))
                            for key, g in ref[ref.model == f"{names[0]}/geojepa"].groupby(["task", "split"])}
                mine = {key: dict(zip(g.tile_id, g.label, strict=True))
                        for key, g in df[df.model == f"{run}/geojepa"].groupby(["task", "split"])}
                for key in sorted(set(labelled) | set(mine)):
                    a, b = labelled.get(key, {}), mine.get(key, {})
                    if a != b:
                        task, split = key
                        differ = len(set(a.items()) ^ set(b.items()))
                        raise GeoJepaError(f"{w.eval / 'predictions.parquet'}: run {run} has other {split} tiles or "
                                           f"labels for {task} than run {names[0]} in {w.name} ({differ} differ); "
                                           "evaluate the runs on the same tiles and tokens")
                df = pd.concat([ref, df], ignore_index=True)
            frames[w.name] = df
    errs = _Errors(frames)
    members = {"all": regions, "trained": [n for n in regions if seen[n]],
               "holdout": [n for n in regions if not seen[n]]}
    tasks = sorted({k[1] for k in errs.err if k[0] == "masked"})
    rows, metrics = [], {}
    for task in tasks:
        chosen = {run: _chosen(errs, task, regions, run) for run in names}
        if chosen[names[0]] is None:
            continue
        ref_key = ("masked", task, f"{names[0]}/{chosen[names[0]]}", "mlp")
        for group in GROUPS:
            have = [r for r in members[group] if "test" in errs.err.get(ref_key, {}).get(r, {})]
            if not have:
                continue
            best = _best_peer(errs, task, have)
            for run in names:
                if chosen[run] is None:
                    continue
                key = ("masked", task, f"{run}/{chosen[run]}", "mlp")
                s = errs.stats(key, tuple(have))
                row = {"task": task, "group": group, "run": run, "encoder": chosen[run], "mae": s["mean"],
                       "std": s["std"], "ci_low": s["ci_low"], "ci_high": s["ci_high"], "val_mae": s["val_mean"],
                       "regions": len(have), "n_test": s["n_test"]}
                others = {"untrained": ("masked", task, f"{run}/untrained", "mlp")}
                if run != names[0]:
                    others = {"reference": ref_key, **others}
                if best is not None:
                    others["best_peer"] = ("masked", task, best, "mlp")
                    row["best_peer"] = best
                for vs, other in others.items():
                    if (paired := errs.gain(key, other, have)) is None:
                        continue
                    gain, lo, hi = paired
                    row[f"gain_vs_{vs}"], row[f"gain_vs_{vs}_ci"] = gain, [lo, hi]
                    name = f"ablation.{group}.{task}.{run}_vs_{vs}.mae_gain"
                    metrics.update({name: gain, name + "_ci_low": lo, name + "_ci_high": hi})
                metrics[f"ablation.{group}.{task}.{run}.mae"] = s["mean"]
                rows.append(row)
    lines = [f"# GeoJEPA ablation: {title}", "",
             f"Runs: {', '.join(f'`{n}`' for n in names)} (reference: `{names[0]}`), evaluated on the same "
             f"{len(regions)} regions ({len(members['holdout'])} holdout). Masked setting, MLP probe; per task and "
             "run the encoder (EMA target or context) with the lower pooled validation MAE. MAE: pooled test MAE, "
             "mean over probe seeds, [95% region-stratified bootstrap over test tiles]. Gains: the other model's "
             "MAE minus this run's (positive: this run better), [paired 95% bootstrap interval]; **bold** when "
             "the interval is above zero, *italic* when below.", "",
             "*Best peer*: the SRAI embedder with the lowest pooled validation MAE (when the reference run's "
             "regions were evaluated with the peers).", "",
             "| task | group | run | encoder | val MAE | test MAE [95% CI] | gain over reference | gain over own "
             "untrained twin | gain over best peer |", "|---|---|---|---|---|---|---|---|---|"]

    def cell(r, vs):
        if f"gain_vs_{vs}" not in r:
            return "-"
        g, (lo, hi) = r[f"gain_vs_{vs}"], r[f"gain_vs_{vs}_ci"]
        text = f"{g:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        return f"**{text}**" if lo > 0 else (f"*{text}*" if hi < 0 else text)

    for r in rows:
        val_mae = "-" if r["val_mae"] is None else f"{r['val_mae']:.3f}"
        lines.append(f"| {r['task']} | {r['group']} ({r['regions']}) | {r['run']} | {r['encoder']} | {val_mae} | "
                     f"{r['mae']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {cell(r, 'reference')} | "
                     f"{cell(r, 'untrained')} | {cell(r, 'best_peer')}"
                     + (f" ({r['best_peer']})" if "best_peer" in r else "") + " |")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "ablation_report.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_path(out / "ablation.json") as tmp:
        tmp.write_text(json.dumps({"runs": {n: [str(w.path) for w in runs[n]] for n in names}, "rows": rows},
                                  indent=1))
    return metrics
