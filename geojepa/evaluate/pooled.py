"""Test metrics pooled over regions, with a region-stratified bootstrap over test tiles (the corpus and
ablation reports' arithmetic).

``Scores`` holds every (setting, task, model, probe)'s predictions and labels on each region's val and test
tiles, aligned by tile id, and one set of bootstrap draws per (setting, task, region) shared by every model, so
two models' difference is paired (the same resamples of the same tiles). Metrics:

- ``mae``: over the union of the regions' test tiles, mean over probe seeds; the bootstrap reweights tiles;
- ``roc_auc`` (binary tasks under protocol v2): the AUC of the seed-mean prediction over the union of the
  test tiles (std: the spread of the seeds' own AUCs); each bootstrap resample's is the weighted AUC of the
  same prediction under the resample's tile counts;
- ``relative_mae``: each region's MAE over its Dummy's (the training median), averaged over regions, so a
  few regions with large counts cannot dominate (each resample takes the ratio within the region; a region
  where Dummy is exact on every test tile has no ratio and is left out).

``cross_region``: one ridge read-out per (task, model) fitted on every trained-on region's train tiles
(penalty chosen on their validation tiles) and tested on every region's test tiles, from each region's
``eval/probe_features.parquet``: whether the features mean the same from one place to the next.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np
import pandas as pd

from geojepa.errors import GeoJepaError
from geojepa.evaluate import readouts
from geojepa.evaluate.readouts import auc, weighted_auc

BOOTSTRAP = 2000
HIGHER_IS_BETTER = {"roc_auc"}
CROSS = "cross_ridge"  # the cross-region read-out's probe name


class Scores:
    """Predictions of every (setting, task, model, probe) per region and split (see the module docstring)."""

    def __init__(self, frames: dict[str, pd.DataFrame], metric_of):
        self.metric_of = metric_of  # task -> its headline metric (mae | roc_auc)
        self.data: dict[tuple, dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]] = {}
        self.draws: dict[tuple, np.ndarray] = {}  # (setting, task, region) -> (BOOTSTRAP, tiles) counts
        for region, df in frames.items():
            for key, g in df.groupby(["setting", "task", "model", "probe", "split"], sort=False):
                g = g.sort_values("tile_id")
                p = np.stack(g["pred"].to_numpy()).astype(np.float64)
                self.data.setdefault(key[:4], {}).setdefault(region, {})[key[4]] = (p, g["label"].to_numpy(float))
                if key[4] == "test" and (key[0], key[1], region) not in self.draws:
                    rng = np.random.default_rng(zlib.crc32(f"{key[0]}/{key[1]}/{region}".encode()))
                    n = len(g)
                    self.draws[key[0], key[1], region] = rng.multinomial(n, np.full(n, 1 / n),
                                                                         size=BOOTSTRAP).astype(np.int32)

    def covers(self, key: tuple, regions) -> bool:
        """Whether ``key`` has test predictions in every one of ``regions``."""
        return all("test" in self.data.get(key, {}).get(r, {}) for r in regions)

    def have(self, key: tuple, regions) -> list[str]:
        return [r for r in regions if "test" in self.data.get(key, {}).get(r, {})]

    def _split(self, key, regions, split) -> tuple[np.ndarray, np.ndarray] | None:
        parts = [self.data[key][r][split] for r in regions if split in self.data[key].get(r, {})]
        if not parts:
            return None
        return np.concatenate([p for p, _ in parts]), np.concatenate([y for _, y in parts])

    @staticmethod
    def _value(metric: str, p: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per seed (columns of ``p``)."""
        if metric == "roc_auc":
            if len(np.unique(y)) < 2:
                return np.full(p.shape[1], np.nan)
            return np.array([auc(p[:, j], y) for j in range(p.shape[1])])
        return np.abs(p - y[:, None]).mean(0)

    @functools.cache  # noqa: B019 (one report's lifetime; rows, choices and comparisons reuse it)
    def stats(self, key: tuple, regions: tuple[str, ...], metric: str) -> dict | None:
        """Pooled ``metric`` of ``key`` over ``regions`` (those that have it); None when none has it or it is
        undefined there (one class only)."""
        have = tuple(self.have(key, regions))
        if not have:
            return None
        seeds = {self.data[key][r]["test"][0].shape[1] for r in have}
        if len(seeds) > 1:
            raise GeoJepaError(f"{key}: the regions were probed with different numbers of seeds ({sorted(seeds)}); "
                               "evaluate them with the same settings to pool them")
        point = None
        if metric == "relative_mae":
            dummy = (key[0], key[1], "dummy", "median")
            # a region where Dummy is exact (every test label the training median) has no ratio: left out
            have = tuple(r for r in have if self.covers(dummy, [r]) and self._dummy_mae(dummy, r) > 0)
            if not have:
                return None
            per_seed = np.mean([self._value("mae", *self.data[key][r]["test"]) / self._dummy_mae(dummy, r)
                                for r in have], 0)
            val = None
        else:
            p, y = self._split(key, have, "test")
            per_seed = self._value(metric, p, y)
            if metric == "roc_auc":  # the AUC of the seed-mean prediction, as each bootstrap resample takes it
                point = self._value(metric, p.mean(1, keepdims=True), y)[0]
            v = self._split(key, have, "val")
            vals = None if v is None else (self._value(metric, v[0].mean(1, keepdims=True), v[1])
                                           if metric == "roc_auc" else self._value(metric, *v))
            val = None if vals is None or np.isnan(vals).all() else float(np.nanmean(vals))
        if np.isnan(per_seed).all():
            return None
        boot = self.boot(key, have, metric)
        mean = float(np.nanmean(per_seed)) if point is None else float(point)
        return {"mean": mean, "std": float(np.nanstd(per_seed)), "seeds": len(per_seed),
                "n_test": int(sum(len(self.data[key][r]["test"][1]) for r in have)),
                "val_mean": None if val is None or np.isnan(val) else val,
                "ci_low": float(np.nanpercentile(boot, 2.5)), "ci_high": float(np.nanpercentile(boot, 97.5)),
                "regions": len(have)}

    def boot(self, key: tuple, regions, metric: str) -> np.ndarray:
        """(BOOTSTRAP,) pooled ``metric`` of each resample (region-stratified)."""
        if metric == "roc_auc":
            p, y = self._split(key, regions, "test")
            w = np.concatenate([self.draws[key[0], key[1], r] for r in regions], 1)
            return weighted_auc(p.mean(1), y, w)
        if metric == "relative_mae":
            dummy = (key[0], key[1], "dummy", "median")
            ratios = []
            for r in regions:
                if not (self.covers(dummy, [r]) and self._dummy_mae(dummy, r) > 0):
                    continue
                d = self.draws[key[0], key[1], r]
                e = np.abs(self.data[key][r]["test"][0] - self.data[key][r]["test"][1][:, None]).mean(1)
                e0 = np.abs(self.data[dummy][r]["test"][0] - self.data[dummy][r]["test"][1][:, None]).mean(1)
                den = (d @ e0).astype(np.float64)
                with np.errstate(invalid="ignore", divide="ignore"):
                    ratios.append(np.where(den > 0, (d @ e) / den, np.nan))  # a resample of exact Dummy tiles: none
            return np.nanmean(ratios, 0) if ratios else np.full(BOOTSTRAP, np.nan)
        total, n = np.zeros(BOOTSTRAP), 0
        for r in regions:
            p, y = self.data[key][r]["test"]
            e = np.abs(p - y[:, None]).mean(1)
            total += self.draws[key[0], key[1], r] @ e
            n += len(e)
        return total / n

    def _dummy_mae(self, dummy: tuple, region: str) -> float:
        return float(self._value("mae", *self.data[dummy][region]["test"]).mean())

    def gain(self, ours: tuple, other: tuple, regions: list[str], metric: str) -> tuple[float, float, float] | None:
        """How much better ``ours`` is than ``other`` on ``regions`` (MAE: other's minus ours; AUC: ours minus
        other's) and the 2.5 and 97.5 percentiles of that difference over the shared resamples; None when
        ``other`` lacks one of them or the metric is undefined there."""
        if not (self.covers(other, regions) and self.covers(ours, regions)):
            return None
        a, b = self.stats(ours, tuple(regions), metric), self.stats(other, tuple(regions), metric)
        if a is None or b is None:
            return None
        sign = 1.0 if metric in HIGHER_IS_BETTER else -1.0
        diff = sign * (self.boot(ours, regions, metric) - self.boot(other, regions, metric))
        lo, hi = np.nanpercentile(diff, [2.5, 97.5])
        return sign * (a["mean"] - b["mean"]), float(lo), float(hi)

    def chosen(self, task: str, probe: str, regions, candidates, setting: str = "masked") -> str | None:
        """Of ``candidates`` (model names), the one with the best pooled validation headline metric of
        ``probe`` on ``regions`` (never chosen on test)."""
        metric = self.metric_of(task)
        val = {}
        for m in candidates:
            s = self.stats((setting, task, m, probe), tuple(regions), metric)
            if s is not None and s["val_mean"] is not None:
                val[m] = -s["val_mean"] if metric in HIGHER_IS_BETTER else s["val_mean"]
        return min(val, key=val.get) if val else None


def cross_region(features: dict[str, pd.DataFrame], seen: dict[str, bool], kinds: dict[str, str],
                 min_val: int = 100, folds: int = 5) -> tuple[pd.DataFrame | None, dict]:
    """The cross-region ridge read-out (see the module docstring) on each region's probe features (``features``:
    region -> PROBE_FEATURES frame): prediction rows like ``predictions.parquet``'s (probe ``CROSS``) for every
    region's test tiles and the trained-on regions' validation tiles, and per task its chosen setting or why
    it was skipped."""
    notes, out = {}, []
    trained = [r for r in features if seen[r]]
    if not trained:
        return None, {"skipped": "no trained-on region has probe features"}
    frames = []
    for region, df in features.items():
        keep = df.split == "test" if not seen[region] else np.ones(len(df), bool)
        frames.append(df[keep].assign(region=region))
    every = pd.concat(frames, ignore_index=True)
    for (task, model), g in every.groupby(["task", "model"], sort=True):
        g = g.sort_values(["region", "tile_id"])
        sp = g.split.to_numpy(str)
        groups = (g.region + "/" + g.group_id).to_numpy(str)
        x = np.stack(g.features.to_numpy()).astype(np.float32)
        y = g.label.to_numpy(float)
        try:
            p = readouts.plan(sp, np.unique(groups, return_inverse=True)[1], min_val, folds)
        except ValueError as e:
            notes[task] = {"skipped": str(e)}
            continue
        r = readouts.ridge(x, y, kinds[task], p)
        notes.setdefault(task, {})[model] = r.chosen
        for split, rows, pred in (("val", p.val, r.val), ("test", p.test, r.test[0])):
            sub = g.iloc[rows]
            out.append(pd.DataFrame({"setting": "masked", "task": task, "model": model, "probe": CROSS,
                                     "split": split, "tile_id": sub.tile_id.to_numpy(), "label": sub.label.to_numpy(),
                                     "pred": [[float(v)] for v in pred], "region": sub.region.to_numpy()}))
    return (pd.concat(out, ignore_index=True) if out else None), notes
