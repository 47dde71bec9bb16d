"""The external sort: every row once, in key order, row groups of the asked size, any bucket count."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from geojepa.extract.sort import KEY, SpatialSorter

SCHEMA = pa.schema([("kind", pa.string()), ("value", pa.int64()), (KEY, pa.int64())])


@pytest.mark.parametrize("bucket_rows", [10_000, 100, 7])
def test_sorts_across_buckets(tmp_path, bucket_rows):
    rng = np.random.default_rng(0)
    sorter = SpatialSorter(tmp_path, SCHEMA, bucket_rows=bucket_rows)
    values = []
    for _ in range(5):
        keys = rng.integers(0, 50, size=137)  # many ties
        v = rng.integers(0, 1 << 40, size=137)
        values.append(np.column_stack([keys, v]))
        sorter.add(pa.record_batch([pa.array(["point"] * 137), pa.array(v), pa.array(keys)], schema=SCHEMA))
    chunks = []
    sorter.write(chunks.append, row_group_rows=64)
    assert [c.num_rows for c in chunks[:-1]] == [64] * (len(chunks) - 1) and 0 < chunks[-1].num_rows <= 64
    out = pa.concat_tables(chunks)
    assert KEY not in out.column_names and out.num_rows == 685
    expected = np.concatenate(values)
    by_value = dict(zip(expected[:, 1].tolist(), expected[:, 0].tolist(), strict=True))
    got_keys = [by_value[v] for v in out["value"].to_pylist()]
    assert got_keys == sorted(got_keys)
    assert sorted(out["value"].to_pylist()) == sorted(expected[:, 1].tolist())
    assert sorter.kinds == {"point": 685}
    assert list(tmp_path.iterdir()) == []  # staged and bucket files are cleaned up
