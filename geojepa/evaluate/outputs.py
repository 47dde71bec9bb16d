"""The evaluation's tables: ``embeddings.parquet`` (GeoParquet: the tiles, then every entity piece, with
their embedding and first principal components), ``task_labels.parquet``, ``results.parquet`` and
``predictions.parquet``, each through its contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from data_contracts import EMBEDDINGS, EVAL_RESULTS, PREDICTIONS, TASK_LABELS, ArtifactWriter, write_table
from geojepa.encoding.spill import Spill, entity_pieces
from geojepa.evaluate import figures
from geojepa.workdir import EvalDir


def write_tables(out: EvalDir, label_rows: list[tuple], results: list[dict], predictions: pa.Table) -> None:
    write_table(pa.table({"task": [r[0] for r in label_rows], "tile_id": [r[1] for r in label_rows],
                          "split": [r[2] for r in label_rows], "label": [float(r[3]) for r in label_rows]},
                         schema=TASK_LABELS.schema), out.task_labels, TASK_LABELS)
    write_table(pa.Table.from_pylist(results, EVAL_RESULTS.schema), out.results, EVAL_RESULTS)
    write_table(predictions, out.predictions, PREDICTIONS)


def _vectors(x: np.ndarray) -> pa.Array:
    offsets = np.arange(len(x) + 1, dtype=np.int64) * x.shape[1]
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(x.astype(np.float32).ravel()))


def write_embeddings(path: Path, paths: dict, tok, meta: pa.Table, tiles: np.ndarray, spill: Spill,
                     model: str) -> None:
    """Tile rows (footprints; ``tiles``: the target encoder's concat(mean, max)), then each entity piece's row, a
    ``tile_entities`` shard at a time: its embedding (from the spill), and its own geometry, the piece in its
    tile, in EPSG:4326."""
    n = tok.n
    mean, axes = spill.axes()
    with ArtifactWriter(path, EMBEDDINGS) as out:
        out.write(pa.table({
            "level": pa.array(["tile"] * n, pa.string()), "tile_id": pa.array(list(tok.ids), pa.string()),
            "entity_id": pa.nulls(n, pa.string()), "split": pa.array(list(tok.split), pa.string()),
            "embedding": _vectors(tiles), "pc": _pcs(figures.pca(tiles, 3)), "model": pa.array([model] * n),
            "geometry": meta["geometry"].combine_chunks(), "bbox": meta["bbox"].combine_chunks()}))
        for t, owner, x, geometry, bbox in entity_pieces(paths["tile_entities"], tok, meta, spill, []):
            out.write(pa.table({
                "level": pa.array(["entity"] * len(x), pa.string()), "tile_id": t["tile_id"],
                "entity_id": t["entity_id"], "split": pa.array(tok.split[owner].tolist(), pa.string()),
                "embedding": _vectors(x), "pc": _pcs((x - mean) @ axes),
                "model": pa.array([model] * len(x)), "geometry": geometry, "bbox": bbox}))


def _pcs(x: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(x, np.float32).ravel()), 3)


def write_probe_features(path: Path, ids: np.ndarray, groups: np.ndarray, sets: dict, feats: dict[str, dict]) -> None:
    """``PROBE_FEATURES``: per task (``sets``: its ``TaskSet``) each shared feature set's masked tile vectors
    (``feats``: task -> model -> (rows, width)); ``ids`` and ``groups`` per region tile."""
    from data_contracts import PROBE_FEATURES

    with ArtifactWriter(path, PROBE_FEATURES) as out:
        for task, s in sets.items():
            for model, x in feats.get(task, {}).items():
                n = len(s.rows)
                out.write(
                    pa.table(
                        {
                            "task": pa.array([task] * n, pa.string()),
                            "model": pa.array([model] * n, pa.string()),
                            "tile_id": pa.array(ids[s.rows].tolist(), pa.string()),
                            "split": pa.array(s.sp.tolist(), pa.string()),
                            "group_id": pa.array(groups[s.rows].tolist(), pa.string()),
                            "label": pa.array(s.y, pa.float64()),
                            "features": pa.ListArray.from_arrays(
                                pa.array((np.arange(n + 1) * x.shape[1]).astype(np.int32)),
                                pa.array(np.ascontiguousarray(x, np.float32).ravel()),
                            ),
                        },
                        schema=PROBE_FEATURES.schema,
                    )
                )
