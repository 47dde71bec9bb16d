"""Tag classes: an entity's class is the first of ``CLASSES`` among its keys ("other" when none). They colour
the pictures and label entity rows of the embeddings; ``geojepa.evaluate.region`` counts them per tile for
retrieval agreement."""

from __future__ import annotations

CLASSES = ("building", "highway", "railway", "amenity", "shop", "leisure", "landuse", "natural", "waterway",
           "public_transport", "man_made", "barrier", "tourism", "office", "power", "place", "boundary")


def class_of(tags: list[tuple[str, str]]) -> str:
    keys = {k for k, _ in tags}
    return next((c for c in CLASSES if c in keys), "other")
