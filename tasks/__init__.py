"""Thin Prefect ``@task`` wrappers around the ``geojepa`` stage functions: each takes paths and plain values (the
config as its path and overrides) and returns the stage's ``StageResult``; ``cut_partition`` alone takes a value the
library built, the tile stage's ``PartitionJob`` (see ``tasks.stages``)."""

from tasks.stages import cut_partition, evaluate, extract, fetch_osm, tokens, train

__all__ = ["cut_partition", "evaluate", "extract", "fetch_osm", "tokens", "train"]
