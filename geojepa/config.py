"""One typed, frozen configuration with a section per stage.

Loaded from YAML (``configs/default.yaml`` unless another file is given) with
``section.key=value`` overrides from the command line. Unknown keys are errors
that name the key; every stage function receives only its own section.

The ``train`` section is not restated here: ``dataclass_section`` builds it from the training code's own
dataclasses (``geojepa.model.sizes.ModelSizes``, ``geojepa.train.settings.TrainSettings`` and ``MaskConfig``:
their types, defaults and bounds), which a GPU host without pydantic reads from the launcher's JSON.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from geojepa import settings
from geojepa.errors import GeoJepaError
from geojepa.model.sizes import ModelSizes
from geojepa.train.settings import MaskConfig, TrainSettings

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExtractConfig(Section):
    """OSM PBF -> entities GeoParquet."""

    # Keys dropped when they start with any of these prefixes (reference cleaning).
    drop_key_prefixes: tuple[str, ...] = ("tiger:", "source", "import", "yh:", "created_by")
    # Node-location index: in memory, on disk, or chosen from the PBF size.
    node_index: Literal["auto", "memory", "disk"] = "auto"
    disk_index_above_mb: float = Field(1024.0, gt=0)
    # Optional clip box (min_lon, min_lat, max_lon, max_lat), WGS84.
    bbox: tuple[float, float, float, float] | None = None
    # Keep only entities with one of these tags: "key" or "key=value".
    tag_filter: tuple[str, ...] | None = None
    # Size of the blocks of decoded OSM text parsed at a time (memory vs. overhead).
    read_block_mb: int = Field(4, gt=0, le=1024)
    # Threads parsing blocks (the PBF itself is decoded by a separate process).
    threads: int = Field(2, ge=1, le=64)
    row_group_rows: int = Field(25_000, gt=0)

    @field_validator("bbox")
    @classmethod
    def _bbox_on_earth(cls, bbox: tuple[float, float, float, float] | None):
        if bbox is None:
            return bbox
        min_lon, min_lat, max_lon, max_lat = bbox
        if not all(math.isfinite(v) for v in bbox):
            raise ValueError(f"{list(bbox)}: every value must be a finite number")
        if not (-180 <= min_lon <= 180 and -180 <= max_lon <= 180):
            raise ValueError(f"{list(bbox)}: longitudes must lie in [-180, 180]")
        if not (-90 <= min_lat <= 90 and -90 <= max_lat <= 90):
            raise ValueError(f"{list(bbox)}: latitudes must lie in [-90, 90]")
        if not (min_lon < max_lon and min_lat < max_lat):
            raise ValueError(f"{list(bbox)}: expected min_lon < max_lon and min_lat < max_lat")
        return bbox


class TileConfig(Section):
    """entities -> tiles (reference settings from the thesis)."""

    size_m: float = Field(300.0, gt=0)
    min_entities: int = Field(5, ge=0)
    max_entities: int = Field(1250, gt=0)
    group_size: int = Field(4, gt=0)
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 42
    # Partitions (the unit of work) are blocks of partition_groups x partition_groups groups.
    partition_groups: int = Field(4, gt=0)
    simplify_m: float = Field(0.3, ge=0)
    min_side_m: float = Field(1.5, ge=0)  # smallest side of an entity's rotated bbox
    image_px: int = Field(224, gt=0)
    threads: int = Field(2, ge=1, le=64)  # partitions cut in parallel
    gdal_cache_mb: int = Field(128, gt=0)  # GDAL's raster block cache while reading imagery


class TokensConfig(Section):
    """tiles -> tag vocabulary, shape encoder, token shards."""

    text_model: Literal["minilm", "voyage"] = "minilm"
    vocab: str | None = None  # shared vocabulary path; None: W/tag_vocab.parquet
    max_values_per_key: int = Field(100, gt=0)
    geometry_dim: int = Field(256, gt=0)  # the reference used 1024; 256 keeps the CPU demo quick
    geometry_epochs: int = Field(8, gt=0)
    geometry_max_shapes: int = Field(20_000, gt=0)  # training sample
    geometry_checkpoint: str | None = None  # None: W/geometry_encoder.pt
    image_tokenizer: Literal["pixels", "vit_b16"] = "pixels"
    vit_weights: str | None = None
    vit_allow_random: bool = False
    patch_px: int = Field(16, gt=0)
    shard_tiles: int = Field(256, gt=0)  # tiles per shard (one shard is in memory at a time)
    # also tokenise the split's gap tiles, into gap-*.parquet shards that training and evaluation never read
    # (`geojepa embed` sets it: a user's town is embedded whole)
    gap_tiles: bool = False
    seed: int = 0


def dataclass_section(*classes: type, nested: dict[str, type[Section]] | None = None) -> type[Section]:
    """A section whose fields are those of the plain dataclasses ``classes``, in order (their types, defaults
    and bounds: ``geojepa.settings``), so they are defined once, where the code that reads them lives;
    ``nested``: a dataclass-typed field validated as that section. Each validated section must also build
    the dataclasses (their own ``__post_init__`` checks), a failure being this section's error."""
    name = "".join(c.__name__ for c in classes) + "Fields"
    nested = nested or {}
    spec: dict[str, Any] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in spec:
                raise TypeError(f"{name}: {f.name!r} is a field of two of {[c.__name__ for c in classes]}")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if f.name in nested:
                spec[f.name] = (nested[f.name], nested[f.name].model_validate(settings.to_dict(default)))
            else:
                spec[f.name] = (hints[f.name], Field(default, **settings.bounds(f)))

    def build_them(self):
        dumped = self.model_dump()
        for cls in classes:
            settings.from_dict(cls, settings.pick(cls, dumped))
        return self

    return create_model(name, __base__=Section, __module__=__name__,
                        __validators__={"build_them": model_validator(mode="after")(build_them)}, **spec)


class MaskSettings(dataclass_section(MaskConfig)):
    """JEPA masking: the fields of ``geojepa.train.settings.MaskConfig``."""


class TrainConfig(dataclass_section(ModelSizes, TrainSettings, nested={"masks": MaskSettings})):
    """token shards -> GeoJEPA checkpoints: the fields of ``geojepa.model.sizes.ModelSizes`` (the model's sizes)
    and ``geojepa.train.settings.TrainSettings`` (everything else training reads, the masking nested), flat."""

    def as_model_sizes(self) -> ModelSizes:
        return settings.from_dict(ModelSizes, settings.pick(ModelSizes, self.model_dump()))

    def as_train_settings(self) -> TrainSettings:
        return settings.from_dict(TrainSettings, settings.pick(TrainSettings, self.model_dump()))


class EvaluateConfig(Section):
    """checkpoint + token shards -> task datasets, embeddings, probe scores, retrieval, report.

    ``protocol`` fixes the read-outs and the tile vector (``geojepa.evaluate.protocol``): ``v2`` (default) or
    ``reference`` (the thesis's comparison). The fields left None take the protocol's value."""

    protocol: Literal["v2", "reference"] = "v2"
    checkpoint: str | None = None  # None: the last W/checkpoints/step-*.pt
    tasks: tuple[Literal["building_count", "traffic_signals", "max_speed", "bridge", "car_bridge"], ...] = (
        "building_count", "traffic_signals", "max_speed", "bridge", "car_bridge")
    zero_keep_ratio: float = Field(1.0, gt=0)  # sparse tasks: at most this many zero-label tiles per non-zero one
    unmasked: bool = True  # also report probes on the original tiles (label tags kept), named "unmasked"
    # Read-outs (v2: ridge, mlp, knn; reference: linear, mlp, and kNN at k): None takes the protocol's.
    probes: tuple[Literal["ridge", "mlp", "knn", "linear"], ...] | None = None
    pooling: Literal["mean", "mean_max"] | None = None  # the tile vector (v2: mean; reference: concat(mean, max))
    count_features: bool | None = None  # append log(1 + tokens) per modality to every tile vector (v2: yes)
    twin_seeds: int | None = Field(None, ge=1)  # untrained twins, one per seed (v2: 3; reference: 1)
    cv_min_val: int = Field(100, ge=1)  # fewer validation tiles: hyper-parameters by grouped cross-validation
    cv_folds: int = Field(5, ge=2)
    seeds: int | None = Field(None, ge=1)  # MLP probe seeds (v2: 3; reference: 5)
    hidden: int = Field(512, gt=0)  # MLP probe: in -> hidden -> 1, GELU (the reference: 768-512-1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    max_epochs: int | None = Field(None, gt=0)  # MLP probe (v2: 100; reference: 300)
    patience: int | None = Field(None, gt=0)  # epochs without a better validation score (v2: 10; reference: 30)
    batch: int = Field(256, gt=0)
    bag_features: int = Field(1024, gt=0)  # bag-of-tags baseline: most frequent keys and key=value pairs
    # The field's own embedders (SRAI, the `peers` extra), fitted per region; skipped, and said so, without it.
    peers: tuple[Literal["count", "contextual_count", "hex2vec", "geovex"], ...] = (
        "count", "contextual_count", "hex2vec", "geovex")
    peer_features: int = Field(512, gt=0)  # the key=value pairs they count: those on the most training tiles
    peer_epochs: int = Field(3, gt=0)  # Hex2Vec and GeoVeX training epochs (SRAI's default)
    k: int = Field(10, gt=0)  # neighbours for agreement and galleries (and the reference protocol's kNN)
    gallery_queries: int = Field(4, ge=0)
    gallery_k: int = Field(5, gt=0)
    embed_batch_tiles: int = Field(256, gt=0)  # tiles read at once; embedded in chunks of similar length
    map: Literal["umap", "pca"] = "umap"  # 2-D map of the tile embeddings
    pictures: bool = True  # galleries, maps and training curves; false: the figures and tables only (read-outs)
    cache: bool = True  # reuse what does not depend on the model (W/.eval-cache: twins, peers, their probes)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


class SynthConfig(Section):
    """Synthetic city generator (benchmarks and tests only)."""

    centre_lon: float = -98.5
    centre_lat: float = 39.5
    block_m: float = Field(110.0, gt=20)


class TrackingConfig(Section):
    """MLflow. ``uri`` None: SQLite store beside the work directories
    (``W/../mlruns.db``); the ``MLFLOW_TRACKING_URI`` variable wins over both."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "geojepa"
    parent_run_id: str | None = None  # group the stage runs under this run (a pipeline run sets it)


class OrchestrationConfig(Section):
    """How the Prefect flows run the data stages' partitions (the library itself never imports Prefect)."""

    task_runner: Literal["threads", "dask"] = "threads"  # dask: prefect-dask's DaskTaskRunner
    dask_address: str | None = None  # a running Dask scheduler (tcp://host:8786); None: a local cluster
    dask_workers: int = Field(2, gt=0)  # local cluster: worker processes
    partitions_in_flight: int = Field(8, gt=0)  # partition tasks submitted at a time (bounds memory)


class Config(Section):
    extract: ExtractConfig = ExtractConfig()
    tile: TileConfig = TileConfig()
    tokens: TokensConfig = TokensConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    synth: SynthConfig = SynthConfig()
    tracking: TrackingConfig = TrackingConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, item: str) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise GeoJepaError(f"--set {item}: {part!r} is not a section")
    node[parts[-1]] = value


def _source(loc: tuple, path: Path, overrides: dict[tuple[str, ...], str]) -> str:
    """Where a validation error's value came from: the last override that set it (or a section above
    it), else the YAML file."""
    loc = tuple(str(p) for p in loc)
    for key in reversed(list(overrides)):
        if loc[: len(key)] == key or key[: len(loc)] == loc:
            return f"--set {overrides[key]}"
    return str(path)


def read_yaml_mapping(path: Path, what: str, expected: str) -> dict:
    """A YAML file that must hold a mapping; errors name the file (``what``: "config", "corpus")."""
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise GeoJepaError(f"{path}: {what} file not found") from None
    except yaml.YAMLError as e:
        raise GeoJepaError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise GeoJepaError(f"{path}: expected {expected}")
    return tree


def load_config(path: Path | str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML, apply ``key.path=value`` overrides (values parsed as YAML), validate.

    Errors name where the bad value came from: ``--set key=value`` for an override, else the file.
    """
    path = Path(path) if path else DEFAULT_CONFIG
    tree = read_yaml_mapping(path, "config", "a mapping of sections at top level")
    applied: dict[tuple[str, ...], str] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise GeoJepaError(f"--set {item}: expected section.key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            detail = getattr(e, "problem", None) or " ".join(str(e).split())
            if getattr(e, "problem_mark", None) is not None:
                detail += f" at character {e.problem_mark.column + 1} of {raw!r}"
            raise GeoJepaError(f"--set {item}: not valid YAML: {detail}") from None
        _set_dotted(tree, key, value, item)
        applied.pop(tuple(key.split(".")), None)  # keep the latest override last
        applied[tuple(key.split("."))] = item
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        problems: dict[str, list[str]] = {}
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                problem = f"unknown config key {where!r}"
            else:
                msg = err["msg"].removeprefix("Value error, ")
                problem = f"{where}: {msg}"
            problems.setdefault(_source(err["loc"], path, applied), []).append(problem)
        raise GeoJepaError("; ".join(f"{src}: " + "; ".join(p) for src, p in problems.items())) from None
