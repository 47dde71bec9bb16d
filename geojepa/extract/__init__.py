"""Stage 1: OSM PBF -> entities GeoParquet."""

from geojepa.extract.stage import extract

__all__ = ["extract"]
