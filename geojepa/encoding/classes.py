"""Tag classes: an entity's class is the first of ``CLASSES`` among its keys ("other" when none). They colour
the pictures, label entity rows of the embeddings and make the tiles' class mix for retrieval agreement."""

from __future__ import annotations

import numpy as np

CLASSES = ("building", "highway", "railway", "amenity", "shop", "leisure", "landuse", "natural", "waterway",
           "public_transport", "man_made", "barrier", "tourism", "office", "power", "place", "boundary")


def class_histograms(entity_tags: list[list[list[tuple[str, str]]]]) -> np.ndarray:
    """(tiles, classes + 1) share of the tile's entities per tag class (last column: none of them)."""
    out = np.zeros((len(entity_tags), len(CLASSES) + 1), np.float64)
    for i, tile in enumerate(entity_tags):
        for tags in tile:
            keys = {k for k, _ in tags}
            out[i, next((j for j, c in enumerate(CLASSES) if c in keys), len(CLASSES))] += 1
    return out / np.maximum(out.sum(1, keepdims=True), 1)


def class_of(tags: list[tuple[str, str]]) -> str:
    keys = {k for k, _ in tags}
    return next((c for c in CLASSES if c in keys), "other")
