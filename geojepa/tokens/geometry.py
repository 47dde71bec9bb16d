"""Geometry tokens: a PolyGNN-style graph network over an entity's vertices, trained self-supervised.

Graph: one node per vertex (a ring's closing vertex dropped), edges between
consecutive vertices (and closing the ring for polygons), both directions.
Node features are rotation- and translation-invariant triplet features: the
lengths of the edges to the previous and next vertex and the angle between
them (cos, sin), plus the distance to the centroid, in log metres. Four
GIN interaction blocks with residuals, mean and max pooling, a linear map to
the embedding.

The reference froze a pretrained checkpoint that is not public; ours learns
to make the embedding encode shape and size: from the embedding, linear heads
predict rotation-invariant shape descriptors (log area, log perimeter,
compactness, log vertex count, elongation, log long side, convexity,
dimension) and reconstruct a 16 x 16 occupancy raster of the shape in its own
rotated-bbox frame. Then the encoder is frozen and its outputs cached.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import shapely
import torch
from torch import nn
from torch_geometric.data import Batch, Data
from torch_geometric.nn import GINConv, global_max_pool, global_mean_pool

from geojepa.tile.clip import rotated_bbox

log = logging.getLogger(__name__)
N_DESCRIPTORS = 8
OCC = 16


def graphs(geoms_m: np.ndarray) -> list[Data]:
    """One graph per geometry (coordinates in metres)."""
    out = []
    for g in geoms_m:
        parts = shapely.get_parts(g)
        xs, edges, offset = [], [], 0
        for part in parts:
            if part.geom_type == "Polygon":
                rings, closed = [part.exterior, *part.interiors], True
            else:
                rings, closed = [part], False
            for ring in rings:
                c = np.asarray(ring.coords)[:, :2]
                if closed and len(c) > 1 and np.allclose(c[0], c[-1]):
                    c = c[:-1]
                n = len(c)
                if n == 0:
                    continue
                prev = np.roll(c, 1, 0) if closed else np.vstack([c[:1], c[:-1]])
                nxt = np.roll(c, -1, 0) if closed else np.vstack([c[1:], c[-1:]])
                a, b = prev - c, nxt - c
                la, lb = np.hypot(*a.T), np.hypot(*b.T)
                cross = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
                dot = (a * b).sum(1)
                norm = np.maximum(la * lb, 1e-9)
                xs.append(np.column_stack([c, np.log1p(la), np.log1p(lb), dot / norm, cross / norm]))
                i = np.arange(n) + offset
                j = np.roll(i, -1) if closed and n > 2 else i[1:]
                src = i if closed and n > 2 else i[:-1]
                edges.append(np.concatenate([np.stack([src, j]), np.stack([j, src])], axis=1))
                offset += n
        x = np.vstack(xs) if xs else np.zeros((1, 6))
        centre = x[:, :2].mean(0)
        feats = np.column_stack([x[:, 2:], np.log1p(np.hypot(*(x[:, :2] - centre).T))])
        e = np.concatenate(edges, axis=1) if edges else np.zeros((2, 0), int)
        out.append(Data(x=torch.from_numpy(feats.astype(np.float32)), edge_index=torch.from_numpy(e.astype(np.int64))))
    return out


def descriptors(geoms_m: np.ndarray) -> np.ndarray:
    """(n, 8) rotation-invariant shape and size descriptors."""
    area = shapely.area(geoms_m)
    length = shapely.length(geoms_m)
    dims = shapely.get_dimensions(geoms_m)
    hull = shapely.area(shapely.convex_hull(geoms_m))
    pos = rotated_bbox(geoms_m, 0.0).reshape(-1, 4, 2)
    side_a = np.hypot(*(pos[:, 1] - pos[:, 0]).T)
    side_b = np.hypot(*(pos[:, 3] - pos[:, 0]).T)
    long_side, short_side = np.maximum(side_a, side_b), np.minimum(side_a, side_b)
    return np.column_stack([
        np.log1p(area), np.log1p(length), np.where(length > 0, 4 * np.pi * area / np.maximum(length, 1e-9) ** 2, 0),
        np.log1p(shapely.get_num_coordinates(geoms_m)), np.where(long_side > 0, short_side / np.maximum(long_side, 1e-9), 1),
        np.log1p(long_side), np.where(hull > 0, area / np.maximum(hull, 1e-9), 0), dims.astype(float),
    ]).astype(np.float32)


def occupancy(geoms_m: np.ndarray) -> np.ndarray:
    """(n, 16*16) occupancy of each shape sampled on a grid over its rotated bbox (long side along x)."""
    pos = rotated_bbox(geoms_m, 1.0).reshape(-1, 4, 2)
    origin, u, v = pos[:, 0], pos[:, 1] - pos[:, 0], pos[:, 3] - pos[:, 0]
    t = (np.arange(OCC) + 0.5) / OCC
    gu, gv = np.meshgrid(t, t, indexing="xy")
    pts = origin[:, None] + gu.ravel()[None, :, None] * u[:, None] + gv.ravel()[None, :, None] * v[:, None]
    half_cell = 0.5 * np.maximum(np.hypot(*u.T), np.hypot(*v.T)) / OCC
    shapely.prepare(geoms_m)
    rep = np.repeat(geoms_m, OCC * OCC)
    hit = shapely.dwithin(rep, shapely.points(pts.reshape(-1, 2)), np.repeat(half_cell, OCC * OCC))
    return hit.reshape(len(geoms_m), OCC * OCC).astype(np.float32)


class ShapeEncoder(nn.Module):
    def __init__(self, dim: int = 256, hidden: int = 128, blocks: int = 4):
        super().__init__()
        self.inp = nn.Linear(5, hidden)
        self.convs = nn.ModuleList(
            GINConv(nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden)), train_eps=True)
            for _ in range(blocks))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(blocks))
        self.out = nn.Linear(2 * hidden, dim)

    def forward(self, batch: Batch) -> torch.Tensor:
        h = self.inp(batch.x)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            h = h + conv(norm(h), batch.edge_index)
        return self.out(torch.cat([global_mean_pool(h, batch.batch), global_max_pool(h, batch.batch)], dim=1))


class Heads(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.desc = nn.Linear(dim, N_DESCRIPTORS)
        self.occ = nn.Linear(dim, OCC * OCC)


@dataclass
class FitResult:
    val_loss: float
    val_loss_untrained: float
    curve: list[tuple[int, float, float]]  # (epoch, train loss, val loss)


def _loss(heads: Heads, z, d, o) -> torch.Tensor:
    return nn.functional.mse_loss(heads.desc(z), d) + nn.functional.binary_cross_entropy_with_logits(heads.occ(z), o)


def _run(encoder: ShapeEncoder, heads: Heads, data: list[Data], desc: torch.Tensor, occ: torch.Tensor,
         train_idx: np.ndarray, val_idx: np.ndarray, epochs: int, lr: float, batch_size: int, seed: int,
         train_encoder: bool) -> tuple[float, list]:
    gen = np.random.default_rng(seed)
    params = list(heads.parameters()) + (list(encoder.parameters()) if train_encoder else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    curve = []
    for epoch in range(epochs):
        encoder.train(train_encoder)
        total = 0.0
        order = gen.permutation(train_idx)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            z = encoder(Batch.from_data_list([data[i] for i in idx]))
            if not train_encoder:
                z = z.detach()
            loss = _loss(heads, z, desc[idx], occ[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        curve.append((epoch, total / len(train_idx), evaluate(encoder, heads, data, desc, occ, val_idx, batch_size)))
    return curve[-1][2], curve


@torch.no_grad()
def evaluate(encoder, heads, data, desc, occ, idx, batch_size) -> float:
    encoder.eval()
    total = 0.0
    for start in range(0, len(idx), batch_size):
        b = idx[start : start + batch_size]
        total += float(_loss(heads, encoder(Batch.from_data_list([data[i] for i in b])), desc[b], occ[b])) * len(b)
    return total / max(len(idx), 1)


def fit(geoms_m: np.ndarray, dim: int, epochs: int, seed: int, lr: float = 2e-3,
        batch_size: int = 256) -> tuple[ShapeEncoder, dict, FitResult]:
    """Train an encoder (and, for comparison, heads on a frozen untrained copy); 10% held out."""
    torch.manual_seed(seed)
    data = graphs(geoms_m)
    d = descriptors(geoms_m)
    stats = {"desc_mean": d.mean(0).tolist(), "desc_std": (d.std(0) + 1e-6).tolist()}
    desc = torch.from_numpy((d - d.mean(0)) / (d.std(0) + 1e-6))
    occ = torch.from_numpy(occupancy(geoms_m))
    perm = np.random.default_rng(seed).permutation(len(data))
    n_val = max(1, len(data) // 10)
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    untrained = ShapeEncoder(dim)
    encoder = ShapeEncoder(dim)
    encoder.load_state_dict(untrained.state_dict())  # same start: the comparison isolates what training adds
    base_loss, _ = _run(untrained, Heads(dim), data, desc, occ, train_idx, val_idx, epochs, lr, batch_size, seed, False)
    val_loss, curve = _run(encoder, Heads(dim), data, desc, occ, train_idx, val_idx, epochs, lr, batch_size, seed, True)
    log.info("shape encoder: val loss %.4f (untrained encoder with trained heads: %.4f)", val_loss, base_loss)
    encoder.eval()
    return encoder, stats, FitResult(val_loss, base_loss, curve)


@torch.no_grad()
def encode(encoder: ShapeEncoder, geoms_m: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    encoder.eval()
    out = []
    for start in range(0, len(geoms_m), batch_size):
        out.append(encoder(Batch.from_data_list(graphs(geoms_m[start : start + batch_size]))).numpy())
    return np.vstack(out) if out else np.zeros((0, encoder.out.out_features), np.float32)


def neighbour_quality(z: np.ndarray, geoms_m: np.ndarray, k: int = 5, seed: int = 0) -> dict[str, float]:
    """Mean descriptor distance between each shape and its k nearest embeddings, against random pairs."""
    d = descriptors(geoms_m)
    d = (d - d.mean(0)) / (d.std(0) + 1e-6)
    zn = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-9)
    sim = zn @ zn.T
    np.fill_diagonal(sim, -np.inf)
    nn_idx = np.argsort(-sim, axis=1)[:, :k]
    near = np.linalg.norm(d[:, None] - d[nn_idx], axis=2).mean()
    rnd = np.random.default_rng(seed).integers(0, len(d), size=(len(d), k))
    return {"knn_descriptor_distance": float(near), "random_descriptor_distance": float(np.linalg.norm(d[:, None] - d[rnd], axis=2).mean())}
