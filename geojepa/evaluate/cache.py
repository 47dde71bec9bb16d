"""A region's evaluation cache (``W/.eval-cache/``): what does not depend on the evaluated model, computed once
and reused by the evaluation of every other model on the region: the untrained twins' tile vectors, the SRAI
peers' vectors, and the probes of every feature set but the trained encoders'.

Entries are content-addressed: the key is a hash of everything the entry depends on (the region's input
hashes, the settings, the code that computes it), so a stale entry is never read, only left unused. Each
entry is one ``.npz`` (plus ``.json`` notes), written atomically; an unreadable entry is a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from pathlib import Path

import numpy as np

from data_contracts import atomic_path

log = logging.getLogger(__name__)


def key(*parts) -> str:
    """A stable hash of JSON-able ``parts`` (arrays by their bytes)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(f"{p.dtype}{p.shape}".encode())
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


class Cache:
    """The cache folder of one region; ``root`` None: nothing is read or written."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root is not None else None
        self.hits = self.misses = 0

    def _path(self, kind: str, k: str, suffix: str) -> Path:
        return self.root / kind / f"{k}{suffix}"

    def load(self, kind: str, k: str) -> dict[str, np.ndarray] | None:
        if self.root is None:
            return None
        try:
            with np.load(self._path(kind, k, ".npz"), allow_pickle=False) as z:
                out = {name: z[name] for name in z.files}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            self.misses += 1
            return None
        self.hits += 1
        return out

    def save(self, kind: str, k: str, arrays: dict[str, np.ndarray]) -> None:
        if self.root is None:
            return
        path = self._path(kind, k, ".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

    def load_notes(self, kind: str, k: str) -> dict | None:
        if self.root is None:
            return None
        try:
            return json.loads(self._path(kind, k, ".json").read_text())
        except (OSError, ValueError):
            return None

    def save_notes(self, kind: str, k: str, notes: dict) -> None:
        if self.root is None:
            return
        path = self._path(kind, k, ".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(notes))
