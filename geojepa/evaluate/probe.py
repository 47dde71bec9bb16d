"""Probes on frozen embeddings: linear and MLP (in-512-1, GELU), AdamW, early stopping on validation MAE.

Inputs are standardised with the training split's statistics; targets are
centred on the training median and scaled by the training mean absolute
deviation; the loss is L1, the metric the tasks report (MAE).

``fit_predict_seeds`` trains many probes at once: every (feature set, seed) of
one task is a member of one stacked model (batched matrix products over the
members' own weights), each member with the initial weights, the shuffles and
the early stopping its one-probe fit (``fit_predict``) would have with its seed;
a member that stops leaves the stack. AdamW is applied per element, so stacking
does not couple the members: only the order of floating-point sums differs.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class ProbeSettings:
    hidden: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-2
    max_epochs: int = 300
    patience: int = 30
    batch: int = 256


def make_probe(kind: str, dim: int, hidden: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(dim, 1)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
    raise ValueError(f"unknown probe {kind!r}: linear | mlp")


def fit_predict(kind: str, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                x_test: np.ndarray, seed: int, s: ProbeSettings = ProbeSettings()) -> np.ndarray:
    """Train a probe (the epoch with the best validation MAE is kept) and predict the test rows."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    xs = [torch.from_numpy(((x - mu) / sd).astype(np.float32)) for x in (x_train, x_val, x_test)]
    centre = float(np.median(y_train))
    scale = float(np.mean(np.abs(y_train - centre))) or 1.0
    yt = torch.from_numpy(((y_train - centre) / scale).astype(np.float32))
    yv = torch.from_numpy(y_val.astype(np.float32))
    model = make_probe(kind, x_train.shape[1], s.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    best, best_state, bad = np.inf, None, 0
    for _ in range(s.max_epochs):
        model.train()
        perm = torch.randperm(len(yt), generator=gen)
        for i in range(0, len(yt), s.batch):
            idx = perm[i : i + s.batch]
            loss = (model(xs[0][idx]).squeeze(-1) - yt[idx]).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val = float((model(xs[1]).squeeze(-1) * scale + centre - yv).abs().mean())
        if val < best - 1e-9:
            best, bad = val, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= s.patience:
                break
    model.load_state_dict(best_state)
    with torch.no_grad():
        return (model(xs[2]).squeeze(-1) * scale + centre).numpy().astype(np.float64)


def metrics(kind: str, y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float | None]:
    """MAE for every task; R2 for counts and regression; accuracy (threshold 0.5) and ROC-AUC for binary
    (None when the test split holds one class only)."""
    out: dict[str, float | None] = {"mae": float(np.mean(np.abs(y_true - y_pred)))}
    if kind in ("count", "regression"):
        ss = float(np.sum((y_true - y_true.mean()) ** 2))
        out["r2"] = 1 - float(np.sum((y_true - y_pred) ** 2)) / ss if ss > 0 else None
    else:
        from sklearn.metrics import roc_auc_score

        out["accuracy"] = float(np.mean((y_pred >= 0.5) == (y_true >= 0.5)))
        out["roc_auc"] = float(roc_auc_score(y_true, y_pred)) if len(np.unique(y_true)) == 2 else None
    return out


def standardise(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    """``x`` standardised with its training rows' mean and std (as ``fit_predict`` does), float32."""
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
    return ((x - mu) / sd).astype(np.float32)


def _init(kind: str, dim: int, hidden: int, seed: int) -> list[torch.Tensor]:
    """A member's initial weights: those of ``make_probe`` after ``torch.manual_seed(seed)``, as (in, out)
    matrices and (1, out) biases."""
    torch.manual_seed(seed)
    layers = [m for m in make_probe(kind, dim, hidden).modules() if isinstance(m, nn.Linear)]
    return [t for layer in layers for t in (layer.weight.detach().T.contiguous(), layer.bias.detach()[None])]


def _forward(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """(members, rows) outputs of the stacked probes on (members, rows, dim) inputs."""
    h = torch.baddbmm(params[1], x, params[0])
    if len(params) == 4:
        h = torch.baddbmm(params[3], torch.nn.functional.gelu(h), params[2])
    return h.squeeze(-1)


@torch.no_grad()
def _adamw(params, grads, exp_avg, exp_avg_sq, step: int, lr: float, weight_decay: float,
           betas=(0.9, 0.999), eps: float = 1e-8) -> None:
    """torch.optim.AdamW's update on stacked members: its fused kernel where torch has one (one pass over the
    weights instead of a dozen: on a 1,024-wide MLP the plain update costs as much as the matrix products),
    else its formulas."""
    b1, b2 = betas
    if hasattr(torch, "_fused_adamw_"):
        steps = [torch.tensor(float(step)) for _ in params]
        torch._fused_adamw_(list(params), list(grads), list(exp_avg), list(exp_avg_sq), [], steps, lr=lr, beta1=b1,
                            beta2=b2, weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
        return
    c1, c2 = 1 - b1**step, (1 - b2**step) ** 0.5
    for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq, strict=True):
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        p.addcdiv_(m, (v.sqrt() / c2).add_(eps), value=-lr / c1)


def fit_predict_seeds(kind: str, xs: list[np.ndarray], y: np.ndarray, train: np.ndarray, val: np.ndarray,
                      test: np.ndarray, seeds: list[int], s: ProbeSettings = ProbeSettings(),
                      init_lock: threading.Lock | None = None, loss: str = "l1") -> np.ndarray:
    """(feature sets, seeds, test rows) predictions: a probe per feature set in ``xs`` (standardised, of one
    width) and seed, trained together (see the module docstring). Fits on several threads pass one
    ``init_lock``: the initial weights come from torch's global generator. ``loss``: ``l1`` (targets centred
    on the training median, scaled by the mean absolute deviation; stopped on validation MAE) or ``logistic``
    (0/1 targets; the output is a probability; stopped on validation log loss)."""
    if loss not in ("l1", "logistic"):
        raise ValueError(f"unknown probe loss {loss!r}: l1 | logistic")
    x = torch.from_numpy(np.stack(xs)) if len(xs) > 1 else torch.from_numpy(xs[0])[None]
    n_sets, members = x.shape[0], [(f, seed) for f in range(x.shape[0]) for seed in seeds]
    xt, xv, xe = x[:, train], x[:, val], x[:, test]
    logistic = loss == "logistic"
    centre = 0.0 if logistic else float(np.median(y[train]))
    scale = 1.0 if logistic else (float(np.mean(np.abs(y[train] - centre))) or 1.0)
    yt = torch.from_numpy(((y[train] - centre) / scale).astype(np.float32))
    yv = torch.from_numpy(y[val].astype(np.float32))

    def fit_loss(out, target):  # (members, rows) -> (members,)
        if logistic:
            return torch.nn.functional.binary_cross_entropy_with_logits(out, target.expand_as(out),
                                                                        reduction="none").mean(1)
        return (out - target).abs().mean(1)

    def val_metric(out):
        if logistic:
            return fit_loss(out, yv)
        return (out * scale + centre - yv).abs().mean(1)
    with init_lock or contextlib.nullcontext():
        inits = [_init(kind, x.shape[2], s.hidden, seed) for _, seed in members]
    params = [torch.stack(p).requires_grad_() for p in zip(*inits, strict=True)]
    exp_avg = [torch.zeros_like(p) for p in params]
    exp_avg_sq = [torch.zeros_like(p) for p in params]
    best_params = [p.detach().clone() for p in params]
    gens = [torch.Generator().manual_seed(seed) for _, seed in members]
    active = np.arange(len(members))  # members still training, in the order of the stack
    feature = torch.tensor([f for f, _ in members])
    best = np.full(len(members), np.inf)
    bad = np.zeros(len(members), int)
    n, step = len(yt), 0
    for _ in range(s.max_epochs):
        which = feature[active]
        perm = torch.stack([torch.randperm(n, generator=gens[m]) for m in active])
        for i in range(0, n, s.batch):
            idx = perm[:, i : i + s.batch]
            total = fit_loss(_forward(params, xt[which[:, None], idx]), yt[idx]).sum()
            grads = torch.autograd.grad(total, params)
            step += 1
            _adamw(params, grads, exp_avg, exp_avg_sq, step, s.lr, s.weight_decay)
        with torch.no_grad():
            mae = val_metric(_forward(params, xv[which])).numpy().astype(np.float64)
        better = mae < best[active] - 1e-9
        for j in np.flatnonzero(better):
            for b, p in zip(best_params, params, strict=True):
                b[active[j]] = p[j].detach()
        best[active[better]] = mae[better]
        bad[active[better]] = 0
        bad[active[~better]] += 1
        stay = bad[active] < s.patience
        if not stay.all():
            if not stay.any():
                break
            keep = torch.from_numpy(np.flatnonzero(stay))
            params = [p.detach()[keep].requires_grad_() for p in params]
            exp_avg = [m[keep] for m in exp_avg]
            exp_avg_sq = [v[keep] for v in exp_avg_sq]
            active = active[stay]
    with torch.no_grad():
        out = _forward(best_params, xe[feature])
        out = torch.sigmoid(out) if logistic else out * scale + centre
    return out.numpy().astype(np.float64).reshape(n_sets, len(seeds), len(test))
