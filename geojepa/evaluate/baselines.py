"""The baselines' tile vectors that need no encoder: bag-of-tags, and the field's own embedders (SRAI's Count,
ContextualCount, Hex2Vec, GeoVeX: ``geojepa.evaluate.peers``) fitted on the region's training tiles.

The peers do not depend on the evaluated model: their vectors (every tile unmasked, each task's tiles
masked) are kept in the region's cache under a key of the region's tiles and entities, the peer settings,
SRAI's version, the tasks' tiles and this code; a warm evaluation reads them instead of fitting again (the
report then gives the fit's cost as measured when it ran, marked cached).
"""

from __future__ import annotations

import logging

import numpy as np

from geojepa import manifest
from geojepa.encoding.shards import TokenIndex
from geojepa.evaluate import peers
from geojepa.evaluate.cache import Cache, key
from geojepa.evaluate.features import TaskSet
from geojepa.evaluate.masking import bag_of_tags_counts
from geojepa.evaluate.region import RegionScan

log = logging.getLogger(__name__)


def bag_of_tags(scan: RegionScan, tok: TokenIndex, sets: dict[str, TaskSet], section, tasks: list
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(every tile unmasked, per task its tiles masked): log(1 + count) of the most frequent keys and
    key=value pairs on the region's training tiles."""
    keys, values = scan.pairs.keys, scan.pairs.values
    train = np.flatnonzero(tok.split.astype(str) == "train")
    every = bag_of_tags_counts(scan.bag, np.arange(tok.n), keys, values, train, section.bag_features)
    masked = {}
    for name, s in sets.items():
        fit = np.flatnonzero(s.sp == "train")
        drop = scan.pairs.arrays()["defines"][[t.name for t in tasks].index(name)]
        masked[name] = bag_of_tags_counts(scan.bag, s.rows, keys, values, fit, section.bag_features, drop=drop)
    return every, masked


def peer_vectors(paths: dict, tok: TokenIndex, sets: dict[str, TaskSet], section, cache: Cache,
                 region_inputs: dict[str, str], threads) -> tuple[dict, dict, dict]:
    """SRAI's embedders on this region: (every tile's vectors by peer, per task its masked tiles' vectors by
    peer, the notes the report prints: width, fit and embedding seconds, peak memory; or why skipped)."""
    if not section.peers:
        log.info("evaluate: SRAI peers skipped: none asked (evaluate.peers is empty)")
        return {}, {}, {"skipped": "none asked (evaluate.peers is empty)"}
    if why := peers.missing():
        log.warning("evaluate: SRAI peers skipped: %s", why)
        return {}, {}, {"skipped": why}
    if not (tok.split == "train").any():
        log.warning("evaluate: SRAI peers skipped: no training tiles to fit them on")
        return {}, {}, {"skipped": "no training tiles to fit them on"}
    k = key("peers", {n: region_inputs[n] for n in ("tiles", "tile_entities")}, list(section.peers),
            section.peer_features, section.peer_epochs, section.seed, peers.version(),
            manifest.code_version("geojepa.evaluate.peers"), {t: s.rows for t, s in sets.items()})
    if (hit := cache.load("peers", k)) is not None and (notes := cache.load_notes("peers", k)) is not None:
        log.info("evaluate: SRAI peers' vectors from the cache (fitted %s)", notes.get("fitted_at", "earlier"))
        every = {p: hit[f"all/{p}"] for p in section.peers}
        per_task = {t: {p: hit[f"{t}/{p}"] for p in section.peers} for t in sets}
        return every, per_task, {**notes, "cached": True}
    region = peers.load_region(paths["tiles"], paths["tile_entities"], tok.ids, tok.split.astype(str),
                               section.peer_features)
    with threads:
        fitted = peers.fit(region, tuple(section.peers), section.peer_epochs, section.seed)
        every = fitted.embed(region)
        per_task, groups = {}, {}
        for name, s in sets.items():  # tasks removing the same tags share one embedding
            groups.setdefault(s.task.defines, []).append((name, s.rows))
        for defines, members in groups.items():
            union = np.unique(np.concatenate([rows for _, rows in members]))
            vecs = fitted.embed(region.masked(defines), tok.ids[union].tolist())
            for name, rows in members:
                at = np.searchsorted(union, rows)
                per_task[name] = {p: x[at] for p, x in vecs.items()}
    notes = {"srai": peers.version(), "features": len(region.pairs), "feature_cap": section.peer_features,
             "fitted_on_tiles": len(region.train),
             "fitted": {p: {"dim": st.dim, "fit_seconds": round(st.fit_s, 2),
                            "embed_seconds": round(st.transform_s, 2), "peak_mb": round(st.peak_mb, 1)}
                        for p, st in fitted.stats.items()}}
    import datetime

    cache.save("peers", k, {**{f"all/{p}": x for p, x in every.items()},
                            **{f"{t}/{p}": x for t, v in per_task.items() for p, x in v.items()}})
    cache.save_notes("peers", k, {**notes, "fitted_at": datetime.datetime.now().isoformat(timespec="seconds")})
    return every, per_task, notes
