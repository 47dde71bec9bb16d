"""Stage 2: entities -> 300 m tiles with their entities (tile coordinates) and imagery."""

from geojepa.tile.stage import PartitionJob, tile

__all__ = ["PartitionJob", "tile"]
