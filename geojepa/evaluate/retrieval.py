"""Retrieval over the unmasked tiles (each model's neighbours' tag-class agreement) and the evaluation's
pictures: galleries of nearest tiles and entities (PNG + HTML), the embedding map, the region in PCA colours
and the training curves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_contracts import TILE_ENTITIES, TILE_IMAGES, open_artifact
from geojepa.encoding.classes import class_of
from geojepa.encoding.neighbours import topk_cosine, topk_cosine_chunks
from geojepa.encoding.spill import Spill
from geojepa.evaluate import figures
from geojepa.workdir import CheckpointsDir, EvalDir


def agreement(feats: dict[str, np.ndarray], hist: np.ndarray, k: int, device: str = "cpu") -> dict[str, float]:
    """Per feature set: the mean tag-class histogram intersection between each tile and its ``k`` nearest tiles
    (cosine; 1: the same mix of buildings, roads, shops, ...)."""
    n = len(hist)
    out = {}
    for name, x in feats.items():
        if n > 1:
            _, nn = topk_cosine(x, x, k, exclude=np.arange(n), device=device)
            out[name] = neighbour_agreement(hist, nn)
    return out


def neighbour_agreement(hist: np.ndarray, idx: np.ndarray) -> float:
    """Mean histogram intersection (1: identical class mix) between each tile and its neighbours."""
    return float(np.minimum(hist[:, None, :], hist[idx]).sum(-1).mean())


def drawings(paths: dict, tok, tiles: list[int]) -> dict[int, dict]:
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


def pictures(out: EvalDir, paths: dict, tok, scan, meta: pa.Table, tiles: np.ndarray, spill: Spill, section,
             ckpt: Path) -> dict[str, str]:
    """Galleries of the target encoder's nearest tiles and entities, the embedding map, the PCA region map and
    training curves; returns name -> file name."""
    made = {}
    rng = np.random.default_rng(section.seed)
    ids, n = tok.ids, tok.n
    n_flat = int(tok.ent_off[-1])
    if section.gallery_queries and n > 1:
        queries = rng.choice(n, min(section.gallery_queries, n), replace=False)
        sims, nn = topk_cosine(tiles[queries], tiles, section.gallery_k, exclude=queries)
        entity_rows = None
        if n_flat > section.gallery_k + 1:
            qs = rng.choice(n_flat, min(section.gallery_queries, n_flat), replace=False)
            e_sims, e_nn = topk_cosine_chunks(spill.rows(qs), spill.chunks(),
                                              section.gallery_k * 4, exclude=qs)
            entity_rows = (qs, e_sims, e_nn)
        need = [*queries.tolist(), *nn.ravel().tolist()]
        if entity_rows is not None:
            need += tok.owner(np.concatenate([qs, e_nn.ravel()]))[0].tolist()
        draw = drawings(paths, tok, need)

        def cell(i, highlight=None):
            return {**draw[int(i)], "highlight": highlight}

        rows = [[(ids[q], 1.0, cell(q))] + [(ids[j], s, cell(j)) for s, j in zip(ss, jj, strict=True)]
                for q, ss, jj in zip(queries, sims, nn, strict=True)]
        figures.gallery(out.gallery_tiles, out.gallery_tiles_html, "nearest tiles (cosine)", rows)
        made |= {"gallery_tiles": out.gallery_tiles.name, "gallery_tiles_html": out.gallery_tiles_html.name}
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
            figures.gallery(out.gallery_entities, out.gallery_entities_html,
                            "nearest entities (cosine; the entity in colour, its tile grey)", rows)
            made |= {"gallery_entities": out.gallery_entities.name,
                     "gallery_entities_html": out.gallery_entities_html.name}
    if n >= 3:
        method = figures.embedding_map(tiles, np.log1p(scan.buildings), "log(1 + buildings)",
                                       out.embedding_map, section.map, section.seed)
        made[f"embedding_map_{method}"] = out.embedding_map.name
        figures.region_map(meta["geometry"].to_numpy(zero_copy_only=False), tiles, out.region_pca,
                           "tiles coloured by the first 3 principal components of their embedding")
        made["region_pca"] = out.region_pca.name
    history = CheckpointsDir(ckpt.parent).history
    if history.exists() and figures.training_curves(json.loads(history.read_text()), out.training_curves):
        made["training_curves"] = out.training_curves.name
    return made
