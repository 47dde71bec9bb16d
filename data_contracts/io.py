"""Validated, atomic reading and writing of contract artifacts.

Schemas are checked once where a file is opened (and once per written batch,
which is a cheap schema comparison), never per row. Writers write to a hidden
temporary name and rename on success, so a failed run never leaves a
half-written artifact and never touches an earlier good one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_contracts.schemas import Contract

VERSION_KEY = b"geojepa:schema_version"
ARTIFACT_KEY = b"geojepa:artifact"
WKB_TYPES = {1: "Point", 2: "LineString", 3: "Polygon", 4: "MultiPoint", 5: "MultiLineString",
             6: "MultiPolygon", 7: "GeometryCollection"}


class ContractError(ValueError):
    """An artifact does not match its contract; the message names file, column and difference."""


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def replace_folder(tmp: Path | str, final: Path | str) -> None:
    """Put the finished folder ``tmp`` in place of ``final``; the old one is removed only afterwards."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def sweep(folder: Path | str) -> list[str]:
    """Clean up after a process that was killed while writing into ``folder``: remove its temporaries
    (``.NAME.tmp-PID``) and put back a folder it had moved aside (``.NAME.old-PID``) before its
    replacement was in place. Live processes' files are left alone. Returns what it did."""
    done = []
    for p in sorted(Path(folder).glob(".*.*-*")):
        name, sep, pid = p.name.rpartition("-")
        kind = name.rsplit(".", 1)[-1]
        if not sep or kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        final = p.with_name(name[1 : -len(kind) - 1])
        if kind == "old" and not final.exists():
            os.replace(p, final)
            done.append(f"restored {final.name}")
        else:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            done.append(f"removed {p.name}")
    return done


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def schema_diff(expected: pa.Schema, actual: pa.Schema) -> list[str]:
    """Human-readable differences between two schemas (names and types; order ignored)."""
    problems = []
    for field in expected:
        if field.name not in actual.names:
            problems.append(f"column {field.name!r} is missing (expected {field.type})")
        elif not actual.field(field.name).type.equals(field.type):
            problems.append(f"column {field.name!r}: expected {field.type}, found {actual.field(field.name).type}")
    for name in actual.names:
        if name not in expected.names:
            problems.append(f"unexpected column {name!r}")
    return problems


def _wkb_type_names(column: pa.Array | pa.ChunkedArray) -> set[str]:
    """Geometry type names read from the WKB headers (byte 0: order, bytes 1-4: type). Only the first five
    bytes of each value are touched, so chunked, sliced and large (64-bit offset) columns of any size work."""
    names: set[str] = set()
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    for arr in chunks:
        arr = arr.drop_null()
        if len(arr) == 0:
            continue
        heads = pc.binary_slice(arr, 0, 5).cast(pa.binary())  # a fresh, contiguous array of <= 5-byte values
        short = pc.less(pc.binary_length(heads), 5).to_numpy(zero_copy_only=False)
        if short.any():
            names.add("Unknown")
            heads = heads.filter(pa.array(~short))
        if len(heads) == 0:
            continue
        starts = np.frombuffer(heads.buffers()[1], dtype=np.int32)[heads.offset : heads.offset + len(heads)]
        data = np.frombuffer(heads.buffers()[2], dtype=np.uint8)[starts[:, None] + np.arange(5)].astype(np.uint32)
        little = data[:, 0] == 1
        code = np.where(little, data[:, 1] | data[:, 2] << 8 | data[:, 3] << 16 | data[:, 4] << 24,
                        data[:, 4] | data[:, 3] << 8 | data[:, 2] << 16 | data[:, 1] << 24)
        code = (code & 0xFFFF) % 1000  # drop EWKB flags and ISO Z/M offsets
        names.update(WKB_TYPES.get(int(c), "Unknown") for c in np.unique(code))
    return names


def _crs_json(crs: str) -> dict | None:
    if crs == "tile":
        return None  # tile-normalised coordinates: no geographic CRS
    import pyproj  # lazy: training hosts read token shards without pyproj

    return pyproj.CRS.from_user_input(crs).to_json_dict()


class ArtifactWriter:
    """Stream tables/batches into one Parquet artifact; commit renames it into place.

    Use as a context manager: leaving the block normally commits, an exception aborts.
    """

    def __init__(self, path: Path | str, contract: Contract, row_group_rows: int = 50_000,
                 metadata: dict[str, str] | None = None, compression: str = "zstd",
                 use_dictionary: bool | list[str] = True):
        self.path = Path(path)
        self.contract = contract
        self.row_group_rows = row_group_rows
        self.rows = 0
        self._geo_types: dict[str, set[str]] = {col: set() for col, _ in contract.geometry}
        self._bbox = [np.inf, np.inf, -np.inf, -np.inf]
        self._metadata = {ARTIFACT_KEY: contract.name.encode(), VERSION_KEY: str(contract.version).encode()}
        self._metadata.update({k.encode(): v.encode() for k, v in (metadata or {}).items()})
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        try:
            self._writer = pq.ParquetWriter(self._tmp, contract.schema.with_metadata(self._metadata),
                                            compression=compression, use_dictionary=use_dictionary,
                                            write_statistics=True)
        except OSError as e:
            self._ctx.__exit__(type(e), e, None)
            raise ContractError(f"{self.path}: cannot write: {e}") from None

    def write(self, data: pa.Table | pa.RecordBatch) -> None:
        problems = schema_diff(self.contract.schema, data.schema)
        if problems:
            raise ContractError(
                f"{self.path}: data for {self.contract.name!r} breaks its contract: " + "; ".join(problems)
            )
        if isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        data = data.select(self.contract.schema.names).cast(self.contract.schema)
        for col, _ in self.contract.geometry:
            self._geo_types[col] |= _wkb_type_names(data[col])
        if "bbox" in data.column_names and data.num_rows:
            bbox = data["bbox"].combine_chunks()
            for i, (fname, fn) in enumerate([("xmin", pc.min), ("ymin", pc.min), ("xmax", pc.max), ("ymax", pc.max)]):
                v = fn(bbox.field(fname)).as_py()
                self._bbox[i] = min(self._bbox[i], v) if i < 2 else max(self._bbox[i], v)
        self._writer.write_table(data, row_group_size=self.row_group_rows)
        self.rows += data.num_rows

    def _geo_metadata(self) -> dict:
        columns = {}
        for col, crs in self.contract.geometry:
            meta = {"encoding": "WKB", "geometry_types": sorted(self._geo_types[col]), "crs": _crs_json(crs)}
            if "bbox" in self.contract.schema.names and col == "geometry":
                if self.rows:
                    meta["bbox"] = [float(v) for v in self._bbox]
                meta["covering"] = {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}}
            columns[col] = meta
        return {"version": "1.1.0", "primary_column": self.contract.geometry[0][0], "columns": columns}

    def commit(self) -> Path:
        if self.contract.geometry:
            self._writer.add_key_value_metadata({"geo": json.dumps(self._geo_metadata())})
        self._writer.close()
        with open(self._tmp, "rb") as f:
            os.fsync(f.fileno())
        self._ctx.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_table(table: pa.Table, path: Path | str, contract: Contract, **kwargs) -> Path:
    """Validate and atomically write a whole table as one artifact."""
    with ArtifactWriter(path, contract, **kwargs) as w:
        w.write(table)
    return Path(path)


def _files(path: Path) -> list[Path]:
    """The Parquet files of an artifact: the file itself, or a folder's shards (a Parquet dataset)."""
    if path.is_dir():
        return sorted(p for p in path.glob("*.parquet") if not p.name.startswith("."))
    return [path]


def open_artifact(path: Path | str, contract: Contract) -> list[pq.ParquetFile]:
    """Open an artifact (a file, or a folder of shards) after checking that it exists, is Parquet,
    and matches ``contract``."""
    path = Path(path)
    if not path.exists() or (path.is_dir() and not _files(path)):
        raise ContractError(f"{path}: {contract.name} artifact not found")
    opened = []
    for f in _files(path):
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise ContractError(f"{f}: not a readable Parquet file: {e}") from None
        meta = pf.schema_arrow.metadata or {}
        name = meta.get(ARTIFACT_KEY, b"").decode()
        if name and name != contract.name:
            raise ContractError(f"{f}: is a {name!r} artifact, expected {contract.name!r}")
        version = meta.get(VERSION_KEY, b"").decode()
        if version != str(contract.version):
            found = version or "none"
            raise ContractError(f"{f}: {contract.name} schema_version {found}, expected {contract.version}")
        problems = schema_diff(contract.schema, pf.schema_arrow)
        if problems:
            raise ContractError(f"{f}: does not match the {contract.name!r} contract: " + "; ".join(problems))
        opened.append(pf)
    return opened


def embedding_dim(path: Path | str) -> int:
    """The width of a fixed-size ``embedding`` column (tile_embeddings, entity_embeddings), from the schema."""
    path = Path(path)
    if not path.is_file():
        raise ContractError(f"{path}: not found")
    try:
        field = pq.read_schema(path).field("embedding")
    except (pa.ArrowInvalid, OSError, KeyError) as e:
        raise ContractError(f"{path}: not an embeddings file: {e}") from None
    if not pa.types.is_fixed_size_list(field.type):
        raise ContractError(f"{path}: its embedding column is {field.type}, not a fixed-size list")
    return field.type.list_size


def read_table(path: Path | str, contract: Contract, columns: list[str] | None = None, **kwargs) -> pa.Table:
    """Read a validated artifact (optionally a subset of columns, Parquet ``filters=``)."""
    open_artifact(path, contract)
    return pq.read_table(path, columns=columns, **kwargs)
