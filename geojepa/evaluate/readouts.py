"""Protocol v2's read-outs on frozen tile vectors: closed-form ridge, MLP and cosine kNN, each choosing its
hyper-parameters on held-out tiles that are never test tiles.

Every read-out sees the same inputs: features standardised with the rows it is fitted on and clipped at
``|z| <= CLIP`` (a rare count's tiny training std can no longer turn into a huge test value), columns that
are constant on those rows set to zero, and predictions clipped to the range of the labels it was fitted on
(no extrapolation far outside what training saw; the order is kept, so ROC-AUC sees the read-out's ranking).

Held-out choice (``Plan``): with at least ``min_val`` validation tiles, hyper-parameters are chosen on the
validation split (fitted on train); with fewer, by ``folds``-fold cross-validation over train and validation
together, the folds made of whole spatial groups (``tiles.group_id``: 4 x 4 tiles), so no fold scores a tile
whose neighbours it was fitted on. The chosen setting is then refitted on train + validation for the test
predictions; the validation predictions kept (what encoders are chosen on) are the held-out ones.

- ridge: penalty ``alpha / n`` over ``ALPHAS`` and, for count tasks, the target (y or log(1 + y)); one
  eigen-decomposition per fit serves every penalty;
- kNN: the mean label of the k nearest fitted tiles by cosine, k over ``KS``;
- MLP (``geojepa.evaluate.probe.fit_predict_seeds``): seeds, early stopping on validation; L1 loss for
  counts and regression, logistic loss for binary tasks (it predicts a probability).

Choice metric: MAE for counts and regression, ROC-AUC for binary tasks (MAE when the held-out tiles hold one
class only): the metric the report headlines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLIP = 5.0
ALPHAS = np.logspace(-6, 3, 19)  # ridge penalty per fitted row (the features are standardised)
KS = (1, 3, 5, 10, 20, 50)


def standardise_clipped(x: np.ndarray, fit: np.ndarray, clip: float = CLIP) -> np.ndarray:
    """``x`` standardised with rows ``fit``'s mean and std, clipped at ``|z| <= clip``; columns constant on
    ``fit`` are zero. float32."""
    mu = x[fit].mean(0)
    sd = x[fit].std(0)
    live = sd > 1e-8 * np.maximum(1.0, np.abs(mu))
    z = np.zeros(x.shape, np.float32)
    if live.any():
        z[:, live] = np.clip((x[:, live] - mu[live]) / sd[live], -clip, clip)
    return z


@dataclass(frozen=True)
class Plan:
    """Which rows choose the hyper-parameters and which fit the final read-out.

    ``rounds``: (fit rows, held-out rows) pairs; their held-out predictions together score each setting.
    ``final``: the rows the chosen setting is refitted on (train + validation); ``test``: scored rows."""

    rounds: tuple[tuple[np.ndarray, np.ndarray], ...]
    final: np.ndarray
    val: np.ndarray
    test: np.ndarray
    mode: str  # "validation" | "cv"


def plan(sp: np.ndarray, groups: np.ndarray | None, min_val: int = 100, folds: int = 5, seed: int = 0) -> Plan:
    """The ``Plan`` of a task's tiles: split labels ``sp`` (train | val | test) and spatial ``groups``.
    Raises ``ValueError`` (saying what is missing) when no choice is possible."""
    tr, va, te = (np.flatnonzero(sp == s) for s in ("train", "val", "test"))
    final = np.sort(np.concatenate([tr, va]))
    if len(va) >= min_val:
        return Plan(((tr, va),), final, va, te, "validation")
    g = np.asarray(groups if groups is not None else np.arange(len(sp)))[final]
    uniq = np.unique(g)
    if len(uniq) < folds:
        raise ValueError(f"{len(va)} validation tiles (fewer than {min_val}) and {len(uniq)} spatial groups in "
                         f"train + validation (fewer than the {folds} folds cross-validation needs)")
    order = np.random.default_rng(seed).permutation(len(uniq))
    fold_of_group = np.empty(len(uniq), np.int64)
    fold_of_group[order] = np.arange(len(uniq)) % folds
    fold = fold_of_group[np.searchsorted(uniq, g)]
    rounds = tuple((final[fold != f], final[fold == f]) for f in range(folds))
    return Plan(rounds, final, va, te, "cv")


def weighted_auc(score: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC-AUC of ``score`` for 0/1 labels ``y`` under each row of tile weights ``w`` (resamples, tiles); ties
    count one half. nan where a resample holds one class only."""
    order = np.argsort(score, kind="stable")
    s, pos = score[order], y[order] > 0.5
    w = w[:, order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
    neg = np.add.reduceat(np.where(pos, 0.0, w), starts, axis=1)
    posw = np.add.reduceat(np.where(pos, w, 0.0), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    n1, n0 = posw.sum(1), neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (posw * (below + 0.5 * neg)).sum(1) / (n1 * n0)


def auc(score: np.ndarray, y: np.ndarray) -> float:
    return float(weighted_auc(score, y, np.ones((1, len(y))))[0])


def score(kind: str, y: np.ndarray, p: np.ndarray) -> float:
    """The choice metric, lower is better: MAE, or 1 - ROC-AUC for binary tasks (MAE with one class)."""
    if kind == "binary" and len(np.unique(y)) == 2:
        return 1.0 - auc(p, y)
    return float(np.mean(np.abs(y - p)))


def _transforms(kind: str) -> tuple[str, ...]:
    return ("y", "log1p") if kind == "count" else ("y",)


def _forward(t: str, y: np.ndarray) -> np.ndarray:
    return np.log1p(np.maximum(y, 0)) if t == "log1p" else y


def _back(t: str, p: np.ndarray) -> np.ndarray:
    return np.expm1(p) if t == "log1p" else p


def _ridge_paths(x: np.ndarray, fit: np.ndarray, out: np.ndarray, ys: np.ndarray, alphas: np.ndarray
                 ) -> np.ndarray:
    """(targets, alphas, len(out)) predictions of ridge regressions with intercept fitted on rows ``fit``
    (features standardised and clipped on them) for each column of ``ys`` (fit rows, targets) and penalty
    ``alphas * len(fit)``: one eigen-decomposition (of the Gram or the kernel matrix, the smaller) for all."""
    z = standardise_clipped(x, fit).astype(np.float64)
    zf, zo = z[fit], z[out]
    mu = zf.mean(0)
    zf, zo = zf - mu, zo - mu
    ym = ys.mean(0)
    yc = ys - ym
    lam = alphas * len(fit)
    n, d = zf.shape
    if d <= n:
        e, v = np.linalg.eigh(zf.T @ zf)
        proj = v.T @ (zf.T @ yc)  # (d, targets)
        zo_v = zo @ v
        coef = proj[None, :, :] / (np.maximum(e, 0)[None, :, None] + lam[:, None, None])  # (alphas, d, targets)
        pred = np.einsum("od,adt->tao", zo_v, coef)
    else:
        e, u = np.linalg.eigh(zf @ zf.T)
        proj = u.T @ yc  # (n, targets)
        k_o = (zo @ zf.T) @ u  # (out, n)
        coef = proj[None] / (np.maximum(e, 0)[None, :, None] + lam[:, None, None])
        pred = np.einsum("on,ant->tao", k_o, coef)
    return pred + ym[:, None, None]


def _clip_to(p: np.ndarray, y_fit: np.ndarray) -> np.ndarray:
    """``p`` within the fitted labels' range, the order kept (a ranking metric must not see ties made by the
    clip): the excess survives as at most 1e-6 (``tanh``), too small to change an MAE."""
    lo, hi = y_fit.min(), y_fit.max()
    clipped = np.clip(p, lo, hi)
    return clipped + 1e-6 * np.tanh(p - clipped)


@dataclass
class Readout:
    """One read-out's held-out validation predictions, test predictions (per seed for the MLP: rows (seeds,
    tiles)) and the setting it chose (e.g. ``alpha=0.1,target=log1p``)."""

    val: np.ndarray
    test: np.ndarray
    chosen: str
    held_out_score: float


def ridge(x: np.ndarray, y: np.ndarray, kind: str, p: Plan, alphas: np.ndarray = ALPHAS) -> Readout:
    """Closed-form ridge with the penalty and the target transform chosen on ``p``'s held-out rows."""
    transforms = _transforms(kind)
    held = np.concatenate([o for _, o in p.rounds])
    preds = np.zeros((len(transforms), len(alphas), len(held)))
    at = 0
    for fit, out in p.rounds:
        ys = np.stack([_forward(t, y[fit]) for t in transforms], 1)
        pr = _ridge_paths(x, fit, out, ys, alphas)
        for i, t in enumerate(transforms):
            preds[i, :, at : at + len(out)] = _clip_to(_back(t, pr[i]), y[fit])
        at += len(out)
    scores = np.array([[score(kind, y[held], preds[i, a]) for a in range(len(alphas))]
                       for i in range(len(transforms))])
    i, a = np.unravel_index(int(np.argmin(scores)), scores.shape)
    t = transforms[i]
    val = _held_out_rows(preds[i, a], held, p.val)
    test = _ridge_paths(x, p.final, p.test, _forward(t, y[p.final])[:, None], alphas[a : a + 1])[0, 0]
    test = _clip_to(_back(t, test), y[p.final])
    return Readout(val, test[None], f"alpha={alphas[a]:.3g},target={t}", float(scores[i, a]))


def _held_out_rows(pred: np.ndarray, held: np.ndarray, val: np.ndarray) -> np.ndarray:
    """The held-out predictions of the validation rows (held-out rows may include training tiles under CV)."""
    at = {int(r): j for j, r in enumerate(held)}
    return np.array([pred[at[int(r)]] for r in val], np.float64)


def _cosine_topk(z: np.ndarray, queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    from geojepa.encoding.neighbours import topk_cosine

    return topk_cosine(z[queries], z[gallery], k)[1]


def knn(x: np.ndarray, y: np.ndarray, kind: str, p: Plan, ks: tuple[int, ...] = KS) -> Readout:
    """Cosine kNN regression (the mean label of the k nearest fitted tiles), k chosen on ``p``'s held-out rows."""
    held = np.concatenate([o for _, o in p.rounds])
    smallest = min(len(fit) for fit, _ in p.rounds)
    ks = tuple(k for k in ks if k <= smallest) or (max(1, smallest),)
    preds = np.zeros((len(ks), len(held)))
    at = 0
    for fit, out in p.rounds:
        z = standardise_clipped(x, fit)
        nn = _cosine_topk(z, out, fit, max(ks))
        for j, k in enumerate(ks):
            preds[j, at : at + len(out)] = y[fit][nn[:, :k]].mean(1)
        at += len(out)
    scores = np.array([score(kind, y[held], preds[j]) for j in range(len(ks))])
    j = int(np.argmin(scores))
    z = standardise_clipped(x, p.final)
    test = y[p.final][_cosine_topk(z, p.test, p.final, ks[j])].mean(1)
    return Readout(_held_out_rows(preds[j], held, p.val), test[None], f"k={ks[j]}", float(scores[j]))
