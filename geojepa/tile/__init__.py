"""Stage 2: entities -> 300 m tiles with their entities (tile coordinates) and imagery."""

from geojepa.tile.stage import TILE_ENTITIES_DIR, TILE_IMAGES_DIR, TILES_FILE, tile

__all__ = ["TILES_FILE", "TILE_ENTITIES_DIR", "TILE_IMAGES_DIR", "tile"]
