"""The corpus report's markdown (``geojepa.evaluate.corpus`` computes what it shows)."""

from __future__ import annotations

from geojepa.evaluate.labels import TASKS
from geojepa.evaluate.names import BEST_PEER, GROUPS, NAMED, model_order
from geojepa.evaluate.peers import PEERS
from geojepa.evaluate.pooled import CROSS
from geojepa.evaluate.report import protocol_lines


def _verdict(c: dict | None) -> str:
    if c is None:
        return "-"
    text = f"{c['gain']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"
    return f"**{text}**" if c["better"] else (f"*{text}*" if c["worse"] else text)


def _peer_lines(peer_notes: dict) -> list[str]:
    """Each region's peers: fit and embedding time and peak memory, or why they were skipped."""
    if not any(n.get("fitted") for n in peer_notes.values()):
        reasons = sorted({n.get("skipped", "") for n in peer_notes.values()})
        return ["", "## Peers (SRAI)", "", "Not evaluated: " + "; ".join(reasons) + "."]
    names = [p for p in PEERS if any(p in n.get("fitted", {}) for n in peer_notes.values())]
    version = next(n["srai"] for n in peer_notes.values() if n.get("fitted"))
    lines = ["", "## Peers (SRAI)", "", f"SRAI {version}'s embedders, fitted per region on its training tiles "
             "(each region's report says how). Per peer: fit + embedding seconds on the evaluating machine (as "
             "measured when fitted; a cached fit is not refitted), and the peak resident-memory rise (MB).", "",
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


def _cell(r: dict | None, digits: int = 3) -> str:
    if r is None:
        return "-"
    spread = f" ± {r['std']:.{digits}f}" if r["seeds"] > 1 else ""
    return f"{r['mean']:.{digits}f}{spread} [{r['ci_low']:.{digits}f}, {r['ci_high']:.{digits}f}]"


def markdown(title, regions, seen, summaries, proto, tasks, probes, rows, chosen, comparisons, cross_notes
              ) -> list[str]:
    names = [w.name for w in regions]
    notes = {n: s.get("tasks", {}) for n, s in summaries.items()}
    lines = [f"# GeoJEPA corpus report: {title}", "", *protocol_lines(proto.__dict__),
             "Masked setting (the task's label tags removed from every entity of its tiles). Each figure: the "
             "test metric, mean over probe seeds ± their std, [a 95% bootstrap interval over test tiles, "
             "resampled within each region]. *all* / *trained* / *holdout*: the union of the test tiles of the "
             "regions of that group (trained: the model saw the region's train split). *relative MAE*: each "
             "region's MAE over its Dummy's (the training median), averaged over regions. "
             f"*{CROSS}*: one ridge read-out fitted on the training tiles of every trained-on region (penalty "
             "chosen on their validation tiles), tested on every region's test tiles. *geojepa*: the EMA target "
             "encoder; *geojepa_context*: the context encoder; per task and read-out the one with the better "
             "pooled validation score carries the claim.", "",
             "| region | role | " + " | ".join(f"test tiles ({t})" for t in tasks) + " |",
             "|---|---|" + "---|" * len(tasks)]
    for n in names:
        counts = [str(notes[n].get(t, {}).get("test_tiles", "-")) if not notes[n].get(t, {}).get("skipped")
                  else "skipped" for t in tasks]
        lines.append(f"| {n} | {'trained on' if seen[n] else 'holdout'} | " + " | ".join(counts) + " |")
    if comparisons:
        cols = ["every_twin", *NAMED, BEST_PEER, "dummy"]  # every peer's row: corpus_comparisons.json
        lines += ["", "## Headline: GeoJEPA against its untrained twins and the baselines", "",
                  "Gain = how much better GeoJEPA is (MAE: baseline's minus GeoJEPA's; ROC-AUC: GeoJEPA's minus "
                  "the baseline's), [paired 95% bootstrap interval over test tiles]; **bold**: better beyond the "
                  "uncertainty, *italic*: worse. *every twin*: the closest twin's gain, bold only when GeoJEPA is "
                  "better than every twin seed.", "",
                  "| task (metric) | read-out | group | encoder | GeoJEPA | " + " | ".join(cols) + " |",
                  "|---|---|---|---|---|" + "---|" * len(cols)]
        for task in tasks:
            for probe in probes:
                for group in GROUPS:
                    here = {c["baseline_key"]: c for c in comparisons
                            if (c["task"], c["probe"], c["group"]) == (task, probe, group)}
                    if not here:
                        continue
                    c0 = next(iter(here.values()))
                    best = here.get(BEST_PEER)
                    lines.append(f"| {task} ({c0['metric']}) | {probe} | {group} ({c0['regions']}) | {c0['encoder']} | "
                                 f"{c0['geojepa']:.3f} | " + " | ".join(
                                     _verdict(here.get(k)) + (f" ({best['baseline'][len(BEST_PEER) + 2:-1]})"
                                                              if k == BEST_PEER and best else "") for k in cols) + " |")
    for task in tasks:
        metric = proto.headline(TASKS[task].kind)
        main = probes[0] if probes else "mlp"
        here = [r for r in rows if r["setting"] == "masked" and r["task"] == task and r["metric"] == metric
                and r["probe"] in (main, "median")]
        models = sorted(dict.fromkeys(r["model"] for r in here), key=model_order)
        enc = chosen.get((task, main))
        lines += ["", f"## {task}: test {metric}, {main} read-out" + (f" (encoder: {enc})" if enc else ""), "",
                  "| model | " + " | ".join([*names, "all", "trained", "holdout"]) + " |",
                  "|---|" + "---|" * (len(names) + 3)]
        for model in models:
            cells = [_cell(next((r for r in here if r["model"] == model and r["region"] == region), None), 2)
                     for region in [*names, *GROUPS]]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        rel = [r for r in rows if r["setting"] == "masked" and r["task"] == task and r["metric"] == "relative_mae"
               and r["region"] == "all"]
        read = list(dict.fromkeys(r["probe"] for r in rel if r["probe"] != "median"))
        if rel and read:
            lines += ["", f"Relative MAE (MAE / Dummy's, averaged over the {rel[0]['regions']} regions; lower is "
                      "better), every read-out:", "", "| model | " + " | ".join(read) + " |",
                      "|---|" + "---|" * len(read)]
            for model in sorted(dict.fromkeys(r["model"] for r in rel if r["probe"] != "median"), key=model_order):
                lines.append(f"| {model} | " + " | ".join(
                    _cell(next((r for r in rel if r["model"] == model and r["probe"] == q), None))
                    for q in read) + " |")
        cross = [r for r in rows if r["setting"] == "masked" and r["task"] == task and r["metric"] == metric
                 and r["probe"] == CROSS and r["region"] in GROUPS]
        if cross:
            lines += ["", f"Cross-region ridge ({metric}; fitted on every trained-on region, tested on each "
                      "region's test tiles):", "", "| model | all | trained | holdout |", "|---|---|---|---|"]
            for model in dict.fromkeys(r["model"] for r in cross):
                lines.append(f"| {model} | " + " | ".join(
                    _cell(next((r for r in cross if r["model"] == model and r["region"] == g), None)) for g in GROUPS)
                    + " |")
    if not tasks:
        lines += ["", "No task had enough tiles in any region: see each region's report."]
    if cross_notes.get("skipped"):
        lines += ["", f"Cross-region read-out: skipped ({cross_notes['skipped']})."]
    agreement = {n: s.get("agreement", {}) for n, s in summaries.items()}
    models = list(dict.fromkeys(m for a in agreement.values() for m in a))
    if models:
        lines += ["", "## Retrieval agreement", "", "Mean tag-class histogram intersection between each tile and its "
                  "10 nearest tiles (unmasked tiles; 1: the same mix of buildings, roads, shops, ...).", "",
                  "| region | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
        for name, a in agreement.items():
            lines.append(f"| {name} | " + " | ".join(f"{a[m]:.3f}" if m in a else "-" for m in models) + " |")
    lines += _peer_lines({n: s.get("peers") or {"skipped": "evaluated before the peers existed"}
                          for n, s in summaries.items()})
    lines += ["", "Each region's full report: " + ", ".join(f"[{w.name}]({w.eval.report.resolve()})"
                                                            for w in regions), ""]
    return lines
