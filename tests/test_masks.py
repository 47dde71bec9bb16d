"""Mask invariants for every tile length from 2 to 1,250 tokens (property tests)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geojepa.train.masks import MaskConfig, make_mask


@settings(max_examples=300, deadline=None)
@given(n=st.integers(2, 1250), seed=st.integers(0, 2**31 - 1), modalities=st.integers(1, 3),
       clustered=st.booleans())
def test_mask_invariants(n, seed, modalities, clustered):
    rng = np.random.default_rng(seed)
    centres = rng.random((n, 2)) * (0.1 if clustered else 1.0)  # clustered: most area blocks hit nothing
    modality = rng.integers(0, modalities, n)
    cfg = MaskConfig()
    m = make_mask(centres, modality, rng, cfg)
    targets = np.unique(np.concatenate(m.targets))
    assert len(m.context) > 0 and len(targets) > 0
    assert not set(m.context.tolist()) & set(targets.tolist())
    assert len(m.context) + len(targets) == n
    assert len(m.targets) <= cfg.blocks + 1
    minimum = {"random": cfg.random_min_context, "area": cfg.area_min_context, "modality": 0.0}[m.kind]
    assert len(m.context) >= max(1, int(np.ceil(minimum * n)))


def test_strategies_follow_their_definitions():
    rng = np.random.default_rng(0)
    n = 1000
    centres = rng.random((n, 2))
    modality = np.repeat([0, 1], n // 2)
    kinds = {"modality": 0, "random": 0, "area": 0}
    for _ in range(400):
        m = make_mask(centres, modality, rng)
        kinds[m.kind] += 1
        targets = np.unique(np.concatenate(m.targets))
        if m.kind == "modality":
            assert len(np.unique(modality[m.context])) == 1 and len(np.unique(modality[targets])) == 1
        elif m.kind == "random":
            assert len(targets) == 450
        else:
            assert 0.25 <= len(targets) / n <= 0.85  # 4 blocks of 25% of the area each (overlapping), 15% context
    # chances: modality 0.2; of the rest, random 0.25 and area 0.75
    assert 0.13 < kinds["modality"] / 400 < 0.27
    assert 0.12 < kinds["random"] / 400 < 0.28


def test_tiny_tiles_are_refused():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        make_mask(np.zeros((1, 2)), np.zeros(1, int), np.random.default_rng(0))


@settings(max_examples=200, deadline=None)
@given(entities=st.integers(1, 600), seed=st.integers(0, 2**31 - 1), patches=st.integers(0, 30))
def test_whole_entities_are_masked_together(entities, seed, patches):
    """An entity's tags and geometry tokens (one position) are both context or both targets, except when one
    modality is the context (the cross-modal strategy); image patches are their own entities."""
    rng = np.random.default_rng(seed)
    centres = np.concatenate([np.tile(rng.random((entities, 2)), (2, 1)), rng.random((patches, 2))])
    modality = np.repeat([0, 1, 2], [entities, entities, patches])
    entity = np.concatenate([np.arange(entities), np.arange(entities), entities + np.arange(patches)])
    cfg = MaskConfig()
    m = make_mask(centres, modality, rng, cfg, entity)
    targets = np.unique(np.concatenate(m.targets))
    assert len(m.context) and len(targets) and not set(m.context.tolist()) & set(targets.tolist())
    assert len(m.context) + len(targets) == len(centres)
    if m.kind != "modality":
        role = np.zeros(len(centres), bool)
        role[targets] = True
        assert (role[:entities] == role[entities : 2 * entities]).all()
        for block in m.targets:  # and in the same blocks
            inside = np.zeros(len(centres), bool)
            inside[block] = True
            assert (inside[:entities] == inside[entities : 2 * entities]).all()


def test_a_single_entity_is_masked_across_modalities():
    rng = np.random.default_rng(0)
    m = make_mask(np.full((2, 2), 0.5), np.array([0, 1]), rng, MaskConfig(), np.array([0, 0]))
    assert m.kind == "modality" and len(m.context) == 1 and len(np.concatenate(m.targets)) == 1


@settings(max_examples=100, deadline=None)
@given(entities=st.integers(2, 300), seed=st.integers(0, 2**31 - 1), p=st.sampled_from([0.3, 1.0]))
def test_partial_entity_masks_show_one_token_of_a_target_entity_and_keep_the_other_a_target(entities, seed, p):
    rng = np.random.default_rng(seed)
    centres = np.tile(rng.random((entities, 2)), (2, 1))
    modality = np.repeat([0, 1], entities)
    entity = np.tile(np.arange(entities), 2)
    m = make_mask(centres, modality, rng, MaskConfig(p_partial=p, p_modality=0.0), entity)
    targets = np.unique(np.concatenate(m.targets))
    assert len(m.context) and len(targets) and not set(m.context.tolist()) & set(targets.tolist())
    assert len(m.context) + len(targets) == len(centres) and all(len(b) for b in m.targets)
    split = set(entity[targets].tolist()) & set(entity[m.context].tolist())
    whole = set(entity[targets].tolist()) - split
    if p == 1.0:  # every target entity shows one token: none is a target whole
        assert not whole and split
    for e in split:  # a partial entity: one token context, the other a target
        assert (entity[targets] == e).sum() == 1 and (entity[m.context] == e).sum() == 1
