"""Embeddings as a product: ``geojepa embed`` (a region's tile and entity embeddings as GeoParquet),
``geojepa similar`` (a tile's nearest tiles) and ``geojepa map`` (one self-contained HTML page)."""

from geojepa.embeddings.embed import embed_source
from geojepa.embeddings.similar import similar
from geojepa.embeddings.webmap import write_map

__all__ = ["embed_source", "similar", "write_map"]
