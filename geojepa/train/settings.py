"""The training settings: their one definition (the ``train`` section of the config is built from these and
``geojepa.model.sizes.ModelSizes``; ``configs/default.yaml`` documents the same defaults, a test keeps them
equal). The standard library only: a bare GPU host builds them from the launcher's JSON without pydantic.

``TrainRun`` is one training job as the torchrun child gets it: the settings, the model sizes and where it
reads and writes. Its JSON form (``checkpoints/train_config.json``, and each checkpoint's ``config``) is flat:
the ``train`` section's keys beside the run's own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from geojepa.model.sizes import ModelSizes
from geojepa.settings import check, from_dict, pick, setting, to_dict


def is_compact(path: str | Path) -> bool:
    """A compact tokens file (``geojepa.train.compact``), not a region's work directory."""
    return str(path).endswith(".npz")


@dataclass(frozen=True)
class MaskConfig:
    """JEPA masking (the reference's settings; ``geojepa.train.masks``), on whole entities."""

    blocks: int = setting(4, gt=0)  # target blocks per tile
    p_modality: float = setting(0.2, ge=0, le=1)  # one modality as context, the rest targets (several modalities)
    p_random: float = setting(0.25, ge=0, le=1)  # otherwise random entities: random_ratio of them targets
    random_ratio: float = setting(0.45, gt=0, lt=1)
    random_min_context: float = setting(0.10, gt=0, lt=1)
    block_area: float = setting(0.25, gt=0, lt=1)  # otherwise rectangles covering this share of the tile each
    area_aspect: tuple[float, float] = (0.5, 2.0)  # their aspect ratios: log-uniform in this range
    area_min_context: float = setting(0.15, gt=0, lt=1)
    target_box: bool = False  # the predictor is told each target's rotated box (True) or only its centre
    # random and area masks: chance that a target entity with several tokens keeps one of them (tags or
    # geometry, at random) as context, so that its other token is predicted from it (partial entity masks)
    p_partial: float = setting(0.0, ge=0, le=1)

    def __post_init__(self):
        check(self)
        lo, hi = self.area_aspect
        if not 0 < lo <= hi:
            raise ValueError(f"area_aspect={list(self.area_aspect)}: expected 0 < low <= high")


@dataclass(frozen=True)
class TrainSettings:
    """token shards -> GeoJEPA checkpoints: data, optimisation, schedules, loss, masking (the reference's
    settings; ``configs/demo.yaml`` overrides the sizes and the run's length)."""

    modalities: tuple[Literal["tags", "geometry", "image"], ...] = ("tags", "geometry")  # T, GT, TI, GTI
    epochs: int = setting(300, gt=0)
    max_steps: int | None = None  # None: epochs x the steps of an epoch
    batch_tiles: int = setting(960, gt=0)  # global batch: each rank gets batch_tiles / (ranks x accumulate)
    accumulate: int = setting(1, gt=0)
    lr: float = 1e-3
    warmup: float = setting(0.1, ge=0, le=1)  # share of the steps, from warmup_start x lr
    warmup_start: float = 0.1
    final_lr: float = 1e-6
    wd: float = 0.04
    final_wd: float = 0.4
    ema: float = 0.997
    final_ema: float = 0.99999
    # Over the run, sum(1 - momentum) >= ema_turnover (e^-5: < 1% of the target's initial weights left): long
    # runs keep the ramp above, short ones move it away from 1. 0: the plain ramp.
    ema_turnover: float = setting(5.0, ge=0)
    clip: float = setting(10.0, gt=0)  # gradient norm
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when a GPU is visible
    num_workers: int = setting(2, ge=0)  # DataLoader workers per rank
    log_every: int = setting(10, gt=0)
    checkpoint_every: int = setting(500, gt=0)
    keep_last: int = setting(3, ge=1)  # checkpoints kept
    pad_to_max: bool = False  # the padded-attention baseline (benchmarks)
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile the transformer blocks; auto: on CUDA
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW
    vicreg_scale: float = setting(0.02, ge=0)  # loss = jepa + vicreg_scale x (var_weight x var + cov_weight x cov)
    var_weight: float = setting(25.0, ge=0)
    cov_weight: float = setting(1.0, ge=0)
    # vicreg: VICReg on the predictions and the tiles' mean context embeddings (rewards a shared tile component);
    # target: on the predictions only, against the targets' own per-dimension std and covariance
    regulariser: Literal["vicreg", "target"] = "vicreg"
    target_centre: bool = False  # predict each target minus its (tile, modality)'s context mean target
    # > 0: a head predicts each tile's mean target from its context's mean output, its loss with this weight
    # (the tile's meaning, which centred targets no longer ask of the predictor)
    tile_head: float = setting(0.0, ge=0)
    max_entities_per_tile: int | None = setting(None, ge=1)  # a longer training tile: a random spatial crop of it
    # a rank's (micro-)batch: at most this many tokens (after the crop), its tiles of similar lengths split into
    # consecutive parts; a longer tile goes alone. None: batch_tiles alone bounds a batch
    max_batch_tokens: int | None = setting(None, ge=1)
    # share of context entities shown by one of their two tokens only (tags or geometry; the reference: 0.3)
    entity_dropout: float = setting(0.0, ge=0, lt=1)
    masks: MaskConfig = setting(factory=MaskConfig)
    # Several regions: tiles drawn per epoch proportional to each region's training tiles, none above region_cap
    # times the median region's; or explicit weights by region name (the same total, shared by weight).
    region_cap: float = setting(2.0, gt=0)
    region_weights: dict[str, float] | None = None

    def __post_init__(self):
        check(self)


@dataclass(frozen=True)
class TrainRun:
    """One training job: what ``geojepa.train.train.train`` takes (``geojepa train`` writes it as JSON)."""

    model: ModelSizes
    settings: TrainSettings
    out_dir: str  # checkpoints go to out_dir/checkpoints
    # the regions' work directories (their token shards), or one compact tokens file (.npz:
    # geojepa.train.compact) holding several; empty: out_dir alone
    data: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()  # their names; empty: the folders' names (a compact file: the names it holds)
    resume: bool = False  # continue from the last checkpoint that loads
    stop_after: int | None = None  # checkpoint and stop at this step (a time-limited job; resume later)
    # wall-clock budget in seconds: after 10 steps the run's length is cut to what fits in it (the schedules
    # follow), and at the limit it checkpoints and stops whatever the step (bench/gpu.sh's arms)
    time_limit_s: float | None = None
    tracking_uri: str | None = None  # MLflow (rank 0, when mlflow is installed); None: stdout only
    mlflow_run_id: str | None = None  # the launcher's run, continued
    experiment: str = "geojepa"
    tokenizer_digest: str | None = None  # recorded in the checkpoints (embedding and export check it)
    corpus: str | None = None  # recorded

    def __post_init__(self):
        data = self.data or (self.out_dir,)
        object.__setattr__(self, "data", tuple(str(d) for d in data))
        object.__setattr__(self, "regions", tuple(self.regions) or tuple(Path(d).name for d in data))
        if self.resume and self.time_limit_s:
            raise ValueError("time_limit_s and resume: a run cut to fit its budget cannot be continued (its cut "
                             "length is not recorded); resume with stop_after instead")
        if not self.compact and len(self.regions) != len(self.data):
            raise ValueError(f"{len(self.regions)} region names for {len(self.data)} regions' work directories")

    @property
    def compact(self) -> bool:
        """The data is one compact tokens file (``geojepa.train.compact``)."""
        return len(self.data) == 1 and is_compact(self.data[0])

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainRun:
        """From the flat JSON form; ``work_dir`` stands for ``out_dir`` (a single region's own folder). A key
        that is neither a setting nor the run's is a ValueError naming it."""
        data = dict(data)
        if "work_dir" in data:
            data.setdefault("out_dir", data["work_dir"])
            del data["work_dir"]
        own = {f.name for f in dataclasses.fields(cls)} - {"model", "settings"}
        sizes, settings = pick(ModelSizes, data), pick(TrainSettings, data)
        rest = {k: v for k, v in data.items() if k not in sizes and k not in settings}
        if unknown := sorted(set(rest) - own):
            raise ValueError(f"train config: unknown key(s) {', '.join(map(repr, unknown))}")
        if "out_dir" not in rest:
            raise ValueError("train config: no out_dir (or work_dir)")
        return from_dict(cls, {**rest, "model": from_dict(ModelSizes, sizes),
                               "settings": from_dict(TrainSettings, settings)})

    def to_json(self) -> dict[str, Any]:
        """The flat JSON form (the format of ``train_config.json`` and of every checkpoint's ``config``)."""
        own = {k: v for k, v in to_dict(self).items() if k not in ("model", "settings")}
        return {**to_dict(self.settings), **to_dict(self.model), **own}
