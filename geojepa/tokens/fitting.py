"""What a tokenizer is fitted from, for one region (the tokens stage) or a corpus (``geojepa tokenizer fit``):
the tag vocabulary's text vectors (``build_vocab``) and the frozen shape encoder (``train_geometry_encoder``,
``load_geometry_encoder``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_contracts import TAG_VOCAB, atomic_path, read_table, write_table
from geojepa import manifest
from geojepa.config import TokensConfig
from geojepa.errors import GeoJepaError
from geojepa.tokens import geometry as G
from geojepa.tokens.text import batches, open_embedder
from geojepa.tokens.vocab import Vocab, entry_text, wanted_entries

log = logging.getLogger(__name__)


def build_vocab(path: Path, tag_lists: list, cfg: TokensConfig, run=None) -> tuple[Vocab, int]:
    """Load the vocabulary at ``path`` and embed the entries these tags need that it lacks.

    Progress is saved after every request, so an interrupted run resumes where it stopped.
    Returns the vocabulary and how many texts were embedded now.
    """
    keys: list[str] = []
    values: list[str | None] = []
    vectors = np.zeros((0, 0), np.float32)
    model = None
    if path.exists():
        t = read_table(path, TAG_VOCAB)
        keys, values = t["key"].to_pylist(), t["value"].to_pylist()
        vectors = np.asarray(t["embedding"].to_pylist(), dtype=np.float32) if t.num_rows else vectors
        models = set(t["model"].to_pylist())
        model = models.pop() if len(models) == 1 else None
        if len(models) > 1:
            raise GeoJepaError(f"{path}: vocabulary mixes embedding models {sorted(models | {model})}")
    have = set(zip(keys, values, strict=True))
    missing = sorted(wanted_entries(tag_lists, cfg.max_values_per_key) - have, key=lambda e: (e[0], e[1] or ""))
    if not missing:
        return Vocab(keys, values, vectors), 0
    embedder = open_embedder(cfg.text_model)
    if model is not None and model != embedder.name:
        raise GeoJepaError(f"{path}: vocabulary was embedded with {model}, not {embedder.name}; "
                           f"use another --set tokens.vocab=PATH for this model")
    log.info("tokens: embedding %d new vocabulary entries with %s", len(missing), embedder.name)
    done = 0
    for chunk in batches(missing, embedder.batch_size):
        emb = embedder.embed([entry_text(k, v) for k, v in chunk])
        vectors = emb if not len(vectors) else np.vstack([vectors, emb])
        keys += [k for k, _ in chunk]
        values += [v for _, v in chunk]
        done += len(chunk)
        log.info("tokens: vocabulary %d/%d texts embedded", done, len(missing))
        write_table(pa.table({
            "key": pa.array(keys, pa.string()), "value": pa.array(values, pa.string()),
            "text": pa.array([entry_text(k, v) for k, v in zip(keys, values, strict=True)], pa.string()),
            "embedding": pa.array(list(vectors), pa.list_(pa.float32())),
            "model": pa.array([embedder.name] * len(keys), pa.string())}), path, TAG_VOCAB)
        if run:
            run.metrics({"vocab_embedded": done})
    return Vocab(keys, values, vectors), done


def load_geometry_encoder(path: Path, dim: int):
    """The frozen shape encoder at ``path`` (weights only: a checkpoint cannot run code when loaded)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        encoder = G.ShapeEncoder(state["dim"])
        encoder.load_state_dict(state["model"])
    except Exception as e:  # noqa: BLE001 (torch raises many kinds for a damaged file)
        raise GeoJepaError(f"{path}: damaged shape encoder checkpoint ({type(e).__name__}: {e}); "
                           "retrain it with --train-geometry") from None
    if state["dim"] != dim:
        raise GeoJepaError(f"{path}: encoder of width {state['dim']}, config asks {dim}; retrain with --train-geometry")
    return encoder.eval()


def train_geometry_encoder(path: Path, cfg: TokensConfig, geoms_m: np.ndarray, run) -> dict:
    """Train the shape encoder on (a sample of) ``geoms_m``, save it to ``path``; returns its quality report."""
    import torch

    rng = np.random.default_rng(cfg.seed)
    sample = geoms_m[rng.permutation(len(geoms_m))[: cfg.geometry_max_shapes]]
    t0 = time.perf_counter()
    encoder, stats, result = G.fit(sample, cfg.geometry_dim, cfg.geometry_epochs, cfg.seed)
    z = G.encode(encoder, sample[:2000])
    z0 = G.encode(G.ShapeEncoder(cfg.geometry_dim), sample[:2000])
    quality = {**G.neighbour_quality(z, sample[:2000]),
               "knn_descriptor_distance_untrained": G.neighbour_quality(z0, sample[:2000])["knn_descriptor_distance"]}
    report = {"geometry_val_loss": result.val_loss, "geometry_val_loss_untrained": result.val_loss_untrained,
              "geometry_train_seconds": time.perf_counter() - t0, "geometry_train_shapes": len(sample), **quality}
    with atomic_path(path) as tmp:
        torch.save({"dim": cfg.geometry_dim, "model": encoder.state_dict(), "descriptor_stats": stats,
                    "report": {k: float(v) for k, v in report.items()}}, tmp)
    if run:
        for epoch, train_loss, val_loss in result.curve:
            run.metrics({"geometry_train_loss": train_loss, "geometry_val_loss_curve": val_loss}, step=epoch)
        run.metrics(report)
    log.info("tokens: shape encoder trained on %d shapes: val loss %.4f vs %.4f untrained; %s", len(sample),
             result.val_loss, result.val_loss_untrained, quality)
    return report


def geometry_encoder(path: Path, cfg: TokensConfig, geoms_m: np.ndarray, train: bool, run) -> tuple:
    """Load the frozen shape encoder, or train it (when asked, or when there is none yet)."""
    report = None
    if train or not path.exists():
        report = train_geometry_encoder(path, cfg, geoms_m, run)
    return load_geometry_encoder(path, cfg.geometry_dim), manifest.file_sha256(path), report


def vocab_model(path: Path) -> str:
    t = read_table(path, TAG_VOCAB, columns=["model"]) if path.exists() else None
    return t["model"][0].as_py() if t is not None and t.num_rows else ""
