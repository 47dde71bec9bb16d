"""The evaluate stage: a checkpoint and the token shards -> ``W/eval/``.

1. Task datasets (``task_labels.parquet``): labels from the tiles' original
   entities, tiles following the tile split (no test tile touches a training tile).
2. Per task, the task tiles with the label-defining tags removed are embedded by
   the trained target encoder and by its untrained twin; TagPool and bag-of-tags
   vectors are built from the same masked tiles. Linear and MLP probes are trained
   on the train split with each seed, stopped on val, scored on test; Dummy
   predicts the training median. kNN regression scores the same splits.
3. Retrieval over the unmasked tiles: neighbours' tag-class agreement per model,
   galleries of tiles and entities (PNG + HTML).
4. ``embeddings.parquet`` (GeoParquet), the maps, training curves,
   ``results.parquet`` and ``report.md``; everything logged to MLflow.

The folder is written whole to a temporary sibling and swapped in at the end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_contracts import (EMBEDDINGS, ENTITIES, EVAL_RESULTS, TAG_VOCAB, TASK_LABELS, TILE_ENTITIES, TILE_IMAGES,
                            TILES, TOKENS, open_artifact, read_table, replace_folder, write_table)
from geojepa.config import Config
from geojepa.errors import GeoJepaError
from geojepa.evaluate import figures
from geojepa.evaluate.embed import bag_of_tags, embed, masked_items, tag_pool
from geojepa.evaluate.knn import class_histograms, class_of, knn_regression_mae, neighbour_agreement, topk_cosine
from geojepa.evaluate.labels import TASKS, task_labels
from geojepa.evaluate.probe import ProbeSettings, fit_predict, metrics
from geojepa.evaluate.report import write_report
from geojepa.lifecycle import Lifecycle
from geojepa.tokens.vocab import Vocab
from geojepa.train.data import TokenRows
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
    life = Lifecycle("evaluate", work_dir, cfg, inputs, section.model_dump(mode="json"),
                     ("geojepa.evaluate", "geojepa.model"), section="evaluate")
    if done := life.skipped(force):
        return done

    import torch

    from geojepa.model.jepa import encoder_from_checkpoint

    t0 = time.perf_counter()
    device = "cuda" if section.device == "cuda" or (section.device == "auto" and torch.cuda.is_available()) else "cpu"
    encoder, tcfg = encoder_from_checkpoint(ckpt)
    untrained, _ = encoder_from_checkpoint(ckpt, untrained=True, seed=section.seed)
    modalities = tuple(tcfg["modalities"])
    data = _load(paths, modalities, encoder)
    items, ids, split = data["items"], data["tile_ids"], data["split"]
    vocab = data["vocab"]
    settings = ProbeSettings(section.hidden, section.lr, section.weight_decay, section.max_epochs, section.patience,
                             section.batch)

    def emb(enc, its):
        return embed(enc, its, modalities, section.embed_batch_tiles, device=device)

    tmp = work_dir / f".{EVAL_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with life.run() as run:
        try:
            tiles_emb, entity_emb = emb(encoder, items)
            untrained_emb, _ = emb(untrained, items)
            label_rows, results, notes = [], [], {}
            ents = {t: list(zip(k, (dict(x) for x in tg), strict=True))
                    for t, k, tg in zip(ids, data["kinds"], data["tags"], strict=True)}
            for name in section.tasks:
                task = TASKS[name]
                labels = task_labels(task, ents, section.zero_keep_ratio, section.seed)
                idx = np.array([i for i, t in enumerate(ids) if t in labels], int)
                m_items, m_tags = masked_items([items[i] for i in idx], [data["tags"][i] for i in idx], task, vocab)
                alive = np.array([sum(len(it[m]) for m in modalities) > 0 for it in m_items], bool)
                label_rows += [(name, ids[i], split[i], labels[ids[i]]) for i in idx[alive]]
                y = np.array([labels[ids[i]] for i in idx], float)[alive]
                sp = np.array([split[i] for i in idx])[alive]
                m_items = [it for it, a in zip(m_items, alive, strict=True) if a]
                m_tags = [t for t, a in zip(m_tags, alive, strict=True) if a]
                reason = _unusable(y, sp)
                notes[name] = {"tiles": int(len(idx)), "emptied_by_masking": int((~alive).sum()),
                               **{f"{s}_tiles": int((sp == s).sum()) for s in ("train", "val", "test")},
                               "skipped": reason}
                if reason:
                    log.warning("evaluate: task %s skipped: %s", name, reason)
                    continue
                tr = np.flatnonzero(sp == "train")
                feats = {"geojepa": emb(encoder, m_items)[0], "untrained": emb(untrained, m_items)[0],
                         "tagpool": tag_pool(m_items), "bag_of_tags": bag_of_tags(m_tags, tr, section.bag_features)}
                results += _score("masked", task, feats, y, sp, section, settings)
                if section.unmasked:
                    keep = idx[alive]
                    results += _score("unmasked", task, {"geojepa": tiles_emb[keep],
                                                         "tagpool": tag_pool([items[i] for i in keep])},
                                      y, sp, section, settings, dummy=False)
                log.info("evaluate: %s done (%d tiles)", name, len(y))

            # Retrieval over the unmasked tiles.
            hist = class_histograms(data["tags"])
            n = len(items)
            agreement = {}
            all_feats = {"geojepa": tiles_emb, "untrained": untrained_emb, "tagpool": tag_pool(items),
                         "bag_of_tags": bag_of_tags(data["tags"], np.flatnonzero(split == "train"),
                                                    section.bag_features)}
            for model, x in all_feats.items():
                if n > 1:
                    _, nn_idx = topk_cosine(x, x, section.k, exclude=np.arange(n), device=device)
                    agreement[model] = neighbour_agreement(hist, nn_idx)
            pictures = _pictures(tmp, data, tiles_emb, entity_emb, section, ckpt)
            _write_embeddings(tmp / "embeddings.parquet", data, tiles_emb, entity_emb, f"geojepa:{ckpt.name}")
            write_table(pa.table({"task": [r[0] for r in label_rows], "tile_id": [r[1] for r in label_rows],
                                  "split": [r[2] for r in label_rows], "label": [float(r[3]) for r in label_rows]}),
                        tmp / "task_labels.parquet", TASK_LABELS)
            write_table(pa.Table.from_pylist(results, EVAL_RESULTS.schema), tmp / "results.parquet", EVAL_RESULTS)
            summary = {"checkpoint": str(ckpt), "region": w.name, "seen_in_training": seen, "role": role,
                       "tokenizer_digest": region_digest, "tiles": n, "entities": int(sum(len(e) for e in entity_emb)),
                       "tasks": notes, "agreement": agreement, "pictures": pictures,
                       "seconds": round(time.perf_counter() - t0, 1)}
            write_report(tmp / "report.md", results, summary, w.name)
            replace_folder(tmp, work_dir / EVAL_DIR)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        out = work_dir / EVAL_DIR
        run.metrics({_metric_name(r): r["mean"] for r in results if r["mean"] is not None})
        run.metrics({_metric_name(r) + "_std": r["std"] for r in results if r["std"] is not None})
        run.metrics({f"retrieval.agreement.{m}": v for m, v in agreement.items()})
        for f in ("report.md", "results.parquet", "task_labels.parquet", *pictures.values()):
            run.artifact(out / f, "eval")
        run.dict(summary, "eval_summary.json")
    log.info("evaluate: %s written in %.1fs; report %s", out, summary["seconds"], out / "report.md")
    return life.publish([EVAL_DIR], summary)


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


def _score(setting, task, feats, y, sp, section, settings, dummy=True) -> list[dict]:
    tr, va, te = (np.flatnonzero(sp == s) for s in ("train", "val", "test"))
    rows = []

    def add(model, probe, runs):
        for metric in runs[0]:
            vals = [r[metric] for r in runs if r[metric] is not None]
            rows.append({"setting": setting, "task": task.name, "model": model, "probe": probe, "metric": metric,
                         "mean": float(np.mean(vals)) if vals else None,
                         "std": float(np.std(vals)) if vals else None, "seeds": len(runs),
                         "n_train": len(tr), "n_test": len(te)})

    if dummy:
        add("dummy", "median", [metrics(task.kind, y[te], np.full(len(te), np.median(y[tr])))])
    for model, x in feats.items():
        for probe in section.probes:
            add(model, probe, [metrics(task.kind, y[te], fit_predict(probe, x[tr], y[tr], x[va], y[va], x[te],
                                                                     seed, settings))
                               for seed in range(section.seed, section.seed + section.seeds)])
        knn = knn_regression_mae(x, y, tr, te, min(section.k, len(tr)))
        rows.append({"setting": setting, "task": task.name, "model": model, "probe": "knn", "metric": "mae",
                     "mean": knn, "std": 0.0, "seeds": 1, "n_train": len(tr), "n_test": len(te)})
    return rows


def _load(paths: dict, modalities: tuple[str, ...], encoder) -> dict:
    """Token rows as items, with each tile's entities' tags, kinds, tile geometries, images and footprints."""
    tok = read_table(paths["tokens"], TOKENS)
    dims = WorkDir(Path(paths["tokens"]).parent).token_dims()
    for i, m in enumerate(("tags", "geometry", "image")):
        want = getattr(encoder.proj[i], "in_features", 0)
        if m in modalities and want != dims[m]:
            raise GeoJepaError(f"{paths['checkpoint']}: the encoder takes {m} tokens of width {want}, the shards in "
                               f"{paths['tokens']} hold width {dims[m]}; evaluate with the tokens it was trained on")
    have = tuple(m for m in ("tags", "geometry", "image") if dims[m])
    token_rows = TokenRows(tok, have)
    items = [token_rows.item(i) for i in range(tok.num_rows)]
    ids = tok["tile_id"].to_pylist()
    rows = tok.select(["tile_id", "entity_id", "split"]).to_pylist()
    te = read_table(paths["tile_entities"], TILE_ENTITIES, columns=["tile_id", "entity_id", "kind", "tags", "geometry"])
    te = te.filter(pc.is_in(te["tile_id"], pa.array(sorted(set(ids)), pa.string())))
    where = {(t, e): i for i, (t, e) in enumerate(zip(te["tile_id"].to_pylist(), te["entity_id"].to_pylist(),
                                                      strict=True))}
    te_tags, te_kind, te_geom = te["tags"].to_pylist(), te["kind"].to_pylist(), te["geometry"].to_pylist()
    tags, kinds, geoms = [], [], []
    for r in rows:
        at = [where[(r["tile_id"], e)] for e in r["entity_id"]]
        tags.append([list(te_tags[i]) for i in at])
        kinds.append([te_kind[i] for i in at])
        geoms.append([te_geom[i] for i in at])
    v = read_table(paths["tag_vocab"], TAG_VOCAB)
    vocab = Vocab(v["key"].to_pylist(), v["value"].to_pylist(), np.asarray(v["embedding"].to_pylist(), np.float32))
    tiles = read_table(paths["tiles"], TILES, columns=["tile_id", "geometry", "bbox"])
    pos = pc.index_in(pa.array(ids, pa.string()), tiles["tile_id"])
    return {"items": items, "tile_ids": ids, "split": np.array([r["split"] for r in rows]), "tags": tags,
            "kinds": kinds, "geometries": geoms, "entity_ids": [r["entity_id"] for r in rows], "vocab": vocab,
            "footprint": tiles["geometry"].take(pos), "footprint_bbox": tiles["bbox"].take(pos),
            "paths": paths}


def _image(paths: dict, tile_id: str) -> np.ndarray | None:
    t = read_table(paths["tile_images"], TILE_IMAGES, filters=pc.field("tile_id") == tile_id)
    if not t.num_rows or t["pixels"][0].as_py() is None:
        return None
    r = t.slice(0, 1).to_pylist()[0]
    return np.frombuffer(r["pixels"], np.uint8).reshape(r["height"], r["width"], len(r["bands"]))


def _pictures(out: Path, data: dict, tiles_emb, entity_emb, section, ckpt: Path) -> dict[str, str]:
    """Galleries, the embedding map, the PCA region map and training curves; returns name -> file."""
    made = {}
    rng = np.random.default_rng(section.seed)
    ids, n = data["tile_ids"], len(data["tile_ids"])
    classes = [[class_of(t) for t in tile] for tile in data["tags"]]
    if section.gallery_queries and n > 1:
        queries = rng.choice(n, min(section.gallery_queries, n), replace=False)
        sims, nn = topk_cosine(tiles_emb[queries], tiles_emb, section.gallery_k, exclude=queries)
        rows = [[(ids[q], 1.0, _tile_kwargs(data, q, classes))]
                + [(ids[j], s, _tile_kwargs(data, j, classes)) for s, j in zip(ss, jj, strict=True)]
                for q, ss, jj in zip(queries, sims, nn, strict=True)]
        figures.gallery(out / "gallery_tiles.png", out / "gallery_tiles.html", "nearest tiles (cosine)", rows)
        made |= {"gallery_tiles": "gallery_tiles.png", "gallery_tiles_html": "gallery_tiles.html"}
        owner = np.concatenate([np.full(len(e), i) for i, e in enumerate(entity_emb)])
        local = np.concatenate([np.arange(len(e)) for e in entity_emb])
        flat = np.concatenate(entity_emb)
        eid = [e for tile in data["entity_ids"] for e in tile]
        if len(flat) > section.gallery_k + 1:
            qs = rng.choice(len(flat), min(section.gallery_queries, len(flat)), replace=False)
            sims, nn = topk_cosine(flat[qs], flat, section.gallery_k * 4, exclude=qs)
            rows = []
            for q, ss, jj in zip(qs, sims, nn, strict=True):
                picked = [(s, j) for s, j in zip(ss, jj, strict=True) if eid[j] != eid[q]][: section.gallery_k]
                rows.append([(eid[q], 1.0, _tile_kwargs(data, owner[q], classes, local[q]))]
                            + [(eid[j], s, _tile_kwargs(data, owner[j], classes, local[j])) for s, j in picked])
            figures.gallery(out / "gallery_entities.png", out / "gallery_entities.html",
                            "nearest entities (cosine; the entity in colour, its tile grey)", rows)
            made |= {"gallery_entities": "gallery_entities.png", "gallery_entities_html": "gallery_entities.html"}
    colour = np.log1p([sum(t.get("building", "no") != "no" for t in map(dict, tile)) for tile in data["tags"]])
    if n >= 3:
        method = figures.embedding_map(tiles_emb, colour, "log(1 + buildings)", out / "embedding_map.png",
                                       section.map, section.seed)
        made[f"embedding_map_{method}"] = "embedding_map.png"
        figures.region_map(data["footprint"].to_pylist(), tiles_emb, out / "region_pca.png",
                           "tiles coloured by the first 3 principal components of their embedding")
        made["region_pca"] = "region_pca.png"
    history = ckpt.parent / "history.json"
    if history.exists() and figures.training_curves(json.loads(history.read_text()), out / "training_curves.png"):
        made["training_curves"] = "training_curves.png"
    return made


def _tile_kwargs(data: dict, i: int, classes, highlight: int | None = None) -> dict:
    return {"geometries": data["geometries"][i], "classes": classes[i], "image": _image(data["paths"], data["tile_ids"][i]),
            "highlight": highlight}


def _write_embeddings(path: Path, data: dict, tiles_emb: np.ndarray, entity_emb: list[np.ndarray], model: str) -> None:
    ids, n = data["tile_ids"], len(data["tile_ids"])
    flat = np.concatenate(entity_emb) if entity_emb else np.zeros((0, 1), np.float32)
    eids = [e for tile in data["entity_ids"] for e in tile]
    owner = np.concatenate([np.full(len(e), i) for i, e in enumerate(entity_emb)]).astype(int)
    ents = read_table(data["paths"]["entities"], ENTITIES, columns=["entity_id", "geometry", "bbox"])
    pos = pc.index_in(pa.array(eids, pa.string()), ents["entity_id"])
    pcs = np.concatenate([figures.pca(tiles_emb, 3), figures.pca(flat, 3) if len(flat) else np.zeros((0, 3))])

    def vectors(x: np.ndarray) -> pa.Array:
        offsets = np.arange(len(x) + 1, dtype=np.int32) * x.shape[1]
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(x.astype(np.float32).ravel()))

    table = pa.table({
        "level": ["tile"] * n + ["entity"] * len(eids), "tile_id": ids + [ids[i] for i in owner],
        "entity_id": [None] * n + eids, "split": list(data["split"]) + [data["split"][i] for i in owner],
        "embedding": pa.concat_arrays([vectors(tiles_emb), vectors(flat)]),
        "pc": pa.FixedSizeListArray.from_arrays(pa.array(pcs.astype(np.float32).ravel()), 3), "model": [model] * (n + len(eids)),
        "geometry": pa.concat_arrays([data["footprint"].combine_chunks(), ents["geometry"].take(pos).combine_chunks()]),
        "bbox": pa.concat_arrays([data["footprint_bbox"].combine_chunks(), ents["bbox"].take(pos).combine_chunks()]),
    })
    write_table(table, path, EMBEDDINGS)
