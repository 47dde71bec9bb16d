"""One frozen tokenizer for a corpus, in a folder ``T``: ``geojepa tokenizer fit T --data W1 W2 ...``.

``T`` holds what turns a tile into tokens, so that every region of a corpus is
tokenised the same way and one model can read them all:

- ``tag_vocab.parquet``: the text model's vectors of the tag vocabulary. It
  may grow (a region tokenised later adds the values it brings), but a vector,
  once written, never changes; growth is serialised by a lock on ``T``.
- ``geometry_encoder.pt``: the shape encoder, trained once on shapes drawn
  from all the listed regions, then frozen.
- ``tokenizer.json``: the text model, widths, image tokenizer, the bucketing
  rules, the shape encoder's hash and the regions it was fitted on, and the
  ``digest`` of all of it but the growing vocabulary. The digest goes into
  every token shard made with ``T`` and into every checkpoint trained on them;
  training refuses regions of different digests, evaluation a model of
  another digest.

The files' names are ``geojepa.workdir.TokenizerDir``'s.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import shapely

from data_contracts import TILE_ENTITIES, TILES, atomic_path, read_table
from geojepa.config import Config, TokensConfig
from geojepa.errors import GeoJepaError
from geojepa.lifecycle import StageResult, Summary
from geojepa.tokens import vocab as V
from geojepa.tokens.fitting import build_vocab, train_geometry_encoder
from geojepa.tracking import record_skip, stage_run
from geojepa.workdir import TokenizerDir, WorkDir

log = logging.getLogger(__name__)
# The tokens settings a tokenizer fixes; a region tokenised with T uses these, whatever its config says.
FROZEN = ("text_model", "max_values_per_key", "geometry_dim", "image_tokenizer", "patch_px", "vit_weights")


def rules_sha() -> str:
    """Hash of the vocabulary's bucketing rules (free-text keys, numeric buckets): a change makes a new tokenizer."""
    return hashlib.sha256(json.dumps([V.FREE_TEXT.pattern, V.NUMERIC_EDGES], sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True, kw_only=True)
class TokenizerSummary(Summary):
    """A fit's figures the flows read (every other figure: ``figures``, recorded in ``tokenizer.json``): the
    digest, the vocabulary's entries when fitted and the regions it was fitted on."""

    digest: str
    vocab_entries: int
    regions: list[str]


@dataclass(frozen=True)
class Tokenizer:
    folder: Path
    record: dict

    @property
    def digest(self) -> str:
        return self.record["digest"]

    @property
    def files(self) -> TokenizerDir:
        return TokenizerDir(self.folder)

    @property
    def vocab(self) -> Path:
        return self.files.tag_vocab

    @property
    def geometry_encoder(self) -> Path:
        return self.files.geometry_encoder

    def tokens_config(self, section: TokensConfig) -> TokensConfig:
        """``section`` with the tokenizer's frozen settings and files in place of the region's own."""
        return section.model_copy(update={**{k: self.record["settings"][k] for k in FROZEN},
                                          "vocab": str(self.vocab), "geometry_checkpoint": str(self.geometry_encoder)})

    @contextlib.contextmanager
    def growing(self) -> Iterator[None]:
        """Hold the lock under which the vocabulary grows (regions are tokenised concurrently)."""
        with open(self.files.vocab_lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def load_tokenizer(folder: Path | str) -> Tokenizer:
    files = TokenizerDir(folder)
    folder, path = files.path, files.record_file
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise GeoJepaError(
            f"{path}: no tokenizer here; make one with `geojepa tokenizer fit {folder} --data W ...`"
        ) from None
    except ValueError as e:
        raise GeoJepaError(f"{path}: damaged tokenizer record ({e})") from None
    if record.get("digest") != _digest(record):
        raise GeoJepaError(f"{path}: its digest does not match its content (edited or damaged)")
    files.check()
    if record["rules"] != rules_sha():
        raise GeoJepaError(f"{path}: made with other vocabulary bucketing rules ({record['rules']}, this code "
                           f"{rules_sha()}); fit a new tokenizer")
    return Tokenizer(folder, record)


def _digest(record: dict) -> str:
    frozen = {k: record[k] for k in ("settings", "rules", "geometry_encoder_sha256", "tag_dim", "fitted_on")}
    return hashlib.sha256(json.dumps(frozen, sort_keys=True).encode()).hexdigest()[:16]


def region_shapes(w: WorkDir) -> tuple[list[list], np.ndarray]:
    """A region's tiles' entity tag lists and shapes in metres (the shape encoder's input)."""
    te = read_table(w.tile_entities, TILE_ENTITIES, columns=["tile_id", "tags", "geometry"])
    tiles = read_table(w.tiles, TILES, columns=["tile_id", "split", "size_m"])
    keep = tiles.filter(pc.not_equal(tiles["split"], "gap"))["tile_id"]
    te = te.filter(pc.is_in(te["tile_id"], keep))
    size_m = float(tiles["size_m"][0].as_py()) if tiles.num_rows else 300.0
    geoms = shapely.transform(shapely.from_wkb(te["geometry"].to_numpy(zero_copy_only=False)), lambda c: c * size_m)
    return [list(t) for t in te["tags"].to_pylist()], geoms


def fit(folder: Path | str, work_dirs: list[Path | str], cfg: Config,
        force: bool = False) -> StageResult[TokenizerSummary]:
    """Fit the tokenizer on the listed regions' tiles. An existing tokenizer is frozen: it is kept unless
    ``force`` (which makes a new digest: models trained with the old one no longer match)."""
    files = TokenizerDir(folder)
    folder = files.path
    regions = [WorkDir(w) for w in work_dirs]
    if not regions:
        raise GeoJepaError("tokenizer fit: no regions given (--data W1 W2 ...)")
    for w in regions:
        for p in (w.tiles, w.tile_entities):
            if not p.exists():
                raise GeoJepaError(f"{p}: missing; run `geojepa tile {w.path}` before fitting a tokenizer on it")
        if w.role() == "holdout":
            raise GeoJepaError(f"{w.region_file}: region {w.name!r} is a holdout region; a tokenizer is fitted on "
                               "training regions only")
    if files.record_file.exists() and not force:
        tok = load_tokenizer(folder)
        log.info("tokenizer: %s is frozen (digest %s, fitted on %s); kept", folder, tok.digest,
                 [r["name"] for r in tok.record["fitted_on"]])
        record_skip("tokenizer", folder, cfg, tok.record.get("mlflow_run_id"))
        return StageResult("tokenizer", True, tok.record.get("mlflow_run_id"),
                           TokenizerSummary.of(tok.record.get("summary", {})))
    t0 = time.perf_counter()
    section = cfg.tokens
    folder.mkdir(parents=True, exist_ok=True)
    with stage_run("tokenizer", folder, cfg, section="tokens") as run:
        tag_lists, shapes, fitted_on = [], [], []
        for w in regions:
            tags, geoms = region_shapes(w)
            if not len(geoms):
                raise GeoJepaError(f"{w.tile_entities}: no entities in non-gap tiles; nothing to fit on")
            tag_lists += tags
            shapes.append(geoms)
            fitted_on.append({"name": w.name, "entities": len(geoms)})
        if force:  # a refit starts its vocabulary afresh; an interrupted first fit resumes its own
            files.tag_vocab.unlink(missing_ok=True)
        vocab, embedded = build_vocab(files.tag_vocab, tag_lists, section, run)
        # Shapes from every region, each region's share capped so a large one does not drown the rest.
        rng = np.random.default_rng(section.seed)
        share = max(section.geometry_max_shapes // len(shapes), 1)
        sample = np.concatenate([g[rng.permutation(len(g))[:share]] for g in shapes])
        report = train_geometry_encoder(files.geometry_encoder, section, sample, run)
        from geojepa import manifest

        record = {"settings": {k: getattr(section, k) for k in FROZEN}, "rules": rules_sha(),
                  "geometry_encoder_sha256": manifest.file_sha256(files.geometry_encoder),
                  "tag_dim": int(vocab.vectors.shape[1]), "fitted_on": fitted_on}
        record["digest"] = _digest(record)
        summary = {"digest": record["digest"], "tokenizer": str(folder), "regions": [r["name"] for r in fitted_on],
                   "vocab_entries": len(vocab.index), "vocab_embedded": embedded, "shapes": len(sample), **report,
                   "seconds": round(time.perf_counter() - t0, 1)}
        record.update(summary=summary, mlflow_run_id=run.run_id)  # outside the digest
        with atomic_path(files.record_file) as tmp:
            tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
        run.metrics({k: v for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)})
        run.dict(record, files.record_file.name)
    log.info("tokenizer: %s fitted on %s (digest %s, %d vocabulary entries, %d shapes)", folder,
             summary["regions"], record["digest"], len(vocab.index), len(sample))
    return StageResult("tokenizer", False, record["mlflow_run_id"], TokenizerSummary.of(summary))
