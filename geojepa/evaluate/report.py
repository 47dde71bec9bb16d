"""The evaluation report: one Markdown page with the protocol, the headline table, the task notes, every
result and the pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from geojepa.evaluate.labels import TASKS
from geojepa.evaluate.probes import ENCODERS
from geojepa.evaluate.protocol import PRESETS, Protocol, is_twin

METRICS = ("mae", "r2", "accuracy", "roc_auc")
HIGHER_IS_BETTER = ("r2", "accuracy", "roc_auc")


def _cell(r: dict | None) -> str:
    if r is None or r["mean"] is None:
        return "-"
    return f"{r['mean']:.3f}" + (f" ± {r['std']:.3f}" if r["seeds"] > 1 else "")


def headline_metric(task: str, proto: Protocol | None = None) -> str:
    return (proto or PRESETS["v2"]).headline(TASKS[task].kind)


def chosen_encoders(results: list[dict], probe: str = "mlp", proto: Protocol | None = None) -> dict[str, str]:
    """Per task, the trained encoder behind the headline of ``probe``: the one with the better masked
    *validation* headline metric (never chosen on the test split). Pooled over regions by
    ``geojepa.evaluate.corpus``."""
    best: dict[str, tuple[float, str]] = {}
    for r in results:
        metric = headline_metric(r["task"], proto)
        if (r["setting"], r["probe"], r["metric"]) == ("masked", probe, metric) and r["model"] in ENCODERS \
                and r.get("val_mean") is not None:
            v = -r["val_mean"] if metric in HIGHER_IS_BETTER else r["val_mean"]
            if v < best.get(r["task"], (np.inf, ""))[0]:
                best[r["task"]] = (v, r["model"])
    return {t: m for t, (_, m) in sorted(best.items())}


def protocol_lines(proto: dict | None) -> list[str]:
    """The protocol paragraph every report opens with."""
    if not proto or proto.get("name") == "reference":
        return ["**Protocol: reference** (the thesis's comparison): tile vector concat(mean, max) of the encoder's "
                "outputs; linear and MLP probes (AdamW, L1, stopped on validation MAE), kNN at a fixed k "
                "(evaluate.k); one untrained twin; MAE for every task.", ""]
    pooling = "mean" if proto["pooling"] == "mean" else "concat(mean, max)"
    return [f"**Protocol: v2.** Tile vector of every encoder and of TagPool: the {pooling} of its outputs"
            + (" plus log(1 + tokens) per modality" if proto["count_features"] else "") + "; read-outs fixed in "
            f"advance, all reported: closed-form *ridge* (penalty and, for counts, log target chosen on held-out "
            f"tiles), *mlp* ({proto['seeds']} seeds, at most {proto['max_epochs']} epochs, patience "
            f"{proto['patience']}; logistic for binary tasks) and cosine *knn* (k chosen likewise), on standardised "
            "features clipped at |z| <= 5, predictions within the training labels' range. Ridge and kNN settings are "
            f"chosen on the validation split, or by grouped {proto.get('cv_folds', 5)}-fold cross-validation over "
            f"train + validation when it has fewer than {proto.get('cv_min_val', 100)} tiles (the MLP stops on the "
            f"validation split). {proto['twin_seeds']} untrained twins (same architecture, consecutive seeds): a "
            "claim over 'the twin' must hold against each. Headline: MAE for counts and max_speed, ROC-AUC for "
            "bridge and car_bridge.", ""]


def headline_markdown(results: list[dict], proto: dict | None) -> list[str]:
    """Per masked task: each model's headline metric under each read-out (test mean ± std over seeds), and
    the twins' range."""
    p = Protocol(**proto) if proto else PRESETS["reference"]
    out = []
    for task in sorted({r["task"] for r in results if r["setting"] == "masked"}):
        metric = headline_metric(task, p)
        rows = [r for r in results if r["setting"] == "masked" and r["task"] == task and r["metric"] == metric]
        probes = [q for q in dict.fromkeys(r["probe"] for r in rows) if q != "median"]
        models = list(dict.fromkeys(r["model"] for r in rows))
        arrow = "higher is better" if metric in HIGHER_IS_BETTER else "lower is better"
        out += [f"### {task}: test {metric} ({arrow})", "", "| model | " + " | ".join(probes) + " |",
                "|---|" + "---|" * len(probes)]
        for m in models:
            cells = [next((_cell(r) for r in rows if r["model"] == m and r["probe"] == q), "-") for q in probes]
            if m == "dummy":
                cells = [next((_cell(r) for r in rows if r["model"] == m), "-")] * len(probes)
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        twins = [m for m in models if is_twin(m)]
        if len(twins) > 1:
            spans = []
            for q in probes:
                v = [r["mean"] for r in rows if r["probe"] == q and is_twin(r["model"]) and r["mean"] is not None]
                if v:
                    spans.append(f"{q} {min(v):.3f} to {max(v):.3f}")
            out += ["", f"Twins ({len(twins)} seeds): " + "; ".join(spans) + "."]
        out += _verdicts(results, task, metric, probes, p)
        out.append("")
    return out


def _verdicts(results: list[dict], task: str, metric: str, probes: list[str], p: Protocol) -> list[str]:
    """Per read-out, where the trained encoder (chosen on validation) stands against every twin: point estimates
    on this region's test tiles (the corpus report pools regions and gives intervals)."""
    higher = metric in HIGHER_IS_BETTER
    lines = []
    for q in probes:
        enc = chosen_encoders([r for r in results if r["task"] == task], q, p).get(task)
        get = {r["model"]: r for r in results if (r["setting"], r["task"], r["probe"], r["metric"])
               == ("masked", task, q, metric) and r["mean"] is not None}
        twins = [get[m]["mean"] for m in get if is_twin(m)]
        if enc is None or enc not in get or not twins:
            continue
        v = get[enc]["mean"]
        better = sum((v > t) if higher else (v < t) for t in twins)
        where = ("better than every twin" if better == len(twins) else "worse than every twin" if better == 0
                 else f"better than {better} of {len(twins)} twins")
        lines.append(f"- {q}: {enc} {v:.3f} is {where} ({min(twins):.3f} to {max(twins):.3f}), on "
                     f"{get[enc]['n_test']} test tiles, point estimates only.")
    return ["", "Trained encoder (chosen on validation) against the twins:", *lines] if lines else []


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
        out.append("| model | probe | " + " | ".join(metrics) + " | held-out val mae | chosen |")
        out.append("|---|---|" + "---|" * (len(metrics) + 2))
        for model, probe in dict.fromkeys((r["model"], r["probe"]) for r in rows):
            cells = {r["metric"]: r for r in rows if r["model"] == model and r["probe"] == probe}
            val = cells.get("mae", {}).get("val_mean")
            chosen = cells.get("mae", {}).get("params") or ""
            out.append(f"| {model} | {probe} | " + " | ".join(_cell(cells.get(m)) for m in metrics)
                       + f" | {'-' if val is None else f'{val:.3f}'} | {chosen} |")
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
    lines += [
        f"SRAI {notes['srai']}'s embedders on this region's tiles: *count* (tag counts), *contextual_count* "
        "(with the neighbours' counts), *hex2vec* (a skip-gram over tile adjacency), *geovex* (a hexagonal "
        f"convolutional autoencoder, run on the square grid), counting the {notes['features']} key=value "
        f"pairs found on the most training tiles (at most {notes.get('feature_cap', '-')}); hex2vec and "
        f"geovex trained on this region's {notes['fitted_on_tiles']} training tiles (so, unlike GeoJEPA on a "
        "holdout region, they have seen the region). In the masked setting they see the same tags removed; "
        "they are probed in the masked setting only. Time: seconds on this machine, embedding = all passes "
        "(unmasked and each masked one); peak: the largest resident-memory (RSS) rise in a fit or pass.",
        *(
            [
                f"Read from the region's evaluation cache: the fit below ran at {notes.get('fitted_at', 'an earlier')} "
                "evaluation of this region."
            ]
            if notes.get("cached")
            else []
        ),
        "",
        "| peer | width | fit s | embedding s | peak RSS rise MB |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {p} | {st['dim']} | {st['fit_seconds']:.1f} | {st['embed_seconds']:.1f} | {st['peak_mb']:.0f} |"
              for p, st in notes["fitted"].items()]
    return lines + [""]


def write_report(path: Path, results: list[dict], summary: dict, region: str) -> None:
    lines = [f"# GeoJEPA evaluation: {region}", "",
             f"Checkpoint `{summary['checkpoint']}`; {summary['tiles']} tiles, {summary['entities']} entity "
             f"embeddings; {summary['seconds']} s.", "", *_timing(summary.get("timing")),
             f"**Region {region}: {summary.get('role', 'trained on')}.** Tokenizer "
             f"`{summary.get('tokenizer_digest') or 'region-own'}`.", "",
             *protocol_lines(summary.get("protocol")),
             "*masked*: the task's label-defining tags were removed from every entity of its tiles before "
             "embedding (entities left without tags removed). *unmasked*: the original tiles, for reference only. "
             "Probes: mean ± std over seeds on the test split; *untrained*, *untrained_1*, ...: the same "
             "architecture at random initialisation (twins). *geojepa* is the trained EMA target encoder, "
             "*geojepa_context* the trained context encoder; per task and read-out, the better on validation "
             "carries the claim (the corpus report pools regions and says which claims hold beyond the "
             "uncertainty).",
             *(["", f"Image tokens in the masked setting: {summary['masked_images']}."]
               if summary.get("masked_images") else []), "", "## Headline (masked)", "",
             *headline_markdown(results, summary.get("protocol")), *_chosen_line(results, summary.get("protocol")),
             "## Tasks", "",
             "| task | tiles | emptied by masking | train | val | test | settings chosen by | skipped |",
             "|---|---|---|---|---|---|---|---|"]
    for name, n in summary["tasks"].items():
        c = n.get("choice") or {}
        how = (f"validation ({c['held_out_tiles']} tiles)" if c.get("mode") == "validation" else
               f"{c['folds']}-fold grouped CV ({c['held_out_tiles']} tiles)" if c.get("mode") == "cv" else "-")
        lines.append(f"| {name} | {n['tiles']} | {n['emptied_by_masking']} | {n['train_tiles']} | {n['val_tiles']} | "
                     f"{n['test_tiles']} | {how} | {n['skipped'] or ''} |")
    lines += ["", "## Results (test split)", "", results_markdown(results) or "No task had enough tiles.", "",
              "## Retrieval", "", "Mean tag-class histogram intersection between each tile and its k nearest tiles "
              "(1: the same mix of buildings, roads, shops, ...).", "", "| model | agreement |", "|---|---|"]
    lines += [f"| {m} | {v:.3f} |" for m, v in summary["agreement"].items()]
    lines += ["", *_peers(summary.get("peers"))]
    lines += ["", "## Pictures", ""]
    drawn = [f"![{name}]({file})" if file.endswith(".png") else f"[{name}]({file})"
             for name, file in summary["pictures"].items()]
    lines += drawn or ["None drawn (evaluate.pictures=false, or too few tiles)."]
    path.write_text("\n".join(lines) + "\n")


def _chosen_line(results: list[dict], proto: dict | None) -> list[str]:
    p = Protocol(**proto) if proto else PRESETS["reference"]
    probe = "ridge" if "ridge" in p.probes else "mlp"
    chosen = chosen_encoders(results, probe, p)
    if not chosen:
        return []
    return [f"Trained encoder carrying each task's claim (better {probe} validation score): "
            + ", ".join(f"{t}: {m}" for t, m in chosen.items()) + ".", ""]


def headline(results: list[dict], tasks: dict) -> str:
    """One line for a summary table: the first probed task's masked test MAE per model (ridge or MLP probes,
    and Dummy), or why no task was probed."""
    probe = "ridge" if any(r["probe"] == "ridge" for r in results) else "mlp"
    rows = [r for r in results if r["setting"] == "masked" and r["metric"] == "mae" and r["probe"] in (probe, "median")]
    done = sorted({r["task"] for r in rows})
    if not done:
        reasons = {n["skipped"] for n in tasks.values()}
        return f"no task probed ({'; '.join(sorted(reasons))}); retrieval and pictures only"
    t = done[0]
    maes = ", ".join(f"{r['model']} {r['mean']:.1f}" for r in rows if r["task"] == t)
    return f"{t} test MAE ({probe}): {maes}; {len(done)}/{len(tasks)} tasks probed"
