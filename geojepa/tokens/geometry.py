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
from torch_geometric.data import Data
from torch_geometric.nn import GINConv, global_max_pool, global_mean_pool

from geojepa.tile.clip import rotated_bbox

log = logging.getLogger(__name__)
N_DESCRIPTORS = 8
OCC = 16


@dataclass
class Graphs:
    """The vertex graphs of many shapes, stored flat; shape s owns nodes node_ptr[s]:node_ptr[s+1]."""

    x: np.ndarray  # (nodes, 5) float32 features
    edges: np.ndarray  # (2, edges) global node ids, grouped by shape
    node_ptr: np.ndarray
    edge_ptr: np.ndarray

    def __len__(self) -> int:
        return len(self.node_ptr) - 1

    def batch(self, idx: np.ndarray, device: str = "cpu") -> Data:
        """A minibatch of shapes ``idx`` as one disjoint graph (x, edge_index, batch) on ``device``."""
        n_cnt = np.diff(self.node_ptr)[idx]
        e_cnt = np.diff(self.edge_ptr)[idx]
        new_ptr = np.concatenate([[0], np.cumsum(n_cnt)])
        nodes = np.arange(new_ptr[-1]) - np.repeat(new_ptr[:-1] - self.node_ptr[idx], n_cnt)
        e_new = np.concatenate([[0], np.cumsum(e_cnt)])
        edges = np.arange(e_new[-1]) - np.repeat(e_new[:-1] - self.edge_ptr[idx], e_cnt)
        edge_index = self.edges[:, edges] - np.repeat(self.node_ptr[idx] - new_ptr[:-1], e_cnt)
        return Data(x=torch.from_numpy(self.x[nodes]), edge_index=torch.from_numpy(edge_index),
                    batch=torch.from_numpy(np.repeat(np.arange(len(idx)), n_cnt))).to(device)


def graphs(geoms_m: np.ndarray) -> Graphs:
    """Vertex graphs of shapes (coordinates in metres), built without a Python loop over shapes."""
    parts, shape_of_part = shapely.get_parts(geoms_m, return_index=True)
    is_poly = shapely.get_type_id(parts) == 3
    rings, ring_part = shapely.get_rings(parts[is_poly], return_index=True)
    paths = np.concatenate([rings, parts[~is_poly]])
    shape = np.concatenate([shape_of_part[is_poly][ring_part], shape_of_part[~is_poly]])
    closed = np.concatenate([np.ones(len(rings), bool), np.zeros(int((~is_poly).sum()), bool)])
    order = np.argsort(shape, kind="stable")
    paths, shape, closed = paths[order], shape[order], closed[order]
    coords, path_of = shapely.get_coordinates(paths, return_index=True)
    n = np.bincount(path_of, minlength=len(paths))
    # A closed ring repeats its first vertex at the end: drop it.
    last = np.cumsum(n) - 1
    drop = np.zeros(len(coords), bool)
    drop[last[closed & (n > 1)]] = True
    coords, path_of = coords[~drop], path_of[~drop]
    n = np.bincount(path_of, minlength=len(paths))
    start = np.concatenate([[0], np.cumsum(n)[:-1]])
    i = np.arange(len(coords))
    k = i - start[path_of]
    m = n[path_of]
    cyc = closed[path_of] & (m > 2)
    prev = np.where(k > 0, i - 1, np.where(cyc, i + m - 1, i))
    nxt = np.where(k < m - 1, i + 1, np.where(cyc, i - (m - 1), i))
    a, b = coords[prev] - coords, coords[nxt] - coords
    la, lb = np.hypot(*a.T), np.hypot(*b.T)
    norm = np.maximum(la * lb, 1e-9)
    node_shape = shape[path_of]
    counts = np.bincount(node_shape, minlength=len(geoms_m))
    centre = np.column_stack([np.bincount(node_shape, coords[:, j], len(geoms_m)) for j in (0, 1)])
    centre /= np.maximum(counts, 1)[:, None]
    x = np.column_stack([np.log1p(la), np.log1p(lb), (a * b).sum(1) / norm,
                         (a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]) / norm,
                         np.log1p(np.hypot(*(coords - centre[node_shape]).T))]).astype(np.float32)
    has_edge = nxt != i
    src, dst = i[has_edge], nxt[has_edge]
    edges = np.stack([np.concatenate([src, dst]), np.concatenate([dst, src])])
    edge_shape = np.concatenate([node_shape[src], node_shape[src]])
    edges = edges[:, np.argsort(edge_shape, kind="stable")]
    node_ptr = np.concatenate([[0], np.cumsum(counts)])
    edge_ptr = np.concatenate([[0], np.cumsum(np.bincount(edge_shape, minlength=len(geoms_m)))])
    if (counts == 0).any():  # empty geometries: one zero node so every shape pools something
        raise ValueError("empty geometry among the shapes")
    return Graphs(x, edges.astype(np.int64), node_ptr, edge_ptr)


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
    return np.column_stack(
        [
            np.log1p(area),
            np.log1p(length),
            np.where(length > 0, 4 * np.pi * area / np.maximum(length, 1e-9) ** 2, 0),
            np.log1p(shapely.get_num_coordinates(geoms_m)),
            np.where(long_side > 0, short_side / np.maximum(long_side, 1e-9), 1),
            np.log1p(long_side),
            np.where(hull > 0, area / np.maximum(hull, 1e-9), 0),
            dims.astype(float),
        ]
    ).astype(np.float32)


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

    def forward(self, batch: Data) -> torch.Tensor:
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


def device() -> str:
    """Batches go to the GPU when one is present."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _run(encoder: ShapeEncoder, heads: Heads, data: Graphs, desc: torch.Tensor, occ: torch.Tensor,
         train_idx: np.ndarray, val_idx: np.ndarray, epochs: int, lr: float, batch_size: int, seed: int,
         train_encoder: bool) -> tuple[float, list]:
    dev = device()
    encoder.to(dev)
    heads.to(dev)
    desc, occ = desc.to(dev), occ.to(dev)
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
            z = encoder(data.batch(idx, dev))
            if not train_encoder:
                z = z.detach()
            loss = _loss(heads, z, desc[idx], occ[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        curve.append((epoch, total / len(train_idx), evaluate(encoder, heads, data, desc, occ, val_idx, batch_size)))
        log.info("shape encoder: %s epoch %d/%d, train loss %.4f, val loss %.4f",
                 "encoder" if train_encoder else "heads", epoch + 1, epochs, curve[-1][1], curve[-1][2])
    return curve[-1][2], curve


@torch.no_grad()
def evaluate(encoder, heads, data, desc, occ, idx, batch_size) -> float:
    encoder.eval()
    total = 0.0
    for start in range(0, len(idx), batch_size):
        b = idx[start : start + batch_size]
        total += float(_loss(heads, encoder(data.batch(b, desc.device.type)), desc[b], occ[b])) * len(b)
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
    encoder.cpu().eval()
    return encoder, stats, FitResult(val_loss, base_loss, curve)


@torch.no_grad()
def encode(encoder: ShapeEncoder, geoms_m: np.ndarray, batch_size: int = 2048) -> np.ndarray:
    encoder.eval()
    if len(geoms_m) == 0:
        return np.zeros((0, encoder.out.out_features), np.float32)
    dev = device()
    encoder.to(dev)
    g = graphs(geoms_m)
    out = np.vstack([encoder(g.batch(np.arange(s, min(s + batch_size, len(g))), dev)).cpu().numpy()
                     for s in range(0, len(g), batch_size)])
    encoder.cpu()
    return out


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
    return {
        "knn_descriptor_distance": float(near),
        "random_descriptor_distance": float(np.linalg.norm(d[:, None] - d[rnd], axis=2).mean()),
    }
