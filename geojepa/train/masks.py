"""JEPA masks: which tokens of a tile are context and which are targets (built in DataLoader workers).

Three strategies, mixed by chance (the reference's settings are the defaults):
- modality (chance 0.2 when a tile has several modalities): one modality is
  context, the others are targets;
- random (otherwise, chance 0.25): 45% of the tokens are targets, dealt into
  the target blocks; at least 10% stay context;
- area (otherwise): ``blocks`` rectangles of ``area`` / ``blocks`` of the tile
  each, aspect 0.5 to 2, at random places; tokens whose position centre falls in
  a rectangle are its targets; at least 15% stay context.

Invariants for every tile of 2 or more tokens: context and targets are
non-empty and disjoint, and the minimum context share holds (targets are
dropped at random until it does).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MaskConfig:
    blocks: int = 4
    p_modality: float = 0.2
    p_random: float = 0.25
    random_ratio: float = 0.45
    random_min_context: float = 0.10
    area_ratio: float = 0.35
    area_aspect: tuple[float, float] = (0.5, 2.0)
    area_min_context: float = 0.15


@dataclass
class Mask:
    context: np.ndarray  # token indices, sorted
    targets: list[np.ndarray]  # one index array per target block (a token may be in several blocks)
    kind: str


def make_mask(centres: np.ndarray, modality: np.ndarray, rng: np.random.Generator, cfg: MaskConfig = MaskConfig()) -> Mask:
    """A mask for one tile; ``centres`` (n, 2) token position centres in [0, 1], ``modality`` (n,)."""
    n = len(centres)
    if n < 2:
        raise ValueError(f"a tile needs at least 2 tokens to mask, got {n}")
    modalities = np.unique(modality)
    u = rng.random()
    if len(modalities) > 1 and u < cfg.p_modality:
        keep = rng.choice(modalities)
        is_target = modality != keep
        blocks = _deal(np.flatnonzero(is_target), cfg.blocks, rng)
        return _finish(is_target, blocks, 0.0, rng, "modality")
    if rng.random() < cfg.p_random:
        k = max(1, int(round(cfg.random_ratio * n)))
        chosen = rng.choice(n, size=k, replace=False)
        is_target = np.zeros(n, bool)
        is_target[chosen] = True
        return _finish(is_target, _deal(chosen, cfg.blocks, rng), cfg.random_min_context, rng, "random")
    blocks = []
    for _ in range(cfg.blocks):
        area = cfg.area_ratio / cfg.blocks
        aspect = np.exp(rng.uniform(np.log(cfg.area_aspect[0]), np.log(cfg.area_aspect[1])))
        w, h = min(np.sqrt(area * aspect), 1.0), min(np.sqrt(area / aspect), 1.0)
        x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
        inside = (centres[:, 0] >= x0) & (centres[:, 0] <= x0 + w) & (centres[:, 1] >= y0) & (centres[:, 1] <= y0 + h)
        if not inside.any():  # an empty rectangle takes the token nearest its centre
            inside[np.argmin(np.hypot(centres[:, 0] - x0 - w / 2, centres[:, 1] - y0 - h / 2))] = True
        blocks.append(np.flatnonzero(inside))
    is_target = np.zeros(n, bool)
    for b in blocks:
        is_target[b] = True
    return _finish(is_target, blocks, cfg.area_min_context, rng, "area")


def _deal(indices: np.ndarray, blocks: int, rng: np.random.Generator) -> list[np.ndarray]:
    shuffled = rng.permutation(indices)
    return [b for b in np.array_split(shuffled, min(blocks, max(len(shuffled), 1))) if len(b)]


def _finish(is_target: np.ndarray, blocks: list[np.ndarray], min_context: float, rng: np.random.Generator,
            kind: str) -> Mask:
    n = len(is_target)
    need = max(1, int(np.ceil(min_context * n)))
    targets = np.flatnonzero(is_target)
    if n - len(targets) < need:  # give targets back to the context until the minimum holds
        back = rng.choice(targets, size=need - (n - len(targets)), replace=False)
        is_target[back] = False
    if not is_target.any():  # at least one target
        is_target[rng.integers(n)] = True
    blocks = [np.sort(b[is_target[b]]) for b in blocks]
    blocks = [b for b in blocks if len(b)]
    covered = np.zeros(n, bool)
    for b in blocks:
        covered[b] = True
    leftover = np.flatnonzero(is_target & ~covered)
    if len(leftover):
        blocks.append(leftover)
    return Mask(np.flatnonzero(~is_target), blocks, kind)
