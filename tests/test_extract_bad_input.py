"""Bad input to `geojepa extract`: a clear error naming the file, non-zero exit, nothing half-written."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from geojepa.cli import app
from geojepa.manifest import file_sha256
from tests.conftest import HELSINKI, KOTKA

runner = CliRunner()


@pytest.fixture()
def good_w(tmp_path):
    """A work directory holding a good entities.parquet from an earlier run."""
    w = tmp_path / "w"
    result = runner.invoke(app, ["extract", str(KOTKA), str(w), "--set", "tracking.enabled=false"])
    assert result.exit_code == 0, result.output
    return w


def _fails(args: list[str], *needles: str) -> str:
    result = runner.invoke(app, [*args, "--set", "tracking.enabled=false"])
    assert result.exit_code != 0
    message = result.output
    for needle in needles:
        assert needle in message, message
    return message


def _untouched(w, digest):
    assert file_sha256(w / "entities.parquet") == digest
    assert sorted(p.name for p in w.iterdir()) == ["entities.parquet", "manifests"]


def test_missing_file(good_w, tmp_path):
    digest = file_sha256(good_w / "entities.parquet")
    _fails(["extract", str(tmp_path / "nope.osm.pbf"), str(good_w)], "nope.osm.pbf", "not found")
    _untouched(good_w, digest)


def test_not_a_pbf(good_w, tmp_path):
    bad = tmp_path / "readme.osm.pbf"
    bad.write_text("this is not a protobuf file\n" * 10)
    digest = file_sha256(good_w / "entities.parquet")
    _fails(["extract", str(bad), str(good_w)], "readme.osm.pbf", "not an OSM PBF")
    _untouched(good_w, digest)


def test_truncated_pbf(good_w, tmp_path):
    cut = tmp_path / "cut.osm.pbf"
    cut.write_bytes(HELSINKI.read_bytes()[: HELSINKI.stat().st_size // 2])
    digest = file_sha256(good_w / "entities.parquet")
    _fails(["extract", str(cut), str(good_w), "--force"], "cut.osm.pbf", "truncated")
    _untouched(good_w, digest)


def test_bbox_outside_the_file(good_w):
    digest = file_sha256(good_w / "entities.parquet")
    _fails(["extract", str(KOTKA), str(good_w), "--bbox", "10,10,11,11"], "kotka.osm.pbf", "does not overlap")
    _untouched(good_w, digest)


def test_bbox_inside_header_but_empty(good_w, tmp_path):
    """A clip inside the file's bbox that holds no entity is an error, not an empty artifact."""
    digest = file_sha256(good_w / "entities.parquet")
    _fails(["extract", str(KOTKA), str(good_w), "--bbox", "26.93001,60.52001,26.93002,60.52002"],
           "kotka.osm.pbf", "no tagged entities")
    _untouched(good_w, digest)


def test_unwritable_work_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    _fails(["extract", str(KOTKA), str(blocker / "w")], "a_file", "not writable")


def test_bad_config_key_is_named(tmp_path):
    _fails(["extract", str(KOTKA), str(tmp_path / "w"), "--set", "extract.read_block_mbz=5"], "extract.read_block_mbz")


def test_interrupted_run_leaves_no_temporary_files(good_w, tmp_path):
    cut = tmp_path / "cut.osm.pbf"
    shutil.copy(HELSINKI, cut)
    with open(cut, "r+b") as f:
        f.truncate(HELSINKI.stat().st_size - 1000)
    _fails(["extract", str(cut), str(good_w), "--force"], "cut.osm.pbf")
    assert not [p for p in good_w.rglob("*") if p.name.startswith(".")]


@pytest.mark.parametrize("bbox,needle", [
    ("26.9,60.4,27,60.5]", "--set extract.bbox=[26.9,60.4,27,60.5]]: not valid YAML"),
    ("-inf,-90,inf,90", "finite"),
    ("27,60.4,26.9,60.5", "min_lon < max_lon"),
])
def test_bad_bbox_is_a_clear_error(tmp_path, bbox, needle):
    """A malformed or infinite --bbox once gave a YAML traceback or a run keeping only the points."""
    result = runner.invoke(app, ["extract", str(KOTKA), str(tmp_path / "w"), f"--bbox={bbox}",
                                 "--set", "tracking.enabled=false"])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "error: " in result.output and needle in result.output, result.output
    assert "default.yaml" not in result.output and "Traceback" not in result.output
    assert not (tmp_path / "w").exists()
