"""The probes phase: every read-out of every feature set of every task, side by side on a thread pool, and the
result and prediction rows they make.

Work units: a ridge or kNN read-out per (task, setting, model); an MLP (or the reference's linear probe) per
(task, setting, feature width), its feature sets and seeds stacked into one fit
(``probe.fit_predict_seeds``), the largest split by seeds so no thread waits alone at the end. Under v2 the
features are standardised and clipped (``readouts.standardise_clipped``) and binary tasks use a logistic MLP;
under the reference protocol the probes are the thesis's (``probe.standardise``, L1, kNN at k on raw
features, no choice).

Every probe of a feature set that is not a trained encoder's (twins, TagPool, bag-of-tags, the peers) is
content-addressed in the region's cache (``probe_key``: the features, labels, splits, groups and settings), so
evaluating another model on the region fits only the model's own probes.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from data_contracts import PREDICTIONS
from geojepa.encoding.neighbours import topk_cosine
from geojepa.encoding.shards import release
from geojepa.evaluate import readouts
from geojepa.evaluate.cache import Cache, key
from geojepa.evaluate.labels import Task
from geojepa.evaluate.probe import ProbeSettings, fit_predict_seeds, metrics, standardise
from geojepa.evaluate.protocol import Protocol
from geojepa.progress import Progress

log = logging.getLogger(__name__)
ENCODERS = ("geojepa", "geojepa_context")  # the trained model's EMA target and context encoders: never cached
_INIT = threading.Lock()


@dataclass
class TaskProbes:
    """One task's probe work: ``jobs`` = [(setting, {model: features}, read-outs, with Dummy)], labels, splits,
    spatial groups and tile ids of its tiles."""

    task: Task
    jobs: list
    y: np.ndarray
    sp: np.ndarray
    groups: np.ndarray
    ids: np.ndarray

    def split(self, s: str) -> np.ndarray:
        return np.flatnonzero(self.sp == s)


def probe_key(probe: str, x: np.ndarray, pr: TaskProbes, proto: Protocol, section) -> str:
    """Everything a cached probe's predictions depend on: the read-out, the protocol and settings, the task's
    kind, the features, labels, splits and groups, torch's version and the read-outs' code."""
    settings = {k: getattr(section, k) for k in ("hidden", "lr", "weight_decay", "batch", "seed", "k")}
    return key(_code(), torch.__version__, probe, pr.task.kind, proto.__dict__, settings, x,
               pr.y.astype(np.float64), pr.sp.astype(str).astype("U8"), pr.groups.astype(np.int64))


@functools.cache
def _code() -> str:
    from geojepa import manifest

    return manifest.code_version("geojepa.evaluate.readouts", "geojepa.evaluate.probe", "geojepa.evaluate.probes",
                                 "geojepa.encoding.neighbours")


def score(probes: list[TaskProbes], proto: Protocol, section, pool, cache: Cache
          ) -> tuple[list[dict], pa.Table, dict, dict]:
    """(result rows, prediction rows, seconds of a core per task, per task how its settings were chosen or why it
    was skipped)."""
    seeds = list(range(section.seed, section.seed + proto.seeds))
    settings = ProbeSettings(section.hidden, section.lr, section.weight_decay, proto.max_epochs, proto.patience,
                             section.batch)
    plans, choice, units, preds, keys, std = {}, {}, [], {}, {}, {}
    for t, pr in enumerate(probes):
        if proto.choose:
            try:
                plans[t] = readouts.plan(pr.sp, pr.groups, proto.cv_min_val, proto.cv_folds, section.seed)
            except ValueError as e:
                choice[pr.task.name] = {"skipped": f"too few tiles to choose read-out settings: {e}"}
                log.warning("evaluate: task %s skipped: %s", pr.task.name, choice[pr.task.name]["skipped"])
                continue
            p = plans[t]
            choice[pr.task.name] = {"mode": p.mode, "held_out_tiles": int(sum(len(o) for _, o in p.rounds)),
                                    "folds": len(p.rounds)}
        tr = pr.split("train")
        for setting, feats, wanted, _ in pr.jobs:
            widths: dict[tuple[str, int], list[str]] = {}
            for model, x in feats.items():
                for probe in wanted:
                    if model not in ENCODERS:
                        keys[t, setting, model, probe] = k = probe_key(probe, x, pr, proto, section)
                        if (hit := cache.load("probes", k)) is not None:
                            preds[t, setting, model, probe] = (hit["val"], hit["test"], str(hit["chosen"]))
                            continue
                    if probe in ("mlp", "linear"):
                        if (t, setting, model) not in std:
                            std[t, setting, model] = (readouts.standardise_clipped(x, tr) if proto.clip
                                                      else standardise(x, tr))
                        widths.setdefault((probe, x.shape[1]), []).append(model)
                    else:
                        units.append([len(x) * x.shape[1], "one", t, setting, probe, (model,), seeds])
            for (probe, dim), models in widths.items():
                cost = len(tr) * dim * len(models) * len(seeds) * (section.hidden if probe == "mlp" else 1) * 20
                units.append([cost, "stack", t, setting, probe, tuple(models), seeds])
    total, n_workers = sum(u[0] for u in units), workers()
    parts = []
    for u in units:
        n = min(n_workers, len(u[6])) if u[1] == "stack" and n_workers > 1 and u[0] > total / (2 * n_workers) else 1
        parts += [[u[0] * len(c) / len(u[6]), *u[1:6], c.tolist()] for c in np.array_split(np.array(u[6]), n)]
    parts.sort(key=lambda u: -u[0])
    seconds, lock = np.zeros(len(probes)), threading.Lock()
    progress = Progress("evaluate: probes", len(parts), "fits")

    def run(u):
        t0 = time.perf_counter()
        _, how, t, setting, probe, models, chunk = u
        pr = probes[t]
        feats = next(f for s, f, _, _ in pr.jobs if s == setting)
        if how == "one":
            x = feats[models[0]]
            if proto.choose:
                r = (readouts.ridge if probe == "ridge" else readouts.knn)(x, pr.y, pr.task.kind, plans[t])
                got = {models[0]: (r.val[None], r.test, r.chosen)}
            else:  # the reference's kNN: k fixed, raw features, fitted on train
                got = {models[0]: _knn_fixed(x, pr, min(section.k, len(pr.split("train"))))}
        else:
            va, te = pr.split("val"), pr.split("test")
            scored = np.concatenate([va, te])
            loss = "logistic" if proto.binary_loss == "logistic" and pr.task.kind == "binary" else "l1"
            p = fit_predict_seeds(probe, [std[t, setting, m] for m in models], pr.y, pr.split("train"), va,
                                  scored, chunk, settings, init_lock=_INIT, loss=loss)
            got = {m: (pm[:, : len(va)], pm[:, len(va) :], f"seeds={len(chunk)}") for m, pm in zip(models, p,
                                                                                                  strict=True)}
        with lock:
            for m, (v, te_, chosen) in got.items():
                k_ = (t, setting, m, probe)
                if k_ in preds and how == "stack":  # another chunk of seeds of the same fit
                    v0, t0_, _ = preds[k_]
                    v, te_, chosen = np.concatenate([v0, v]), np.concatenate([t0_, te_]), f"seeds={len(seeds)}"
                preds[k_] = (v, te_, chosen)
            seconds[t] += time.perf_counter() - t0
            progress.update()
        release()

    list(pool.map(run, parts))
    progress.close()
    for k_, cache_key in keys.items():
        if k_ in preds and cache.load_notes("probes", cache_key) is None:
            v, te_, chosen = preds[k_]
            cache.save("probes", cache_key, {"val": np.asarray(v), "test": np.asarray(te_), "chosen": np.array(chosen)})
            cache.save_notes("probes", cache_key, {"task": probes[k_[0]].task.name, "model": k_[2], "probe": k_[3]})
    rows, out = _rows(probes, preds, plans, proto)
    return rows, out, {pr.task.name: round(float(seconds[t]), 2) for t, pr in enumerate(probes)}, choice


def _knn_fixed(x: np.ndarray, pr: TaskProbes, k: int):
    tr, va, te = pr.split("train"), pr.split("val"), pr.split("test")
    out = []
    for rows in (va, te):
        _, idx = topk_cosine(x[rows], x[tr], k)
        out.append(pr.y[tr][idx].mean(1)[None])
    return out[0], out[1], f"k={k}"


def _rows(probes: list[TaskProbes], preds: dict, plans: dict, proto: Protocol) -> tuple[list[dict], pa.Table]:
    rows, out = [], {f.name: [] for f in PREDICTIONS.schema}
    for t, pr in enumerate(probes):
        if proto.choose and t not in plans:
            continue
        task, y = pr.task, pr.y
        tr, va, te = pr.split("train"), pr.split("val"), pr.split("test")
        scored, n_tr = np.concatenate([va, te]), len(tr)

        def add(setting, model, probe, v, te_, chosen, task=task, y=y, va=va, te=te, scored=scored, n_tr=n_tr,
                ids=pr.ids):
            runs = [metrics(task.kind, y[te], p) for p in te_]
            val = [metrics(task.kind, y[va], p) for p in v]
            for metric in runs[0]:
                vals = [r[metric] for r in runs if r[metric] is not None]
                vv = [r[metric] for r in val if r[metric] is not None]
                rows.append({"setting": setting, "task": task.name, "model": model, "probe": probe, "metric": metric,
                             "mean": float(np.mean(vals)) if vals else None,
                             "std": float(np.std(vals)) if vals else None, "seeds": len(runs),
                             "n_train": n_tr, "n_test": len(te), "val_mean": float(np.mean(vv)) if vv else None,
                             "params": chosen})
            k = len(scored)
            both = np.concatenate([np.asarray(v, np.float32).reshape(len(te_), -1), np.asarray(te_, np.float32)], 1)
            for col, vals_ in (("setting", [setting] * k), ("task", [task.name] * k), ("model", [model] * k),
                               ("probe", [probe] * k), ("split", ["val"] * len(va) + ["test"] * len(te)),
                               ("tile_id", ids[scored].tolist()), ("label", y[scored].tolist()),
                               ("pred", both.T.tolist())):
                out[col] += vals_

        for setting, feats, wanted, dummy in pr.jobs:
            if dummy:
                med = float(np.median(y[tr]))
                add(setting, "dummy", "median", np.full((1, len(va)), med), np.full((1, len(te)), med), "median")
            for model in feats:
                for probe in wanted:
                    if (t, setting, model, probe) in preds:
                        v, te_, chosen = preds[t, setting, model, probe]
                        add(setting, model, probe, np.atleast_2d(v), np.atleast_2d(te_), chosen)
    return rows, pa.table(out, schema=PREDICTIONS.schema)


def workers() -> int:
    """The cores this process may use."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)
