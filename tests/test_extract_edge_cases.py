"""Valid PBFs that once crashed `geojepa extract`: files without relations (common in real extracts) and
text that is not valid UTF-8, which libosmium's OPL writer refuses."""

from __future__ import annotations

import logging

import osmium
import pytest
from osmium.osm.mutable import Node, Relation, Way
from typer.testing import CliRunner

from data_contracts import ENTITIES, read_table
from geojepa.cli import app
from geojepa.extract import extract
from tests.conftest import KOTKA
from tests.test_extract import _independent_counts

runner = CliRunner()
BAD = b"ab\xff\xfecd"  # 0xff never starts a UTF-8 sequence


def _write(path, objects: str = "nwr", bad_in: str | None = None):
    """A small PBF: 7 tagged nodes, a tagged way over three of them, a route relation holding the way.

    ``bad_in`` ("node", "way" or "relation") gives that object a `name` that is not valid UTF-8. pyosmium
    takes text as Python strings, which cannot hold invalid UTF-8 (and it refuses lone surrogates), so
    the file is written uncompressed with a placeholder of the same length, whose bytes are then swapped.
    """
    marker = b"QQQQQQ"
    assert len(marker) == len(BAD)

    def name(kind):
        return {"name": marker.decode()} if bad_in == kind else {}

    with osmium.SimpleWriter(osmium.io.File(str(path), "pbf,pbf_compression=none"), overwrite=True) as w:
        if "n" in objects:
            for i in range(1, 8):
                w.add_node(Node(id=i, location=(26.9 + i * 0.001, 60.45),
                                tags={"amenity": "bench", **(name("node") if i == 3 else {})}))
        if "w" in objects:
            w.add_way(Way(id=10, nodes=[1, 2, 3], tags={"highway": "path", **name("way")}))
        if "r" in objects:
            w.add_relation(Relation(id=20, members=[("w", 10, "")], tags={"type": "route", **name("relation")}))
    data = path.read_bytes()
    if bad_in:
        assert data.count(marker) == 1
        path.write_bytes(data.replace(marker, BAD))
    return path


def _types(w) -> dict[str, int]:
    t = read_table(w / "entities.parquet", ENTITIES, columns=["osm_type"])["osm_type"].to_pylist()
    return {k: t.count(k) for k in ("node", "way", "relation")}


def test_tagged_nodes_only(tmp_path, cfg):
    summary = extract(_write(tmp_path / "nodes.osm.pbf", "n"), tmp_path / "w", cfg)
    assert summary.summary.entities == 7 and _types(tmp_path / "w") == {"node": 7, "way": 0, "relation": 0}


def test_empty_pbf_is_a_clear_error(tmp_path):
    with osmium.SimpleWriter(str(tmp_path / "empty.osm.pbf"), overwrite=True):
        pass
    result = runner.invoke(app, ["extract", str(tmp_path / "empty.osm.pbf"), str(tmp_path / "w"),
                                 "--set", "tracking.enabled=false"])
    assert result.exit_code == 1 and "empty.osm.pbf: no tagged entities" in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


def test_kotka_without_its_relations(tmp_path, cfg):
    pbf = tmp_path / "kotka-norel.osm.pbf"
    with osmium.SimpleWriter(str(pbf), overwrite=True) as writer:
        osmium.apply(osmium.io.Reader(str(KOTKA), osmium.osm.NODE | osmium.osm.WAY), writer)
    extract(pbf, tmp_path / "w", cfg)
    assert _types(tmp_path / "w") == {**_independent_counts(pbf), "relation": 0}
    assert _types(tmp_path / "w")["way"] > 1000


@pytest.mark.parametrize("bad_in", ["node", "way", "relation"])
def test_text_that_is_not_utf8_is_skipped_counted_and_named(tmp_path, cfg, caplog, bad_in):
    pbf = _write(tmp_path / f"bad-{bad_in}.osm.pbf", bad_in=bad_in)
    with caplog.at_level(logging.WARNING, logger="geojepa.extract.stage"):
        summary = extract(pbf, tmp_path / "w", cfg).as_dict()
    assert summary["skipped_invalid_utf8"] == 1
    expected = {"node": 7, "way": 1, "relation": 1}
    expected[bad_in] -= 1
    if bad_in == "way":  # the route's only member is gone: no geometry, counted as usual
        expected["relation"] = 0
        assert summary["skipped_relation_no_member_geometry"] == 1
    assert _types(tmp_path / "w") == expected
    warning = caplog.text
    ids = {"node": 3, "way": 10, "relation": 20}
    assert f"bad-{bad_in}.osm.pbf" in warning and f"{bad_in}/{ids[bad_in]}" in warning
    assert "not valid UTF-8" in warning and "invalid Unicode codepoint" in warning


def test_bad_text_through_the_cli(tmp_path):
    pbf = _write(tmp_path / "bad.osm.pbf", bad_in="relation")
    result = runner.invoke(app, ["extract", str(pbf), str(tmp_path / "w"), "--set", "tracking.enabled=false"])
    assert result.exit_code == 0, result.output
    assert '"skipped_invalid_utf8": 1' in result.output
