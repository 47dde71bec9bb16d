"""Folder layouts stay with their owner: an artifact's file name is written in ``geojepa/workdir.py`` (the type
that owns its folder) and nowhere else in the library, the flows or the tasks; the tokenizer folder checks
itself; and ``workdir.py`` stays importable on a training host (the standard library, pyarrow and
``data_contracts`` only)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from geojepa.errors import GeoJepaError
from geojepa.workdir import TokenizerDir

ROOT = Path(__file__).resolve().parents[1]
OWNER = ROOT / "geojepa" / "workdir.py"
SCANNED = ("geojepa", "flows", "tasks")
# Folder names too plain to find by themselves in workdir.py's strings (file names are found: see _names).
FOLDERS = {"manifests", "checkpoints", "eval", ".eval-cache"}


def _names() -> set[str]:
    """Every file name ``workdir.py`` writes (a string like ``name.ext``), and the folder names above."""
    found = {n.value for n in ast.walk(ast.parse(OWNER.read_text())) if isinstance(n, ast.Constant)
             and isinstance(n.value, str) and re.fullmatch(r"\.?[\w-]+(\.\w+)+", n.value)}
    return found | FOLDERS


def test_the_owner_names_the_artifacts():
    assert {"history.json", "tokenizer.json", "report.md", "train_config.json", "region.json", "tag_vocab.parquet",
            "geometry_encoder.pt", "results.parquet", "predictions.parquet", "embeddings.parquet",
            "tile_embeddings.parquet", "entity_embeddings.parquet", "corpus_report.md", "task_labels.parquet",
            "probe_features.parquet"} <= _names()


def test_no_artifact_name_outside_its_owner():
    quoted = re.compile(r"""(["'])(%s)\1""" % "|".join(re.escape(n) for n in sorted(_names(), key=len, reverse=True)))
    leaks = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == OWNER:
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                leaks += [f"{path.relative_to(ROOT)}:{i}: {m.group(0)}" for m in quoted.finditer(line)]
    assert not leaks, "artifact names outside geojepa/workdir.py (name them through its types):\n" + "\n".join(leaks)


def test_tokenizer_dir_says_which_file_is_missing(tmp_path):
    t = TokenizerDir(tmp_path / "T")
    t.path.mkdir()
    t.tag_vocab.write_bytes(b"")
    t.geometry_encoder.write_bytes(b"")
    with pytest.raises(GeoJepaError) as e:
        t.check()
    assert str(t.path) in str(e.value) and t.record_file.name in str(e.value) and "\n" not in str(e.value)
    t.record_file.write_text("{}")
    assert t.check() is t
    t.geometry_encoder.unlink()
    with pytest.raises(GeoJepaError, match=re.escape(t.geometry_encoder.name)):
        t.check()


def test_workdir_imports_nothing_heavy():
    allowed = {*sys.stdlib_module_names, "pyarrow", "data_contracts", "geojepa"}
    for path in (OWNER, ROOT / "geojepa" / "errors.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            for m in mods:
                assert m.split(".")[0] in allowed, f"{path.name} imports {m}"
                if m.startswith("geojepa"):
                    assert m == "geojepa.errors", f"{path.name} imports {m}"


def test_an_evaluation_summary_is_read_from_eval_or_an_older_evaluations_manifest(tmp_path):
    import json

    from geojepa.workdir import WorkDir

    w = WorkDir(tmp_path / "r")
    assert w.evaluation_summary() is None  # never evaluated
    w.manifests.mkdir(parents=True)
    w.manifest("evaluate").write_text(json.dumps({"summary": {"checkpoint": "old.pt"}}))
    assert w.evaluation_summary() == {"checkpoint": "old.pt"}  # made before eval/summary.json existed
    w.eval.path.mkdir()
    w.eval.summary.write_text(json.dumps({"checkpoint": "new.pt"}))
    assert w.evaluation_summary() == {"checkpoint": "new.pt"}
