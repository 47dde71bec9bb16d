"""Stage 3: tiles -> tag vocabulary, shape encoder and token shards."""

from geojepa.tokens.stage import tokens

__all__ = ["tokens"]
