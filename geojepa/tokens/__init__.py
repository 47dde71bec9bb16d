"""Stage 3: tiles -> tag vocabulary, shape encoder and token shards."""

from geojepa.tokens.stage import TOKENS_DIR, tokens

__all__ = ["TOKENS_DIR", "tokens"]
