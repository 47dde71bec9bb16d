"""Entity embeddings spilled to disk while a region is embedded (float32, flat token order), read back a chunk
or a few rows at a time, and the one loop that writes them out with their pieces' geometry: the region's
entity vectors are never all in memory."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_contracts import TILE_ENTITIES
from geojepa.encoding.shards import TokenIndex, entity_batches, pieces_lonlat


class Spill:
    """An append-only float32 file of (rows, width) vectors, with the sums their mean and principal axes need."""

    def __init__(self, path: Path, width: int):
        self.path, self.width = Path(path), width
        self.count = 0
        self._s1, self._s2 = np.zeros(width), np.zeros((width, width))
        self._out = None

    def __enter__(self) -> Spill:
        self._out = open(self.path, "wb")
        return self

    def __exit__(self, *exc) -> None:
        self._out.close()
        self._out = None

    def write(self, ents: list[np.ndarray]) -> None:
        flat = np.concatenate(ents) if ents else np.zeros((0, self.width), np.float32)
        self._out.write(np.ascontiguousarray(flat, np.float32).tobytes())
        f64 = flat.astype(np.float64)
        self._s1 += f64.sum(0)
        self._s2 += f64.T @ f64
        self.count += len(flat)

    def axes(self, n: int = 3) -> tuple[np.ndarray, np.ndarray]:
        """(mean, (width, n) first principal axes) of the written vectors."""
        mean = self._s1 / max(self.count, 1)
        cov = self._s2 / max(self.count, 1) - np.outer(mean, mean)
        axes = np.linalg.eigh(cov)[1][:, ::-1][:, :n] if self.count else np.zeros((self.width, n))
        return mean, axes

    def chunks(self, rows: int = 1 << 16) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows) of the file, a chunk at a time (one buffer, reused)."""
        buf = np.empty((rows, self.width), np.float32)
        with open(self.path, "rb") as f:
            start = 0
            while n := f.readinto(memoryview(buf).cast("B")) // (4 * self.width):
                yield start, buf[:n]
                start += n

    def rows(self, at: np.ndarray) -> np.ndarray:
        if not len(at):
            return np.zeros((0, self.width), np.float32)
        m = np.memmap(self.path, np.float32, "r", shape=(os.path.getsize(self.path) // (4 * self.width), self.width))
        try:
            return np.array(m[at])
        finally:
            del m


def entity_pieces(tile_entities: Path, tok: TokenIndex, meta: pa.Table, spill: Spill, columns: list[str]
                  ) -> Iterator[tuple[pa.Table, np.ndarray, np.ndarray, pa.Array, pa.Array]]:
    """A ``tile_entities`` shard at a time, in token order: (its rows with ``columns``, each row's tile index,
    its spilled embedding, its piece's geometry in EPSG:4326 and bbox)."""
    for t, tiles, pos in entity_batches(tile_entities, TILE_ENTITIES, ["geometry", *columns], tok):
        geometry, bbox = pieces_lonlat(t["geometry"].combine_chunks(), tiles, meta)
        yield t, tiles, spill.rows(pos), geometry, bbox
