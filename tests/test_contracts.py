"""Data contracts: validated writes and reads with errors that name file, column and difference."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_contracts import ALL, TAG_VOCAB, TASK_LABELS, ArtifactWriter, ContractError, read_table, sweep, write_table


def _labels(n=3):
    return pa.table({"task": ["bridge"] * n, "tile_id": [f"t{i}" for i in range(n)], "split": ["train"] * n,
                     "label": [float(i) for i in range(n)]}, schema=TASK_LABELS.schema)


def test_every_artifact_has_a_versioned_schema():
    assert set(ALL) == {"entities", "tiles", "tile_entities", "tile_images", "tag_vocab", "tokens", "embeddings",
                        "task_labels", "eval_results", "predictions", "probe_features", "corpus_results"}
    for contract in ALL.values():
        assert contract.version >= 1 and len(contract.schema) > 0


def test_round_trip_keeps_data_and_records_version(tmp_path):
    path = write_table(_labels(), tmp_path / "labels.parquet", TASK_LABELS)
    assert read_table(path, TASK_LABELS).equals(_labels())
    meta = pq.read_schema(path).metadata
    assert meta[b"geojepa:schema_version"] == str(TASK_LABELS.version).encode()


def test_write_rejects_wrong_columns_and_leaves_nothing(tmp_path):
    bad = _labels().drop_columns(["label"]).append_column("labell", pa.array([1.0, 2.0, 3.0]))
    with pytest.raises(ContractError) as e:
        write_table(bad, tmp_path / "labels.parquet", TASK_LABELS)
    msg = str(e.value)
    assert "labels.parquet" in msg and "'label' is missing" in msg and "unexpected column 'labell'" in msg
    assert list(tmp_path.iterdir()) == []


def test_read_names_type_difference(tmp_path):
    table = _labels().set_column(3, "label", pa.array(["a", "b", "c"]))
    pq.write_table(table.replace_schema_metadata({"geojepa:schema_version": "1", "geojepa:artifact": "task_labels"}),
                   tmp_path / "x.parquet")
    with pytest.raises(ContractError, match=r"x.parquet.*column 'label': expected double, found string"):
        read_table(tmp_path / "x.parquet", TASK_LABELS)


def test_read_refuses_other_version_and_other_artifact(tmp_path):
    path = write_table(_labels(), tmp_path / "labels.parquet", TASK_LABELS)
    t = pq.read_table(path)
    pq.write_table(t.replace_schema_metadata({"geojepa:schema_version": "99", "geojepa:artifact": "task_labels"}),
                   tmp_path / "v99.parquet")
    with pytest.raises(ContractError, match="v99.parquet: task_labels schema_version 99, expected 1"):
        read_table(tmp_path / "v99.parquet", TASK_LABELS)
    with pytest.raises(ContractError, match="is a 'task_labels' artifact, expected 'tag_vocab'"):
        read_table(path, TAG_VOCAB)


def test_read_missing_and_non_parquet(tmp_path):
    with pytest.raises(ContractError, match="nope.parquet: task_labels artifact not found"):
        read_table(tmp_path / "nope.parquet", TASK_LABELS)
    (tmp_path / "text.parquet").write_text("hello")
    with pytest.raises(ContractError, match="text.parquet: not a readable Parquet file"):
        read_table(tmp_path / "text.parquet", TASK_LABELS)


def test_failed_write_keeps_the_earlier_artifact(tmp_path):
    path = write_table(_labels(2), tmp_path / "labels.parquet", TASK_LABELS)
    before = path.read_bytes()
    with pytest.raises(RuntimeError), ArtifactWriter(path, TASK_LABELS) as w:
        w.write(_labels(5))
        raise RuntimeError("crash in the middle of a stage")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["labels.parquet"]


def test_sweep_undoes_what_a_killed_writer_left_and_spares_live_ones(tmp_path):
    import os
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".tokens.tmp-{dead.pid}").mkdir()
    (tmp_path / f".tokens.tmp-{dead.pid}" / "train-00000.parquet").write_bytes(b"half")
    (tmp_path / f".entities.parquet.tmp-{dead.pid}").write_bytes(b"half")
    (tmp_path / f".eval.old-{dead.pid}").mkdir()  # moved aside, replacement never put in place
    (tmp_path / f".eval.old-{dead.pid}" / "report.md").write_text("earlier")
    (tmp_path / f".tiles.parquet.tmp-{os.getpid()}").write_bytes(b"being written")  # a live writer's
    done = sweep(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["eval", f".tiles.parquet.tmp-{os.getpid()}"])
    assert (tmp_path / "eval" / "report.md").read_text() == "earlier"
    assert len(done) == 3


def test_wkb_types_read_from_chunked_sliced_and_large_binary_columns():
    """The type scan reads five header bytes per value, whatever the column's layout: chunked, sliced (an offset
    into shared buffers), 64-bit offsets, values past 2 GB of data (a sparse synthetic buffer), short values."""
    import numpy as np
    import pyarrow as pa
    import shapely

    from data_contracts.io import _wkb_type_names

    point, line = shapely.to_wkb(shapely.Point(1, 2)), shapely.to_wkb(shapely.LineString([(0, 0), (1, 1)]))
    poly = shapely.to_wkb(shapely.box(0, 0, 1, 1), byte_order=0)  # big-endian
    chunked = pa.chunked_array([pa.array([point, None], pa.binary()), pa.array([line], pa.binary())])
    assert _wkb_type_names(chunked) == {"Point", "LineString"}
    sliced = pa.array([point, line, poly], pa.binary()).slice(1, 2)
    assert _wkb_type_names(sliced) == {"LineString", "Polygon"}
    assert _wkb_type_names(pa.array([poly, b"\x01"], pa.large_binary())) == {"Polygon", "Unknown"}
    # One huge value (2.1 GB of zeros after a point header) then a polygon whose header lies past 2**31 bytes.
    big = 2**31 + 100
    data = np.zeros(big + len(poly), np.uint8)
    data[: len(point)] = np.frombuffer(point, np.uint8)
    data[big:] = np.frombuffer(poly, np.uint8)
    offsets = np.array([0, big, big + len(poly)], np.int64)
    huge = pa.LargeBinaryArray.from_buffers(pa.large_binary(), 2, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    assert _wkb_type_names(huge) == {"Point", "Polygon"}
