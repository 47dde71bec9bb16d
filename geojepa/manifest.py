"""Stage manifests: what a stage's outputs were made from, so unchanged work is skipped.

A manifest records the content hashes of a stage's inputs and outputs, its
config section and the code version. A stage is fresh when a manifest exists,
all of that matches, and the outputs still hash to what was recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import geojepa
from data_contracts import atomic_path, sweep
from geojepa.workdir import WorkDir

log = logging.getLogger(__name__)


def recover(work_dir: Path) -> None:
    """Undo what a killed earlier run left half-done in ``work_dir`` (see ``data_contracts.sweep``)."""
    for action in sweep(work_dir):
        log.warning("%s: %s (left by a run that was killed)", work_dir, action)


def file_sha256(path: Path | str, chunk: int = 1 << 23) -> str:
    """Content hash of a file, or of a folder's files (names and contents)."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f.relative_to(path).as_posix().encode())
            h.update(file_sha256(f).encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def code_version(*packages: str) -> str:
    """Package version plus a hash of the named subpackages' sources (e.g. "geojepa.extract")."""
    h = hashlib.sha256()
    root = Path(geojepa.__file__).resolve().parent.parent
    for package in sorted(packages):
        folder = root.joinpath(*package.split("."))
        files = sorted(folder.rglob("*.py")) if folder.is_dir() else [folder.with_suffix(".py")]
        for f in files:
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return f"{geojepa.__version__}+{h.hexdigest()[:12]}"


def expected_manifest(stage: str, inputs: dict[str, Path], config: dict[str, Any], code: str) -> dict[str, Any]:
    return {
        "stage": stage,
        "inputs": {name: file_sha256(p) for name, p in sorted(inputs.items())},
        "config": json.loads(json.dumps(config, sort_keys=True, default=str)),
        "code": code,
    }


def is_fresh(work_dir: Path, expected: dict[str, Any]) -> bool:
    path = WorkDir(work_dir).manifest(expected["stage"])
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if any(found.get(k) != v for k, v in expected.items()):
        return False
    outputs = found.get("outputs", {})
    return bool(outputs) and all(
        (work_dir / name).exists() and file_sha256(work_dir / name) == digest for name, digest in outputs.items()
    )


def write_manifest(work_dir: Path, expected: dict[str, Any], outputs: list[str], **extra: Any) -> Path:
    """Record the manifest after the outputs (names relative to ``work_dir``) are in place."""
    path = WorkDir(work_dir).manifest(expected["stage"])
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**expected, "outputs": {name: file_sha256(work_dir / name) for name in outputs}, **extra}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    return path
