"""Shared fixtures: the bundled real OSM samples, and one extraction of each reused by many tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from geojepa.config import load_config

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples"
HELSINKI = SAMPLES / "helsinki.osm.pbf"
KOTKA = SAMPLES / "kotka.osm.pbf"


@pytest.fixture(scope="session")
def cfg():
    """Default config with MLflow off (tests of tracking turn it on explicitly) and without the SRAI peers (their
    own tests and the evaluation tests' real run cover them)."""
    return load_config(overrides=["tracking.enabled=false", "evaluate.peers=[]"])


@pytest.fixture(scope="session")
def extracted(tmp_path_factory, cfg):
    """W directories with entities.parquet for both samples."""
    from geojepa.extract import extract

    out = {}
    for pbf in (HELSINKI, KOTKA):
        w = tmp_path_factory.mktemp(pbf.name.split(".")[0])
        extract(pbf, w, cfg)
        out[pbf.name.split(".")[0]] = w
    return out


def small_tokens(cfg, **updates):
    """Tokens settings small enough for tests."""
    small = {"geometry_epochs": 2, "geometry_max_shapes": 1500, "geometry_dim": 64, **updates}
    return cfg.model_copy(update={"tokens": cfg.tokens.model_copy(update=small)})


@pytest.fixture(scope="session")
def tokenised(tmp_path_factory, extracted, cfg):
    """Kotka tiled with rendered imagery and tokenised (small shape encoder)."""
    import shutil

    from geojepa.tile import tile
    from geojepa.tokens import tokens

    w = tmp_path_factory.mktemp("tokens")
    shutil.copy(extracted["kotka"] / "entities.parquet", w / "entities.parquet")
    tile(w, cfg, imagery="render")
    summary = tokens(w, small_tokens(cfg))
    return w, summary
