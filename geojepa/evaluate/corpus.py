"""The corpus report: tasks x regions x models, each region's row and the regions pooled, with uncertainty.

Reads each region's evaluation artifacts: ``eval/predictions.parquet`` (every read-out's val and test
predictions, per seed), ``eval/probe_features.parquet`` and ``eval/summary.json`` (the protocol it was
evaluated with, which every region must share; the checkpoint; the tasks' test tiles, the peers and the
retrieval agreement). Figures (``geojepa.evaluate.pooled``): per (setting, task, model, read-out) the task's
headline metric (protocol v2: MAE for counts and max_speed, ROC-AUC for bridge and car_bridge; the reference
protocol: MAE everywhere) and MAE, on each region's test tiles and pooled over the union of the regions' test
tiles (all, trained on, holdout), with a 95% region-stratified bootstrap interval over test tiles; the MAE
relative to Dummy's averaged over regions; and one cross-region ridge read-out fitted on every trained-on
region's training tiles, tested on every region's test tiles.

Comparisons, per task, read-out and group, paired (the same resamples of the same test tiles): GeoJEPA's
encoder (EMA target or context, whichever has the better pooled *validation* headline) against each untrained
twin, TagPool, bag-of-tags, each SRAI peer, the *best peer* (chosen on validation) and Dummy. A gain is
*better beyond the uncertainty* when its whole interval is above zero; GeoJEPA is better than "the twin" only
when it is better than every twin seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa

from data_contracts import CORPUS_RESULTS, PREDICTIONS, PROBE_FEATURES, atomic_path, read_table, write_table
from geojepa.errors import GeoJepaError
from geojepa.evaluate.corpus_markdown import markdown
from geojepa.evaluate.labels import TASKS
from geojepa.evaluate.names import BEST_PEER, GROUPS, NAMED
from geojepa.evaluate.peers import PEERS
from geojepa.evaluate.pooled import CROSS, HIGHER_IS_BETTER, Scores, cross_region
from geojepa.evaluate.probes import ENCODERS
from geojepa.evaluate.protocol import PRESETS, Protocol, is_twin
from geojepa.workdir import ModelDir, WorkDir

# A gain whose whole interval is within this of zero is no difference (read-outs clipped to the labels' range keep
# their order by at most 1e-6: two exact predictions differ by that much, not by a finding).
RESOLUTION = 1e-4


def read_region(w: WorkDir):
    """A region's evaluation: (its predictions frame, its evaluation summary)."""
    if not w.eval.predictions.exists():
        raise GeoJepaError(f"{w.eval.predictions}: missing; run `geojepa evaluate {w.path} --model ...` first "
                           "(again, if it was evaluated before predictions were written)")
    if (summary := w.evaluation_summary()) is None:
        raise GeoJepaError(f"{w.eval.summary}: missing; run `geojepa evaluate {w.path} --model ...` again")
    return read_table(w.eval.predictions, PREDICTIONS).to_pandas(), summary


def load_regions(regions: list[WorkDir]) -> tuple[dict, dict, dict, Protocol]:
    """(predictions by region, summaries by region, whether each was trained on, the shared protocol)."""
    frames, summaries = {}, {}
    for w in regions:
        frames[w.name], summaries[w.name] = read_region(w)
    protos = {n: json.dumps(s.get("protocol") or PRESETS["reference"].__dict__, sort_keys=True)
              for n, s in summaries.items()}
    if len(set(protos.values())) > 1:
        first = next(iter(protos))
        other = next(n for n, p in protos.items() if p != protos[first])
        raise GeoJepaError(f"{other} was evaluated with another protocol than {first} ({json.loads(protos[other])} "
                           f"against {json.loads(protos[first])}); evaluate them with the same evaluate settings "
                           "to pool them")
    checkpoints = {s.get("checkpoint") for s in summaries.values()}
    if len(checkpoints) > 1:
        raise GeoJepaError(
            f"the regions were evaluated with different models ({', '.join(sorted(map(str, checkpoints)))})"
            "; a corpus report pools one model's evaluations (compare models with ablation-report)"
        )
    proto = protocol_of(next(iter(protos.values()), None), regions[0].path if regions else "")
    seen = {n: bool(s.get("seen_in_training", True)) for n, s in summaries.items()}
    return frames, summaries, seen, proto


def protocol_of(text: str | None, where) -> Protocol:
    """The ``Protocol`` of a summary's protocol record (JSON), or a clear error naming the region."""
    if not text:
        return PRESETS["reference"]
    try:
        return Protocol(**json.loads(text))
    except TypeError:
        raise GeoJepaError(f"{where}: its evaluation records a protocol this version does not know; evaluate it "
                           "again") from None


def headline_probes(proto: Protocol, present: set[str]) -> list[str]:
    """The read-outs the comparisons are made with: v2's ridge and MLP (and the cross-region ridge), the
    reference's MLP."""
    wanted = ("ridge", "mlp", CROSS) if proto.name == "v2" else ("mlp",)
    return [p for p in wanted if p in present]


def corpus_report(regions: list[WorkDir], out: Path, title: str) -> dict:
    """Write the corpus report, its results and its comparisons into the model folder ``out`` (``ModelDir``);
    return the pooled metrics by name (``corpus.<group>.masked.<task>.<model>.<probe>.<metric>``, and
    ``corpus.<group>.masked.<task>.<probe>.geojepa_vs_<baseline>.gain`` with ``_ci_low``/``_ci_high``)."""
    frames, summaries, seen, proto = load_regions(regions)
    names = [w.name for w in regions]
    cross_notes: dict = {"skipped": "the reference protocol has no cross-region read-out"}
    if proto.name == "v2":
        feats = {w.name: read_table(w.eval.probe_features, PROBE_FEATURES).to_pandas()
                 for w in regions if w.eval.probe_features.exists()}
        if len(feats) < len(regions):
            cross_notes = {"skipped": "some regions have no eval/probe_features.parquet (evaluate them again)"}
        else:
            cross, cross_notes = cross_region(feats, seen, {t: TASKS[t].kind for t in TASKS})
            if cross is not None:
                for region, part in cross.groupby("region"):
                    frames[region] = pd.concat([frames[region], part.drop(columns="region")], ignore_index=True)

    def metric_of(task: str) -> str:
        return proto.headline(TASKS[task].kind)

    scores = Scores(frames, metric_of)
    members = {"all": names, "trained": [n for n in names if seen[n]], "holdout": [n for n in names if not seen[n]]}
    probes = headline_probes(proto, {k[3] for k in scores.data})
    rows, metrics = [], {}
    for key in sorted(scores.data):
        setting, task, model, probe = key
        for region in [*names, *GROUPS]:
            group = region in GROUPS
            for metric in dict.fromkeys([metric_of(task), "mae", *(["relative_mae"] if group else [])]):
                s = scores.stats(key, tuple(members.get(region, [region])), metric)
                if s is None:
                    continue
                rows.append({"region": region, "setting": setting, "task": task, "model": model, "probe": probe,
                             "metric": metric, **s})
                if group and setting == "masked" and probe in (*probes, "median"):
                    metrics[f"corpus.{region}.masked.{task}.{model}.{probe}.{metric}"] = s["mean"]
    tasks = sorted({k[1] for k in scores.data if k[0] == "masked"})
    chosen = {(t, p): scores.chosen(t, p, names, ENCODERS) for t in tasks for p in probes}
    comparisons = []
    for task in tasks:
        for probe in probes:
            for group in GROUPS:
                comparisons += compare(scores, task, probe, chosen[task, probe], members[group], group)
    for c in comparisons:
        name = f"corpus.{c['group']}.masked.{c['task']}.{c['probe']}.geojepa_vs_{c['baseline_key']}.gain"
        metrics.update({name: c["gain"], name + "_ci_low": c["ci_low"], name + "_ci_high": c["ci_high"]})
    lines = markdown(title, regions, seen, summaries, proto, tasks, probes, rows, chosen, comparisons, cross_notes)
    out = ModelDir(out)
    out.path.mkdir(parents=True, exist_ok=True)
    with atomic_path(out.corpus_report) as tmp:
        tmp.write_text("\n".join(lines))
    with atomic_path(out.corpus_comparisons) as tmp:
        tmp.write_text(json.dumps({"protocol": proto.name, "chosen_encoder": {f"{t}/{p}": m for (t, p), m in
                                                                             chosen.items()},
                                   "cross_region": cross_notes, "comparisons": comparisons}, indent=1))
    write_table(pa.Table.from_pylist(rows, CORPUS_RESULTS.schema), out.corpus_results, CORPUS_RESULTS)
    return metrics


def compare(scores: Scores, task: str, probe: str, encoder: str | None, regions: list[str], group: str,
            ours_model: str | None = None, prefix: str = "") -> list[dict]:
    """GeoJEPA (``ours_model`` or ``encoder``) against every baseline on ``regions`` with read-out ``probe``:
    one row per baseline, and an ``every twin`` row (better only if better than each twin seed; its gain and
    interval those of the closest twin). ``prefix``: the models are named ``prefix/encoder`` (ablations)."""
    if encoder is None or not regions:
        return []
    metric = scores.metric_of(task)
    ours = ("masked", task, ours_model or encoder, probe)
    have = scores.have(ours, regions)
    if not have or scores.stats(ours, tuple(have), metric) is None:
        return []
    mine = scores.stats(ours, tuple(have), metric)["mean"]
    models = {m for (s, t, m, p) in scores.data if (s, t, p) == ("masked", task, probe)}
    twins = sorted(m for m in models if is_twin(m.removeprefix(prefix)) and m.startswith(prefix))
    peers = [m for m in PEERS if m in models]
    best = scores.chosen(task, probe, have, [p for p in peers if scores.covers(("masked", task, p, probe), have)])
    targets = [(t, t.removeprefix(prefix), probe) for t in twins] + [(m, m, probe) for m in (*NAMED, *peers)]
    if best:
        targets.append((best, BEST_PEER, probe))
    targets.append(("dummy", "dummy", "median"))
    out, twin_rows = [], []
    for model, label, p in targets:
        paired = scores.gain(ours, ("masked", task, model, p), have, metric)
        if paired is None:
            continue
        gain, lo, hi = paired
        row = {"task": task, "probe": probe, "group": group, "metric": metric, "encoder": encoder,
               "baseline": f"{BEST_PEER} ({best})" if label == BEST_PEER else label, "baseline_key": label,
               "geojepa": mine, "baseline_value": mine - gain if metric in HIGHER_IS_BETTER else mine + gain,
               "gain": gain, "ci_low": lo, "ci_high": hi, "better": lo > RESOLUTION, "worse": hi < -RESOLUTION,
               "regions": len(have)}
        out.append(row)
        if model in twins:
            twin_rows.append(row)
    if twin_rows:
        closest = min(twin_rows, key=lambda r: r["ci_low"])
        every = len(twin_rows) == len(twins)  # a twin missing in one of the regions: no claim over every twin
        out.append({**closest, "baseline": f"every twin ({len(twin_rows)} of {len(twins)})",
                    "baseline_key": "every_twin", "better": every and all(r["better"] for r in twin_rows),
                    "worse": any(r["worse"] for r in twin_rows)})
    return out
