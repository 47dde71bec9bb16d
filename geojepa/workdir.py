"""One region's work directory ``W``: where each artifact lives, and what its token shards say about themselves.

Every stage, the flows and the training code name a region's files through
this type, never as strings. It imports only pyarrow (and ``data_contracts``),
so the training hosts use it too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

SPLITS = ("train", "val", "test")
MODALITY_DIMS = {"tags": "tag_dim", "geometry": "geometry_dim", "image": "image_dim"}


def checkpoint_step(path: Path) -> int:
    """The step of ``step-00000025.pt`` (numerically: ``step-1000`` sorts after ``step-999``)."""
    return int(path.stem.split("-")[1])


def checkpoints_in(folder: Path) -> list[Path]:
    """``folder/step-*.pt``, oldest first by step."""
    return sorted(Path(folder).glob("step-*.pt"), key=checkpoint_step)


class WorkDir:
    """The paths of one region's artifacts, and reads of the token shards' metadata."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"WorkDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def name(self) -> str:
        """The region's name: the one its ``region.json`` records (a corpus region), else the folder's."""
        return self.region().get("name") or self.path.name

    # The artifacts, under fixed names.
    entities = property(lambda self: self.path / "entities.parquet")
    tiles = property(lambda self: self.path / "tiles.parquet")
    tile_entities = property(lambda self: self.path / "tile_entities.parquet")
    tile_images = property(lambda self: self.path / "tile_images.parquet")
    tag_vocab = property(lambda self: self.path / "tag_vocab.parquet")
    geometry_encoder = property(lambda self: self.path / "geometry_encoder.pt")
    tokens = property(lambda self: self.path / "tokens")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    eval = property(lambda self: self.path / "eval")
    manifests = property(lambda self: self.path / "manifests")
    region_file = property(lambda self: self.path / "region.json")

    def manifest(self, stage: str) -> Path:
        return self.manifests / f"{stage}.json"

    def region(self) -> dict:
        """What a corpus recorded about this region (name, role, corpus); empty for a plain work directory."""
        try:
            return json.loads(self.region_file.read_text())
        except (OSError, ValueError):
            return {}

    def role(self) -> str | None:
        return self.region().get("role")

    def token_shards(self, split: str | None = None) -> list[Path]:
        pattern = f"{split}-*.parquet" if split else "*.parquet"
        return sorted(self.tokens.glob(pattern))

    def token_meta(self, split: str | None = None) -> dict[str, str]:
        """The key-value metadata of the token shards (of ``split``; the same in every shard of a run); empty
        without shards."""
        shards = self.token_shards(split)
        if not shards:
            return {}
        meta = pq.read_schema(shards[0]).metadata or {}
        return {k.decode(): v.decode() for k, v in meta.items() if not k.startswith(b"ARROW")}

    def token_dims(self, split: str | None = None) -> dict[str, int]:
        """Token widths per modality (0: the shards have none of that modality)."""
        meta = self.token_meta(split)
        return {m: int(meta.get(key, 0) or 0) for m, key in MODALITY_DIMS.items()}

    def tokenizer_digest(self) -> str | None:
        """The digest of the frozen corpus tokenizer the shards were made with; None for a region-own tokenizer."""
        return self.token_meta().get("tokenizer_digest") or None

    def vocab_path(self) -> Path:
        """The tag vocabulary the shards were made with: the corpus tokenizer's, else the region's own."""
        folder = self.token_meta().get("tokenizer_dir")
        return Path(folder) / "tag_vocab.parquet" if folder else self.tag_vocab

    def checkpoints(self) -> list[Path]:
        return checkpoints_in(self.checkpoints_dir)
