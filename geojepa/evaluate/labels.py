"""The reference's five tile tasks: how each label is read from a tile's entities, and which tags define it.

A task's tiles are the tokenised tiles, labelled from their original entities.
Before they are embedded, the tags that define the label are removed from every
entity of the tile (the honest "masked" setting); an entity left with no tags is
removed too, as extraction drops untagged features. Sparse tasks keep at most
``zero_keep_ratio`` zero-label tiles per non-zero tile (seeded); ``max_speed``
has only the tiles with a parseable ``maxspeed``.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Tags = dict[str, str]
Entity = tuple[str, Tags]  # (kind, tags)

CAR_ROADS = {"motorway", "trunk", "primary", "secondary", "tertiary", "unclassified", "residential", "service",
             "living_street", "road", "motorway_link", "trunk_link", "primary_link", "secondary_link",
             "tertiary_link"}
MPH = 1.6  # the reference's conversion


def _yes(value: str | None) -> bool:
    return value is not None and value != "no"


def parse_speed(value: str) -> float | None:
    """km/h of a ``maxspeed`` value: "50", "30 mph", "50 km/h", "60;40" (largest); None for "RU:urban", "none"..."""
    best = None
    for part in value.split(";"):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(mph|km/h|kmh|kph)?\s*", part)
        if m:
            v = float(m.group(1)) * (MPH if m.group(2) == "mph" else 1.0)
            best = v if best is None else max(best, v)
    return best


def _traffic_signal(kind: str, t: Tags) -> bool:
    return kind == "point" and (t.get("highway") == "traffic_signals" or t.get("crossing") == "traffic_signals"
                                or _yes(t.get("crossing:signals")))


def _bridge(t: Tags) -> bool:
    return _yes(t.get("bridge")) or t.get("man_made") == "bridge"


def _speed(t: Tags) -> float | None:
    return parse_speed(t["maxspeed"]) if "maxspeed" in t else None


@dataclass(frozen=True)
class Task:
    """A tile task. A tile's label reduces its entities' values: the sum (counts) or the maximum of the values
    that are not None, ``empty`` when there is none (None: the tile is not in the task). ``reads`` are the keys
    ``value`` looks at: an entity with none of them gives 0 or None, so the evaluation converts only the entities
    that have one (a test checks it)."""

    name: str
    kind: str  # count | regression | binary
    value: Callable[[str, Tags], float | None]  # (kind, tags) -> this entity's contribution
    reduce: str  # sum | max
    empty: float | None  # the label of a tile whose entities give no value
    reads: tuple[str, ...]
    defines: Callable[[str, str], bool]  # (key, value) -> is this tag part of the label's definition?
    sparse: bool  # zero-label tiles subsampled

    def label(self, ents: list[Entity]) -> float | None:
        """The tile's label from its (kind, tags) entities; None: the tile is not in the task."""
        values = [v for k, t in ents if (v := self.value(k, t)) is not None]
        if not values:
            return self.empty
        return float(sum(values)) if self.reduce == "sum" else float(max(values))


def _bridge_tag(k: str, v: str) -> bool:
    return k == "bridge" or k.startswith("bridge:") or (k == "man_made" and v == "bridge")


TASKS = {t.name: t for t in (
    Task("building_count", "count", lambda kind, t: float(_yes(t.get("building"))), "sum", 0.0, ("building",),
         lambda k, v: k == "building" or k.startswith("building:"), sparse=False),
    Task("traffic_signals", "count", lambda kind, t: float(_traffic_signal(kind, t)), "sum", 0.0,
         ("highway", "crossing", "crossing:signals"),
         lambda k, v: (k == "highway" and v == "traffic_signals") or (k == "crossing" and v == "traffic_signals")
         or k.startswith(("crossing:signals", "traffic_signals")), sparse=True),
    Task("max_speed", "regression", lambda kind, t: _speed(t), "max", None, ("maxspeed",),
         lambda k, v: k.startswith("maxspeed"), sparse=False),
    Task("bridge", "binary", lambda kind, t: float(_bridge(t)), "max", 0.0, ("bridge", "man_made"), _bridge_tag,
         sparse=True),
    Task("car_bridge", "binary", lambda kind, t: float(_bridge(t) and t.get("highway") in CAR_ROADS), "max", 0.0,
         ("bridge", "man_made"), _bridge_tag, sparse=True),
)}


def strip(task: Task, tags: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The tags left once the task's label-defining ones are removed."""
    return [(k, v) for k, v in tags if not task.defines(k, v)]


def task_labels(task: Task, tiles: dict[str, list[Entity]], zero_keep_ratio: float, seed: int) -> dict[str, float]:
    """tile_id -> label for the tiles in the task."""
    labels = {t: y for t, ents in tiles.items() if (y := task.label(ents)) is not None}
    return subsample(task, labels, zero_keep_ratio, seed)


def subsample(task: Task, labels: dict[str, float], zero_keep_ratio: float, seed: int) -> dict[str, float]:
    """A sparse task's labels with at most ``zero_keep_ratio`` zero-label tiles per non-zero one (seeded: the
    same tiles for the same labels, whatever order they come in); a dense task's unchanged."""
    if task.sparse:
        zeros = sorted(t for t, y in labels.items() if y == 0)
        keep = int(round(zero_keep_ratio * (len(labels) - len(zeros))))
        if len(zeros) > keep:
            rng = np.random.default_rng([seed, zlib.crc32(task.name.encode())])
            drop = set(np.asarray(zeros)[rng.permutation(len(zeros))[keep:]].tolist())
            labels = {t: y for t, y in labels.items() if t not in drop}
    return labels
