"""cache-tokens: tile artifacts -> tag vocabulary, shape encoder, token shards."""

from __future__ import annotations

from prefect import flow

from tasks.stages import tokens


@flow(name="cache-tokens")
def cache_tokens(work_dir: str, config_path: str | None = None, overrides: list[str] | None = None,
                 train_geometry: bool = False) -> dict:
    return tokens(work_dir, config_path, overrides, train_geometry)
