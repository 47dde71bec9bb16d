"""GeoJEPA: self-supervised embeddings of urban tiles and map entities.

The library never imports Prefect; ``tasks/`` and ``flows/`` wrap it.
"""

__version__ = "0.1.0"
