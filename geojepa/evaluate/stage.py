"""The evaluate stage: a checkpoint and the token shards -> ``W/eval/``.

It streams: what it holds for the whole region is per-tile float arrays (tile
embeddings, TagPool and bag-of-tags vectors: what the probes need) and sparse
integer tables, never the tokens, the entities' tags or their geometries.

1. Loading: the token index (tile ids, splits, entity counts, no token) and one
   pass over ``tile_entities``, a partition shard at a time (``region``): the
   tiles' task labels, tag-class histograms and tag counts, and each task's
   masking edits. Task datasets (``task_labels.parquet``) follow the tile split
   (no test tile touches a training tile); a task without two tiles in each
   split once masked, or with one training label, is skipped and named.
2. Embedding: one pass over the token shards, a batch of tiles at a time: the
   trained target encoder and its untrained twin embed each tile, and each
   probed task's tiles once its label-defining tags are removed; the entity
   embeddings go to a float32 spill file.
   Then the field's own embedders (SRAI's Count, ContextualCount, Hex2Vec, GeoVeX: ``peers``, when the
   ``peers`` extra is installed) are fitted on the region's training tiles and embed every tile and each
   task's masked tiles; their probes are cached like the baselines'.
3. Probes: linear and MLP probes on the train split, stopped on val, scored on
   test, every seed and feature set of one kind and width in one stacked fit
   (``probe.fit_predict_seeds``), the fits of all tasks side by side; Dummy
   predicts the training median; kNN regression scores the same splits.
4. Retrieval over the unmasked tiles: neighbours' tag-class agreement per model;
   galleries of tiles and entities (PNG + HTML), maps and training curves.
5. Writing: ``embeddings.parquet`` (GeoParquet; each entity row its piece in the
   tile) a ``tile_entities`` shard at a time, ``results.parquet``, ``report.md``;
   everything logged to MLflow, with the time of each phase.

The folder is written whole to a temporary sibling and swapped in at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from data_contracts import (
    EMBEDDINGS,
    ENTITIES,
    EVAL_RESULTS,
    PREDICTIONS,
    TAG_VOCAB,
    TASK_LABELS,
    TILE_ENTITIES,
    TILE_IMAGES,
    TILES,
    TOKENS,
    ArtifactWriter,
    atomic_path,
    open_artifact,
    read_table,
    replace_folder,
    write_table,
)
from geojepa.config import Config
from geojepa.errors import GeoJepaError
from geojepa.evaluate import figures, peers
from geojepa.evaluate.embed import (
    bag_of_tags_counts,
    embed,
    kept_tag_vectors,
    mask_item,
    tag_pool,
    without_images,
)
from geojepa.evaluate.knn import (
    class_of,
    knn_regression_mae,
    neighbour_agreement,
    topk_cosine,
    topk_cosine_chunks,
)
from geojepa.evaluate.labels import TASKS, subsample
from geojepa.evaluate.peers import PEERS
from geojepa.evaluate.probe import (
    ProbeSettings,
    fit_predict_seeds,
    metrics,
    standardise,
)
from geojepa.evaluate.region import (
    entity_batches,
    pieces_lonlat,
    release,
    scan_entities,
    tiles_meta,
    token_batches,
    token_index,
)
from geojepa.evaluate.report import write_report
from geojepa.lifecycle import Lifecycle
from geojepa.tokens.vocab import Vocab
from geojepa.workdir import WorkDir

log = logging.getLogger(__name__)
EVAL_DIR = "eval"


def last_checkpoint(work_dir: Path) -> Path:
    found = WorkDir(work_dir).checkpoints()
    if not found:
        raise GeoJepaError(f"{work_dir / 'checkpoints'}: no step-*.pt checkpoint; run `geojepa train {work_dir}`, "
                           "or pass --model")
    return found[-1]


def evaluate(work_dir: Path | str, cfg: Config, checkpoint: Path | str | None = None, force: bool = False,
             model: str | Path | None = None) -> dict:
    """Evaluate region ``work_dir`` with ``model`` (a checkpoint, a model folder or ``models:/name/N``; default
    the region's own last checkpoint). The model must have been trained on tokens of the region's tokenizer;
    the report says whether the region was among its training regions."""
    from geojepa.evaluate.model import resolve_model
    from geojepa.model.jepa import load_checkpoint

    w = WorkDir(work_dir)
    work_dir = w.path
    section = cfg.evaluate
    spec = model or checkpoint or section.checkpoint
    ckpt = resolve_model(spec, cfg, work_dir.parent / ".models") if spec else last_checkpoint(work_dir)
    if not ckpt.is_file():
        raise GeoJepaError(f"{ckpt}: checkpoint not found")
    try:
        tcfg = load_checkpoint(ckpt)["config"]
    except ValueError as e:
        raise GeoJepaError(str(e)) from None
    trained_digest, region_digest = tcfg.get("tokenizer_digest"), w.tokenizer_digest()
    if trained_digest != region_digest:
        raise GeoJepaError(f"{ckpt}: the model was trained on tokens of tokenizer {trained_digest or '(region-own)'}, "
                           f"but {w.tokens} were made with {region_digest or 'the region-own tokenizer'}; tokenise "
                           "the region with the model's tokenizer (geojepa tokens W --tokenizer T)")
    trained_on = [Path(d).name for d in tcfg.get("data") or [tcfg.get("work_dir", "")]]
    names = tcfg.get("regions") or trained_on
    seen = w.name in names or work_dir.resolve().as_posix() in [str(Path(d)) for d in tcfg.get("data") or []]
    role = (f"trained on: the model saw this region's train split ({', '.join(names)})" if seen else
            f"holdout: the model never saw this region (trained on {', '.join(names)})")
    paths = {"tiles": w.tiles, "tile_entities": w.tile_entities, "tile_images": w.tile_images, "entities": w.entities,
             "tokens": w.tokens, "tag_vocab": Path(cfg.tokens.vocab) if cfg.tokens.vocab else w.vocab_path(),
             "checkpoint": ckpt}
    for name, contract in (("tiles", TILES), ("tile_entities", TILE_ENTITIES), ("tile_images", TILE_IMAGES),
                           ("entities", ENTITIES), ("tokens", TOKENS), ("tag_vocab", TAG_VOCAB)):
        open_artifact(paths[name], contract)
    # The vocabulary of a corpus tokenizer grows with other regions: it enters by the shards' digest instead.
    inputs = {k: v for k, v in paths.items() if not (k == "tag_vocab" and region_digest)}
    # Whether SRAI is installed decides the peers' rows: an evaluation made without it is stale once it is.
    params = {**section.model_dump(mode="json"), "peers_srai": peers.version() if section.peers else None}
    life = Lifecycle("evaluate", work_dir, cfg, inputs, params,
                     ("geojepa.evaluate", "geojepa.model"), section="evaluate")
    if done := life.skipped(force):
        return done

    from geojepa.model.jepa import encoder_from_checkpoint

    t0 = time.perf_counter()
    device = "cuda" if section.device == "cuda" or (section.device == "auto" and torch.cuda.is_available()) else "cpu"
    encoder, tcfg = encoder_from_checkpoint(ckpt)
    context, _ = encoder_from_checkpoint(ckpt, which="context")
    untrained, _ = encoder_from_checkpoint(ckpt, untrained=True, seed=section.seed)
    modalities = tuple(tcfg["modalities"])
    # Rendered images are drawn from the very tags the masked setting removes: there the image tokens are left
    # out (real imagery, an independent observation, stays).
    rendered = "image" in modalities and _rendered(paths["tile_images"])
    tok = token_index(paths["tokens"])
    check_widths(tok.dims, modalities, encoder, paths)
    settings = ProbeSettings(section.hidden, section.lr, section.weight_decay, section.max_epochs, section.patience,
                             section.batch)
    tasks = [TASKS[name] for name in section.tasks]
    timing: dict = {}

    tmp = work_dir / f".{EVAL_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    spill = tmp / ".entity_embeddings.f32"
    with life.run() as run, _torch_threads(1), _pool() as pool:
        try:
            clock = time.perf_counter()
            vocab = _vocab(paths["tag_vocab"])
            scan = scan_entities(paths["tile_entities"], tok, tasks, vocab)
            meta = tiles_meta(paths["tiles"], tok)
            release()
            split_of = tok.split.astype(str)
            label_rows, results, notes, probed = [], [], {}, {}
            for task in tasks:  # which tiles each task has once masked, and whether it can be probed
                name, rows = task.name, _task_rows(task, scan.raw[task.name], tok, section)
                kept = tok.n_entities[rows] - scan.edits[name].dropped(tok)[rows]
                alive = ((kept > 0) & any(m in modalities for m in ("tags", "geometry"))) | (
                    (tok.n_patches[rows] > 0) & ("image" in modalities) & (not rendered))
                y, sp = scan.raw[name][rows][alive], split_of[rows][alive]
                label_rows += [(name, tok.ids[i], split_of[i], float(v)) for i, v in zip(rows[alive], y, strict=True)]
                reason = _unusable(y, sp)
                notes[name] = {"tiles": len(rows), "emptied_by_masking": int((~alive).sum()),
                               **{f"{s}_tiles": int((sp == s).sum()) for s in ("train", "val", "test")},
                               "skipped": reason}
                if reason:
                    log.warning("evaluate: task %s skipped: %s", name, reason)
                else:
                    probed[name] = (task, rows[alive], y, sp)
            timing["loading"] = round(time.perf_counter() - clock, 2)
            clock = time.perf_counter()
            emb = _embed_region(tok, scan, {name: p[1] for name, p in probed.items()}, encoder, context, untrained,
                                modalities, section, device, spill, vocab.vectors, pool, rendered)
            timing["embedding"] = round(time.perf_counter() - clock, 2)
            del vocab
            release()
            clock = time.perf_counter()
            peer_all, peer_tasks, peer_notes = _peers(paths, tok, probed, section)
            timing["peers"] = round(time.perf_counter() - clock, 2)
            n = tok.n
            keys, values = scan.pairs.keys, scan.pairs.values
            clock = time.perf_counter()
            probes = []
            for name, (task, rows, y, sp) in probed.items():
                tr = np.flatnonzero(sp == "train")
                masked = emb.tasks[name]
                feats = {"geojepa": masked["geojepa"], "geojepa_context": masked["geojepa_context"],
                         "untrained": masked["untrained"], "tagpool": masked["tagpool"],
                         "bag_of_tags": bag_of_tags_counts(scan.bag, rows, keys, values, tr, section.bag_features,
                                                           drop=scan.pairs.arrays()["defines"][tasks.index(task)]),
                         **peer_tasks.get(name, {})}
                jobs = [("masked", feats, True)]
                if section.unmasked:
                    jobs.append(("unmasked", {"geojepa": emb.tiles[rows], "geojepa_context": emb.context[rows],
                                              "tagpool": emb.tagpool[rows]}, False))
                probes.append(Probes(task, jobs, y, sp, tok.ids[rows]))
            results, predictions, timing["probes"] = _score(probes, section, settings, pool,
                                                               cache=work_dir / PROBE_CACHE)
            timing["probes_wall"] = round(time.perf_counter() - clock, 2)
            del probes

            # Retrieval over the unmasked tiles.
            clock = time.perf_counter()
            agreement = {}
            all_feats = {"geojepa": emb.tiles, "geojepa_context": emb.context, "untrained": emb.untrained,
                         "tagpool": emb.tagpool,
                         "bag_of_tags": bag_of_tags_counts(scan.bag, np.arange(n), keys, values,
                                                           np.flatnonzero(split_of == "train"), section.bag_features),
                         **peer_all}
            for name, x in all_feats.items():
                if n > 1:
                    _, nn_idx = topk_cosine(x, x, section.k, exclude=np.arange(n), device=device)
                    agreement[name] = neighbour_agreement(scan.hist, nn_idx)
            del all_feats
            timing["retrieval"] = round(time.perf_counter() - clock, 2)
            clock = time.perf_counter()
            pictures = _pictures(tmp, paths, tok, scan, meta, emb, spill, section, ckpt)
            release()
            timing["pictures"] = round(time.perf_counter() - clock, 2)
            clock = time.perf_counter()
            _write_embeddings(tmp / "embeddings.parquet", paths, tok, meta, emb, spill, f"geojepa:{ckpt.name}")
            spill.unlink()
            write_table(pa.table({"task": [r[0] for r in label_rows], "tile_id": [r[1] for r in label_rows],
                                  "split": [r[2] for r in label_rows], "label": [float(r[3]) for r in label_rows]},
                                 schema=TASK_LABELS.schema), tmp / "task_labels.parquet", TASK_LABELS)
            write_table(pa.Table.from_pylist(results, EVAL_RESULTS.schema), tmp / "results.parquet", EVAL_RESULTS)
            write_table(predictions, tmp / "predictions.parquet", PREDICTIONS)
            timing["writing"] = round(time.perf_counter() - clock, 2)
            summary = {"checkpoint": str(ckpt), "region": w.name, "seen_in_training": seen, "role": role,
                       "tokenizer_digest": region_digest, "masked_images": "left out (rendered from the tags)"
                       if rendered else ("kept (real imagery)" if "image" in modalities else None), "tiles": n, "entities": int(tok.ent_off[-1]),
                       "tasks": notes, "peers": peer_notes, "agreement": agreement, "pictures": pictures,
                       "seconds": round(time.perf_counter() - t0, 1), "timing": timing}
            write_report(tmp / "report.md", results, summary, w.name)
            replace_folder(tmp, work_dir / EVAL_DIR)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        out = work_dir / EVAL_DIR
        run.metrics({_metric_name(r): r["mean"] for r in results if r["mean"] is not None})
        run.metrics({_metric_name(r) + "_std": r["std"] for r in results if r["std"] is not None})
        run.metrics({f"retrieval.agreement.{m}": v for m, v in agreement.items()})
        run.metrics({f"peers.{p}.{k}": v for p, st in peer_notes.get("fitted", {}).items() for k, v in st.items()})
        run.metrics({f"seconds.{k}": v for k, v in _flat_timing(timing).items()})
        for f in ("report.md", "results.parquet", "predictions.parquet", "task_labels.parquet", *pictures.values()):
            run.artifact(out / f, "eval")
        run.dict(summary, "eval_summary.json")
    log.info("evaluate: %s written in %.1fs (%s); report %s", out, summary["seconds"],
             ", ".join(f"{k} {v:g}s" for k, v in _flat_timing(timing).items()), out / "report.md")
    return life.publish([EVAL_DIR], summary)


def _peers(paths: dict, tok, probed: dict, section) -> tuple[dict, dict, dict]:
    """SRAI's embedders on this region (``geojepa.evaluate.peers``): every tile's vectors (unmasked, for
    retrieval), each probed task's tiles' vectors with its label-defining tags removed, and what the report
    says of them (each peer's width, fit and embedding seconds, peak memory; or why they were skipped)."""
    if not section.peers:
        log.info("evaluate: SRAI peers skipped: none asked (evaluate.peers is empty)")
        return {}, {}, {"skipped": "none asked (evaluate.peers is empty)"}
    if why := peers.missing():
        log.warning("evaluate: SRAI peers skipped: %s", why)
        return {}, {}, {"skipped": why}
    if not (tok.split == "train").any():
        log.warning("evaluate: SRAI peers skipped: no training tiles to fit them on")
        return {}, {}, {"skipped": "no training tiles to fit them on"}
    region = peers.load_region(paths["tiles"], paths["tile_entities"], tok.ids, tok.split.astype(str),
                               section.peer_features)
    with _torch_threads(_workers()):
        fitted = peers.fit(region, tuple(section.peers), section.peer_epochs, section.seed)
        every = fitted.embed(region)
        per_task, groups = {}, {}
        for name, (task, rows, _, _) in probed.items():  # tasks removing the same tags share one embedding
            groups.setdefault(task.defines, []).append((name, rows))
        for defines, members in groups.items():
            union = np.unique(np.concatenate([rows for _, rows in members]))
            vecs = fitted.embed(region.masked(defines), tok.ids[union].tolist())
            for name, rows in members:
                at = np.searchsorted(union, rows)
                per_task[name] = {p: x[at] for p, x in vecs.items()}
    notes = {"srai": peers.version(), "features": len(region.pairs), "feature_cap": section.peer_features, "fitted_on_tiles": len(region.train),
             "fitted": {p: {"dim": st.dim, "fit_seconds": round(st.fit_s, 2),
                            "embed_seconds": round(st.transform_s, 2), "peak_mb": round(st.peak_mb, 1)}
                        for p, st in fitted.stats.items()}}
    return every, per_task, notes


def _rendered(tile_images: Path) -> bool:
    """Whether the region's tile images were rendered from its own map data (``tile --imagery render``)."""
    sources = pq.read_table(tile_images, columns=["source"])["source"]
    return bool(pc.any(pc.starts_with(sources, "render")).as_py())


def _flat_timing(timing: dict) -> dict[str, float]:
    out = {}
    for k, v in timing.items():
        out.update({f"{k}.{t}": s for t, s in v.items()} if isinstance(v, dict) else {k: v})
    return out


def _metric_name(r: dict) -> str:
    """Stable MLflow names, e.g. masked.building_count.geojepa.mlp.mae."""
    return f"{r['setting']}.{r['task']}.{r['model']}.{r['probe']}.{r['metric']}"


def _unusable(y: np.ndarray, sp: np.ndarray) -> str | None:
    for s in ("train", "val", "test"):
        if (sp == s).sum() < 2:
            return f"{(sp == s).sum()} {s} tiles (need 2)"
    if np.all(y[sp == "train"] == y[sp == "train"][0]):
        return f"every training label is {y[sp == 'train'][0]:g}"
    return None


@dataclass
class _Embedded:
    tiles: np.ndarray  # (tiles, 2 x width), the trained (EMA target) encoder, unmasked
    context: np.ndarray  # the trained context encoder
    untrained: np.ndarray
    tagpool: np.ndarray  # (tiles, tag_dim)
    tasks: dict[str, dict[str, np.ndarray]]  # probed task -> geojepa | geojepa_context | untrained | tagpool
    entity_mean: np.ndarray  # of the entity embeddings (in the spill file), and their first 3 principal axes
    entity_axes: np.ndarray


def check_widths(dims: dict[str, int], modalities: tuple[str, ...], encoder, paths: dict) -> None:
    for i, m in enumerate(("tags", "geometry", "image")):
        want = getattr(encoder.proj[i], "in_features", 0)
        if m in modalities and want != dims[m]:
            raise GeoJepaError(f"{paths['checkpoint']}: the encoder takes {m} tokens of width {want}, the shards in "
                               f"{paths['tokens']} hold width {dims[m]}; evaluate with the tokens it was trained on")


def _vocab(path: Path) -> Vocab:
    v = read_table(path, TAG_VOCAB)
    col = v["embedding"].combine_chunks()
    offs = col.offsets.to_numpy()
    values = col.values.to_numpy()[offs[0] : offs[-1]] if len(offs) else np.zeros(0, np.float32)
    return Vocab(v["key"].to_pylist(), v["value"].to_pylist(),
                 np.array(values, np.float32).reshape(v.num_rows, -1) if v.num_rows else np.zeros((0, 1), np.float32))


def _task_rows(task, raw: np.ndarray, tok, section) -> np.ndarray:
    """The task's tiles (token order) after the zero-label subsampling."""
    have = np.flatnonzero(~np.isnan(raw))
    kept = subsample(task, dict(zip(tok.ids[have].tolist(), raw[have].tolist(), strict=True)),
                     section.zero_keep_ratio, section.seed)
    return np.array([i for i in have if tok.ids[i] in kept], np.int64)


def _embed_region(tok, scan, task_rows: dict[str, np.ndarray], encoder, context, untrained, modalities, section,
                  device, spill: Path, vectors: np.ndarray, pool: ThreadPoolExecutor, drop_masked_images: bool = False
                  ) -> _Embedded:
    """One pass over the token shards, ``embed_batch_tiles`` tiles at a time: the tiles' embeddings by the three
    encoders (target, context, untrained; side by side on ``pool``) and their TagPool vectors; each probed task's
    tiles (``task_rows``) in the batch masked with its edits (and without image tokens when
    ``drop_masked_images``) and embedded (a tile the masking leaves unchanged reuses its unmasked vectors); the
    target encoder's entity embeddings appended to ``spill`` (float32, token order) with the sums their
    principal axes need. Image tokens are read only when the model takes them."""
    width, n = encoder.width, tok.n
    have = tuple(m for m in ("tags", "geometry", "image") if tok.dims[m] and (m == "tags" or m in modalities))
    tag_dim = tok.dims["tags"] or 1
    tiles, ctx, untr = (np.zeros((n, 2 * width), np.float32) for _ in range(3))
    pooled = np.zeros((n, tag_dim), np.float32)
    where, feats = {}, {}
    for name, rows in task_rows.items():
        where[name] = np.full(n, -1, np.int64)
        where[name][rows] = np.arange(len(rows))
        feats[name] = {**{m: np.zeros((len(rows), 2 * width), np.float32)
                          for m in ("geojepa", "geojepa_context", "untrained")},
                       "tagpool": np.zeros((len(rows), tag_dim), np.float32)}
    groups: dict = {}
    for name in task_rows:
        groups.setdefault(scan.tasks[name].defines, []).append(name)
    groups = list(groups.values())
    s1, s2, count = np.zeros(width), np.zeros((width, width)), 0

    def emb(enc, its):
        return embed(enc, its, modalities, section.embed_batch_tiles, device=device)

    def all_three(its):
        """(target, context, untrained) tile embeddings and the target encoder's entity embeddings, side by side."""
        runs = [pool.submit(emb, e, its) for e in (encoder, context, untrained)]
        (t, ents), (c, _), (u, _) = (r.result() for r in runs)
        return t, c, u, ents

    with open(spill, "wb") as out:
        for r, items in token_batches(tok, have, section.embed_batch_tiles):
            tiles[r], ctx[r], untr[r], ents = all_three(items)
            flat = np.concatenate(ents) if ents else np.zeros((0, width), np.float32)
            out.write(np.ascontiguousarray(flat, np.float32).tobytes())
            f64 = flat.astype(np.float64)
            s1 += f64.sum(0)
            s2 += f64.T @ f64
            count += len(flat)
            if tok.dims["tags"]:
                pooled[r] = tag_pool(items)
            for names in groups:  # tasks masking the same tags share their masked tiles' vectors
                at = np.stack([where[name][r] for name in names])
                wanted = np.flatnonzero((at >= 0).any(0))
                if not len(wanted):
                    continue
                ed = scan.edits[names[0]].range(tok.ent_off[r[0]], tok.ent_off[r[-1] + 1])
                new_vectors = kept_tag_vectors(vectors, ed.ptr, ed.rows) if "tags" in have else None
                owner, local = tok.owner(ed.pos)
                bounds = np.searchsorted(owner, r, side="left").tolist() + [len(owner)]
                vec = {"geojepa": tiles[r[wanted]], "geojepa_context": ctx[r[wanted]], "untrained": untr[r[wanted]],
                       "tagpool": pooled[r[wanted]]}
                changed, masked = [], []
                for w, k in enumerate(wanted):
                    a, b = bounds[k : k + 2]
                    if a < b or drop_masked_images:  # else unchanged by the masking: the unmasked vectors
                        changed.append(w)
                        it = mask_item(items[k], local[a:b], ed.keep[a:b],
                                       None if new_vectors is None else new_vectors[a:b])
                        masked.append(without_images(it) if drop_masked_images else it)
                if masked:
                    vec["geojepa"][changed], vec["geojepa_context"][changed], vec["untrained"][changed], _ = (
                        all_three(masked))
                    if tok.dims["tags"]:
                        vec["tagpool"][changed] = tag_pool(masked)
                for name, at_task in zip(names, at, strict=True):
                    sel = at_task[wanted] >= 0
                    for key, v in vec.items():
                        feats[name][key][at_task[wanted][sel]] = v[sel]
            release()
    mean = s1 / max(count, 1)
    cov = s2 / max(count, 1) - np.outer(mean, mean)
    axes = np.linalg.eigh(cov)[1][:, ::-1][:, :3] if count else np.zeros((width, 3))
    return _Embedded(tiles, ctx, untr, pooled, feats, mean, axes)


_INIT = threading.Lock()


@dataclass
class Probes:
    """One task's probe work: ``jobs`` = [(setting, {model: features}, with Dummy)], labels, splits, tile ids."""

    task: object
    jobs: list
    y: np.ndarray
    sp: np.ndarray
    ids: np.ndarray

    def split(self, s: str) -> np.ndarray:
        return np.flatnonzero(self.sp == s)


BASELINES = ("tagpool", "bag_of_tags", *PEERS)  # features that do not depend on the model: their probes are cached
PROBE_CACHE = ".probe-cache"  # in W: the baselines' probe predictions, content-addressed


PROBE_CODE = 1  # bump when fit_predict_seeds changes what it predicts: cached baseline probes are then ignored


def _cache_key(kind: str, x: np.ndarray, y: np.ndarray, sp: np.ndarray, seed: int, settings) -> str:
    """A probe's predictions depend on exactly these: the features, labels and splits (bytes), the seed and
    the settings (and the code: ``PROBE_CODE``)."""
    h = hashlib.sha256(f"{PROBE_CODE}/{torch.__version__}/{kind}/{seed}/{settings}/{x.shape}".encode())
    for a in (x, y.astype(np.float64), sp.astype(str).astype("U8")):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]


def _cached(path: Path, rows: int) -> np.ndarray | None:
    """A cached probe's predictions, or None (a miss: absent, unreadable or of another length)."""
    try:
        p = np.load(path)
    except (OSError, ValueError):
        return None
    return p if p.shape == (rows,) else None


def _score(probes: list[Probes], section, settings, pool: ThreadPoolExecutor, cache: Path | None = None
           ) -> tuple[list[dict], pa.Table, dict]:
    """Every task's result rows (test metrics, with the validation metric beside), in the order the one-probe
    loop wrote them, every probe's val and test predictions per seed (``PREDICTIONS``), and each task's probe
    time in seconds of a core. Each (task, setting, probe kind, feature width) is one stacked fit over its feature
    sets and seeds (the features standardised once, for both kinds); the fits of every task run side by side
    on ``pool``, largest first, the largest split by seeds into one fit per thread (members are independent:
    the same results) so no thread waits alone at the end.

    The baselines' probes (``BASELINES``: their features are the region's, whatever the model) are kept in
    ``cache`` (a folder), content-addressed (``_cache_key``), so evaluating another model on the same region
    fits only the model's own probes; a cached probe gives the predictions its fit gave."""
    seeds = list(range(section.seed, section.seed + section.seeds))
    fits, std, preds, keys = [], {}, {}, {}
    for t, pr in enumerate(probes):
        tr = pr.split("train")
        for setting, feats, _ in pr.jobs:
            groups: dict[int, list[str]] = {}
            for model, x in feats.items():
                std[t, setting, model] = standardise(x, tr)
                groups.setdefault(x.shape[1], []).append(model)
                if cache is None or model not in BASELINES:
                    continue
                scored = len(pr.split("val")) + len(pr.split("test"))
                for probe, seed in itertools.product(section.probes, seeds):
                    keys[t, setting, model, probe, seed] = key = _cache_key(probe, x, pr.y, pr.sp, seed, settings)
                    if (hit := _cached(cache / f"{key}.npy", scored)) is not None:
                        preds[t, setting, model, probe, seed] = hit
            for probe in section.probes:
                for dim, models in groups.items():
                    models = [m for m in models if not all((t, setting, m, probe, s) in preds for s in seeds)]
                    if not models:
                        continue
                    cost = len(tr) * dim * len(models) * (section.hidden if probe == "mlp" else 1)
                    fits.append([cost, t, setting, probe, tuple(models), seeds])
    total, workers = sum(f[0] for f in fits), _workers()
    parts = []
    for f in fits:
        n = min(workers, len(seeds)) if workers > 1 and f[0] > total / (2 * workers) else 1
        chunks = np.array_split(np.array(seeds), n)
        parts += [[f[0] * len(c) / len(seeds), *f[1:5], c.tolist()] for c in chunks]
    parts.sort(key=lambda f: -f[0])
    seconds, lock = np.zeros(len(probes)), threading.Lock()

    def fit(f):
        t0 = time.perf_counter()
        _, t, setting, probe, models, chunk = f
        pr = probes[t]
        scored = np.concatenate([pr.split("val"), pr.split("test")])  # val rows first
        p = fit_predict_seeds(probe, [std[t, setting, m] for m in models], pr.y, pr.split("train"), pr.split("val"),
                              scored, chunk, settings, init_lock=_INIT)
        with lock:
            for m, pm in zip(models, p, strict=True):
                for seed, ps in zip(chunk, pm, strict=True):
                    preds[t, setting, m, probe, seed] = ps
                    if (t, setting, m, probe, seed) in keys:
                        cache.mkdir(parents=True, exist_ok=True)
                        with atomic_path(cache / f"{keys[t, setting, m, probe, seed]}.npy") as tmp:
                            with open(tmp, "wb") as out:
                                np.save(out, ps)
            seconds[t] += time.perf_counter() - t0
        release()  # each thread's heap keeps the fit's freed tensors otherwise

    list(pool.map(fit, parts))

    rows, out = [], {f.name: [] for f in PREDICTIONS.schema}
    for t, pr in enumerate(probes):
        task, y = pr.task, pr.y
        tr, va, te = pr.split("train"), pr.split("val"), pr.split("test")
        scored = np.concatenate([va, te])

        def add(setting, model, probe, p, task=task, y=y, tr=tr, va=va, te=te, scored=scored, ids=pr.ids):
            """Result rows and prediction rows of one probe; ``p`` (seeds, val + test rows)."""
            runs = [metrics(task.kind, y[te], ps[len(va):]) for ps in p]
            val = [metrics(task.kind, y[va], ps[: len(va)]) for ps in p]
            for metric in runs[0]:
                vals = [r[metric] for r in runs if r[metric] is not None]
                vv = [r[metric] for r in val if r[metric] is not None]
                rows.append({"setting": setting, "task": task.name, "model": model, "probe": probe, "metric": metric,
                             "mean": float(np.mean(vals)) if vals else None,
                             "std": float(np.std(vals)) if vals else None, "seeds": len(runs),
                             "n_train": len(tr), "n_test": len(te), "val_mean": float(np.mean(vv)) if vv else None})
            k = len(scored)
            for col, v in (("setting", [setting] * k), ("task", [task.name] * k), ("model", [model] * k),
                           ("probe", [probe] * k), ("split", ["val"] * len(va) + ["test"] * len(te)),
                           ("tile_id", ids[scored].tolist()), ("label", y[scored].tolist()),
                           ("pred", np.asarray(p, np.float32).T.tolist())):
                out[col] += v

        t0 = time.perf_counter()
        for setting, feats, dummy in pr.jobs:
            if dummy:
                add(setting, "dummy", "median", [np.full(len(scored), np.median(y[tr]))])
            for model, x in feats.items():
                for probe in section.probes:
                    add(setting, model, probe, [preds[t, setting, model, probe, seed] for seed in seeds])
                knn = knn_regression_mae(x, y, tr, te, min(section.k, len(tr)))
                rows.append({"setting": setting, "task": task.name, "model": model, "probe": "knn", "metric": "mae",
                             "mean": knn, "std": 0.0, "seeds": 1, "n_train": len(tr), "n_test": len(te),
                             "val_mean": None})
        seconds[t] += time.perf_counter() - t0
        log.info("evaluate: %s probed (%d tiles; %.1f s of a core)", task.name, len(y), seconds[t])
    return (rows, pa.table(out, schema=PREDICTIONS.schema),
            {pr.task.name: round(float(seconds[t]), 2) for t, pr in enumerate(probes)})




def _workers() -> int:
    """The cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def _torch_threads(n: int):
    """Torch ops on ``n`` threads inside the block. The evaluation's matrices are small: its parallelism is
    separate work on separate threads (``_pool``), each op on one thread; two threads per op contend with
    each other and with the other threads (about 10 x slower on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pool() -> ThreadPoolExecutor:
    """A thread per core, each running torch ops on one thread (the setting is per thread)."""
    return ThreadPoolExecutor(_workers(), initializer=torch.set_num_threads, initargs=(1,))


def _drawings(paths: dict, tok, tiles: list[int]) -> dict[int, dict]:
    """For a few tiles (indices): their entities' tile-coordinate geometries and tag classes in token order, and
    their image, read by one streaming filtered scan of each artifact (a few rows in memory at a time)."""
    ids = sorted({tok.ids[i] for i in tiles})
    te = _rows_of(paths["tile_entities"], TILE_ENTITIES, ids, ["tile_id", "entity_id", "tags", "geometry"])
    te = te.sort_by([("tile_id", "ascending"), ("entity_id", "ascending")])
    out = {i: {"geometries": [], "classes": [], "image": None} for i in tiles}
    by_id: dict[str, dict] = {tok.ids[i]: out[i] for i in tiles}
    for t, tags, g in zip(te["tile_id"].to_pylist(), te["tags"].to_pylist(), te["geometry"].to_pylist(),
                          strict=True):
        by_id[t]["geometries"].append(g)
        by_id[t]["classes"].append(class_of(tags))
    images = _rows_of(paths["tile_images"], TILE_IMAGES, ids, TILE_IMAGES.schema.names)
    for r in images.to_pylist():
        if r["pixels"] is not None:
            by_id[r["tile_id"]]["image"] = np.frombuffer(r["pixels"], np.uint8).reshape(r["height"], r["width"],
                                                                                       len(r["bands"]))
    return out


def _rows_of(path: Path, contract, ids: list[str], columns: list[str]) -> pa.Table:
    """The rows of these tiles, scanned a small batch at a time without read-ahead."""
    import pyarrow.dataset as ds

    open_artifact(path, contract)
    scan = ds.dataset(path, format="parquet").scanner(columns=columns, filter=pc.field("tile_id").isin(ids),
                                                      batch_size=64, batch_readahead=0, fragment_readahead=0)
    return pa.Table.from_batches(list(scan.to_batches()), schema=scan.projected_schema)


def _spill_chunks(spill: Path, width: int, rows: int = 1 << 16):
    """(first row, rows) of the spilled entity embeddings, a chunk at a time (one buffer, reused)."""
    buf = np.empty((rows, width), np.float32)
    with open(spill, "rb") as f:
        start = 0
        while n := f.readinto(memoryview(buf).cast("B")) // (4 * width):
            yield start, buf[:n]
            start += n


def _spill_rows(spill: Path, width: int, at: np.ndarray) -> np.ndarray:
    if not len(at):
        return np.zeros((0, width), np.float32)
    m = np.memmap(spill, np.float32, "r", shape=(os.path.getsize(spill) // (4 * width), width))
    try:
        return np.array(m[at])
    finally:
        del m


def _pictures(out: Path, paths: dict, tok, scan, meta: pa.Table, emb: _Embedded, spill: Path, section,
              ckpt: Path) -> dict[str, str]:
    """Galleries, the embedding map, the PCA region map and training curves; returns name -> file."""
    made = {}
    rng = np.random.default_rng(section.seed)
    ids, n, width = tok.ids, tok.n, emb.entity_mean.shape[0]
    n_flat = int(tok.ent_off[-1])
    if section.gallery_queries and n > 1:
        queries = rng.choice(n, min(section.gallery_queries, n), replace=False)
        sims, nn = topk_cosine(emb.tiles[queries], emb.tiles, section.gallery_k, exclude=queries)
        entity_rows = None
        if n_flat > section.gallery_k + 1:
            qs = rng.choice(n_flat, min(section.gallery_queries, n_flat), replace=False)
            e_sims, e_nn = topk_cosine_chunks(_spill_rows(spill, width, qs), _spill_chunks(spill, width),
                                              section.gallery_k * 4, exclude=qs)
            entity_rows = (qs, e_sims, e_nn)
        need = [*queries.tolist(), *nn.ravel().tolist()]
        if entity_rows is not None:
            need += tok.owner(np.concatenate([qs, e_nn.ravel()]))[0].tolist()
        draw = _drawings(paths, tok, need)

        def cell(i, highlight=None):
            return {**draw[int(i)], "highlight": highlight}

        rows = [[(ids[q], 1.0, cell(q))] + [(ids[j], s, cell(j)) for s, j in zip(ss, jj, strict=True)]
                for q, ss, jj in zip(queries, sims, nn, strict=True)]
        figures.gallery(out / "gallery_tiles.png", out / "gallery_tiles.html", "nearest tiles (cosine)", rows)
        made |= {"gallery_tiles": "gallery_tiles.png", "gallery_tiles_html": "gallery_tiles.html"}
        if entity_rows is not None:
            flat = np.unique(np.concatenate([qs, e_nn.ravel()]))
            owner, local = tok.owner(flat)
            at = {int(f): (int(o), int(lo), tok.entity_ids[int(f)].as_py()) for f, o, lo in zip(flat, owner, local,
                                                                                                 strict=True)}
            rows = []
            for q, ss, jj in zip(qs, e_sims, e_nn, strict=True):
                oq, lq, eq = at[int(q)]
                picked = [(s, at[int(j)]) for s, j in zip(ss, jj, strict=True) if at[int(j)][2] != eq]
                rows.append([(eq, 1.0, cell(oq, lq))] + [(e, s, cell(o, lo)) for s, (o, lo, e) in
                                                          picked[: section.gallery_k]])
            figures.gallery(out / "gallery_entities.png", out / "gallery_entities.html",
                            "nearest entities (cosine; the entity in colour, its tile grey)", rows)
            made |= {"gallery_entities": "gallery_entities.png", "gallery_entities_html": "gallery_entities.html"}
    if n >= 3:
        method = figures.embedding_map(emb.tiles, np.log1p(scan.buildings), "log(1 + buildings)",
                                       out / "embedding_map.png", section.map, section.seed)
        made[f"embedding_map_{method}"] = "embedding_map.png"
        figures.region_map(meta["geometry"].to_numpy(zero_copy_only=False), emb.tiles, out / "region_pca.png",
                           "tiles coloured by the first 3 principal components of their embedding")
        made["region_pca"] = "region_pca.png"
    history = ckpt.parent / "history.json"
    if history.exists() and figures.training_curves(json.loads(history.read_text()), out / "training_curves.png"):
        made["training_curves"] = "training_curves.png"
    return made


def _vectors(x: np.ndarray) -> pa.Array:
    offsets = np.arange(len(x) + 1, dtype=np.int64) * x.shape[1]
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(x.astype(np.float32).ravel()))


def _write_embeddings(path: Path, paths: dict, tok, meta: pa.Table, emb: _Embedded, spill: Path, model: str) -> None:
    """Tile rows (footprints), then each entity piece's row, a ``tile_entities`` shard at a time: its embedding
    (from the spill file), and its own geometry, the piece in its tile, in EPSG:4326."""
    width = emb.entity_mean.shape[0]
    n = tok.n
    with ArtifactWriter(path, EMBEDDINGS) as out:
        out.write(pa.table({
            "level": pa.array(["tile"] * n, pa.string()), "tile_id": pa.array(list(tok.ids), pa.string()),
            "entity_id": pa.nulls(n, pa.string()), "split": pa.array(list(tok.split), pa.string()),
            "embedding": _vectors(emb.tiles), "pc": _pcs(figures.pca(emb.tiles, 3)), "model": pa.array([model] * n),
            "geometry": meta["geometry"].combine_chunks(), "bbox": meta["bbox"].combine_chunks()}))
        for t, tiles, pos in entity_batches(paths["tile_entities"], TILE_ENTITIES, ["geometry"], tok):
            x = _spill_rows(spill, width, pos)
            geometry, bbox = pieces_lonlat(t["geometry"].combine_chunks(), tiles, meta)
            out.write(pa.table({
                "level": pa.array(["entity"] * len(pos), pa.string()), "tile_id": t["tile_id"],
                "entity_id": t["entity_id"], "split": pa.array(tok.split[tiles].tolist(), pa.string()),
                "embedding": _vectors(x), "pc": _pcs((x - emb.entity_mean) @ emb.entity_axes),
                "model": pa.array([model] * len(pos)), "geometry": geometry, "bbox": bbox}))


def _pcs(x: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(x, np.float32).ravel()), 3)
