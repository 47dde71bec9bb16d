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
    """Default config with MLflow off (tests of tracking turn it on explicitly)."""
    return load_config(overrides=["tracking.enabled=false"])


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
