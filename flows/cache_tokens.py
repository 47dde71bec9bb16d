"""cache-tokens: tile artifacts -> tag vocabulary, shape encoder, token shards."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.common import outputs_artifact
from tasks.stages import tokens


@flow(name="cache-tokens")
def cache_tokens(work_dir: str, config_path: str | None = None, overrides: list[str] | None = None,
                 train_geometry: bool = False, tokenizer: str | None = None) -> dict:
    """Tokenise one region, with a corpus tokenizer folder or (without) the region's own."""
    summary = tokens(work_dir, config_path, overrides, train_geometry, tokenizer)
    keep = (
        "skipped",
        "tokenizer_digest",
        "tiles",
        "tiles_tokenised",
        "tiles_reused",
        "tokens",
        "vocab_entries",
        "geometry_val_loss",
        "geometry_val_loss_untrained",
        "seconds",
    )
    outputs_artifact(f"cache-tokens-{Path(work_dir).name}", [{k: summary[k] for k in keep if k in summary}],
                     f"token shards in {Path(work_dir) / 'tokens'}")
    return summary
