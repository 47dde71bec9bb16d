"""One pyarrow schema per pipeline artifact: the single place each is defined.

Bump a contract's ``version`` whenever its schema changes; readers refuse
files written under another version.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class Contract:
    name: str
    version: int
    schema: pa.Schema
    # Columns holding WKB geometries, with their CRS ("EPSG:4326", or "tile" for
    # tile-normalised [0, 1] coordinates that have no CRS). GeoParquet metadata
    # is written for the EPSG ones.
    geometry: tuple[tuple[str, str], ...] = ()
    doc: str = ""


BBOX = pa.struct([("xmin", pa.float64()), ("ymin", pa.float64()), ("xmax", pa.float64()), ("ymax", pa.float64())])
TAGS = pa.map_(pa.string(), pa.string())
MEMBERS = pa.list_(pa.struct([("type", pa.string()), ("ref", pa.int64()), ("role", pa.string())]))
POSITION = pa.list_(pa.float32(), 8)  # rotated-bbox corners (x0,y0,...,x3,y3) in tile coordinates
VECTOR = pa.list_(pa.float32())


ENTITIES = Contract(
    name="entities",
    version=1,
    schema=pa.schema(
        [
            pa.field("entity_id", pa.string(), nullable=False),  # "node/123", "way/4", "relation/9"
            pa.field("osm_type", pa.string(), nullable=False),  # node | way | relation
            pa.field("osm_id", pa.int64(), nullable=False),
            pa.field("kind", pa.string(), nullable=False),  # point | line | polygon | relation
            pa.field("tags", TAGS, nullable=False),  # cleaned, never empty
            pa.field("members", MEMBERS),  # relations only
            pa.field("geometry", pa.binary(), nullable=False),  # WKB, EPSG:4326 (lon, lat)
            pa.field("bbox", BBOX, nullable=False),  # GeoParquet 1.1 bbox covering column
            pa.field("geometry_fix", pa.string()),  # null, or how the geometry was repaired
        ]
    ),
    geometry=(("geometry", "EPSG:4326"),),
    doc="One row per tagged OSM node, way and relation; rows sorted along a Hilbert curve.",
)

TILES = Contract(
    name="tiles",
    version=1,
    schema=pa.schema(
        [
            pa.field("tile_id", pa.string(), nullable=False),
            pa.field("group_id", pa.string(), nullable=False),
            pa.field("split", pa.string(), nullable=False),  # train | val | test
            pa.field("crs", pa.string(), nullable=False),  # metric CRS of the grid, e.g. EPSG:32635
            pa.field("col", pa.int64(), nullable=False),
            pa.field("row", pa.int64(), nullable=False),
            pa.field("origin_x", pa.float64(), nullable=False),  # lower-left corner in `crs`
            pa.field("origin_y", pa.float64(), nullable=False),
            pa.field("size_m", pa.float64(), nullable=False),
            pa.field("n_entities", pa.int32(), nullable=False),
            pa.field("geometry", pa.binary(), nullable=False),  # footprint, WKB EPSG:4326
            pa.field("bbox", BBOX, nullable=False),
        ]
    ),
    geometry=(("geometry", "EPSG:4326"),),
)

TILE_ENTITIES = Contract(
    name="tile_entities",
    version=1,
    schema=pa.schema(
        [
            pa.field("tile_id", pa.string(), nullable=False),
            pa.field("entity_id", pa.string(), nullable=False),
            pa.field("kind", pa.string(), nullable=False),
            pa.field("tags", TAGS, nullable=False),
            pa.field("geometry", pa.binary(), nullable=False),  # WKB in tile coordinates [0, 1]
            pa.field("vertices", VECTOR, nullable=False),  # simplified (x, y) pairs, tile coordinates
            pa.field("position", POSITION, nullable=False),
        ]
    ),
    geometry=(("geometry", "tile"),),
)

TILE_IMAGES = Contract(
    name="tile_images",
    version=1,
    schema=pa.schema(
        [
            pa.field("tile_id", pa.string(), nullable=False),
            pa.field("pixels", pa.binary()),  # H x W x C uint8, row-major; null when missing
            pa.field("height", pa.int32(), nullable=False),
            pa.field("width", pa.int32(), nullable=False),
            pa.field("bands", pa.list_(pa.string()), nullable=False),  # e.g. [R, G, B, NIR]
            pa.field("coverage", pa.float32(), nullable=False),  # share of pixels with data
            pa.field("source", pa.string(), nullable=False),  # file/STAC id, "render (synthetic)", "missing"
            pa.field("acquired", pa.string()),  # ISO date, null when unknown
        ]
    ),
)

TAG_VOCAB = Contract(
    name="tag_vocab",
    version=1,
    schema=pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("value", pa.string()),  # null: the key-only entry
            pa.field("text", pa.string(), nullable=False),  # what was embedded
            pa.field("embedding", VECTOR, nullable=False),
            pa.field("model", pa.string(), nullable=False),
        ]
    ),
)

TOKENS = Contract(
    name="tokens",
    version=1,
    schema=pa.schema(
        [
            pa.field("tile_id", pa.string(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
            pa.field("length", pa.int32(), nullable=False),  # entities + image patches
            pa.field("content_hash", pa.string(), nullable=False),  # of the inputs that made this row
            pa.field("entity_id", pa.list_(pa.string()), nullable=False),  # n entities
            pa.field("entity_position", VECTOR, nullable=False),  # n x 8, flattened
            pa.field("tag", VECTOR, nullable=False),  # n x tag_dim: sum of the entity's tag vectors
            pa.field("geometry", VECTOR, nullable=False),  # n x geometry_dim: frozen shape encoder output
            pa.field("patch_position", VECTOR, nullable=False),  # p x 8 (p = 0 without imagery)
            pa.field("image", VECTOR, nullable=False),  # p x image_dim
        ]
    ),
    doc="Token shards W/tokens/{split}-NNNNN.parquet, one row per tile, rows sorted by length. The column is "
        "the modality: each entity gives a tag token (modality 0) and a geometry token (1) at its position, each "
        "patch an image token (2). Widths (tag_dim, geometry_dim, image_dim) are in the file metadata.",
)

EMBEDDINGS = Contract(
    name="embeddings",
    version=3,
    schema=pa.schema(
        [
            pa.field("level", pa.string(), nullable=False),  # tile | entity
            pa.field("tile_id", pa.string(), nullable=False),
            pa.field("entity_id", pa.string()),  # null for tile rows
            pa.field("split", pa.string(), nullable=False),
            pa.field("embedding", VECTOR, nullable=False),
            pa.field("pc", pa.list_(pa.float32(), 3), nullable=False),  # first 3 principal components (colours)
            pa.field("model", pa.string(), nullable=False),
            # tile footprint, or the entity's piece in that tile (clipped to it), WKB EPSG:4326
            pa.field("geometry", pa.binary(), nullable=False),
            pa.field("bbox", BBOX, nullable=False),
        ]
    ),
    geometry=(("geometry", "EPSG:4326"),),
    doc="W/eval/embeddings.parquet: GeoParquet (opens in QGIS), one row per tile and per entity piece in a tile. "
        "An entity row's geometry is its piece in that tile (tile_entities' clipped geometry, from tile "
        "coordinates to EPSG:4326 through the tile's CRS, origin and size), not the whole entity: a coastline "
        "or ferry route crossing 300 tiles is 300 short pieces, not 300 copies of itself (version 2 wrote the "
        "whole entity per piece). Tile rows first, then the entity rows a tile_entities shard at a time.",
)

def tile_embeddings(dim: int) -> Contract:
    """``geojepa embed``'s OUT/tile_embeddings.parquet for a model with ``dim``-wide tile embeddings (the width
    is part of the schema: a fixed-size list; ``embedding_dim`` reads it from a file)."""
    return Contract(
        name="tile_embeddings",
        version=1,
        schema=pa.schema([
            pa.field("tile_id", pa.string(), nullable=False),
            pa.field("split", pa.string(), nullable=False),  # the tiling's train | val | test
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),  # concat(mean, max), target encoder
            pa.field("geometry", pa.binary(), nullable=False),  # the tile footprint, WKB EPSG:4326
            pa.field("bbox", BBOX, nullable=False),
        ]),
        geometry=(("geometry", "EPSG:4326"),),
        doc="OUT/tile_embeddings.parquet (geojepa embed): GeoParquet, one row per tokenised tile in token order; "
            "the model, its version and the tokenizer digest in the file metadata (EMBEDDING_KEYS).",
    )


def entity_embeddings(dim: int) -> Contract:
    """``geojepa embed``'s OUT/entity_embeddings.parquet (``dim``: the encoder width)."""
    return Contract(
        name="entity_embeddings",
        version=1,
        schema=pa.schema([
            pa.field("entity_id", pa.string(), nullable=False),
            pa.field("tile_id", pa.string(), nullable=False),
            pa.field("class", pa.string(), nullable=False),  # building, highway, ... or other (its tags' class)
            pa.field("tags", TAGS, nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),  # mean of the entity's tokens
            pa.field("geometry", pa.binary(), nullable=False),  # the entity's piece in the tile, WKB EPSG:4326
            pa.field("bbox", BBOX, nullable=False),
        ]),
        geometry=(("geometry", "EPSG:4326"),),
        doc="OUT/entity_embeddings.parquet (geojepa embed): GeoParquet, one row per entity piece in a tile (an "
            "entity crossing tiles has a piece, and an embedding in that tile's context, in each).",
    )


# The file metadata geojepa embed writes beside the schema: which model made the vectors.
EMBEDDING_KEYS = ("geojepa:model", "geojepa:model_version", "geojepa:tokenizer_digest", "geojepa:encoder")


TASK_LABELS = Contract(
    name="task_labels",
    version=1,
    doc="W/eval/task_labels.parquet: per task, its tiles (after zero-label subsampling) with split and label.",
    schema=pa.schema(
        [
            pa.field("task", pa.string(), nullable=False),
            pa.field("tile_id", pa.string(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
            pa.field("label", pa.float64(), nullable=False),
        ]
    ),
)

EVAL_RESULTS = Contract(
    name="eval_results",
    version=3,
    schema=pa.schema(
        [
            pa.field("setting", pa.string(), nullable=False),  # masked (label tags removed) | unmasked
            pa.field("task", pa.string(), nullable=False),
            # geojepa (the EMA target encoder) | geojepa_context | untrained, untrained_1, ... (twins) | tagpool |
            # bag_of_tags | SRAI peers | dummy
            pa.field("model", pa.string(), nullable=False),
            pa.field("probe", pa.string(), nullable=False),  # ridge | mlp | knn | linear | median
            pa.field("metric", pa.string(), nullable=False),  # mae | r2 | accuracy | roc_auc
            pa.field("mean", pa.float64()),  # over seeds; null when undefined (e.g. one class in test)
            pa.field("std", pa.float64()),
            pa.field("seeds", pa.int32(), nullable=False),
            pa.field("n_train", pa.int32(), nullable=False),
            pa.field("n_test", pa.int32(), nullable=False),
            pa.field("val_mean", pa.float64()),  # the same metric on held-out validation tiles (null: none)
            pa.field("params", pa.string()),  # what the read-out chose, e.g. alpha=0.1,target=log1p; k=10
        ]
    ),
    doc="W/eval/results.parquet: one row per (setting, task, model, probe, metric), test split (val_mean: val).",
)

PREDICTIONS = Contract(
    name="predictions",
    version=1,
    schema=pa.schema(
        [
            pa.field("setting", pa.string(), nullable=False),
            pa.field("task", pa.string(), nullable=False),
            pa.field("model", pa.string(), nullable=False),
            pa.field("probe", pa.string(), nullable=False),  # ridge | mlp | knn | linear | median (Dummy)
            pa.field("split", pa.string(), nullable=False),  # val (held-out predictions) | test
            pa.field("tile_id", pa.string(), nullable=False),
            pa.field("label", pa.float64(), nullable=False),
            pa.field("pred", pa.list_(pa.float32()), nullable=False),  # one per probe seed
        ]
    ),
    doc="W/eval/predictions.parquet: each probe's prediction of every val and test tile, per seed: the "
    "uncertainty over test tiles (bootstrap) and model choice on validation are computed from it.",
)

PROBE_FEATURES = Contract(
    name="probe_features",
    version=1,
    schema=pa.schema(
        [
            pa.field("task", pa.string(), nullable=False),
            pa.field("model", pa.string(), nullable=False),  # geojepa | geojepa_context | twins | tagpool
            pa.field("tile_id", pa.string(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
            pa.field("group_id", pa.string(), nullable=False),  # the tile's spatial group (tiles.parquet)
            pa.field("label", pa.float64(), nullable=False),
            pa.field("features", pa.list_(pa.float32()), nullable=False),  # the protocol's tile vector, masked
        ]
    ),
    doc="W/eval/probe_features.parquet: the masked tile vectors of the feature sets that mean the same in every "
    "region (the encoders' and TagPool's), for the corpus report's cross-region probe.",
)

CORPUS_RESULTS = Contract(
    name="corpus_results",
    version=3,
    schema=pa.schema(
        [
            pa.field("region", pa.string(), nullable=False),  # a region's name, or pooled: all | trained | holdout
            pa.field("setting", pa.string(), nullable=False),  # masked | unmasked
            pa.field("task", pa.string(), nullable=False),
            pa.field("model", pa.string(), nullable=False),  # as in EVAL_RESULTS
            pa.field("probe", pa.string(), nullable=False),  # ridge | mlp | knn | linear | median (Dummy)
            pa.field("metric", pa.string(), nullable=False),  # mae | roc_auc | relative_mae (MAE / Dummy's)
            pa.field("mean", pa.float64(), nullable=False),  # over the (union of the) test tiles, mean over seeds
            pa.field("std", pa.float64(), nullable=False),  # over probe seeds
            pa.field("seeds", pa.int32(), nullable=False),
            pa.field("n_test", pa.int64(), nullable=False),
            pa.field("val_mean", pa.float64()),  # the same on the validation tiles
            pa.field("ci_low", pa.float64(), nullable=False),  # 95% bootstrap interval over test tiles
            pa.field("ci_high", pa.float64(), nullable=False),
            pa.field("regions", pa.int64(), nullable=False),
        ]
    ),
    doc="OUT/corpus_results.parquet: test metrics per region and pooled (all, trained, holdout; relative_mae: each "
    "region's MAE over its Dummy's, averaged over regions), by setting, task, model and probe, with seed spread "
    "and a bootstrap interval over test tiles; region 'cross-region' rows: one probe fitted on every trained-on "
    "region.",
)

ALL = {c.name: c for c in (ENTITIES, TILES, TILE_ENTITIES, TILE_IMAGES, TAG_VOCAB, TOKENS, EMBEDDINGS, TASK_LABELS,
                           EVAL_RESULTS, PREDICTIONS, PROBE_FEATURES, CORPUS_RESULTS)}
