"""A corpus's token shards in a compact form that travels to a GPU host (whose transfer is capped at 64 MiB),
read by training directly, and the way back: a model trained on it exported as a standard checkpoint.

Token shards hold, per entity, a 384-wide tag vector (the sum of its tags' text embeddings), a 256-wide shape
vector and 8 position numbers, all fp32: about 2.6 KB an entity (659 MB of shards for the ten training
regions; their train and val splits compact to 18.0 MB, docs/stages.md). The compact form:

- tags: the distinct tag vectors once (the ten training regions' 438,570 entities have 27,098), as fp16
  coordinates on their top ``tag_dim`` principal axes, and an int32 row per entity;
- geometry: int8 coordinates on the top ``geometry_dim`` principal axes (a scale per axis);
- positions: fp16.

The principal axes (fp32, with the means) are stored too. A model trained on the compact form sees each
modality through ``x -> P (x - mean)`` before its first (linear) projection ``W``, so folding ``W P`` and
``b - W P mean`` into that projection gives a model that takes the full tokens and computes the same thing
(``export``), up to the rounding of the compact inputs (fp16 tags, int8 shapes) it was trained on: its
checkpoint is read here like any other (``geojepa evaluate --model``). The retained variance
of each modality is stored and printed; images are not supported (the corpus has none).

numpy, pyarrow and torch only (the GPU host has no pydantic, mlflow or prefect). One ``.npz`` file, written
atomically.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from data_contracts import TOKENS, ContractError, open_artifact
from geojepa.model.jepa import MODALITIES
from geojepa.train.settings import is_compact

log = logging.getLogger(__name__)
FORMAT = "geojepa-compact-tokens/1"
SPLITS = ("train", "val", "test")
ARRAYS = ("tile_region", "tile_split", "n_entities", "epos", "tag_row", "tag_coords", "geometry", "geometry_scale",
          "tag_axes", "tag_mean", "geometry_axes", "geometry_mean")


def _pca(x: np.ndarray, k: int, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """(axes k x d, mean d, retained variance share) of the rows of ``x`` (weighted)."""
    w = np.ones(len(x)) if weights is None else weights.astype(np.float64)
    mean = (x * w[:, None]).sum(0) / w.sum()
    xc = (x - mean) * np.sqrt(w / w.sum())[:, None]
    cov = xc.T @ xc
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1]
    k = min(k, x.shape[1])
    axes = vecs[:, order[:k]].T
    return axes.astype(np.float32), mean.astype(np.float32), float(vals[order[:k]].sum() / max(vals.sum(), 1e-30))


def build(folders: list[Path], out: Path, splits: tuple[str, ...] = ("train", "val"), tag_dim: int = 128,
          geometry_dim: int = 32, sample: int = 200_000, seed: int = 0, holdouts: list[str] = ()) -> dict:
    """Write the compact form of the ``splits`` of the regions' token folders (``W/tokens``) to ``out`` (.npz);
    returns its metadata (regions, tiles, sizes, retained variance). ``holdouts``: the names of the regions
    that are holdouts, recorded so that training refuses the file (it may still be built, e.g. to measure)."""
    if not is_compact(out):
        raise ContractError(f"{out}: the compact tokens file must end in .npz")
    bad = sorted(set(splits) - set(SPLITS))
    if bad:
        raise ContractError(f"splits {bad}: expected some of {list(SPLITS)}")
    names, tile_region, tile_split, n_ent, epos, tags, geom, digests = [], [], [], [], [], [], [], set()
    for r, folder in enumerate(folders):
        folder = Path(folder)
        files = sorted(f for s in splits for f in folder.glob(f"{s}-*.parquet"))
        if not files:
            raise ContractError(f"{folder}: no {'/'.join(splits)} token shards; run `geojepa tokens` first")
        meta = {}
        for f in files:
            open_artifact(f, TOKENS)
            meta = pq.read_schema(f).metadata
            if int(meta[b"image_dim"]):
                log.info("%s: image tokens left out (the compact form holds tags and geometry)", f)
            digests.add(meta.get(b"tokenizer_digest", b"").decode())
            t = pq.read_table(f, columns=["split", "entity_position", "tag", "geometry"])
            counts = np.diff(t["entity_position"].combine_chunks().offsets.to_numpy()) // 8
            n_ent.append(counts)
            tile_region.append(np.full(len(counts), r, np.int16))
            tile_split.append(np.array([SPLITS.index(s) for s in t["split"].to_pylist()], np.int8))
            for name, dest, width in (("entity_position", epos, 8), ("tag", tags, int(meta[b"tag_dim"])),
                                      ("geometry", geom, int(meta[b"geometry_dim"]))):
                dest.append(t[name].combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, width))
        names.append(folder.parent.name if folder.name == "tokens" else folder.name)
    if len(digests) > 1:
        raise ContractError(f"{[str(f) for f in folders]}: token shards of different tokenizers ({sorted(digests)})")
    tags_all, geom_all = np.concatenate(tags), np.concatenate(geom)
    # tags: the distinct vectors, their principal axes weighted by how many entities carry each
    vocab, rows, uses = np.unique(tags_all, axis=0, return_inverse=True, return_counts=True)
    tag_axes, tag_mean, tag_kept = _pca(vocab.astype(np.float64), tag_dim, uses)
    tag_coords = ((vocab - tag_mean) @ tag_axes.T).astype(np.float16)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(geom_all), size=min(sample, len(geom_all)), replace=False)
    geom_axes, geom_mean, geom_kept = _pca(geom_all[pick].astype(np.float64), geometry_dim)
    g = (geom_all - geom_mean) @ geom_axes.T
    scale = np.maximum(np.abs(g).max(0), 1e-12) / 127.0
    geom_q = np.clip(np.round(g / scale), -127, 127).astype(np.int8)
    meta = {"format": FORMAT, "regions": names, "holdouts": sorted(set(holdouts) & set(names)),
            "tiles": int(sum(len(n) for n in n_ent)), "splits": list(splits), "tokenizer_digest": digests.pop() or None,
            "dims": {"tags": int(tag_axes.shape[0]), "geometry": int(geom_axes.shape[0])},
            "full_dims": {"tags": int(tags_all.shape[1]), "geometry": int(geom_all.shape[1])},
            "retained_variance": {"tags": round(tag_kept, 4), "geometry": round(geom_kept, 4)},
            "entities": int(len(tags_all)), "distinct_tag_vectors": int(len(vocab))}
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8),
              "tile_region": np.concatenate(tile_region), "tile_split": np.concatenate(tile_split),
              "n_entities": np.concatenate(n_ent).astype(np.int32), "epos": np.concatenate(epos).astype(np.float16),
              "tag_row": rows.reshape(-1).astype(np.int32), "tag_coords": tag_coords, "geometry": geom_q,
              "geometry_scale": scale.astype(np.float32), "tag_axes": tag_axes, "tag_mean": tag_mean,
              "geometry_axes": geom_axes, "geometry_mean": geom_mean}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.npz")
    try:
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    meta["bytes"] = out.stat().st_size
    return meta


class Compact:
    """A compact tokens file, loaded (its arrays in memory; the file is at most tens of MB)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with np.load(self.path) as z:
                self.arrays = {k: z[k] for k in z.files}
            self.meta = json.loads(self.arrays.pop("meta").tobytes())
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise ContractError(f"{self.path}: not a readable compact tokens file ({type(e).__name__}: {e})") from None
        fmt = self.meta.get("format") if isinstance(self.meta, dict) else None
        if fmt != FORMAT:
            raise ContractError(f"{self.path}: format {fmt!r}, expected {FORMAT!r}")
        missing = sorted({"regions", "splits", "dims"} - set(self.meta) | set(ARRAYS) - set(self.arrays))
        if missing:
            raise ContractError(f"{self.path}: a compact tokens file without {', '.join(missing)} (damaged?)")
        self.regions: list[str] = self.meta["regions"]
        self.holdouts: list[str] = self.meta.get("holdouts", [])
        self.dims = {**self.meta["dims"], "image": 0}
        a = self.arrays
        self.tile_start = np.concatenate([[0], np.cumsum(a["n_entities"])]).astype(np.int64)

    def tiles(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.arrays["tile_split"] == SPLITS.index(split))

    def item(self, t: int, modalities: tuple[str, ...]) -> dict:
        a, lo, hi = self.arrays, self.tile_start[t], self.tile_start[t + 1]
        out = {"epos": a["epos"][lo:hi].astype(np.float32)}
        if "tags" in modalities:
            out["tags"] = a["tag_coords"][a["tag_row"][lo:hi]].astype(np.float32)
        if "geometry" in modalities:
            out["geometry"] = a["geometry"][lo:hi].astype(np.float32) * a["geometry_scale"]
        return out

    def maps(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """modality -> (axes k x d, mean d): the compact coordinates are ``axes @ (x - mean)``."""
        a = self.arrays
        return {"tags": (a["tag_axes"], a["tag_mean"]), "geometry": (a["geometry_axes"], a["geometry_mean"])}


class CompactDataset(torch.utils.data.Dataset):
    """One split of a compact tokens file, with ``ShardDataset``'s interface (``dims``, ``region``,
    ``lengths``; items are per-modality numpy arrays)."""

    def __init__(self, path: str | Path, split: str, modalities: tuple[str, ...]):
        if "image" in modalities:
            raise ContractError(f"{path}: the compact form holds no image tokens; drop 'image' from train.modalities")
        self.compact = c = path if isinstance(path, Compact) else Compact(path)
        self.modalities, self.dims = modalities, c.dims
        if split not in c.meta["splits"]:
            raise ContractError(f"{c.path}: holds the {c.meta['splits']} splits, not {split!r}")
        self.index = c.tiles(split)
        if not len(self.index) and split == "train":
            raise ContractError(f"{c.path}: the {split} split holds no tiles")
        self.region = c.arrays["tile_region"][self.index].astype(np.int64)
        n = c.arrays["n_entities"][self.index]
        self.lengths = n * sum(m in modalities for m in ("tags", "geometry"))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        return {"index": i, **self.compact.item(int(self.index[i]), self.modalities)}


def fold(weights: dict[str, torch.Tensor], maps: dict[str, tuple[np.ndarray, np.ndarray]],
         name: str = "the model") -> dict[str, torch.Tensor]:
    """The state dict of a model trained on compact coordinates, with each modality's input projection (in the
    context and the target encoder) taking the full tokens: ``W' = W P``, ``b' = b - W P mean``. A projection
    of another width than the compact coordinates' is a ValueError naming ``name``."""
    out = dict(weights)
    for prefix in ("encoder.", "target_encoder."):
        for modality, (axes, mean) in maps.items():
            i = MODALITIES[modality]
            w_key, b_key = f"{prefix}proj.{i}.weight", f"{prefix}proj.{i}.bias"
            if w_key not in weights:
                continue
            w, b = weights[w_key].double(), weights[b_key].double()
            if w.shape[1] != axes.shape[0]:
                raise ValueError(f"{name}: its {modality} projection takes {w.shape[1]} inputs, the compact "
                                 f"coordinates are {axes.shape[0]}: not a model trained on this compact file")
            p, mu = torch.from_numpy(axes).double(), torch.from_numpy(mean).double()
            folded = w @ p
            out[w_key] = folded.to(weights[w_key].dtype)
            out[b_key] = (b - folded @ mu).to(weights[b_key].dtype)
    return out


def export(checkpoint: str | Path, compact: str | Path | Compact, out: str | Path, half: bool = True) -> Path:
    """A checkpoint of a model trained on ``compact`` -> a checkpoint (``out``) that takes the full tokens: the
    context and target encoders folded (fp16 when ``half``), the predictor and optimiser left out, its config
    with the corpus's tokenizer digest. ``geojepa evaluate --model out`` reads it."""
    from geojepa.model.jepa import load_checkpoint

    c = compact if isinstance(compact, Compact) else Compact(compact)
    state = load_checkpoint(checkpoint)
    encoders = {k: v for k, v in state["model"].items() if k.startswith(("encoder.", "target_encoder."))}
    model = fold(encoders, c.maps(), str(checkpoint))
    if half:
        model = {k: v.half() if v.is_floating_point() else v for k, v in model.items()}
    config = {**state["config"], "tokenizer_digest": c.meta.get("tokenizer_digest"), "compact": str(c.path.name)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        torch.save({"step": state["step"], "epoch": state.get("epoch", 0), "model": model, "config": config}, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
