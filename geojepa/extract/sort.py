"""External sort of entity batches by their Hilbert key, in bounded memory.

Batches are staged unsorted in an Arrow IPC file while only their keys (8 bytes
per entity) stay in memory. At the end the keys give exact quantile bounds for
buckets of about ``bucket_rows`` entities; one sequential pass distributes the
staged rows into per-bucket files, then each bucket is sorted in memory and
written out in order. Peak memory is about one bucket, whatever the input
size; the disk holds the staged data twice at most.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

KEY = "_sort_key"


class SpatialSorter:
    def __init__(self, tmp_dir: Path, schema: pa.Schema, bucket_rows: int = 50_000):
        self.tmp_dir, self.schema, self.bucket_rows = tmp_dir, schema, bucket_rows
        self._staged = tmp_dir / "staged.arrow"
        self._sink = ipc.new_file(self._staged, schema)
        self._keys: list[np.ndarray] = []
        self.kinds: Counter = Counter()
        self.rows = 0

    def add(self, batch: pa.RecordBatch) -> None:
        self._sink.write_batch(batch)
        self._keys.append(batch.column(KEY).to_numpy())
        self.kinds.update({d["values"]: d["counts"] for d in pc.value_counts(batch.column("kind")).to_pylist()})
        self.rows += batch.num_rows

    def close(self) -> None:
        """Abandon the staged rows (a re-read starts a new sorter)."""
        self._sink.close()
        self._staged.unlink(missing_ok=True)

    def sorted_tables(self) -> Iterator[pa.Table]:
        """The staged rows in key order, one bucket-sized table at a time (sort key dropped)."""
        self._sink.close()
        keys = np.concatenate(self._keys) if self._keys else np.zeros(0, np.int64)
        n_buckets = max(1, math.ceil(len(keys) / self.bucket_rows))
        bounds = np.sort(keys)[np.linspace(0, len(keys), n_buckets + 1).astype(np.int64)[1:-1]]
        self._keys = []
        paths = [self.tmp_dir / f"bucket-{i:05d}.arrow" for i in range(n_buckets)]
        writers: dict[int, ipc.RecordBatchStreamWriter] = {}
        with pa.OSFile(str(self._staged)) as f:  # plain reads, not a memory map: freed batch by batch
            staged = ipc.open_file(f)
            for i in range(staged.num_record_batches):
                batch = staged.get_batch(i)
                bucket = np.searchsorted(bounds, batch.column(KEY).to_numpy(), side="right")
                order = np.argsort(bucket, kind="stable")
                batch = batch.take(pa.array(order))
                cuts = np.searchsorted(bucket[order], np.arange(n_buckets + 1))
                for b in np.flatnonzero(np.diff(cuts)).tolist():
                    if b not in writers:
                        writers[b] = ipc.new_stream(paths[b], self.schema)
                    writers[b].write_batch(batch.slice(cuts[b], cuts[b + 1] - cuts[b]))
        self._staged.unlink()
        for w in writers.values():
            w.close()
        for b in sorted(writers):
            with pa.OSFile(str(paths[b])) as f:
                table = ipc.open_stream(f).read_all()
            paths[b].unlink()
            order = np.argsort(table.column(KEY).to_numpy(), kind="stable")
            yield table.drop_columns([KEY]).take(pa.array(order))

    def write(self, write: Callable[[pa.Table], None], row_group_rows: int) -> None:
        """Feed ``write`` tables of ``row_group_rows`` rows (the last may be shorter), in key order."""
        carry: pa.Table | None = None
        for table in self.sorted_tables():
            if carry is not None:
                table = pa.concat_tables([carry, table])
            full = table.num_rows // row_group_rows * row_group_rows
            for start in range(0, full, row_group_rows):
                write(table.slice(start, row_group_rows))
            carry = table.slice(full) if full < table.num_rows else None
        if carry is not None:
            write(carry)
