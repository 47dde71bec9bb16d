"""The model's sizes: the one definition of the ``train`` section's ``width`` ... ``pred_heads`` (the standard
library only, so ``geojepa.config`` reads it without torch; ``geojepa.model.jepa`` builds the model from it)."""

from __future__ import annotations

from dataclasses import dataclass

from geojepa.settings import check, setting


@dataclass(frozen=True)
class ModelSizes:
    """The reference's sizes (12 x 384 encoder, 4 x 192 predictor); ``configs/demo.yaml`` sets small ones."""

    width: int = setting(384, gt=0)  # token width of the context and target encoders
    depth: int = setting(12, gt=0)  # encoder blocks
    heads: int = setting(8, gt=0)  # encoder attention heads
    mlp: int = setting(1536, gt=0)  # encoder MLP hidden width
    pred_width: int = setting(192, gt=0)  # predictor token width (its MLP: 4 x pred_width)
    pred_depth: int = setting(4, gt=0)  # predictor blocks
    pred_heads: int = setting(6, gt=0)
    # Fourier features of the 8 position numbers (sin and cos at pi x 2^i, i < pos_fourier) beside them, into
    # the encoders' and predictor's position MLPs: 0 (the reference) gives the MLP the raw numbers only. At
    # most 8: a compact corpus stores positions in fp16 (error ~2.4e-4), noise at finer frequencies
    pos_fourier: int = setting(0, ge=0, le=8)

    def __post_init__(self):
        check(self)


@dataclass(frozen=True, kw_only=True)
class ModelConfig(ModelSizes):
    """A model to build: the sizes and the input width of each modality's tokens (from the token shards)."""

    dims: tuple[int, int, int]  # input widths of tags, geometry, image tokens (0: a modality the model lacks)
