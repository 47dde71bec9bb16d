"""The folders of the pipeline, each a type that owns its layout: the region ``W`` (``WorkDir``) with its
evaluation ``W/eval`` (``EvalDir``), a corpus tokenizer ``T`` (``TokenizerDir``), a model ``OUT``
(``ModelDir``, its checkpoints in ``CheckpointsDir``) and the embeddings of ``geojepa embed`` (``EmbeddingsDir``).

Every stage, the flows and the training code name these folders' files through these types, never as
strings: an artifact's file name is written here and nowhere else (``tests/test_layout.py`` greps for it).
Each type wraps any path (a temporary sibling too, which a stage writes and then swaps in); ``check()``
says, in one line naming the folder, which file it lacks. The module imports only the standard library,
pyarrow and ``geojepa.errors`` (plain Python), so the training hosts use it too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq

from geojepa.errors import GeoJepaError

SPLITS = ("train", "val", "test")
MODALITY_DIMS = {"tags": "tag_dim", "geometry": "geometry_dim", "image": "image_dim"}


def checkpoint_step(path: Path) -> int:
    """The step of ``step-00000025.pt`` (numerically: ``step-1000`` sorts after ``step-999``)."""
    return int(path.stem.split("-")[1])


def checkpoints_in(folder: Path) -> list[Path]:
    """``folder/step-*.pt``, oldest first by step."""
    return sorted(Path(folder).glob("step-*.pt"), key=checkpoint_step)


def temporary(path: Path) -> Path:
    """The temporary sibling ``.NAME.tmp-PID`` to write ``path`` into and then swap in (``data_contracts.sweep``
    clears it after a killed run)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


class Folder:
    """A folder whose files the subclass names; ``required``: the attributes ``check()`` wants present."""

    required: tuple[str, ...] = ()
    what = "folder"

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def temporary(self):
        """The same folder at its temporary sibling (``temporary``), to swap in with
        ``data_contracts.replace_folder``."""
        return type(self)(temporary(self.path))

    def check(self, *needed: str):
        """This folder, when it holds the files ``needed`` (attribute names; default ``required``); else a
        ``GeoJepaError`` naming the folder and the first file missing."""
        for attr in needed or self.required:
            if not (path := getattr(self, attr)).exists():
                raise GeoJepaError(f"{self.path}: not a complete {self.what}: {path.name} is missing")
        return self


class TokenizerDir(Folder):
    """A corpus tokenizer ``T`` (``geojepa tokenizer fit``; ``geojepa.tokens.tokenizer``): its record (settings,
    rules, digest), its tag vocabulary and its shape encoder. A region's own tokenizer keeps the last two in
    ``W`` under the same names."""

    required = ("record_file", "tag_vocab", "geometry_encoder")
    what = "tokenizer folder"
    record_file = property(lambda self: self.path / "tokenizer.json")
    tag_vocab = property(lambda self: self.path / "tag_vocab.parquet")
    geometry_encoder = property(lambda self: self.path / "geometry_encoder.pt")
    vocab_lock = property(lambda self: self.path / ".vocab.lock")


class CheckpointsDir(Folder):
    """``OUT/checkpoints``: the ``step-*.pt`` files, and beside them the training run's resolved config, its
    history (one entry per logged step) and the previous run's files (``previous/``)."""

    history = property(lambda self: self.path / "history.json")
    train_config = property(lambda self: self.path / "train_config.json")
    selection = property(lambda self: self.path / "selection.json")  # geojepa select-checkpoint
    previous = property(lambda self: self.path / "previous")

    def step(self, step: int) -> Path:
        return self.path / f"step-{step:08d}.pt"

    def all(self) -> list[Path]:
        """The checkpoints, oldest first."""
        return checkpoints_in(self.path)


class ModelDir(Folder):
    """A model folder ``OUT`` (``geojepa train OUT``; a region trained alone is its own): its checkpoints; the
    corpus report written beside them; and, in a folder ``geojepa export`` made to ship, the tokenizer, the
    export record and the model card."""

    what = "model folder"
    checkpoints_dir = property(lambda self: CheckpointsDir(self.path / "checkpoints"))
    tokenizer = property(lambda self: TokenizerDir(self.path / "tokenizer"))
    export_record = property(lambda self: self.path / "export.json")
    card = property(lambda self: self.path / "README.md")
    corpus_report = property(lambda self: self.path / "corpus_report.md")
    corpus_results = property(lambda self: self.path / "corpus_results.parquet")
    corpus_comparisons = property(lambda self: self.path / "corpus_comparisons.json")

    def checkpoints(self) -> list[Path]:
        return self.checkpoints_dir.all()


class EvalDir(Folder):
    """A region's evaluation ``W/eval`` (``geojepa evaluate``): its tables, report, the summary the report was
    written from (protocol, checkpoint, tasks, peers, retrieval agreement) and pictures (each picture by the name
    the report links to)."""

    what = "evaluation folder"
    report = property(lambda self: self.path / "report.md")
    summary = property(lambda self: self.path / "summary.json")  # what the report was written from
    results = property(lambda self: self.path / "results.parquet")
    predictions = property(lambda self: self.path / "predictions.parquet")
    task_labels = property(lambda self: self.path / "task_labels.parquet")
    probe_features = property(lambda self: self.path / "probe_features.parquet")
    embeddings = property(lambda self: self.path / "embeddings.parquet")
    gallery_tiles = property(lambda self: self.path / "gallery_tiles.png")
    gallery_tiles_html = property(lambda self: self.path / "gallery_tiles.html")
    gallery_entities = property(lambda self: self.path / "gallery_entities.png")
    gallery_entities_html = property(lambda self: self.path / "gallery_entities.html")
    embedding_map = property(lambda self: self.path / "embedding_map.png")
    region_pca = property(lambda self: self.path / "region_pca.png")
    training_curves = property(lambda self: self.path / "training_curves.png")


class WorkDir(Folder):
    """The paths of one region's artifacts, and reads of the token shards' metadata."""

    what = "work directory"

    @property
    def name(self) -> str:
        """The region's name: the one its ``region.json`` records (a corpus region), else the folder's."""
        return self.region().get("name") or self.path.name

    # The artifacts, under fixed names.
    entities = property(lambda self: self.path / "entities.parquet")
    tiles = property(lambda self: self.path / "tiles.parquet")
    tile_entities = property(lambda self: self.path / "tile_entities.parquet")
    tile_images = property(lambda self: self.path / "tile_images.parquet")
    own_tokenizer = property(lambda self: TokenizerDir(self.path))  # its tag vocabulary and shape encoder only
    tag_vocab = property(lambda self: self.own_tokenizer.tag_vocab)
    geometry_encoder = property(lambda self: self.own_tokenizer.geometry_encoder)
    tokens = property(lambda self: self.path / "tokens")
    model = property(lambda self: ModelDir(self.path))  # the region trained alone (``geojepa train W``)
    eval = property(lambda self: EvalDir(self.path / "eval"))
    eval_cache = property(lambda self: self.path / ".eval-cache")  # what evaluating another model reuses
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

    def evaluation_summary(self) -> dict | None:
        """The last evaluation's summary: ``eval/summary.json``, or for an evaluation made before that file
        existed, its manifest's copy; None when the region was not evaluated."""
        if self.eval.summary.is_file():
            return json.loads(self.eval.summary.read_text())
        if self.manifest("evaluate").is_file():
            return json.loads(self.manifest("evaluate").read_text()).get("summary", {})
        return None

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
        return TokenizerDir(folder).tag_vocab if folder else self.tag_vocab


class EmbeddingsDir(Folder):
    """The folder ``OUT`` of ``geojepa embed``: the tile and entity embeddings (GeoParquet), the views made of
    them (``geojepa map``, ``geojepa similar``), the region's work directory when it was made here, and the
    copy of the model's tokenizer the region was tokenised with."""

    tile_embeddings = property(lambda self: self.path / "tile_embeddings.parquet")
    entity_embeddings = property(lambda self: self.path / "entity_embeddings.parquet")
    map = property(lambda self: self.path / "map.html")
    similar = property(lambda self: self.path / "similar")
    work = property(lambda self: WorkDir(self.path / "work"))
    tokenizer = property(lambda self: TokenizerDir(self.path / "tokenizer"))
    download = property(lambda self: self.path / "download")
