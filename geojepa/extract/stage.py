"""The extract stage: ``*.osm.pbf`` -> ``W/entities.parquet`` (GeoParquet, EPSG:4326).

Entity batches stream from the PBF (``reader``) into an external sort
(``sort``) and out to the GeoParquet artifact in Hilbert order of the
entities' bbox centres, so each row group covers a compact area and bbox
statistics prune spatial reads. Memory stays bounded whatever the input size.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from data_contracts import ENTITIES, ArtifactWriter
from geojepa.config import Config
from geojepa.errors import GeoJepaError
from geojepa.extract.reader import BATCH_SCHEMA, InvalidText, check_pbf, node_index_spec, read_entities
from geojepa.extract.sort import SpatialSorter
from geojepa.extract.tags import TagFilter
from geojepa.lifecycle import Lifecycle, StageResult, Summary
from geojepa.workdir import WorkDir

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ExtractSummary(Summary):
    """The extract stage's figures: the entities written (every other figure: ``figures``)."""

    entities: int


def _check_work_dir(work_dir: Path) -> None:
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=work_dir):
            pass
    except OSError as e:
        raise GeoJepaError(f"{work_dir}: work directory is not writable: {e.strerror or e}") from None


def _check_bbox(pbf: Path, header_box, bbox: tuple[float, float, float, float]) -> None:
    min_lon, min_lat, max_lon, max_lat = bbox
    if not (min_lon < max_lon and min_lat < max_lat):
        raise GeoJepaError(f"bbox {bbox}: expected min_lon < max_lon and min_lat < max_lat")
    if header_box.valid():
        bl, tr = header_box.bottom_left, header_box.top_right
        if max_lon < bl.lon or min_lon > tr.lon or max_lat < bl.lat or min_lat > tr.lat:
            raise GeoJepaError(
                f"{pbf}: its bbox ({bl.lon}, {bl.lat}, {tr.lon}, {tr.lat}) does not overlap the requested "
                f"clip {bbox}")


def _progress(pbf: Path):
    """A rich progress counter on a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        return nullcontext(None)
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(SpinnerColumn(), TextColumn("[bold]extract[/] {task.description}"),
                        TextColumn("{task.completed:,.0f} entities"), TimeElapsedColumn(), transient=True)

    class _Ctx:
        def __enter__(self):
            progress.start()
            task = progress.add_task(pbf.name, total=None)
            return lambda n: progress.advance(task, n)

        def __exit__(self, *exc):
            progress.stop()

    return _Ctx()


def extract(pbf: Path | str, work_dir: Path | str, cfg: Config, force: bool = False) -> StageResult[ExtractSummary]:
    """Extract tagged entities of ``pbf`` into ``work_dir/entities.parquet``.

    Skips the work when the PBF, the config section and the code are unchanged
    since the last successful run (``force`` re-runs). On any failure the
    previous ``entities.parquet`` is left as it was.
    """
    pbf, work_dir = Path(pbf), Path(work_dir)
    section = cfg.extract
    header_box = check_pbf(pbf)
    if section.bbox is not None:
        _check_bbox(pbf, header_box, section.bbox)
    _check_work_dir(work_dir)
    out = WorkDir(work_dir).entities
    life = Lifecycle("extract", work_dir, cfg, {"pbf": pbf}, section.model_dump(mode="json"),
                     ("geojepa.extract", "data_contracts"), section="extract")
    if done := life.skipped(force, ExtractSummary):
        return done

    stats: Counter = Counter()
    t0 = time.perf_counter()
    tmp_dir = Path(tempfile.mkdtemp(prefix=".extract-", dir=work_dir))
    try:
        with life.run() as run:
            spec = node_index_spec(pbf, section.node_index, section.disk_index_above_mb, tmp_dir)
            tag_filter = TagFilter(section.tag_filter) if section.tag_filter else None
            skip = None
            while True:
                sorter = SpatialSorter(tmp_dir, BATCH_SCHEMA)
                try:
                    with _progress(pbf) as progress:
                        for batch in read_entities(pbf, drop_prefixes=section.drop_key_prefixes, node_index=spec,
                                                   tmp_dir=tmp_dir, block_mb=section.read_block_mb,
                                                   threads=section.threads, clip=section.bbox, tag_filter=tag_filter,
                                                   stats=stats, progress=progress, skip=skip):
                            sorter.add(batch)
                    break
                except InvalidText as e:
                    if skip is not None:
                        raise
                    # Skipped and counted like other repairs; read again without them.
                    log.warning("extract: %s; skipping them", e)
                    sorter.close()
                    skip = e.objects
                    stats = Counter(skipped_invalid_utf8=e.count)
            rows = sorter.rows
            if rows == 0:
                where = f" inside bbox {section.bbox}" if section.bbox else ""
                raise GeoJepaError(f"{pbf}: no tagged entities{where}; nothing written")
            t_read = time.perf_counter() - t0
            with ArtifactWriter(out, ENTITIES, row_group_rows=section.row_group_rows,
                                metadata={"geojepa:source": "OpenStreetMap contributors, ODbL 1.0"}) as writer:
                sorter.write(writer.write, section.row_group_rows)
            counts = dict(sorter.kinds)
            seconds = time.perf_counter() - t0
            summary = {
                "entities": rows,
                **{f"kind_{k}": v for k, v in counts.items()},
                **dict(sorted(stats.items())),
                "seconds": round(seconds, 3),
                "seconds_read": round(t_read, 3),
                "entities_per_s": round(rows / seconds, 1),
                "input_mb_per_s": round(pbf.stat().st_size / 1e6 / seconds, 3),
                "node_index_on_disk": int(spec != "flex_mem"),
            }
            run.metrics(summary)
            run.dict(summary, "extract_summary.json")
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    repaired = {k: v for k, v in stats.items() if k.startswith(("fixed_", "skipped_"))}
    if repaired:
        log.info("extract: repaired or skipped geometries: %s", repaired)
    log.info("extract: %d entities from %s in %.1fs -> %s", rows, pbf, seconds, out)
    return life.publish([out], ExtractSummary.of(summary))
