"""The names the corpus and ablation reports share: the region groups pooled over, the best-peer row, the
named baselines, and the order models are listed in."""

from __future__ import annotations

from geojepa.evaluate.peers import PEERS
from geojepa.evaluate.probes import ENCODERS
from geojepa.evaluate.protocol import is_twin

GROUPS = ("all", "trained", "holdout")
BEST_PEER = "best_peer"  # per task and read-out the peer with the best pooled validation score
NAMED = ("tagpool", "bag_of_tags")  # the baselines besides the twins, the peers and Dummy


def model_order(model: str) -> tuple:
    """Encoders, twins, TagPool, bag-of-tags, the peers, Dummy; then the rest by name."""
    base = model.rsplit("/", 1)[-1]
    rank = ([*ENCODERS].index(base) if base in ENCODERS else 2 if is_twin(base) else
            3 + [*NAMED, *PEERS, "dummy"].index(base) if base in (*NAMED, *PEERS, "dummy") else 99)
    return rank, model
