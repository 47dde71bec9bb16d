"""Thin Prefect ``@task`` wrappers around the ``geojepa`` stage functions: they pass paths, nothing more."""

from tasks.stages import cut_partition, evaluate, extract, fetch_osm, tokens, train

__all__ = ["cut_partition", "evaluate", "extract", "fetch_osm", "tokens", "train"]
