"""`geojepa info PATH` and `geojepa --version`: what a folder holds, as a table or JSON; a clear error otherwise."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import pyarrow.parquet as pq
from typer.testing import CliRunner

from geojepa.cli import app

MODEL = Path(__file__).resolve().parents[1] / "models" / "geojepa-cpu"
runner = CliRunner()


def _info(*args: str) -> tuple[int, str]:
    r = runner.invoke(app, ["info", *map(str, args)])
    return r.exit_code, r.output


def test_a_region_says_its_extent_tiles_per_split_and_stages(tokenised):
    w, _ = tokenised
    code, out = _info(w, "--json")
    assert code == 0, out
    d = json.loads(out)
    splits = pq.read_table(w / "tiles.parquet", columns=["split"])["split"].to_pylist()
    assert d["kind"] == "region" and d["tiles"] == {s: splits.count(s) for s in set(splits)}
    x0, y0, x1, y1 = d["extent"]
    assert 26.8 < x0 < x1 < 27.1 and 60.4 < y0 < y1 < 60.6  # Kotka
    assert {"tile", "tokens"} <= set(d["stages"]) and d["entities"] > 100
    code, table = _info(w)
    assert code == 0 and "tiles" in table and "train" in table and "{" not in table  # a table, not JSON


def test_the_shipped_model_and_its_tokenizer(tmp_path):
    code, out = _info(MODEL, "--json")
    assert code == 0, out
    d = json.loads(out)
    assert d["kind"] == "model" and [c["step"] for c in d["saved_steps"]] == [800]
    assert d["size"]["width"] == 128 and d["tokenizer_digest"] == "21cb7252f0438fff" and "malta" in d["regions"]
    code, out = _info(MODEL / "tokenizer", "--json")
    d = json.loads(out)
    assert code == 0 and d["kind"] == "tokenizer" and d["digest"] == "21cb7252f0438fff"
    assert d["vocabulary_entries"] == pq.read_metadata(MODEL / "tokenizer" / "tag_vocab.parquet").num_rows


def test_a_folder_that_is_none_of_these_says_what_was_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    code, out = _info(tmp_path)
    assert code == 1 and "not a GeoJEPA folder" in out and "tokenizer.json" in out and str(tmp_path) in out
    code, out = _info(tmp_path / "missing")
    assert code == 1 and "no such folder" in out
    code, out = _info(tmp_path / "notes.txt")
    assert code == 1 and "a file, not a folder" in out


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"geojepa {version('geojepa')}"  # the installed one

