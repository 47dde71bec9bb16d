from __future__ import annotations

import pytest

from geojepa.config import load_config
from geojepa.errors import GeoJepaError


def test_defaults_match_the_reference():
    cfg = load_config()
    assert cfg.tile.size_m == 300 and cfg.tile.min_entities == 5 and cfg.tile.max_entities == 1250
    assert cfg.tile.split == (0.8, 0.1, 0.1) and cfg.tile.seed == 42 and cfg.tile.group_size == 4
    assert cfg.extract.drop_key_prefixes == ("tiger:", "source", "import", "yh:", "created_by")


def test_overrides_are_typed_and_config_is_frozen():
    cfg = load_config(overrides=["extract.read_block_mb=7", "extract.bbox=[1, 2, 3, 4]", "tracking.enabled=false"])
    assert cfg.extract.read_block_mb == 7 and cfg.extract.bbox == (1.0, 2.0, 3.0, 4.0) and not cfg.tracking.enabled
    with pytest.raises(Exception):
        cfg.extract.read_block_mb = 8


@pytest.mark.parametrize("override,needle", [
    ("extract.nope=1", "unknown config key 'extract.nope'"),
    ("nosection.x=1", "unknown config key 'nosection'"),
    ("extract.read_block_mb=-1", "extract.read_block_mb"),
    ("extract.node_index=ssd", "extract.node_index"),
    ("extract", "expected section.key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(GeoJepaError, match=needle.replace(".", r"\.").replace("'", "'")):
        load_config(overrides=[override])


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("extract:\n  read_block_mb: 10\n  colour: red\n")
    with pytest.raises(GeoJepaError, match=r"mine.yaml: unknown config key 'extract.colour'"):
        load_config(path)
