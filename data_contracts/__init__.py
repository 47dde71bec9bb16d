"""Data contracts: one pyarrow schema per pipeline artifact, with validated I/O.

Importable with only pyarrow and numpy installed (training hosts read token
shards through it).
"""

from data_contracts.io import (
    ArtifactWriter,
    ContractError,
    atomic_path,
    embedding_dim,
    open_artifact,
    read_table,
    replace_folder,
    schema_diff,
    sweep,
    write_table,
)
from data_contracts.schemas import (
    ALL,
    CORPUS_RESULTS,
    EMBEDDING_KEYS,
    EMBEDDINGS,
    ENTITIES,
    EVAL_RESULTS,
    PREDICTIONS,
    PROBE_FEATURES,
    TAG_VOCAB,
    TASK_LABELS,
    TILE_ENTITIES,
    TILE_IMAGES,
    TILES,
    TOKENS,
    Contract,
    entity_embeddings,
    tile_embeddings,
)

__all__ = [
    "ALL",
    "CORPUS_RESULTS",
    "EMBEDDINGS",
    "ENTITIES",
    "EVAL_RESULTS",
    "PREDICTIONS",
    "PROBE_FEATURES",
    "TAG_VOCAB",
    "TASK_LABELS",
    "TILE_ENTITIES",
    "TILE_IMAGES",
    "TILES",
    "TOKENS",
    "ArtifactWriter",
    "Contract",
    "ContractError",
    "atomic_path",
    "open_artifact",
    "read_table",
    "replace_folder",
    "schema_diff",
    "sweep",
    "write_table",
    "EMBEDDING_KEYS",
    "embedding_dim",
    "entity_embeddings",
    "tile_embeddings",
]
