"""Stage 1: OSM PBF -> entities GeoParquet."""

from geojepa.extract.stage import ENTITIES_FILE, extract

__all__ = ["ENTITIES_FILE", "extract"]
