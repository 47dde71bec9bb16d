"""cache-tokens: tile artifacts -> tag vocabulary, shape encoder, token shards."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.common import outputs_artifact
from geojepa.lifecycle import StageResult
from geojepa.workdir import WorkDir
from tasks.stages import tokens


@flow(name="cache-tokens")
def cache_tokens(work_dir: str, config_path: str | None = None, overrides: list[str] | None = None,
                 train_geometry: bool = False, tokenizer: str | None = None) -> StageResult:
    """Tokenise one region, with a corpus tokenizer folder or (without) the region's own."""
    result = tokens(work_dir, config_path, overrides, train_geometry, tokenizer)
    s = result.summary
    row = {"skipped": result.skipped, "tokenizer_digest": s.tokenizer_digest, "tiles": s.tiles,
           "tiles_tokenised": s.tiles_tokenised, "tiles_reused": s.tiles_reused, "tokens": s.tokens,
           "vocab_entries": s.vocab_entries}
    if s.geometry_val_loss is not None:  # the region's own shape encoder, trained by this run
        row |= {"geometry_val_loss": s.geometry_val_loss, "geometry_val_loss_untrained": s.geometry_val_loss_untrained}
    outputs_artifact(f"cache-tokens-{Path(work_dir).name}", [row | {"seconds": s.seconds}],
                     f"token shards in {WorkDir(work_dir).tokens}")
    return result
