"""The tokens stage: tiles -> ``W/tag_vocab.parquet``, the shape encoder, ``W/tokens/{split}-NNNNN.parquet``.

Per tile, one row holding its entities' tag vectors, shape-encoder outputs and
positions, and its image patch tokens with their positions. Each row carries a
content hash of what made it (the tile's entities and image, the vocabulary
model, the encoder checkpoint, this stage's config), so a re-run re-tokenises
only tiles whose hash changed and embeds only vocabulary entries not yet
embedded. ``gap`` tiles (see the tile stage) get no tokens, unless ``tokens.gap_tiles`` (``geojepa embed``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import shapely

from data_contracts import TILE_ENTITIES, TILE_IMAGES, TILES, TOKENS, open_artifact, read_table, write_table
from geojepa.config import Config, TokensConfig
from geojepa.errors import GeoJepaError
from geojepa.lifecycle import Lifecycle, StageResult, Summary
from geojepa.progress import Progress
from geojepa.tokens import geometry as G
from geojepa.tokens.fitting import build_vocab, geometry_encoder, vocab_model
from geojepa.tokens.image import ViTB16, patch_positions, pixel_patches, token_width
from geojepa.tokens.tokenizer import load_tokenizer
from geojepa.workdir import SPLITS, WorkDir

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TokensSummary(Summary):
    """The tokens stage's figures the flows show (every other figure: ``figures``); the shape encoder's losses
    only when this run trained it."""

    tokenizer_digest: str | None
    tiles: int
    tiles_tokenised: int
    tiles_reused: int
    tokens: int
    vocab_entries: int
    seconds: float
    geometry_val_loss: float | None = None
    geometry_val_loss_untrained: float | None = None


class _Images:
    """Tile images by tile_id, materialised one row at a time (pixels are the bulk of the data)."""

    def __init__(self, table: pa.Table):
        self.table = table
        self.index = {t: i for i, t in enumerate(table["tile_id"].to_pylist())}

    def get(self, tile_id: str) -> dict | None:
        i = self.index.get(tile_id)
        return None if i is None else self.table.slice(i, 1).to_pylist()[0]

    def pixels(self, tile_id: str) -> bytes:
        i = self.index.get(tile_id)
        return (self.table["pixels"][i].as_py() or b"") if i is not None else b""

    def bands(self, tile_ids) -> int:
        """The band count of the first of ``tile_ids`` with an image (0: none has one)."""
        have = pc.is_valid(self.table["pixels"]).to_numpy(zero_copy_only=False)
        at = next((i for t in tile_ids if (i := self.index.get(t)) is not None and have[i]), None)
        return 0 if at is None else len(self.table["bands"][at].as_py())


def _tile_hashes(te: pa.Table, images: _Images, fingerprint: str, split_of: dict[str, str]) -> dict[str, str]:
    """Per tile, a hash of everything its token row is made of, its split included (re-tiling with another
    seed must not reuse rows that carry their old split)."""
    ids = te["tile_id"].to_pylist()
    geoms = te["geometry"].to_pylist()
    tags = te["tags"].to_pylist()
    pos = te["position"].to_pylist()
    ents = te["entity_id"].to_pylist()
    hashes: dict[str, hashlib._Hash] = {}
    for t, e, g, tg, p in zip(ids, ents, geoms, tags, pos, strict=True):
        h = hashes.get(t) or hashes.setdefault(t, hashlib.sha256(fingerprint.encode()))
        h.update(e.encode())
        h.update(g)
        h.update(repr(tg).encode())
        h.update(np.asarray(p, np.float32).tobytes())
    out = {}
    for t, h in hashes.items():
        h.update(split_of[t].encode())
        h.update(images.pixels(t))
        out[t] = h.hexdigest()
    return out


def _existing_hashes(folder: Path) -> dict[str, str]:
    """tile_id -> content hash of the rows already in the shards (none if they are unreadable)."""
    if not folder.is_dir() or not any(folder.glob("*.parquet")):
        return {}
    try:
        t = read_table(folder, TOKENS, columns=["tile_id", "content_hash"])
    except ValueError:
        return {}
    return dict(zip(t["tile_id"].to_pylist(), t["content_hash"].to_pylist(), strict=True))


def _n_patches(img: dict | None, cfg: TokensConfig) -> int:
    if img is None or img["pixels"] is None:
        return 0
    grid = img["height"] // (16 if cfg.image_tokenizer == "vit_b16" else cfg.patch_px)
    return grid * grid + (cfg.image_tokenizer == "vit_b16")


def tokens(work_dir: Path | str, cfg: Config, train_geometry: bool = False, force: bool = False,
           tokenizer: Path | str | None = None) -> StageResult[TokensSummary]:
    """Tokenise every non-gap tile (the gap tiles too under ``tokens.gap_tiles``) of ``work_dir`` into shards
    under ``work_dir/tokens``.

    With ``tokenizer`` (a folder made by ``geojepa tokenizer fit``), its frozen vocabulary (which may grow with
    this region's new tag values), shape encoder and settings are used, and its digest goes into every shard;
    without, the region gets its own vocabulary and shape encoder (``W/tag_vocab.parquet``,
    ``W/geometry_encoder.pt``)."""

    w = WorkDir(work_dir)
    work_dir = w.path
    tok = load_tokenizer(tokenizer) if tokenizer else None
    if tok and train_geometry:
        raise GeoJepaError(f"{tok.geometry_encoder}: the tokenizer's shape encoder is frozen; --train-geometry "
                           "applies to a region's own tokenizer only")
    section = tok.tokens_config(cfg.tokens) if tok else cfg.tokens
    paths = {"tiles": w.tiles, "tile_entities": w.tile_entities, "tile_images": w.tile_images}
    open_artifact(paths["tiles"], TILES)
    open_artifact(paths["tile_entities"], TILE_ENTITIES)
    open_artifact(paths["tile_images"], TILE_IMAGES)
    vocab_path = Path(section.vocab) if section.vocab else w.tag_vocab
    encoder_path = Path(section.geometry_checkpoint) if section.geometry_checkpoint else w.geometry_encoder
    # The tokenizer enters by its record (digest), not its vocabulary file, which other regions may grow.
    inputs = {**paths, **({"tokenizer": tok.files.record_file} if tok else {})}
    life = Lifecycle(
        "tokens",
        work_dir,
        cfg,
        inputs,
        section.model_dump(mode="json"),
        ("geojepa.tokens", "data_contracts"),
        section="tokens",
    )
    if done := life.skipped(force or train_geometry, TokensSummary):
        return done

    t0 = time.perf_counter()
    tiles = read_table(paths["tiles"], TILES, columns=["tile_id", "split"])
    split_of = dict(zip(tiles["tile_id"].to_pylist(), tiles["split"].to_pylist(), strict=True))
    te = read_table(paths["tile_entities"], TILE_ENTITIES).sort_by(
        [("tile_id", "ascending"), ("entity_id", "ascending")]
    )
    wanted = [t for t, s in split_of.items() if s != "gap" or section.gap_tiles]
    te = te.filter(pc.is_in(te["tile_id"], pa.array(wanted, pa.string())))
    if te.num_rows == 0:
        raise GeoJepaError(f"{paths['tile_entities']}: no entities in non-gap tiles; nothing to tokenise")
    images = _Images(read_table(paths["tile_images"], TILE_IMAGES))

    with life.run() as run:
        tag_lists = [list(t) for t in te["tags"].to_pylist()]
        with tok.growing() if tok else contextlib.nullcontext():
            vocab, embedded = build_vocab(vocab_path, tag_lists, section, run)
        size_m = float(read_table(paths["tiles"], TILES, columns=["size_m"])["size_m"][0].as_py())
        geoms_m = shapely.transform(shapely.from_wkb(te["geometry"].to_numpy(zero_copy_only=False)),
                                    lambda c: c * size_m)
        encoder, encoder_sha, report = geometry_encoder(encoder_path, section, geoms_m, train_geometry, run)
        vit = ViTB16(section.vit_weights, section.vit_allow_random) if section.image_tokenizer == "vit_b16" else None
        fingerprint = json.dumps(
            # gap_tiles says which tiles, not how a tile is tokenised: out of the rows' hashes
            [section.model_dump(mode="json", exclude={"gap_tiles"}), vocab_model(vocab_path), encoder_sha],
            sort_keys=True,
        )
        hashes = _tile_hashes(te, images, fingerprint, split_of)
        old_hashes = _existing_hashes(w.tokens)
        reused = {t for t, h in hashes.items() if old_hashes.get(t) == h}
        ids_np = te["tile_id"].to_numpy(zero_copy_only=False)
        n_patches = {t: _n_patches(images.get(t), section) for t in hashes}
        length = {t: int(n) + n_patches[t] for t, n in zip(*np.unique(ids_np, return_counts=True), strict=True)}
        positions = np.asarray(te["position"].combine_chunks().flatten().to_numpy(), np.float32).reshape(-1, 8)
        entity_ids = te["entity_id"].to_pylist()

        tile_ids, first = np.unique(ids_np, return_index=True)
        span = dict(
            zip(tile_ids.tolist(), zip(first.tolist(), [*first[1:].tolist(), len(ids_np)], strict=True), strict=True)
        )

        def compute(todo: list[str]) -> dict[str, dict]:
            """Token rows of these tiles (te is sorted by tile, so each tile's entities are contiguous)."""
            rows_idx = np.concatenate([np.arange(*span[t]) for t in todo]) if todo else np.zeros(0, int)
            tag_vec = vocab.tag_vectors([tag_lists[i] for i in rows_idx])
            geo_vec = G.encode(encoder, geoms_m[rows_idx])
            ends = np.cumsum([span[t][1] - span[t][0] for t in todo]).astype(int)
            starts = ends - [span[t][1] - span[t][0] for t in todo]
            out = {}
            for t, a, b in zip(todo, starts, ends, strict=True):
                sel = rows_idx[a:b]
                patches, ppos = _image_tokens(images.get(t), section, vit, paths["tile_images"])
                out[t] = {"tile_id": t, "split": split_of[t], "length": length[t], "content_hash": hashes[t],
                          "entity_id": [entity_ids[i] for i in sel], "entity_position": positions[sel].ravel(),
                          "tag": tag_vec[a:b].ravel(), "geometry": geo_vec[a:b].ravel(),
                          "patch_position": ppos.ravel(), "image": patches.ravel()}
            return out

        meta = {"tag_dim": str(vocab.vectors.shape[1]), "geometry_dim": str(section.geometry_dim),
                "text_model": vocab_model(vocab_path), "image_tokenizer": section.image_tokenizer,
                **({"tokenizer_digest": tok.digest, "tokenizer_dir": str(tok.folder.resolve())} if tok else {}),
                "image_dim": str(token_width(section.image_tokenizer, section.patch_px, images.bands(hashes)))}
        with life.staging(w.tokens) as staged:
            counts = _write_shards(staged, w.tokens, hashes, split_of, length, reused, compute, section.shard_tiles,
                                   meta)
        todo_count = len(hashes) - len(reused)
        n_tokens = sum(length.values())
        seconds = time.perf_counter() - t0
        empty = sorted(t for t, s in split_of.items() if (s != "gap" or section.gap_tiles) and t not in hashes)
        if empty:
            log.warning("tokens: %d tiles have no entities and get no tokens: %s", len(empty), empty[:5])
        summary = {
            "tokenizer_digest": tok.digest if tok else None,
            "tiles": len(hashes),
            "tiles_tokenised": todo_count,
            "tiles_reused": len(reused),
            "gap_tiles_skipped": 0 if section.gap_tiles else sum(s == "gap" for s in split_of.values()),
            "empty_tiles_skipped": len(empty),
            "tokens": n_tokens,
            "entities": te.num_rows,
            "vocab_entries": len(vocab.index),
            "vocab_embedded": embedded,
            "entities_per_vocab_text": round(sum(len(t) for t in tag_lists) / max(len(vocab.index), 1), 2),
            **{f"shards_{k}": v for k, v in counts.items()},
            "seconds": round(seconds, 3),
            "tiles_per_s": round(todo_count / seconds, 1),
            "tokens_per_s": round(n_tokens / seconds, 1),
            **(report or {}),
        }
        run.metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})
        run.dict(summary, "tokens_summary.json")
    log.info("tokens: %d tiles (%d re-tokenised, %d reused), %d tokens in %.1fs", len(hashes), todo_count, len(reused),
             n_tokens, seconds)
    return life.publish([w.tokens], TokensSummary.of(summary))


def _image_tokens(img: dict | None, cfg: TokensConfig, vit, source: Path) -> tuple[np.ndarray, np.ndarray]:
    """(p, dim) patch tokens and (p, 8) positions; none when the tile has no image."""
    if img is None or img["pixels"] is None:
        return np.zeros((0, 0), np.float32), np.zeros((0, 8), np.float32)
    h, w, c = img["height"], img["width"], len(img["bands"])
    if len(img["pixels"]) != h * w * c:
        raise GeoJepaError(f"{source}: tile {img['tile_id']}: image has {len(img['pixels'])} bytes, "
                           f"expected {h} x {w} x {c}")
    pixels = np.frombuffer(img["pixels"], np.uint8).reshape(h, w, c)
    if vit is not None:
        return vit.tokens([pixels])[0], patch_positions(h // 16, cls_token=True)
    return pixel_patches(pixels, cfg.patch_px), patch_positions(h // cfg.patch_px)


def _write_shards(tmp: Path, final: Path, hashes: dict[str, str], split_of: dict[str, str], length: dict[str, int],
                  reused: set[str], compute, shard_tiles: int, meta: dict[str, str]) -> dict:
    """Shards per split into the staging folder ``tmp``, rows sorted by length; one shard in memory at a time.
    Unchanged rows are copied from the previous shards in ``final``."""
    old = ds.dataset(final, format="parquet") if reused else None
    counts = {}
    gap = any(split_of[t] == "gap" for t in hashes)  # tokenised only under tokens.gap_tiles
    progress = Progress(f"tokens: {len(reused)} of {len(hashes)} tiles reused", len(hashes), "tiles")
    for split in (*SPLITS, "gap") if gap else SPLITS:
        order = sorted((t for t in hashes if split_of[t] == split), key=lambda t: (length[t], t))
        counts[split] = 0
        for i, start in enumerate(range(0, len(order), shard_tiles)):
            chunk = order[start : start + shard_tiles]
            rows = compute([t for t in chunk if t not in reused])
            keep = [t for t in chunk if t in reused]
            if keep:
                table = old.to_table(filter=ds.field("tile_id").isin(keep))
                rows.update((r["tile_id"], r) for r in table.to_pylist())
            table = pa.table({name: _column([rows[t][name] for t in chunk], TOKENS.schema.field(name).type)
                              for name in TOKENS.schema.names})
            # Float tokens barely compress and never repeat: lz4, dictionaries for the strings only.
            write_table(table, tmp / f"{split}-{i:05d}.parquet", TOKENS, row_group_rows=256, metadata=meta,
                        compression="lz4", use_dictionary=["tile_id", "split", "content_hash"])
            counts[split] += 1
            progress.update(len(chunk))
    progress.close()
    return counts


def _column(values: list, type_: pa.DataType) -> pa.Array:
    """An Arrow column; float vectors go in as one buffer with offsets (no per-row conversion)."""
    if type_ == pa.list_(pa.float32()):
        flat = [np.asarray(v, np.float32).ravel() for v in values]
        offsets = np.concatenate([[0], np.cumsum([len(v) for v in flat])]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(flat) if flat else [], pa.float32()))
    return pa.array(values, type_)
