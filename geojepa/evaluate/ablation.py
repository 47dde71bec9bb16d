"""The ablation report: several models evaluated on the same regions and tiles, side by side.

The first run is the reference. Per masked task, read-out (protocol v2: ridge and MLP; reference: MLP) and group
of regions: each run's encoder (EMA target or context, the better pooled validation headline), its pooled test
headline metric with the bootstrap interval (``geojepa.evaluate.pooled``), and paired gains over the reference
run, over every one of the run's own untrained twins (better only if better than each) and over the best
SRAI peer. The baselines do not depend on the model: the reference run's are kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from data_contracts import atomic_path
from geojepa.errors import GeoJepaError
from geojepa.evaluate.corpus import RESOLUTION, compare, headline_probes, protocol_of, read_region
from geojepa.evaluate.labels import TASKS
from geojepa.evaluate.names import BEST_PEER, GROUPS
from geojepa.evaluate.pooled import Scores
from geojepa.evaluate.probes import ENCODERS
from geojepa.evaluate.protocol import PRESETS, Protocol, is_twin
from geojepa.workdir import WorkDir


def _own(model: str) -> bool:
    return model in ENCODERS or is_twin(model)


def _load(runs: dict[str, list[WorkDir]]) -> tuple[dict, dict, Protocol]:
    names = list(runs)
    frames, seen, protos, twins = {}, {}, set(), {}
    for run in names:
        for w in runs[run]:
            df, summary = read_region(w)
            # the number of twins may differ between runs (a larger model's twins cost more): each run is judged
            # against its own; everything else must be the same
            proto = {**(summary.get("protocol") or PRESETS["reference"].__dict__)}
            twins.setdefault(run, proto.pop("twin_seeds", 1))
            protos.add(json.dumps(proto, sort_keys=True))
            seen.setdefault(w.name, bool(summary.get("seen_in_training", True)))
            if bool(summary.get("seen_in_training", True)) != seen[w.name]:
                raise GeoJepaError(f"{w.path}: run {run} was {'not ' if not seen[w.name] else ''}trained on "
                                   f"{w.name} unlike run {names[0]}; compare runs trained on the same regions")
            if run != names[0]:
                df = df[df.model.map(_own).astype(bool)]  # an empty object mask would select columns
            df = df.assign(model=[f"{run}/{m}" if _own(m) else m for m in df.model])
            if w.name in frames:
                _same_tiles(frames[w.name], df, names[0], run, w)
                df = pd.concat([frames[w.name], df], ignore_index=True)
            frames[w.name] = df
    if len(protos) > 1:
        raise GeoJepaError("the runs' regions were evaluated with different protocols; evaluate every run with one "
                           "`evaluate.protocol`")
    proto = json.dumps({**json.loads(protos.pop()), "twin_seeds": twins[names[0]]})
    return frames, seen, protocol_of(proto, runs[names[0]][0].path)


def _same_tiles(ref: pd.DataFrame, df: pd.DataFrame, first: str, run: str, w: WorkDir) -> None:
    labelled = {k: dict(zip(g.tile_id, g.label, strict=True))
                for k, g in ref[ref.model == f"{first}/geojepa"].groupby(["task", "split", "probe"])}
    mine = {k: dict(zip(g.tile_id, g.label, strict=True))
            for k, g in df[df.model == f"{run}/geojepa"].groupby(["task", "split", "probe"])}
    for k in sorted(set(labelled) | set(mine)):
        a, b = labelled.get(k, {}), mine.get(k, {})
        if a != b:
            task, split, _ = k
            differ = len(set(a.items()) ^ set(b.items()))
            raise GeoJepaError(f"{w.eval.predictions}: run {run} has other {split} tiles or labels for "
                               f"{task} than run {first} in {w.name} ({differ} differ); evaluate the runs on the "
                               "same tiles and tokens")


def compare_runs(runs: dict[str, list[WorkDir]], out: Path, title: str) -> dict:
    """Write ``out/ablation_report.md`` and ``out/ablation.json``; return the metrics by name
    (``ablation.<group>.<task>.<probe>.<run>.<metric>``, ``..._vs_<other>.gain`` with ``_ci_low``/``_ci_high``)."""
    names = list(runs)
    if len(names) < 2:
        raise GeoJepaError("an ablation needs two runs or more (name=DIR each)")
    regions = [w.name for w in runs[names[0]]]
    for run, ws in runs.items():
        if sorted(w.name for w in ws) != sorted(regions):
            raise GeoJepaError(f"run {run}: regions {sorted(w.name for w in ws)} differ from {names[0]}'s "
                               f"{sorted(regions)}; evaluate every run on the same regions")
    frames, seen, proto = _load(runs)

    def metric_of(task: str) -> str:
        return proto.headline(TASKS[task].kind)

    scores = Scores(frames, metric_of)
    members = {"all": regions, "trained": [n for n in regions if seen[n]],
               "holdout": [n for n in regions if not seen[n]]}
    tasks = sorted({k[1] for k in scores.data if k[0] == "masked"})
    probes = headline_probes(proto, {k[3] for k in scores.data})
    rows, metrics = [], {}
    for task in tasks:
        metric = metric_of(task)
        for probe in probes:
            chosen = {run: scores.chosen(task, probe, regions, [f"{run}/{e}" for e in ENCODERS]) for run in names}
            for group in GROUPS:
                for run in names:
                    if chosen[run] is None or not members[group]:
                        continue
                    ours = ("masked", task, chosen[run], probe)
                    have = scores.have(ours, members[group])
                    s = scores.stats(ours, tuple(have), metric) if have else None
                    if s is None:
                        continue
                    row = {"task": task, "probe": probe, "metric": metric, "group": group, "run": run,
                           "encoder": chosen[run].split("/", 1)[1], "value": s["mean"], "std": s["std"],
                           "ci_low": s["ci_low"], "ci_high": s["ci_high"], "val": s["val_mean"],
                           "regions": len(have), "n_test": s["n_test"]}
                    vs = {c["baseline_key"]: c for c in compare(scores, task, probe, chosen[run], have, group,
                                                                prefix=f"{run}/")}
                    if run != names[0] and chosen[names[0]] is not None:
                        paired = scores.gain(ours, ("masked", task, chosen[names[0]], probe), have, metric)
                        if paired is not None:
                            g, lo, hi = paired
                            vs["reference"] = {"gain": g, "ci_low": lo, "ci_high": hi, "better": lo > RESOLUTION,
                                               "worse": hi < -RESOLUTION}
                    for k in ("reference", "every_twin", BEST_PEER):
                        if k in vs:
                            c = vs[k]
                            row[f"vs_{k}"] = {x: c[x] for x in ("gain", "ci_low", "ci_high", "better", "worse")}
                            if k == BEST_PEER:
                                row["best_peer"] = c["baseline"]
                            name = f"ablation.{group}.{task}.{probe}.{run}_vs_{k}.gain"
                            metrics.update({name: c["gain"], name + "_ci_low": c["ci_low"],
                                            name + "_ci_high": c["ci_high"]})
                    metrics[f"ablation.{group}.{task}.{probe}.{run}.{metric}"] = s["mean"]
                    rows.append(row)
    lines = [f"# GeoJEPA ablation: {title}", "",
             f"Runs: {', '.join(f'`{n}`' for n in names)} (reference: `{names[0]}`), evaluated on the same "
             f"{len(regions)} regions ({len(members['holdout'])} holdout), protocol {proto.name}. Masked setting; per "
             "task, read-out and run the encoder (EMA target or context) with the better pooled validation score. "
             "Value: the pooled test headline metric (MAE, or ROC-AUC for binary tasks under v2), mean over probe "
             "seeds, [95% region-stratified bootstrap over test tiles]. Gains: how much better this run is "
             "[paired 95% interval]; **bold** above zero, *italic* below. *every twin*: the closest of the run's "
             "own twins, bold only when better than each.", "",
             "| task (metric) | read-out | group | run | encoder | val | test [95% CI] | vs reference | vs every "
             "twin | vs best peer |", "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(r, k):
        c = r.get(f"vs_{k}")
        if c is None:
            return "-"
        text = f"{c['gain']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"
        return f"**{text}**" if c["better"] else (f"*{text}*" if c["worse"] else text)

    for r in rows:
        val = "-" if r["val"] is None else f"{r['val']:.3f}"
        lines.append(f"| {r['task']} ({r['metric']}) | {r['probe']} | {r['group']} ({r['regions']}) | {r['run']} | "
                     f"{r['encoder']} | {val} | {r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | "
                     f"{cell(r, 'reference')} | {cell(r, 'every_twin')} | {cell(r, BEST_PEER)}"
                     + (f" {r['best_peer']}" if "best_peer" in r else "") + " |")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "ablation_report.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_path(out / "ablation.json") as tmp:
        tmp.write_text(json.dumps({"protocol": proto.name, "runs": {n: [str(w.path) for w in runs[n]] for n in names},
                                   "rows": rows}, indent=1))
    return metrics
