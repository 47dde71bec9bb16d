"""build-tiles: a region's OpenStreetMap extract, then its tiles (partitions mapped as Prefect tasks).

``region`` names a bundled sample (``kotka``, ``helsinki``) or a Geofabrik region (``europe/monaco``,
downloaded with retries); ``pbf`` gives a file instead. ``imagery``: ``render`` (synthetic, offline),
``naip`` (STAC), GeoTIFF/COG path(s) or a folder, or null for none.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, unmapped

from flows.common import SAMPLES, outputs_artifact, stage_row, task_runner, work_dir_for
from geojepa.extract.fetch import GEOFABRIK_INDEX
from geojepa.lifecycle import StageResult
from geojepa.tile import PartitionJob, tile
from geojepa.workdir import WorkDir
from tasks.stages import config, cut_partition, extract, fetch_osm, log_outcome


@flow(name="tile")
def tile_partitions(work_dir: str, imagery: str | list[str] | None, config_path: str | None = None,
                    overrides: list[str] | None = None) -> StageResult:
    """The tile stage with each partition (a block of tile groups) as a mapped task, a window at a time."""
    cfg = config(config_path, overrides)

    def mapped(job: PartitionJob, parts):
        window = cfg.orchestration.partitions_in_flight
        for i in range(0, len(parts), window):
            for future in cut_partition.map(unmapped(job), parts[i : i + window]):
                yield future.result()

    return log_outcome("tile", tile(Path(work_dir), cfg, imagery=imagery, map_partitions=mapped))


@flow(name="build-tiles")
def build_tiles(region: str = "kotka", pbf: str | None = None, imagery: str | list[str] | None = "render",
                work_dir: str | None = None, config_path: str | None = None, overrides: list[str] | None = None,
                index_url: str = GEOFABRIK_INDEX) -> list[dict]:
    """Extract, then tile. Unchanged inputs skip both stages (their manifests)."""
    w = work_dir or work_dir_for(region)
    cfg = config(config_path, overrides)
    if pbf is None:
        sample = SAMPLES / f"{region}.osm.pbf"
        pbf = str(sample) if sample.exists() else fetch_osm(region, w, index_url)
    t0 = time.perf_counter()
    ex = extract(pbf, w, config_path, overrides)
    rows = [stage_row(region, "extract", ex, f"{ex.summary.entities} entities", WorkDir(w).entities,
                      time.perf_counter() - t0)]
    t0 = time.perf_counter()
    ti = tile_partitions.with_options(task_runner=task_runner(cfg))(w, imagery, config_path, overrides)
    splits = ", ".join(f"{k} {v}" for k, v in ti.summary.splits.items())
    rows.append(stage_row(region, "tile", ti, f"{ti.summary.tiles} tiles ({splits})", WorkDir(w).tiles,
                          time.perf_counter() - t0))
    outputs_artifact(f"build-tiles-{region}", rows, f"build-tiles outputs for {region} in {w}")
    return rows
