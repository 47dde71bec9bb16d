"""The fast learning loop: several training arms (config overrides), a few hundred steps each and several
seeds, judged on what says whether a model learns, before anything is scaled.

A spec (YAML)::

    steps: 200                       # training steps per arm and seed
    seeds: [0, 1]                    # pretraining seeds (train.seed)
    data: [work/research/helsinki, work/research/malta, ...]     # the regions trained on
    judge: [work/research/malta, work/research/liechtenstein]    # read out on: one trained-on, one holdout
    choose_on: validation            # the figures the choice reads (default): validation or test tiles
    arms:                            # name -> overrides of the base config (the first arm: the control)
      vicreg: []
      target: [train.regulariser=target]

Each (arm, seed) trains into ``OUT/<arm>-s<seed>`` (skipped when already trained with the same settings) and
is evaluated on each judge region through a view of it (``OUT/views/<arm>-s<seed>/<region>``: links to the
region's artifacts and its evaluation cache, its own ``eval/``), with protocol v2's ridge read-out only, no
peers, the masked setting only (the twins and the baselines come from the region's cache). Judged on:

- ``jepa_gain``: the trivial per-(tile, modality) context-mean loss minus the JEPA loss at the end (its share
  of the trivial loss: what the predictor knows beyond the tile's gist);
- the within-tile share of the target's variance on training batches and on validation tiles, and the
  validation tiles' mean cosine (collapse);
- per judge region and task, the ridge headline metric of the encoder chosen on validation against every
  untrained twin (point estimates; the corpus report gives intervals on the full evaluation).

Writes ``OUT/arms.md`` and ``OUT/arms.json`` after every (arm, seed). A loop cut short resumes: an (arm, seed)
already in ``OUT/arms.json`` made with the same config, overrides, data, steps and judge regions, its last
checkpoint at the row's step, is kept
as it is (neither retrained nor re-read; each row records the code version that made it). Delete its row or its
folder to run it again.

The choice, decided in the spec before any result: an arm *wins* a cell when every one of its seeds is better
than every twin there; arms rank by the cells they win on each judge region in ``rank_by`` order (default: the
judge regions last to first, the holdout listed last counting first), then by their mean ``jepa_gain`` share.
``choose_on`` (default ``validation``): the cells' figures the rule reads, each region's validation tiles
(the test tiles are reported beside, never chosen on) or, as the first three rounds did, ``test``; on
validation, the gain share is the validation tiles' (whole-entity masks fixed once, the same for every arm).
Each cell's encoder (target or context) is the one better on validation, so on validation figures the
model's value is a best of two against each single twin: slightly optimistic, for every arm alike.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import yaml

from data_contracts import EVAL_RESULTS, atomic_path, read_table
from geojepa.config import load_config
from geojepa.errors import GeoJepaError
from geojepa.manifest import code_version
from geojepa.workdir import ModelDir, WorkDir, checkpoint_step

log = logging.getLogger(__name__)
TRAIN_CODE = ("geojepa.model", "geojepa.train")  # the code a row's model was trained by (as the train manifest)
JUDGE = ["evaluate.probes=[ridge]", "evaluate.peers=[]", "evaluate.unmasked=false", "evaluate.map=pca",
         "evaluate.pictures=false"]  # figures only: drawing took 5 to 15 s of each 30 to 70 s read-out


def load_spec(path: Path) -> dict:
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise GeoJepaError(f"{path}: cannot read the arms spec ({e})") from None
    missing = [k for k in ("steps", "seeds", "data", "judge", "arms") if not (spec or {}).get(k)]
    if missing:
        raise GeoJepaError(f"{path}: the arms spec needs {', '.join(missing)} (see geojepa/arms.py)")
    if not isinstance(spec["arms"], dict):
        raise GeoJepaError(f"{path}: arms: a mapping of name -> list of overrides")
    if spec.setdefault("choose_on", "validation") not in ("validation", "test"):
        raise GeoJepaError(f"{path}: choose_on: validation or test, not {spec['choose_on']!r}")
    return spec


def view(region: WorkDir, at: Path) -> WorkDir:
    """``at``: a work directory that links to ``region``'s artifacts and evaluation cache, with its own
    manifests (all but evaluate's copied) and its own ``eval/``. A view of another region at ``at`` (the same
    name, another folder) is replaced whole, its evaluation with it."""
    mine, source = WorkDir(at), Path(at) / ".view-of"
    if source.exists() and source.read_text() != str(region.path.resolve()):
        shutil.rmtree(at)  # only links, copied manifests and the view's own eval/
    mine.manifests.mkdir(parents=True, exist_ok=True)
    source.write_text(str(region.path.resolve()))
    own = {region.eval.path, region.manifests, region.model.checkpoints_dir.path}  # not linked
    for f in region.path.iterdir():
        if f in own or f.name.startswith(f".{region.eval.path.name}.tmp"):  # an evaluation being written
            continue
        link = at / f.name
        if link.is_symlink() and not link.exists():  # a link left from a region since moved
            link.unlink()
        if not (link.is_symlink() or link.exists()):
            link.symlink_to(f.resolve())
    region.eval_cache.mkdir(exist_ok=True)
    if not mine.eval_cache.exists():
        mine.eval_cache.symlink_to(region.eval_cache.resolve())
    for m in region.manifests.glob("*.json"):
        if m != region.manifest("evaluate"):
            shutil.copy(m, mine.manifests / m.name)
    return mine


def run_arms(spec_path: Path, out: Path, config: str | None, overrides: list[str]) -> list[dict]:
    from geojepa.launch import train

    spec = load_spec(spec_path)
    data = [Path(d) for d in spec["data"]]
    judges = [WorkDir(j) for j in spec["judge"]]
    for w in [*map(WorkDir, data), *judges]:
        if not w.tokens.is_dir():
            raise GeoJepaError(f"{w.path}: not a tokenised region (no tokens/); the arms need every region of the "
                               "spec tokenised with one tokenizer")
    rank_by = spec.get("rank_by") or [j.name for j in reversed(judges)]
    if unknown := sorted(set(rank_by) - {j.name for j in judges}):
        raise GeoJepaError(f"{spec_path}: rank_by names {', '.join(unknown)}, not among the judge regions")
    base = {"config": str(config) if config else None, "overrides": list(overrides),
            "data": [d.name for d in data]}  # what every arm shares: a row made under another is not kept
    kept = _earlier_rows(out, spec, base)
    pending = dict(kept)  # kept rows not yet reached stay in arms.json whatever happens to the arms before them
    rows = []
    # every arm at the first seed, then every arm at the next: a loop cut short still compares every arm
    for seed in spec["seeds"]:
        for arm, arm_overrides in spec["arms"].items():
            name = f"{arm}-s{seed}"
            model = out / name
            row = pending.pop((arm, seed), None)
            ckpts = ModelDir(model).checkpoints()
            fresh = bool(ckpts) and checkpoint_step(ckpts[-1]) == (row or {}).get("steps")
            if row and row["overrides"] == (arm_overrides or []) and fresh:
                if "code" not in row and (m := WorkDir(model).manifest("train")).exists():  # rows before "code"
                    row["code"] = json.loads(m.read_text()).get("code")
                log.info("arms: %s is in %s already (code %s): kept", name, out / "arms.json", row.get("code"))
                rows.append(row)
                _write(out, spec, base, rows, pending, rank_by)
                continue
            cfg = load_config(config, [*overrides, *(arm_overrides or []), f"train.max_steps={spec['steps']}",
                                       f"train.seed={seed}"])
            log.info("arms: training %s (%s)", name, ", ".join(arm_overrides or ["control"]))
            train(model, cfg, data=data)
            history = json.loads(ModelDir(model).checkpoints_dir.history.read_text())
            last = history[-1]
            val = next((h for h in reversed(history) if "val.mean_cos.target" in h), {})
            row = {"arm": arm, "seed": seed, "overrides": arm_overrides or [], "steps": last["step"],
                   "jepa": last["jepa"], "trivial": last.get("trivial"), "jepa_gain": last.get("jepa_gain"),
                   "within_share": last.get("within_share"), "val_within_share": val.get("val.within_share.target"),
                   "val_mean_cos": val.get("val.mean_cos.target"), "val_jepa_gain": val.get("val.jepa_gain"),
                   "val_trivial": val.get("val.trivial"), "code": code_version(*TRAIN_CODE), "judge": {}}
            row["judge"] = judge(model, judges, out / "views" / name, load_config(config, [*overrides, *JUDGE,
                                                                                             "tracking.enabled=false"]))
            rows.append(row)
            _write(out, spec, base, rows, pending, rank_by)  # the table so far, after every (arm, seed)
    return rows


def judge(model: Path | str, judges: list[WorkDir], views: Path, cfg) -> dict[str, dict]:
    """``model`` (a model folder or checkpoint) read out on each judge region through a view of it
    (``views/<region>``) with ``cfg`` (the loop's: ridge, masked, no peers): per "region/task", the headline
    metric of the encoder chosen on validation, every twin's, TagPool's, and whether training saw the region.
    ``python -c "from geojepa.arms import judge; ..."`` reads out a longer run the way the loop reads an arm."""
    from geojepa.evaluate import evaluate
    from geojepa.evaluate.protocol import is_twin
    from geojepa.evaluate.report import chosen_encoders, headline_metric

    cells = {}
    for region in judges:
        v = view(region, Path(views) / region.name)
        evaluated = evaluate(v.path, cfg, model=model)
        results = read_table(v.eval.results, EVAL_RESULTS).to_pylist()
        for task, enc in chosen_encoders(results, "ridge").items():
            metric = headline_metric(task)
            cell = [r for r in results
                    if (r["setting"], r["task"], r["probe"], r["metric"]) == ("masked", task, "ridge", metric)]
            get = {r["model"]: r["mean"] for r in cell}
            val = {r["model"]: r.get("val_mean") for r in cell}
            twins = [x for m, x in get.items() if is_twin(m) and x is not None]
            cells[f"{region.name}/{task}"] = {"metric": metric, "encoder": enc, "value": get.get(enc), "twins": twins,
                                              "tagpool": get.get("tagpool"),
                                              "seen": evaluated.summary.seen_in_training,
                                              "val": val.get(enc),
                                              "twins_val": [x for m, x in val.items() if is_twin(m) and x is not None]}
    return cells


def select_checkpoint(run: Path, regions: list[WorkDir], views: Path, cfg, every: int = 1) -> dict:
    """The checkpoint of training run ``run`` (a model folder) to ship and evaluate, chosen on validation:
    every ``every``-th checkpoint (the last always among them) read out the loop's way (``judge``) on
    trained-on ``regions``; only the validation figures (``val_mean``) enter the choice and
    ``selection.json``. A checkpoint ranks by the (region, task) cells where it beats every twin, then by
    its mean gain over the twins' mean, on the cells every read checkpoint has; ties go to the earlier one.
    Each cell's encoder (target or context) is the one better on validation, as in the report: a best of
    two against each single twin, at every checkpoint alike. ``selection.json`` is written after each
    checkpoint; a rerun with the same regions, evaluate settings and code reuses its rows."""
    if not Path(run).is_dir():
        raise GeoJepaError(f"{run}: no such folder (a training run's folder, holding checkpoints/)")
    ckpt_dir = ModelDir(run).checkpoints_dir
    ckpts = ModelDir(run).checkpoints()
    if not ckpts:
        raise GeoJepaError(f"{ckpt_dir.path}: no step-*.pt checkpoint to choose from")
    if every < 1:
        raise GeoJepaError(f"--every must be at least 1, not {every}")
    conf = _train_config(ckpt_dir)
    for r in regions:
        if not r.tokens.is_dir():
            raise GeoJepaError(f"{r.path}: not a tokenised region (no tokens/)")
        if "regions" in conf and r.name not in conf["regions"]:
            raise GeoJepaError(f"{r.path}: not among the regions {run} was trained on ({', '.join(conf['regions'])}); "
                               "choose on trained-on regions' validation tiles, never a holdout's")
    if conf.get("checkpoint_every") and checkpoint_step(ckpts[0]) > conf["checkpoint_every"]:
        log.warning("select: %s starts at step %d: the earlier checkpoints are gone (train.keep_last %s)",
                    ckpt_dir.path, checkpoint_step(ckpts[0]), conf.get("keep_last"))
    same = {"regions": [str(r.path.resolve()) for r in regions],
            "evaluate": cfg.evaluate.model_dump(mode="json") if cfg is not None else None,
            "code": code_version("geojepa.evaluate", "geojepa.arms")}
    out = ckpt_dir.selection
    try:
        earlier = json.loads(out.read_text())
        done = {row["step"]: row for row in earlier["rows"]} if earlier.get("same") == same else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        done = {}
    rows, new = [], []
    for c in ckpts[::-1][::every][::-1]:
        step, stamp = checkpoint_step(c), [c.stat().st_size, c.stat().st_mtime_ns]
        if done.get(step, {}).get("file") != stamp:  # not read yet, or the checkpoint was written again since
            cells = judge(c, regions, Path(views), cfg)
            val = {k: {"metric": v["metric"], "encoder": v["encoder"], "val": v["val"], "twins_val": v["twins_val"]}
                   for k, v in cells.items() if v["val"] is not None and v["twins_val"]}
            if empty := [r.name for r in regions if not any(k.startswith(f"{r.name}/") for k in val)]:
                raise GeoJepaError(f"{', '.join(empty)}: no task with validation figures (each task needs labelled "
                                   "tiles in every split, test included, for evaluate to read it out): choose on "
                                   "other regions")
            done[step] = {"step": step, "checkpoint": c.name, "file": stamp, "cells": val}
            new.append(step)
        rows.append(done[step])
        common = set.intersection(*(set(r["cells"]) for r in rows))
        for r in rows:
            r.update(_val_score({k: r["cells"][k] for k in common}))
        if step not in new:
            log.info("select: step %d: read before (%s)", step, out)
        else:
            log.info("select: step %d: better than every twin on validation in %d of %d cells, mean gain %+.3f",
                     step, done[step]["won"], len(common), done[step]["gain"])
        best = max(rows, key=lambda r: (r["won"], r["gain"], -r["step"]))
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps({"run": str(run), "same": same, "chosen": best["checkpoint"],
                                       "rule": "most validation cells better than every twin, then mean gain, "
                                               "then the earlier", "rows": rows}, indent=1))
    log.info("select: %s chosen (written to %s)", ckpt_dir.path / best["checkpoint"], out)
    if conf.get("out_dir") and Path(conf["out_dir"]).resolve() == Path(run).resolve():  # not a copy's origin
        _log_to_training_run(conf, [r for r in rows if r["step"] in new], best["checkpoint"])
    return {"chosen": ckpt_dir.path / best["checkpoint"], "rows": rows}


def _train_config(ckpt_dir) -> dict:
    try:
        conf = json.loads(ckpt_dir.train_config.read_text())
    except (OSError, ValueError):
        return {}
    return conf if isinstance(conf, dict) else {}


def _log_to_training_run(conf: dict, rows: list[dict], chosen: str) -> None:
    """The newly read checkpoints' figures as curves of the training run's own MLflow run (beside its
    losses), when mlflow is installed and the run recorded one."""
    run_id, uri = conf.get("mlflow_run_id"), conf.get("tracking_uri")
    if not run_id or not uri or not rows:
        return
    try:
        import mlflow
    except ImportError:
        return
    from geojepa.tracking import mask_uri

    client = mlflow.MlflowClient(uri)
    try:
        for r in rows:
            client.log_metric(run_id, "select.val_cells_won", r["won"], step=r["step"])
            client.log_metric(run_id, "select.val_gain", r["gain"], step=r["step"])
        client.set_tag(run_id, "select.chosen", chosen)
        log.info("select: figures logged to the training run %s at %s", run_id, mask_uri(uri))
    except mlflow.exceptions.MlflowException as e:
        log.warning("select: could not log to the training run %s at %s: %s", run_id, mask_uri(uri), e)


def _val_score(cells: dict[str, dict]) -> dict:
    """Cells better than every twin on validation, and the mean gain over the twins' mean as a share of it
    (positive: better; a cell whose twins score 0 counts for the wins only)."""
    won, gains = 0, []
    for c in cells.values():
        won += bool(_better(figures(c, "validation")))
        twin = sum(c["twins_val"]) / len(c["twins_val"])
        if twin:
            gains.append(((c["val"] - twin) if c["metric"] == "roc_auc" else (twin - c["val"])) / abs(twin))
    return {"won": won, "gain": sum(gains) / len(gains) if gains else 0.0}


def _earlier_rows(out: Path, spec: dict, base: dict) -> dict[tuple[str, int], dict]:
    """The rows of an earlier run of this loop into ``out`` that still hold: the same steps, judge regions,
    training regions, config and overrides (a file from before the last three were recorded: same steps and
    judges)."""
    try:
        earlier = json.loads((out / "arms.json").read_text())
    except (OSError, ValueError):
        return {}
    same = earlier.get("spec", {}).get("steps") == spec["steps"] and \
        [Path(j).name for j in earlier.get("spec", {}).get("judge", [])] == [Path(j).name for j in spec["judge"]]
    if "base" in earlier:
        same = same and earlier["base"] == base
    elif same:
        log.warning("arms: %s records no config or overrides (an older file): its rows are kept on steps and "
                    "judges alone", out / "arms.json")
    return {(r["arm"], r["seed"]): r for r in earlier.get("rows", [])} if same else {}


def figures(cell: dict, on: str) -> dict:
    """A judged cell with the figures of ``on`` (``validation`` or ``test``) as its value and twins."""
    if on == "validation":
        return {**cell, "value": cell.get("val"), "twins": cell.get("twins_val") or []}
    return cell


def choice(rows: list[dict], rank_by: list[str], on: str = "validation") -> list[dict]:
    """Per arm, best first by the rule in this module's docstring: its seeds, the cells it wins (every seed
    better than every twin, on the figures of ``on``) on each region, and its mean jepa_gain share. An arm with
    fewer seeds than the most any arm has (a loop cut short) ranks after every complete one, marked
    ``complete: False``: one seed wins a cell more easily than two."""
    arms: dict[str, list[dict]] = {}
    for r in rows:
        arms.setdefault(r["arm"], []).append(r)
    ranked = []
    for arm, runs in arms.items():
        cells = set.intersection(*(set(r["judge"]) for r in runs))
        won = sorted(c for c in cells if all(_better(figures(r["judge"][c], on)) for r in runs))
        # on validation, the validation tiles' whole-entity masks fixed once: the same task for every arm (the
        # training batches' differ: partial entity masks make the training task easier)
        shares = [x for r in runs if (x := gain_share(r, on == "validation")) is not None]
        ranked.append({"arm": arm, "seeds": [r["seed"] for r in runs], "won": won,
                       "by_region": [sum(c.split("/")[0] == region for c in won) for region in rank_by],
                       "gain_share": sum(shares) / len(shares) if shares else None})
    most = max((len(a["seeds"]) for a in ranked), default=0)
    for a in ranked:
        a["complete"] = len(a["seeds"]) == most
    return sorted(ranked, key=lambda a: (not a["complete"], [-n for n in a["by_region"]],
                                         float("inf") if a["gain_share"] is None else -a["gain_share"]))


def gain_share(row: dict, val: bool = False) -> float | None:
    """A row's jepa_gain as a share of its trivial loss: at the last training step, or (``val``) on the
    validation tiles; None when not recorded."""
    gain, trivial = (row.get("val_jepa_gain"), row.get("val_trivial")) if val else (row["jepa_gain"], row["trivial"])
    return None if not trivial or gain is None else gain / trivial


def _better(c: dict) -> bool | None:
    if c.get("value") is None or not c["twins"]:
        return None
    higher = c["metric"] == "roc_auc"
    return all((c["value"] > t) if higher else (c["value"] < t) for t in c["twins"])


def _write(out: Path, spec: dict, base: dict, rows: list[dict], pending: dict, rank_by: list[str]) -> None:
    rows = [*rows, *pending.values()]
    on = spec.get("choose_on", "validation")
    cells = list(dict.fromkeys(k for r in rows for k in r["judge"]))
    lines = [f"# Arms: {spec['steps']} steps, seeds {spec['seeds']}", "",
             f"Trained on {len(spec['data'])} region{'s' if len(spec['data']) != 1 else ''}; read out on "
             f"{', '.join(Path(j).name for j in spec['judge'])} "
             f"(ridge, masked, protocol v2; point estimates on each region's {on} tiles"
             + ("; the test tiles' below" if on == "validation" else "") + "). *gain*: trivial "
             "per-(tile, modality) context-mean loss minus the JEPA loss at the last step, and its share of the "
             "trivial loss (*val gain*: the same on validation tiles under fixed masks); *within*: the "
             "within-tile share of the target's variance (training batch / validation "
             "tiles); *cos*: validation tiles' mean cosine (collapse above 0.95). Per region and task: the "
             "encoder's value, **bold** when better than every twin (its own architecture's untrained twins: an arm "
             "that changes the architecture, e.g. train.pos_fourier, has other twins).", "",
             "| arm | seed | jepa | gain (share) | val gain (share) | within (train / val) | cos | "
             + " | ".join(cells) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(cells)]

    def f(x, d=3):
        return "-" if x is None else f"{x:.{d}f}"

    def judged(r: dict, kind: str) -> list[str]:
        out = []
        for k in cells:
            c = r["judge"].get(k)
            c = None if c is None else figures(c, kind)
            if c is None or c["value"] is None:
                out.append("-")
                continue
            text = f"{c['value']:.3f} (twins {min(c['twins']):.3f} to {max(c['twins']):.3f})" if c["twins"] else \
                f"{c['value']:.3f}"
            out.append(f"**{text}**" if _better(c) else text)
        return out

    for r in rows:
        lines.append(f"| {r['arm']} | {r['seed']} | {f(r['jepa'])} | {f(r['jepa_gain'])} ({f(gain_share(r), 2)}) | "
                     f"{f(r.get('val_jepa_gain'))} ({f(gain_share(r, val=True), 2)}) | "
                     f"{f(r['within_share'], 2)} / {f(r['val_within_share'], 2)} | {f(r['val_mean_cos'])} | "
                     + " | ".join(judged(r, on)) + " |")
    if on == "validation":
        lines += ["", "The same on each region's test tiles (reported, never chosen on):", "",
                  "| arm | seed | " + " | ".join(cells) + " |", "|---|---|" + "---|" * len(cells)]
        lines += [f"| {r['arm']} | {r['seed']} | " + " | ".join(judged(r, "test")) + " |" for r in rows]
    ranked = choice(rows, rank_by, on)
    lines += ["", f"Choice (rule, on the {on} figures: an arm wins a cell when every seed run is better than every "
                  "twin; ranked by cells "
                  f"won on {', then '.join(rank_by)}, then mean {'validation ' if on == 'validation' else ''}"
                  "gain share" + ("; a cell's encoder, target or context, is the better on validation, so its "
                                  "validation figure is a best of two against each twin" if on == "validation"
                                  else "") + "):", "",
              "| rank | arm | seeds | " + " | ".join(f"won on {r}" for r in rank_by)
              + " | mean gain share | cells won |",
              "|---|---|---|" + "---|" * len(rank_by) + "---|---|"]
    for i, a in enumerate(ranked, 1):
        seeds = ", ".join(map(str, a["seeds"])) + ("" if a["complete"] else " (incomplete)")
        lines.append(f"| {i} | {a['arm']} | {seeds} | "
                     + " | ".join(map(str, a["by_region"])) + f" | {f(a['gain_share'], 2)} | "
                     + (", ".join(a["won"]) or "-") + " |")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "arms.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_path(out / "arms.json") as tmp:
        tmp.write_text(json.dumps({"spec": spec, "base": base, "rows": rows, "choice": ranked}, indent=1, default=str))
