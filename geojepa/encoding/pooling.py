"""A frozen encoder over tiles' token items: per tile the mean and the max of its layer-normed outputs over
its real tokens (tiles are packed, never padded, so nothing else can be counted; with ``pad_to_max`` the
padded path gives the same numbers, which a test checks), and per entity the mean of its tokens (its tags
and geometry tokens).

The tile embedding ``geojepa embed`` writes (and the reference protocol probes) is concat(mean, max); protocol
v2 probes the mean with the tile's token counts (``geojepa.evaluate.features``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from geojepa.model.jepa import Encoder, TokenBatch
from geojepa.model.layers import Packing
from geojepa.train.data import pack

ENTITY_MODALITIES = ("tags", "geometry")


@dataclass
class Pooled:
    mean: np.ndarray  # (tiles, width)
    max: np.ndarray  # (tiles, width)
    entities: list[np.ndarray]  # per tile (entities, width)

    def concat(self) -> np.ndarray:
        """concat(mean, max): (tiles, 2 x width)."""
        return np.concatenate([self.mean, self.max], 1)


def chunks(lengths: np.ndarray, batch_tiles: int, token_budget: int | None) -> list[np.ndarray]:
    """Tiles in order of length, cut into chunks of at most ``batch_tiles`` tiles and, with ``token_budget``,
    at most that many padded token slots (tiles x the chunk's longest): off the GPU attention is computed on
    each chunk padded to its longest tile, so mixing a 900-token tile with 60 short ones pays 61 x 900."""
    order = np.argsort(lengths, kind="stable")
    out, start = [], 0
    while start < len(order):
        end = start + 1
        while end < len(order) and end - start < batch_tiles and (
                token_budget is None or (end + 1 - start) * lengths[order[end]] <= token_budget):
            end += 1
        out.append(order[start:end])
        start = end
    return out


@torch.no_grad()
def embed(encoder: Encoder, items: list[dict], modalities: tuple[str, ...], batch_tiles: int = 64,
          pad_to_max: bool = False, device: str = "cpu", token_budget: int | None = 4096) -> Pooled:
    """Each tile's mean and max of the outputs and its entities' embeddings (see the module docstring); tiles
    are embedded in chunks of similar length (``chunks``; ``token_budget`` None: ``batch_tiles`` alone)."""
    encoder = encoder.to(device).eval()
    if str(device).startswith("cuda"):  # packed attention there (FlexAttention): no padding to save
        token_budget = None
    width = encoder.width
    lengths = np.array([sum(len(it[m]) for m in modalities) for it in items], np.int64)
    means = np.zeros((len(items), width), np.float32)
    maxes = np.zeros((len(items), width), np.float32)
    entities: list[np.ndarray] = [np.zeros((0, width), np.float32)] * len(items)
    empty = torch.zeros(0, dtype=torch.long)
    for chunk in chunks(lengths, batch_tiles, token_budget):
        packed = pack([items[i] for i in chunk], modalities)
        spans = packed.pop("tiles")
        b = TokenBatch(**packed, context=empty, pred_src=empty, pred_is_target=empty.bool(), pred_doc=empty,
                       n_pred_docs=0, pad_to_max=pad_to_max).to(device)
        out = encoder(encoder.embed(b), Packing(b.doc, b.n_tiles, pad_to_max)).float()
        out = F.layer_norm(out, (width,))  # the space the predictor was trained to predict
        count = torch.bincount(b.doc, minlength=b.n_tiles).clamp_min(1).unsqueeze(1)
        mean = torch.zeros(b.n_tiles, width, device=device).index_add_(0, b.doc, out) / count
        idx = b.doc.unsqueeze(1).expand(-1, width)
        mx = torch.full((b.n_tiles, width), -torch.inf, device=device).scatter_reduce(0, idx, out, "amax")
        means[chunk] = mean.cpu().numpy()
        maxes[chunk] = mx.cpu().numpy()
        out = out.cpu().numpy()
        for i, (first, *_) in zip(chunk, spans, strict=True):
            n = len(items[i]["epos"])
            blocks = [m for m in modalities if m in ENTITY_MODALITIES]
            if blocks:
                parts = [out[first + j * n : first + (j + 1) * n] for j in range(len(blocks))]
                entities[i] = np.mean(parts, axis=0)
    return Pooled(means, maxes, entities)
