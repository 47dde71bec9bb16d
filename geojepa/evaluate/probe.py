"""Probes on frozen embeddings: linear and MLP (in-512-1, GELU), AdamW, early stopping on validation MAE.

Inputs are standardised with the training split's statistics; targets are
centred on the training median and scaled by the training mean absolute
deviation; the loss is L1, the metric the tasks report (MAE).
"""

from __future__ import annotations

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
