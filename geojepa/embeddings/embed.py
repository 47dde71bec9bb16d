"""``geojepa embed SOURCE OUT --model M``: a region's tile and entity embeddings as GeoParquet.

SOURCE is a region work directory, an ``*.osm.pbf`` or a Geofabrik region name (downloaded: needs the
network). A PBF or a name is extracted, tiled and tokenised into ``OUT/work`` (each stage reuses its fresh
artifacts); a work directory is only read: its tokens are used when they come from the model's tokenizer
and cover every tile (the split's gap ring too: ``tokens.gap_tiles``), else ``OUT/work`` links its tile
artifacts and the tokens are made there, gap tiles included (a region tokenised without its gap ring is
tokenised once more there). Every tile is embedded, except with a model of a region's own tokenizer, which
embeds that work directory's tokens as they are. Tokens are made with a copy of
the model's frozen tokenizer in ``OUT/tokenizer``: a new region's tag values grow the copy's vocabulary,
never the shipped model folder. Every tokenizer check (the model's digest against the tokenizer's and
against OUT's copy) comes before anything is made or fetched.

The encoder (the EMA target, the one evaluation reports) runs over the token shards a batch of tiles at a
time, the same batches and the same ``embed`` as ``geojepa evaluate`` (``token_batches``), so memory is
bounded by a batch, the tile index and the entity vectors spilled to disk, not by the region. Both files are
written in a temporary folder and go into place at the end (the entity file, then the tile file, which
names the model); a failure leaves the earlier embeddings in OUT as they were (the artifacts of the
stages before, in ``OUT/work``, are kept for the next run to reuse). OUT's layout is
``geojepa.workdir.EmbeddingsDir``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_contracts import (
    EMBEDDING_KEYS,
    ArtifactWriter,
    entity_embeddings,
    sweep,
    tile_embeddings,
)
from geojepa.config import Config
from geojepa.encoding.classes import class_of
from geojepa.encoding.models import check_widths
from geojepa.encoding.pooling import embed
from geojepa.encoding.shards import release, tiles_meta, token_batches, token_index
from geojepa.encoding.spill import Spill, entity_pieces
from geojepa.errors import GeoJepaError
from geojepa.workdir import EmbeddingsDir, ModelDir, TokenizerDir, WorkDir, temporary

log = logging.getLogger(__name__)


def model_version(ckpt: Path) -> str:
    """The checkpoint's file name and the first 16 hex digits of its SHA-256: what the files say made them."""
    h = hashlib.sha256()
    with open(ckpt, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return f"{ckpt.name} sha256:{h.hexdigest()[:16]}"


def file_metadata(path: Path) -> dict[str, str]:
    """The ``geojepa:*`` metadata of an embeddings file."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if k.decode().startswith("geojepa:")}


def _tokenizer_folder(spec: str, ckpt: Path, tokenizer: Path | None) -> Path | None:
    if tokenizer:
        return Path(tokenizer)
    candidates = [ModelDir(ckpt.parent.parent).tokenizer, ModelDir(ckpt.parent).tokenizer]
    if Path(spec).is_dir():
        candidates.insert(0, ModelDir(spec).tokenizer)
    return next((c.path for c in candidates if c.record_file.is_file()), None)


def _work_dir(source: str, out: EmbeddingsDir, cfg: Config, imagery, tokenizer: Path | None,
              digest: str | None) -> WorkDir:
    """The region's work directory with token shards the model can read (see the module docstring). A source
    work directory is only read: when its tokens are not the model's, ``OUT/work`` links its tile artifacts
    and the tokens are made there."""
    from geojepa.extract import extract
    from geojepa.tile import tile
    from geojepa.tokens import tokens

    path = Path(source).expanduser()
    if path.is_dir():
        w = WorkDir(path)
        if not w.tiles.exists():
            raise GeoJepaError(f"{path}: not a region work directory (no {w.tiles.name}); pass a PBF or run "
                               f"`geojepa extract` and `geojepa tile` on it first")
        if w.token_shards() and w.tokenizer_digest() == digest and (digest is None or _whole(w)):
            return w  # tokens made with the model's tokenizer (or, digest None, the region's own), every tile
        if digest is None:
            made = w.tokenizer_digest() or "none (not tokenised)"
            raise GeoJepaError(f"{path}: its tokens come from tokenizer {made}, the model from its region's own: "
                               "such a model embeds only the work directory it was trained on")
        view = out.work
        view.path.mkdir(parents=True, exist_ok=True)
        for f in (w.entities, w.tiles, w.tile_entities, w.tile_images):
            link = view.path / f.name
            if link.is_symlink() or link.is_file():
                link.unlink()
            elif link.is_dir():
                shutil.rmtree(link)
            if f.exists():
                link.symlink_to(f.resolve())
        w = view
    else:
        if digest is None:
            raise GeoJepaError("the model was trained on its region's own tokenizer: it embeds only the work "
                               "directory it was trained on, not a new region; use a corpus model "
                               "(models/geojepa-cpu)")
        if path.suffix == ".pbf" or path.name.endswith(".osm.pbf"):
            if not path.is_file():
                raise GeoJepaError(f"{path}: no such PBF file")
            pbf = path
        elif path.is_absolute() or source.startswith((".", "~")) or (path.parent != Path(".") and
                                                                       path.parent.exists()):
            raise GeoJepaError(f"{path}: no such work directory or PBF file")
        else:
            from geojepa.extract.fetch import fetch_region

            log.info("embed: %s is not a file or folder: fetching it from Geofabrik", source)
            try:
                pbf = fetch_region(source, out.download)
            except (GeoJepaError, OSError, ValueError) as e:
                raise GeoJepaError(f"{source}: not a work directory or PBF file here, and not fetched as a Geofabrik "
                                   f"region ({e}); pass a local PBF (the bundled ones are in data/samples/)"
                                   ) from None
        w = out.work
        extract(pbf, w.path, cfg)
        tile(w.path, cfg, imagery=imagery)
    copy = out.tokenizer
    if not copy.record_file.is_file():
        tmp = temporary(copy.path)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(tokenizer, tmp, ignore=shutil.ignore_patterns(".*"))
        os.replace(tmp, copy.path)
    # every tile, the split's gap ring too: it means nothing to someone embedding their town
    whole = cfg.model_copy(update={"tokens": cfg.tokens.model_copy(update={"gap_tiles": True})})
    tokens(w.path, whole, tokenizer=copy.path)
    return w


def _whole(w: WorkDir) -> bool:
    """Whether ``w``'s tokens cover every tile: it has no gap tiles, or they were tokenised too."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    split = pq.read_table(w.tiles, columns=["split"])["split"]
    return not pc.any(pc.equal(split, "gap")).as_py() or bool(w.token_shards("gap"))


def embed_source(source: str | Path, out: Path | str, cfg: Config, model: str | Path,
                 tokenizer: Path | None = None, imagery=None, force: bool = False) -> dict:
    """Write ``OUT/tile_embeddings.parquet`` and ``OUT/entity_embeddings.parquet`` (see the module docstring);
    returns a summary (tiles, entity pieces, width, seconds, files)."""
    from geojepa.encoding.models import resolve_model
    from geojepa.model.jepa import load_checkpoint
    from geojepa.tokens.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    out = EmbeddingsDir(Path(out).expanduser())
    spec = str(model)
    ckpt = resolve_model(spec, cfg, out / ".models")
    if not ckpt.is_file():
        raise GeoJepaError(f"{ckpt}: checkpoint not found")
    version = model_version(ckpt)
    if out.tile_embeddings.exists() and not force:
        try:
            before = file_metadata(out.tile_embeddings).get("geojepa:model_version")
        except Exception as e:  # noqa: BLE001 (an unreadable file there is not ours to overwrite either)
            before = f"unreadable ({e})"
        if before != version:
            raise GeoJepaError(f"{out.tile_embeddings}: holds embeddings of another model ({before}, not {version}); "
                               "pass --force to replace them, or another OUT")
    try:
        tcfg = load_checkpoint(ckpt)["config"]
    except ValueError as e:
        raise GeoJepaError(str(e)) from None
    digest = tcfg.get("tokenizer_digest")
    # Every check on the tokenizers before anything is made or fetched.
    folder = _tokenizer_folder(spec, ckpt, tokenizer) if digest else None
    src = Path(str(source)).expanduser()
    ready = src.is_dir() and WorkDir(src).token_shards() and WorkDir(src).tokenizer_digest() == digest
    if digest and folder is None and not ready:
        raise GeoJepaError(f"{ckpt}: trained with tokenizer {digest}, and no tokenizer folder is beside it: pass "
                           "--tokenizer T (the folder `geojepa tokenizer fit` made; a model folder has it in "
                           "tokenizer/)")
    for f, what in ((folder, "the tokenizer"), (out.tokenizer.path if digest else None, "OUT's copy of a tokenizer")):
        if f is None or not Path(f).exists():
            continue
        TokenizerDir(f).check("record_file")
        if (found := load_tokenizer(f).digest) != digest:
            if f != folder and force:
                shutil.rmtree(f)  # OUT's copy of another model's tokenizer: replaced under --force
                continue
            raise GeoJepaError(f"{f}: {what} has digest {found}, the model was trained with {digest}"
                               + ("; pass --force to replace it, or another OUT" if f != folder else ""))
    created = not out.path.exists()
    try:
        if not created:
            sweep(out.path)  # a killed run's temporaries
        out.path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GeoJepaError(f"{out}: cannot be used as OUT ({e.strerror or e})") from None
    try:
        return _embed(src if src.exists() else str(source), out, cfg, spec, ckpt, version, tcfg, digest, folder,
                      imagery, t0)
    except BaseException:
        if created and out.path.is_dir() and not any(out.path.iterdir()):
            out.path.rmdir()  # nothing made: no empty OUT left behind
        raise


def _embed(source, out: EmbeddingsDir, cfg: Config, spec: str, ckpt: Path, version: str, tcfg: dict, digest: str | None,
           folder: Path | None, imagery, t0: float) -> dict:
    from geojepa.model.jepa import encoder_from_checkpoint

    w = _work_dir(str(source), out, cfg, imagery, folder, digest)
    tok = token_index(w.tokens)
    if tok.n == 0:
        raise GeoJepaError(f"{w.tokens}: no tokenised tiles (the region has no tiles with entities): nothing to "
                           "embed")
    encoder, _ = encoder_from_checkpoint(ckpt)
    modalities = tuple(tcfg["modalities"])
    check_widths(tok.dims, modalities, encoder, ckpt, w.tokens)
    meta = tiles_meta(w.tiles, tok)
    width = encoder.width
    named = str(Path(spec).resolve()) if Path(spec).exists() else spec  # a local model by its absolute path
    metadata = dict(zip(EMBEDDING_KEYS, (named, version, digest or "region-own", "target"), strict=True))
    tmp = EmbeddingsDir(out / f".embed.tmp-{os.getpid()}")
    shutil.rmtree(tmp.path, ignore_errors=True)
    tmp.path.mkdir()
    spill = Spill(tmp / "entities.f32", width)
    pieces = 0
    try:
        with ArtifactWriter(tmp.tile_embeddings, tile_embeddings(2 * width), metadata=metadata) as tiles_out, spill:
            for r, vectors, ents in embedded_batches(tok, encoder, modalities, cfg.evaluate.embed_batch_tiles):
                at = pa.array(r)
                tiles_out.write(pa.table({
                    "tile_id": pa.array([tok.ids[i] for i in r], pa.string()),
                    "split": pa.array([str(tok.split[i]) for i in r], pa.string()),
                    "embedding": _fixed(vectors), "geometry": meta["geometry"].take(at),
                    "bbox": meta["bbox"].take(at)}))
                spill.write(ents)
        with ArtifactWriter(tmp.entity_embeddings, entity_embeddings(width), metadata=metadata) as ents_file:
            for t, _, vectors, geometry, bbox in entity_pieces(w.tile_entities, tok, meta, spill, ["tags"]):
                tags = t["tags"].combine_chunks()
                ents_file.write(pa.table({
                    "entity_id": t["entity_id"], "tile_id": t["tile_id"],
                    "class": pa.array([class_of(x) for x in tags.to_pylist()], pa.string()), "tags": tags,
                    "embedding": _fixed(vectors), "geometry": geometry, "bbox": bbox}))
                pieces += len(vectors)
        spill.path.unlink()
        # both at the end; the tile file (which names the model) last
        os.replace(tmp.entity_embeddings, out.entity_embeddings)
        os.replace(tmp.tile_embeddings, out.tile_embeddings)
        for view in (out.map, out.similar):  # views of the embeddings replaced: stale now
            if view.exists():
                log.info("embed: %s removed (made from the previous embeddings; run `geojepa %s %s` again)",
                         view, "map" if view == out.map else "similar", out.path)
            shutil.rmtree(view) if view.is_dir() else view.unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp.path, ignore_errors=True)
    summary = {"tiles": tok.n, "entity_pieces": pieces, "width": 2 * width, "model": spec, "model_version": version,
               "tokenizer_digest": digest, "work_dir": str(w.path), "seconds": round(time.perf_counter() - t0, 1),
               "files": [str(out.tile_embeddings), str(out.entity_embeddings)]}
    log.info("embed: %d tiles and %d entity pieces of %s in %.1fs -> %s", tok.n, pieces, w.path,
             summary["seconds"], out)
    return summary


def embedded_batches(tok, encoder, modalities: tuple[str, ...], batch_tiles: int):
    """(token indices, (tiles, 2 x width) tile embeddings, per tile (entities, width) entity embeddings) of the
    token shards, a batch at a time: ``token_batches`` through ``embed``, as ``geojepa evaluate`` reads them."""
    have = tuple(m for m in ("tags", "geometry", "image") if tok.dims[m] and m in modalities)
    for r, items in token_batches(tok, have, batch_tiles):
        pooled = embed(encoder, items, modalities, batch_tiles)
        yield r, pooled.concat(), pooled.entities
        release()


def _fixed(x: np.ndarray) -> pa.Array:
    x = np.ascontiguousarray(x, np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
