"""The registered model as an MLflow pyfunc: ``mlflow.pyfunc.load_model("models:/geojepa-encoder/N")`` gives
an object whose ``predict`` takes a DataFrame with a ``work_dir`` column (region work directories, or token
shard folders) and returns one row per tile: ``work_dir``, ``tile_id``, ``split`` and ``embedding`` (the EMA
target encoder's concat(mean, max), float32), the vectors ``geojepa embed`` writes. The caller needs neither
the checkpoint's layout nor the encoder's batch format. The shards must have been made with the model's
tokenizer (its digest is a tag of the model version); a shard of other widths is refused.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.string, "work_dir")]),
    outputs=Schema([ColSpec(DataType.string, "work_dir"), ColSpec(DataType.string, "tile_id"),
                    ColSpec(DataType.string, "split"), ColSpec(Array(DataType.float), "embedding")]),
    params=ParamSchema([ParamSpec("batch_tiles", DataType.long, 64)]),
)


class TileEmbedder(mlflow.pyfunc.PythonModel):
    """Tile embeddings of token shards (see the module docstring)."""

    def load_context(self, context) -> None:
        from geojepa.model.jepa import encoder_from_checkpoint

        self.encoder, cfg = encoder_from_checkpoint(context.artifacts["checkpoint"])
        self.modalities = tuple(cfg["modalities"])
        self.digest = cfg.get("tokenizer_digest")

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from geojepa.embeddings.embed import embedded_batches
        from geojepa.encoding.models import check_widths
        from geojepa.encoding.shards import token_index
        from geojepa.errors import GeoJepaError
        from geojepa.workdir import WorkDir

        batch = int((params or {}).get("batch_tiles", 64))
        rows = {"work_dir": [], "tile_id": [], "split": [], "embedding": []}
        for folder in model_input["work_dir"]:
            tokens = WorkDir(folder).tokens if WorkDir(folder).tokens.is_dir() else Path(folder)
            tok = token_index(tokens)
            if not tok.n:
                raise GeoJepaError(f"{tokens}: no token shards")
            made = WorkDir(tokens.parent).tokenizer_digest()
            if made != self.digest:
                raise GeoJepaError(f"{tokens}: made with tokenizer {made or '(region-own)'}, the model with "
                                   f"{self.digest or 'its region-own tokenizer'}: tokenise the region with the "
                                   "model's tokenizer (geojepa embed does)")
            check_widths(tok.dims, self.modalities, self.encoder, "the registered model", tokens)
            for r, vectors, _ in embedded_batches(tok, self.encoder, self.modalities, batch):
                rows["work_dir"] += [str(folder)] * len(r)
                rows["tile_id"] += [tok.ids[i] for i in r]
                rows["split"] += [str(tok.split[i]) for i in r]
                rows["embedding"] += list(np.asarray(vectors, np.float32))
        return pd.DataFrame(rows)


def log_embedder(checkpoint: Path, registered_model_name: str):
    """Log the pyfunc (the checkpoint as its artifact, this project's code beside it, so the model loads where
    geojepa is not installed) in the active run and register it."""
    import torch

    import data_contracts
    import geojepa

    code = [str(Path(m.__file__).parent) for m in (geojepa, data_contracts)]
    return mlflow.pyfunc.log_model(
        name="tile_embedder", python_model=TileEmbedder(), artifacts={"checkpoint": str(checkpoint)},
        signature=SIGNATURE, registered_model_name=registered_model_name, code_paths=code,
        # the environment, named (inferring it would load the model in a child process at every training)
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas", "pyarrow", "pydantic",
                          "shapely", "pyproj"])
