"""The fast path of extraction: libosmium writes OPL text, Arrow parses it in bulk.

A child process (``python -m geojepa.extract.opl nodes-ways ...``) decodes the PBF in C++
(pyosmium's ``apply`` with only C++ handlers: node-location index, tag filter
and the OPL writer with ``locations_on_ways``) and streams one line per tagged
node and per way, with coordinates inline, into a pipe. The parent reads the
pipe with Arrow's CSV reader and parses the lines with vectorised Arrow
compute, so no Python code runs per object, and decoding (child) overlaps
parsing (parent) on two cores.

OPL lines (https://osmcode.org/opl-file-format/):
``n12 Tk=v,k2=v2 x24.94 y60.17`` and ``w7 Tk=v Nn1x24.9y60.1,n2x24.9y60.2``
(a node outside the extract reads ``n3xy``). Keys and values escape space,
``,=@%`` and a few ranges as ``%<hex codepoint>%``.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_ESCAPE = re.compile(r"%([0-9a-fA-F]+)%")
_COMMON = [("%20%", " "), ("%2c%", ","), ("%3d%", "="), ("%40%", "@")]


def unescape(arr: pa.Array) -> pa.Array:
    """Decode OPL's ``%hex%`` escapes in the strings that have any (common ones vectorised)."""
    escaped = pc.match_substring(arr, "%")
    if not pc.any(escaped).as_py():
        return arr
    sub = arr.filter(escaped)
    for code, char in _COMMON:
        sub = pc.replace_substring(sub, code, char)
    rest = pc.match_substring(sub, "%").to_numpy(zero_copy_only=False)
    if rest.any():
        values = sub.to_pylist()
        for i in np.flatnonzero(rest).tolist():
            values[i] = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), values[i])
        sub = pa.array(values, pa.string())
    return pc.replace_with_mask(arr, escaped, sub)


@dataclass
class Tags:
    """Cleaned tags of n objects, flat: key[i], value[i] belong to object owner[i]."""

    keys: pa.Array
    values: pa.Array
    owner: np.ndarray
    n: int

    def count(self, mask: np.ndarray | None = None) -> np.ndarray:
        owner = self.owner if mask is None else self.owner[mask]
        return np.bincount(owner, minlength=self.n)

    def any(self, mask: np.ndarray) -> np.ndarray:
        return self.count(mask) > 0

    def kv(self) -> pa.Array:
        return pc.binary_join_element_wise(self.keys, self.values, "=")

    def take(self, rows: np.ndarray) -> pa.MapArray:
        """A map array for the objects ``rows`` (sorted ascending)."""
        picked = np.zeros(self.n, dtype=bool)
        picked[rows] = True
        sel = picked[self.owner]
        counts = np.bincount(self.owner[sel], minlength=self.n)[rows]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        sel_arr = pa.array(sel)
        return pa.MapArray.from_arrays(pa.array(offsets), self.keys.filter(sel_arr), self.values.filter(sel_arr))


def parse_tags(field: pa.Array, drop_prefixes: tuple[str, ...]) -> Tags:
    """Split ``Tk=v,k2=v2`` fields, unescape, and drop keys with the given prefixes."""
    lists = pc.split_pattern(pc.utf8_slice_codeunits(field, 1, 1 << 30), ",")
    owner = pc.list_parent_indices(lists).to_numpy()
    flat = pc.list_flatten(lists)
    keep = pc.not_equal(flat, "")  # "T" alone: no tags
    for prefix in drop_prefixes:
        keep = pc.and_(keep, pc.invert(pc.starts_with(flat, prefix)))
    flat = flat.filter(keep)
    kv = pc.split_pattern(flat, "=", max_splits=1)  # OPL always writes key=value
    owner = owner[keep.to_numpy(zero_copy_only=False)]
    return Tags(unescape(pc.list_element(kv, 0)), unescape(pc.list_element(kv, 1)), owner, len(field))


@dataclass
class Ways:
    ids: np.ndarray
    coords: np.ndarray  # (m, 2) lon/lat of located nodes, consecutive duplicates removed
    coord_owner: np.ndarray  # way index of each coordinate
    closed: np.ndarray  # first node id == last node id
    missing: np.ndarray  # number of nodes without a location


def parse_way_nodes(ids: np.ndarray, field: pa.Array) -> Ways:
    """``Nn1x..y..,n2x..y..`` -> coordinates per way; unlocated nodes dropped and counted."""
    lists = pc.split_pattern(pc.ascii_ltrim(field, "N"), ",")
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    owner = pc.list_parent_indices(lists).to_numpy()
    flat = pc.list_flatten(lists)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    nonempty = np.flatnonzero(lengths > 0)
    closed = np.zeros(len(ids), dtype=bool)  # same first and last node (tokens hold the node id)
    closed[nonempty] = pc.equal(
        flat.take(pa.array(starts[nonempty])), flat.take(pa.array(starts[nonempty] + lengths[nonempty] - 1))
    ).to_numpy(zero_copy_only=False)
    xy = pc.split_pattern(pc.list_element(pc.split_pattern(flat, "x", max_splits=1), 1), "y", max_splits=1)
    xs, ys = pc.list_element(xy, 0), pc.list_element(xy, 1)
    located = pc.not_equal(xs, "").to_numpy(zero_copy_only=False)  # "n3xy": outside the extract
    missing = np.bincount(owner[~located], minlength=len(ids))
    if not located.all():
        mask = pa.array(located)
        xs, ys, owner = xs.filter(mask), ys.filter(mask), owner[located]
    x = pc.cast(xs, pa.float64()).to_numpy()
    y = pc.cast(ys, pa.float64()).to_numpy()
    # Drop consecutive duplicates within a way (as libosmium's geometry factories do).
    keep = np.ones(len(x), dtype=bool)
    keep[1:] = (x[1:] != x[:-1]) | (y[1:] != y[:-1]) | (owner[1:] != owner[:-1])
    return Ways(ids, np.column_stack([x[keep], y[keep]]), owner[keep], closed, missing)


def parse_members(field: pa.Array) -> tuple[pa.Array, np.ndarray, pa.Array, np.ndarray]:
    """``Mw12@outer,n3@`` -> member type letters, refs, roles, and the owning relation of each."""
    lists = pc.split_pattern(pc.ascii_ltrim(field, "M"), ",")
    owner = pc.list_parent_indices(lists).to_numpy()
    flat = pc.list_flatten(lists)
    nonempty = pc.not_equal(flat, "")
    flat, owner = flat.filter(nonempty), owner[nonempty.to_numpy(zero_copy_only=False)]
    ref_role = pc.split_pattern(flat, "@", max_splits=1)
    ref = pc.list_element(ref_role, 0)
    refs = pc.cast(pc.utf8_slice_codeunits(ref, 1, 64), pa.int64()).to_numpy()
    return pc.utf8_slice_codeunits(ref, 0, 1), refs, unescape(pc.list_element(ref_role, 1)), owner


def read_lines(stream, block_size: int = 1 << 24):
    """Arrow string arrays of whole OPL lines from a buffered binary stream; nothing from an empty one
    (a PBF without relations, or without nodes and ways)."""
    import pyarrow.csv as csv

    if not stream.peek(1):  # Arrow's CSV reader refuses an empty stream ("Empty CSV file")
        return
    reader = csv.open_csv(
        stream,
        read_options=csv.ReadOptions(column_names=["line"], block_size=block_size, use_threads=True),
        parse_options=csv.ParseOptions(delimiter="\x01", quote_char=False, escape_char=False,
                                       newlines_in_values=False),
        convert_options=csv.ConvertOptions(column_types={"line": pa.string()}, strings_can_be_null=False),
    )
    for batch in reader:
        yield batch.column(0)


# Objects to leave out, by OPL type letter ("n", "w", "r") -> ids: those whose text is not valid UTF-8,
# which libosmium's OPL writer refuses ("invalid Unicode codepoint").
Skip = dict[str, list[int]]
INVALID_TEXT = "invalid Unicode codepoint"


def _skipper(skip: Skip | None):
    """A handler that drops the objects in ``skip`` from the chain (a callback returning True stops an
    object); only the callbacks of the types with objects to drop exist, so nothing else enters Python."""
    if not skip:
        return None
    callbacks = {}
    for letter, name in (("n", "node"), ("w", "way"), ("r", "relation")):
        ids = frozenset(skip.get(letter, ()))
        if ids:
            callbacks[name] = (lambda ids: lambda self, o: o.id in ids)(ids)
    return type("SkipObjects", (), callbacks)()


def write_relations(pbf: str, out: str, skip: Skip | None = None) -> None:
    """OPL of the tagged relations (relation blocks only; C++ throughout but for ``skip``)."""
    import osmium

    writer = osmium.SimpleWriter(osmium.io.File(out, "opl,add_metadata=false"), overwrite=True)
    handlers = [osmium.filter.EmptyTagFilter(), _skipper(skip), writer]
    osmium.apply(osmium.io.Reader(pbf, osmium.osm.RELATION), *(h for h in handlers if h is not None))
    writer.close()


def produce(pbf: str, fd: int, node_index: str, member_nodes_file: str, skip: Skip | None = None) -> None:
    """Child process: OPL for tagged nodes and all ways (with locations), then untagged member nodes.

    Writes to the inherited pipe ``fd``; the parent sees end-of-file only when this process exits.
    """
    import osmium

    index = osmium.index.create_map(node_index)
    locations = osmium.NodeLocationsForWays(index)
    locations.ignore_errors()
    tagged_nodes = osmium.filter.EmptyTagFilter().enable_for(osmium.osm.NODE)
    opl = osmium.io.File(f"/dev/fd/{fd}", "opl,add_metadata=false,locations_on_ways=true")
    writer = osmium.SimpleWriter(opl, overwrite=True)
    handlers = [locations, tagged_nodes, _skipper(skip), writer]
    osmium.apply(osmium.io.Reader(pbf, osmium.osm.NODE | osmium.osm.WAY), *(h for h in handlers if h is not None))
    writer.close()
    # Relation members that are untagged nodes: their locations, as tag-less node lines.
    with open(fd, "w", closefd=True) as f:
        for ref in np.load(member_nodes_file).tolist():
            try:
                loc = index.get(ref)
            except KeyError:
                continue
            if loc.valid():
                f.write(f"n{ref} T x{loc.lon:.7f} y{loc.lat:.7f}\n")


def main(argv: list[str]) -> None:
    """``relations PBF OUT [SKIP.json]`` or ``nodes-ways PBF FD INDEX MEMBERS.npy [SKIP.json]``."""
    import json
    import os

    mode, args = argv[0], argv[1:]
    try:
        if mode == "relations":
            skip = json.loads(open(args[2]).read()) if len(args) > 2 else None
            write_relations(args[0], args[1], skip)
        else:
            skip = json.loads(open(args[4]).read()) if len(args) > 4 else None
            produce(args[0], int(args[1]), args[2], args[3], skip)
    except Exception as e:  # reported to the parent through stderr and the exit code
        print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        # At once: closing a libosmium writer after a failed write throws from a destructor (abort).
        os._exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
