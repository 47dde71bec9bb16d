"""The evaluation protocols: what tile vector every model is probed with and which read-outs score it.

- ``v2`` (default): the tile vector of every encoder (GeoJEPA, its untrained twins) and of TagPool is the
  *mean* over the tile's tokens plus log(1 + number of tokens) per modality; three read-outs, fixed in
  advance and all reported: closed-form ridge, an MLP (3 seeds, at most 100 epochs, patience 10) and cosine
  kNN, on standardised features clipped at |z| <= 5 (``geojepa.evaluate.readouts``); three untrained twins.
  Headline metric: MAE for counts and regression, ROC-AUC for binary tasks.
- ``reference``: the thesis's comparison: concat(mean, max), a linear and an MLP probe trained with AdamW and
  stopped on validation (5 seeds, 300 epochs, patience 30), kNN at k, one twin, MAE everywhere.

Why v2: max-pooling a random network's outputs gives a bank of random "an entity of kind X is here"
detectors, and the mean of a random network is a linear map of the tile's mean input, so with an MLP on
concat(mean, max) an untrained twin is a strong random-feature classifier of the inputs: the comparison the
evaluation exists for ("does training add something a probe can use") was decided by the read-out. Mean
pooling cannot count: every pooled vector gets the token counts, so a count task measures what the vector
adds beyond them. A single twin was as far from another twin as the gaps reported, hence several.
"""

from __future__ import annotations

from dataclasses import dataclass

HEADLINE = {"count": "mae", "regression": "mae", "binary": "roc_auc"}  # v2's headline metric by task kind


@dataclass(frozen=True)
class Protocol:
    name: str
    pooling: str  # mean | mean_max
    count_features: bool
    probes: tuple[str, ...]  # masked setting
    unmasked_probes: tuple[str, ...]
    twin_seeds: int
    seeds: int
    max_epochs: int
    patience: int
    clip: bool  # standardised features clipped, constant columns zeroed, predictions in the labels' range
    choose: bool  # ridge / kNN settings chosen on held-out tiles (else: kNN at k)
    binary_loss: str  # the MLP's loss on binary tasks: logistic (a probability) | l1
    cv_min_val: int = 100  # fewer validation tiles than this: settings chosen by grouped cross-validation
    cv_folds: int = 5

    def headline(self, kind: str) -> str:
        return HEADLINE[kind] if self.name == "v2" else "mae"

    def twins(self) -> list[str]:
        """The twins' model names: ``untrained`` (seed + 0), ``untrained_1``, ..."""
        return ["untrained"] + [f"untrained_{i}" for i in range(1, self.twin_seeds)]


PRESETS = {
    "v2": Protocol("v2", "mean", True, ("ridge", "mlp", "knn"), ("ridge",), 3, 3, 100, 10, True, True, "logistic"),
    "reference": Protocol("reference", "mean_max", False, ("linear", "mlp", "knn"), ("linear", "mlp", "knn"), 1, 5,
                          300, 30, False, False, "l1"),
}


def is_twin(model: str) -> bool:
    return model == "untrained" or model.startswith("untrained_")


def protocol(section) -> Protocol:
    """The protocol of an ``evaluate`` config section: its preset, with the fields the section sets. A
    combination that cannot run (ridge under the reference protocol, which chooses nothing on held-out tiles)
    raises ``ValueError`` saying so."""
    base = PRESETS[section.protocol]
    given = {k: getattr(section, k) for k in ("pooling", "count_features", "twin_seeds", "seeds", "max_epochs",
                                              "patience", "cv_min_val", "cv_folds") if getattr(section, k) is not None}
    if not base.choose and "ridge" in (section.probes or ()):
        raise ValueError("evaluate.probes: ridge chooses its penalty on held-out tiles, which the reference protocol "
                         "does not do; use evaluate.protocol: v2, or the reference's linear, mlp and knn")
    if section.probes is not None:
        given["probes"] = tuple(section.probes)
        given["unmasked_probes"] = tuple(p for p in section.probes if p in base.unmasked_probes) or tuple(
            section.probes[:1])
    return Protocol(**{**base.__dict__, **given})
