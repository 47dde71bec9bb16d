"""``geojepa info PATH``: what a folder of the pipeline holds, read from its artifacts (no model is built).

- a region ``W``: its name and role, extent (lon/lat), tiles per split, entities, which stages ran (and when),
  the tokenizer its tokens were made with, and its last evaluation's headline rows (ridge, masked setting);
- a tokenizer ``T``: its digest, the regions it was fitted on, vocabulary entries, widths;
- a model ``OUT``: its checkpoints with their steps, the training's size and last logged losses, the tokenizer
  digest, the regions it was trained on, the model card's title;
- the ``OUT`` of ``geojepa embed``: tiles and entities embedded, the embedding width;
- a checkpoint file (``.pt``, e.g. a model back from ``bench/gpu.sh``): its step, size, regions and tokenizer;
- a compact tokens file (``.npz``, ``geojepa compact``): its regions, holdouts, tiles, widths, retained variance.

``info`` returns a dict (``--json`` prints it); ``lines`` renders it as an aligned table.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from geojepa.errors import GeoJepaError
from geojepa.workdir import EmbeddingsDir, ModelDir, TokenizerDir, WorkDir, checkpoint_step

EXPECTED = ("a region's work directory (tiles.parquet, entities.parquet or tokens/), a tokenizer folder "
            "(tokenizer.json), a model folder (checkpoints/step-*.pt), the output of `geojepa embed` "
            "(tile_embeddings.parquet), a checkpoint file (.pt) or a compact tokens file (.npz)")
SIZES = ("width", "depth", "heads", "mlp", "pred_width", "pred_depth")  # a model's sizes, as shown


def kind(path: Path) -> str | None:
    if TokenizerDir(path).record_file.is_file():
        return "tokenizer"
    w = WorkDir(path)
    if any(p.exists() for p in (w.tiles, w.entities, w.tokens)):
        return "region"  # a region trained alone holds its model too: shown under "model"
    if ModelDir(path).checkpoints():
        return "model"
    if EmbeddingsDir(path).tile_embeddings.is_file():
        return "embeddings"
    return None


def info(path: Path | str) -> dict:
    path = Path(path)
    if path.is_file() and path.suffix in (".pt", ".npz"):
        return {"path": str(path), **(_checkpoint(path) if path.suffix == ".pt" else _compact(path))}
    if not path.is_dir():
        what = "a file, not a folder" if path.exists() else "no such folder"
        raise GeoJepaError(f"{path}: {what}; `geojepa info` reads {EXPECTED}")
    found = kind(path)
    if found is None:
        raise GeoJepaError(f"{path}: not a GeoJEPA folder; expected {EXPECTED}")
    return {"path": str(path), "kind": found, **{"region": _region, "tokenizer": _tokenizer, "model": _model,
                                                  "embeddings": _embeddings}[found](path)}


def _rows(path: Path) -> int:
    return pq.read_metadata(path).num_rows


def _region(path: Path) -> dict:
    w = WorkDir(path)
    out: dict = {"name": w.name, "role": w.role() or "-"}
    if w.tiles.is_file():
        t = pq.read_table(w.tiles, columns=["bbox", "split"])
        box = t["bbox"].combine_chunks()
        out["extent"] = [round(float(pc.min(box.field("xmin")).as_py()), 5),
                         round(float(pc.min(box.field("ymin")).as_py()), 5),
                         round(float(pc.max(box.field("xmax")).as_py()), 5),
                         round(float(pc.max(box.field("ymax")).as_py()), 5)]
        counts = pc.value_counts(t["split"]).to_pylist()
        out["tiles"] = {c["values"]: c["counts"] for c in sorted(counts, key=lambda c: c["values"])}
    if w.entities.is_file():
        out["entities"] = _rows(w.entities)
    out["stages"] = {}
    for m in sorted(w.manifests.glob("*.json")) if w.manifests.is_dir() else []:
        when = datetime.datetime.fromtimestamp(m.stat().st_mtime).isoformat(timespec="seconds")
        out["stages"][m.stem] = when
    if w.token_shards():
        out["tokenizer_digest"] = w.tokenizer_digest() or "the region's own"
        out["token_widths"] = {k: v for k, v in w.token_dims().items() if v}
    if w.eval.results.is_file():
        out["evaluation"] = _headline(w)
    if w.model.checkpoints():
        out["model"] = _model(path)
    return out


def _headline(w: WorkDir) -> dict:
    """Per task, the ridge read-out's headline metric (masked setting) of the trained target encoder, the
    untrained twins (range) and TagPool; the evaluated checkpoint."""
    from geojepa.evaluate.protocol import is_twin
    from geojepa.evaluate.report import headline_metric

    rows = pq.read_table(w.eval.results).to_pylist()
    out = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        metric = headline_metric(task)
        got = {r["model"]: r["mean"] for r in rows if (r["setting"], r["task"], r["probe"], r["metric"]) ==
               ("masked", task, "ridge", metric) and r["mean"] is not None}
        if "geojepa" not in got:
            continue
        twins = [v for m, v in got.items() if is_twin(m)]
        out[task] = {"metric": metric, "geojepa": round(got["geojepa"], 4),
                     "twins": [round(min(twins), 4), round(max(twins), 4)] if twins else None,
                     "tagpool": round(got["tagpool"], 4) if "tagpool" in got else None}
    out["checkpoint"] = (w.evaluation_summary() or {}).get("checkpoint")
    return out


def _tokenizer(path: Path) -> dict:
    t = TokenizerDir(path)
    record = json.loads(t.record_file.read_text())
    return {"digest": record.get("digest"), "fitted_on": [r["name"] for r in record.get("fitted_on", [])],
            "vocabulary_entries": _rows(t.tag_vocab) if t.tag_vocab.is_file() else 0,
            "tag_dim": record.get("tag_dim"), "settings": record.get("settings", {})}


def _model(path: Path) -> dict:
    m = ModelDir(path)
    ck = m.checkpoints_dir
    out: dict = {"saved_steps": [{"step": checkpoint_step(p), "file": p.name, "mb": round(p.stat().st_size / 2**20, 1)}
                                 for p in m.checkpoints()]}
    cfg = json.loads(ck.train_config.read_text()) if ck.train_config.is_file() else _checkpoint_config(m)
    if cfg:
        out["size"] = {k: cfg[k] for k in SIZES if k in cfg}
        out["modalities"] = cfg.get("modalities")
        out["regions"] = cfg.get("regions") or [Path(d).name for d in cfg.get("data") or []]
    if ck.history.is_file():
        history = json.loads(ck.history.read_text())
        if history:
            last = history[-1]
            out["last_step"] = {k: round(last[k], 4) if isinstance(last[k], float) else last[k]
                                for k in ("step", "loss", "jepa", "trivial", "jepa_gain", "within_share") if k in last}
    if m.export_record.is_file():
        record = json.loads(m.export_record.read_text())
        out["tokenizer_digest"] = record.get("tokenizer_digest")
        out["regions"] = out.get("regions") or record.get("regions")
        out["modalities"] = out.get("modalities") or record.get("modalities")
    if m.card.is_file():
        title = next((ln.lstrip("# ").strip() for ln in m.card.read_text().splitlines() if ln.startswith("#")), None)
        out["card"] = title
    return out


def _checkpoint(path: Path) -> dict:
    from geojepa.model.jepa import load_checkpoint

    try:
        state = load_checkpoint(path)
    except ValueError as e:
        raise GeoJepaError(str(e)) from None
    cfg = state["config"]
    return {"kind": "checkpoint", "step": state["step"], "mb": round(path.stat().st_size / 2**20, 1),
            "size": {k: cfg[k] for k in SIZES if k in cfg},
            "modalities": cfg.get("modalities"), "regions": cfg.get("regions"),
            "tokenizer_digest": cfg.get("tokenizer_digest"), "regulariser": cfg.get("regulariser"),
            "encoders": sorted({k.split(".")[0] for k in state["model"]} & {"encoder", "target_encoder"}),
            **({"compact": cfg["compact"]} if cfg.get("compact") else {})}


def _compact(path: Path) -> dict:
    from data_contracts import ContractError
    from geojepa.train.compact import Compact

    try:
        meta = Compact(path).meta
    except ContractError as e:
        raise GeoJepaError(str(e)) from None
    return {"kind": "compact tokens", "mb": round(path.stat().st_size / 2**20, 1),
            **{k: meta.get(k) for k in ("regions", "holdouts", "splits", "tiles", "entities", "dims", "full_dims",
                                        "retained_variance", "tokenizer_digest")}}


def _checkpoint_config(m: ModelDir) -> dict:
    """The training settings stored in the last checkpoint (an exported folder has no train_config.json): the
    file's tensors are read, no model is built."""
    import torch

    found = m.checkpoints()
    return torch.load(found[-1], map_location="cpu", weights_only=True).get("config", {}) if found else {}


def _embeddings(path: Path) -> dict:
    e = EmbeddingsDir(path)
    schema = pq.read_schema(e.tile_embeddings)
    emb = schema.field("embedding").type if "embedding" in schema.names else None
    out = {"tiles": _rows(e.tile_embeddings),
           "width": getattr(emb, "list_size", None)}
    if e.entity_embeddings.is_file():
        out["entities"] = _rows(e.entity_embeddings)
    out["map"] = str(e.map) if e.map.is_file() else None
    return out


def lines(d: dict) -> list[str]:
    """The dict as an aligned two-column table; nested dicts indented."""
    out: list[str] = []

    def walk(obj: dict, indent: int) -> None:
        width = max((len(str(k)) for k in obj), default=0)
        for k, v in obj.items():
            if isinstance(v, dict) and v:
                out.append(f"{' ' * indent}{k}")
                walk(v, indent + 2)
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                out.append(f"{' ' * indent}{k}")
                for item in v:
                    out.append(f"{' ' * (indent + 2)}" + ", ".join(f"{a} {b}" for a, b in item.items()))
            else:
                shown = ", ".join(map(str, v)) if isinstance(v, list) else ("-" if v is None else str(v))
                out.append(f"{' ' * indent}{str(k).ljust(width)}  {shown}")

    walk(d, 0)
    return out
