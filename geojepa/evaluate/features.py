"""The evaluation's features: which tiles each task probes, and every model's tile vectors on them.

1. ``task_sets``: each task's tiles (after the zero-label subsampling), their labels and splits, and how many
   entities each keeps once the task's label-defining tags are removed; a task without two tiles in each
   split once masked, or with one training label, is skipped and named.
2. ``embed_region``: one pass over the token shards, a batch of tiles at a time: each encoder (the trained
   target and context encoders, the untrained twins) embeds every tile, and each task's tiles with its edits
   applied (a tile the masking leaves unchanged reuses its unmasked vectors); TagPool is pooled alongside;
   the target encoder's entity embeddings go to a ``Spill``.
3. ``tile_vectors``: the protocol's tile vector of an encoder (mean, or concat(mean, max)) with, under v2,
   log(1 + tokens) per modality appended (the masked counts in the masked setting).

The twins do not depend on the evaluated model: the stage keeps their ``Pools`` in the region's cache.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from geojepa.encoding.pooling import embed
from geojepa.encoding.shards import TokenIndex, release, token_batches
from geojepa.encoding.spill import Spill
from geojepa.evaluate.labels import Task, subsample
from geojepa.evaluate.masking import kept_tag_vectors, mask_item, tag_pool, without_images
from geojepa.evaluate.protocol import Protocol
from geojepa.evaluate.region import RegionScan
from geojepa.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class TaskSet:
    """One probed task: its tiles (token indices), labels, splits, and entities kept once masked."""

    task: Task
    rows: np.ndarray
    y: np.ndarray
    sp: np.ndarray
    kept: np.ndarray


def task_sets(tasks: list[Task], scan: RegionScan, tok: TokenIndex, section, modalities: tuple[str, ...],
              rendered: bool) -> tuple[dict[str, TaskSet], dict[str, dict], list[tuple]]:
    """(probed tasks, per task the notes the report prints, the task-label rows of every task)."""
    split_of = tok.split.astype(str)
    probed, notes, label_rows = {}, {}, []
    for task in tasks:
        name, rows = task.name, _task_rows(task, scan.raw[task.name], tok, section)
        kept = tok.n_entities[rows] - scan.edits[name].dropped(tok)[rows]
        alive = ((kept > 0) & any(m in modalities for m in ("tags", "geometry"))) | (
            (tok.n_patches[rows] > 0) & ("image" in modalities) & (not rendered))
        y, sp = scan.raw[name][rows][alive], split_of[rows][alive]
        label_rows += [(name, tok.ids[i], split_of[i], float(v)) for i, v in zip(rows[alive], y, strict=True)]
        reason = unusable(y, sp)
        notes[name] = {"tiles": len(rows), "emptied_by_masking": int((~alive).sum()),
                       **{f"{s}_tiles": int((sp == s).sum()) for s in ("train", "val", "test")}, "skipped": reason}
        if reason:
            log.warning("evaluate: task %s skipped: %s", name, reason)
        else:
            probed[name] = TaskSet(task, rows[alive], y, sp, kept[alive])
    return probed, notes, label_rows


def unusable(y: np.ndarray, sp: np.ndarray) -> str | None:
    """Why a task's tiles cannot be probed (None when they can): none labelled, too few to score (test), to fit
    (train) or to stop the MLP and choose on (val), or one training label only."""
    if not len(y):
        return "no tile has a label for it"
    for s in ("test", "train", "val"):
        if (sp == s).sum() < 2:
            return f"{(sp == s).sum()} {s} tiles (need 2)"
    if np.all(y[sp == "train"] == y[sp == "train"][0]):
        return f"every training label is {y[sp == 'train'][0]:g}"
    return None


def _task_rows(task: Task, raw: np.ndarray, tok: TokenIndex, section) -> np.ndarray:
    """The task's tiles (token order) after the zero-label subsampling."""
    have = np.flatnonzero(~np.isnan(raw))
    kept = subsample(task, dict(zip(tok.ids[have].tolist(), raw[have].tolist(), strict=True)),
                     section.zero_keep_ratio, section.seed)
    return np.array([i for i in have if tok.ids[i] in kept], np.int64)


@dataclass
class Pools:
    """One encoder's pooled outputs: every tile unmasked, and each task's tiles masked (mean and max)."""

    mean: np.ndarray
    max: np.ndarray
    task_mean: dict[str, np.ndarray] = field(default_factory=dict)
    task_max: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def zeros(cls, n: int, width: int, sets: dict[str, TaskSet], with_max: bool = True) -> Pools:
        z = (lambda k: np.zeros((k, width), np.float32)) if with_max else (lambda k: np.zeros((k, 0), np.float32))
        return cls(np.zeros((n, width), np.float32), z(n), {t: np.zeros((len(s.rows), width), np.float32)
                                                              for t, s in sets.items()},
                   {t: z(len(s.rows)) for t, s in sets.items()})

    def arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "max": self.max, **{f"mean/{t}": v for t, v in self.task_mean.items()},
                **{f"max/{t}": v for t, v in self.task_max.items()}}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> Pools:
        return cls(a["mean"], a["max"], {k[5:]: v for k, v in a.items() if k.startswith("mean/")},
                   {k[4:]: v for k, v in a.items() if k.startswith("max/")})


def embed_region(tok: TokenIndex, scan: RegionScan, sets: dict[str, TaskSet], encoders: dict, modalities, section,
                 device: str, spill: Spill | None, vectors: np.ndarray, pool: ThreadPoolExecutor,
                 drop_masked_images: bool = False) -> tuple[dict[str, Pools], Pools]:
    """Every encoder's ``Pools`` (``encoders``: name -> encoder, run side by side on ``pool``; the first one's
    entity embeddings go to ``spill``) and TagPool's (mean only). See the module docstring."""
    n = tok.n
    have = tuple(m for m in ("tags", "geometry", "image") if tok.dims[m] and (m == "tags" or m in modalities))
    names = list(encoders)
    out = {name: Pools.zeros(n, enc.width, sets) for name, enc in encoders.items()}
    tags = Pools.zeros(n, tok.dims["tags"] or 1, sets, with_max=False)
    where = {}
    for name, s in sets.items():
        where[name] = np.full(n, -1, np.int64)
        where[name][s.rows] = np.arange(len(s.rows))
    groups: dict = {}
    for name in sets:  # tasks masking the same tags share their masked tiles' vectors
        groups.setdefault(scan.tasks[name].defines, []).append(name)

    def run(its):
        jobs = [pool.submit(embed, encoders[e], its, modalities, section.embed_batch_tiles, device=device)
                for e in names]
        return [j.result() for j in jobs]

    # counted in entities, not tiles: the shards come shortest first, so tiles would promise too early an end
    progress = Progress(f"evaluate: embedding ({len(names)} encoders, masked tiles included)",
                        int(tok.n_entities.sum()), "entities")
    for r, items in token_batches(tok, have, section.embed_batch_tiles):
        for name, p in zip(names, run(items), strict=True):
            out[name].mean[r], out[name].max[r] = p.mean, p.max
            if spill is not None and name == names[0]:
                spill.write(p.entities)
        if tok.dims["tags"]:
            tags.mean[r] = tag_pool(items)
        for members in groups.values():
            at = np.stack([where[t][r] for t in members])
            wanted = np.flatnonzero((at >= 0).any(0))
            if not len(wanted):
                continue
            ed = scan.edits[members[0]].range(tok.ent_off[r[0]], tok.ent_off[r[-1] + 1])
            new_vectors = kept_tag_vectors(vectors, ed.ptr, ed.rows) if "tags" in have else None
            owner, local = tok.owner(ed.pos)
            bounds = np.searchsorted(owner, r, side="left").tolist() + [len(owner)]
            vec = {e: (out[e].mean[r[wanted]], out[e].max[r[wanted]]) for e in names}
            tag_vec = tags.mean[r[wanted]]
            changed, masked = [], []
            for w, k in enumerate(wanted):
                a, b = bounds[k : k + 2]
                if a < b or drop_masked_images:  # else unchanged by the masking: the unmasked vectors
                    changed.append(w)
                    it = mask_item(
                        items[k], local[a:b], ed.keep[a:b], None if new_vectors is None else new_vectors[a:b]
                    )
                    masked.append(without_images(it) if drop_masked_images else it)
            if masked:
                for e, p in zip(names, run(masked), strict=True):
                    vec[e][0][changed], vec[e][1][changed] = p.mean, p.max
                if tok.dims["tags"]:
                    tag_vec[changed] = tag_pool(masked)
            for t, at_task in zip(members, at, strict=True):
                sel = at_task[wanted] >= 0
                dest = at_task[wanted][sel]
                for e in names:
                    out[e].task_mean[t][dest], out[e].task_max[t][dest] = vec[e][0][sel], vec[e][1][sel]
                tags.task_mean[t][dest] = tag_vec[sel]
        release()
        progress.update(int(tok.n_entities[r].sum()))
    progress.close()
    return out, tags


def counts(tok: TokenIndex, modalities: tuple[str, ...], rows: np.ndarray | None = None, kept: np.ndarray | None = None,
           drop_images: bool = False) -> np.ndarray:
    """log(1 + tokens) per modality of tiles ``rows`` (default all): entities (tags and geometry share one
    count; ``kept``: the masked counts) and, when the model reads images, image patches."""
    rows = np.arange(tok.n) if rows is None else rows
    ent = tok.n_entities[rows] if kept is None else kept
    cols = [np.log1p(ent.astype(np.float64))]
    if "image" in modalities:
        cols.append(np.log1p(np.zeros(len(rows)) if drop_images else tok.n_patches[rows].astype(np.float64)))
    return np.stack(cols, 1).astype(np.float32)


def tile_vectors(p: Pools, proto: Protocol, extra: np.ndarray, task: str | None = None,
                 rows: np.ndarray | None = None) -> np.ndarray:
    """The protocol's tile vector of ``p``'s tiles: all (``task`` None; ``rows``: a subset of them, unmasked) or
    a task's masked tiles; ``extra``: the count columns appended under ``count_features``."""
    if task is None:
        mean, mx = (p.mean, p.max) if rows is None else (p.mean[rows], p.max[rows])
    else:
        mean, mx = p.task_mean[task], p.task_max[task]
    parts = [mean, mx] if proto.pooling == "mean_max" and mx.shape[1] else [mean]
    if proto.count_features:
        parts.append(extra)
    return np.concatenate(parts, 1).astype(np.float32)
