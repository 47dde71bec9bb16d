"""JEPA masks: which tokens of a tile are context and which are targets (built in DataLoader workers).

Three strategies, mixed by chance (``MaskConfig``, ``geojepa.train.settings``; the reference's settings are the
defaults):
- modality (chance 0.2 when a tile has several modalities): one modality is
  context, the others are targets (cross-modal prediction, by design);
- random (otherwise, chance 0.25): 45% of the entities are targets, dealt into
  the target blocks; at least 10% stay context;
- area (otherwise): ``blocks`` rectangles of ``block_area`` of the tile each
  (the reference's 25%), aspect 0.5 to 2, at random places; entities whose
  position centre falls in a rectangle are its targets; at least 15% stay
  context.

Random and area masks take whole entities (``entity``: the tokens of one
entity, its tags and geometry tokens, share an id): an entity's tag token as
context would give away its geometry token as a target, at the same position.
Partial entity masks (``p_partial``, off by default) do that on purpose: each
target entity of several tokens keeps, with that chance, one of them (tags or
geometry) as context, so its other token is predicted from it, as the masked
evaluation shows entities by one of their tokens alone.

Invariants for every tile of 2 or more tokens: context and targets are
non-empty and disjoint, and the minimum context share holds (targets are
given back at random until it does); outside the modality strategy no entity
is split between context and targets (when a tile has 2 or more entities),
but for the partial entities, each of which keeps at least one target.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from geojepa.train.settings import MaskConfig  # the settings' one definition (``train.masks`` in the config)


@dataclass
class Mask:
    context: np.ndarray  # token indices, sorted
    targets: list[np.ndarray]  # one index array per target block (a token may be in several blocks)
    kind: str


def make_mask(centres: np.ndarray, modality: np.ndarray, rng: np.random.Generator, cfg: MaskConfig = MaskConfig(),
              entity: np.ndarray | None = None) -> Mask:
    """A mask for one tile; ``centres`` (n, 2) token position centres in [0, 1], ``modality`` (n,), ``entity``
    (n,) the entity of each token (None: every token its own)."""
    n = len(centres)
    if n < 2:
        raise ValueError(f"a tile needs at least 2 tokens to mask, got {n}")
    modalities = np.unique(modality)
    u = rng.random()
    if entity is not None:
        ids, first, inverse = np.unique(entity, return_index=True, return_inverse=True)
        if len(ids) < 2 and len(modalities) > 1:
            return _by_modality(modality, rng, cfg)  # one entity: only the modality strategy can mask it
        elif len(ids) < n:
            if len(modalities) > 1 and u < cfg.p_modality:
                return _by_modality(modality, rng, cfg)
            # Mask the entities (one point each, at its tokens' centre), then give each token its entity's role.
            m = make_mask(centres[first], modality[first], rng, replace(cfg, p_modality=0.0))
            order = np.argsort(inverse, kind="stable")
            bounds = np.searchsorted(inverse[order], np.arange(len(ids) + 1))

            def tokens(groups: np.ndarray) -> np.ndarray:
                return np.sort(np.concatenate([order[bounds[g] : bounds[g + 1]] for g in groups]))

            mask = Mask(tokens(m.context), [tokens(b) for b in m.targets], m.kind)
            return _partial(mask, entity, rng, cfg.p_partial) if cfg.p_partial else mask
    if len(modalities) > 1 and u < cfg.p_modality:
        return _by_modality(modality, rng, cfg)
    if rng.random() < cfg.p_random:
        k = max(1, int(round(cfg.random_ratio * n)))
        chosen = rng.choice(n, size=k, replace=False)
        is_target = np.zeros(n, bool)
        is_target[chosen] = True
        return _finish(is_target, _deal(chosen, cfg.blocks, rng), cfg.random_min_context, rng, "random")
    blocks = []
    for _ in range(cfg.blocks):
        area = cfg.block_area
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


def _partial(mask: Mask, entity: np.ndarray, rng: np.random.Generator, p: float) -> Mask:
    """Each target entity of 2 or more target tokens, with chance ``p``: one of its tokens, at random, moves
    to the context (out of every block)."""
    targets = np.unique(np.concatenate(mask.targets))
    shuffled = rng.permutation(targets)
    ents, first, counts = np.unique(entity[shuffled], return_index=True, return_counts=True)
    shown = shuffled[first[(counts >= 2) & (rng.random(len(ents)) < p)]]  # one random token of each chosen
    if not len(shown):
        return mask
    blocks = [b[~np.isin(b, shown)] for b in mask.targets]
    return Mask(np.union1d(mask.context, shown), [b for b in blocks if len(b)], mask.kind)


def _by_modality(modality: np.ndarray, rng: np.random.Generator, cfg: MaskConfig) -> Mask:
    keep = rng.choice(np.unique(modality))
    is_target = modality != keep
    return _finish(is_target, _deal(np.flatnonzero(is_target), cfg.blocks, rng), 0.0, rng, "modality")


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
