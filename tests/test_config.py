from __future__ import annotations

import pytest
from pydantic import ValidationError

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
    with pytest.raises(ValidationError):
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


@pytest.mark.parametrize("bbox,needle", [
    ("[-inf, -90, inf, 90]", "finite"),
    ("[.nan, 60, 27, 61]", "finite"),
    ("[-190, 60, 27, 61]", "longitudes"),
    ("[26, -91, 27, 61]", "latitudes"),
    ("[27, 60, 26, 61]", "min_lon < max_lon"),
    ("[26, 61, 27, 61]", "min_lat < max_lat"),
])
def test_bbox_must_be_on_earth_and_ordered(bbox, needle):
    """`--bbox -inf,-90,inf,90` once ran and silently kept only the points."""
    with pytest.raises(GeoJepaError, match=needle) as e:
        load_config(overrides=[f"extract.bbox={bbox}"])
    assert str(e.value).startswith(f"--set extract.bbox={bbox}: extract.bbox")
    assert "default.yaml" not in str(e.value)


def test_whole_world_bbox_is_fine():
    assert load_config(overrides=["extract.bbox=[-180, -90, 180, 90]"]).extract.bbox == (-180, -90, 180, 90)


@pytest.mark.parametrize("override", ["extract.bbox=[1,2", "extract.bbox=[26.9,60.4,27,60.5]]", "extract.x={a"])
def test_override_that_is_not_yaml_is_named(override):
    with pytest.raises(GeoJepaError) as e:
        load_config(overrides=[override])
    assert str(e.value).startswith(f"--set {override}: not valid YAML:"), str(e.value)
    assert "\n" not in str(e.value)


def test_errors_name_the_override_not_the_file(tmp_path):
    with pytest.raises(GeoJepaError) as e:
        load_config(overrides=["extract.read_block_mb=-1"])
    assert str(e.value).startswith("--set extract.read_block_mb=-1: extract.read_block_mb"), str(e.value)
    assert "default.yaml" not in str(e.value)
    # A bad value in the file still names the file, and each source its own problems.
    path = tmp_path / "mine.yaml"
    path.write_text("tile:\n  size_m: -3\n")
    with pytest.raises(GeoJepaError) as e:
        load_config(path, overrides=["extract.threads=0"])
    assert f"{path}: tile.size_m" in str(e.value) and "--set extract.threads=0: extract.threads" in str(e.value)
    # A whole section set by an override is blamed on it too.
    with pytest.raises(GeoJepaError, match=r"^--set extract=\{threads: 0\}: extract\.threads"):
        load_config(overrides=["extract={threads: 0}"])


def test_override_below_a_value_is_named():
    with pytest.raises(GeoJepaError, match=r"--set extract\.threads\.x=1: 'threads' is not a section"):
        load_config(overrides=["extract.threads.x=1"])


def test_default_yaml_and_the_typed_defaults_never_drift_apart():
    """configs/default.yaml spells out every key with the value the pydantic model would use anyway."""
    import yaml

    from geojepa.config import DEFAULT_CONFIG, Config
    from geojepa.model.sizes import ModelSizes
    from geojepa.settings import to_dict
    from geojepa.train.settings import MaskConfig, TrainSettings

    written = yaml.safe_load(DEFAULT_CONFIG.read_text())
    typed = Config().model_dump(mode="json")

    def same(a, b, where=""):
        if isinstance(b, dict):
            assert isinstance(a, dict) and set(a) == set(b), f"{where}: keys differ: {set(a) ^ set(b)}"
            for k in b:
                same(a[k], b[k], f"{where}.{k}")
        else:
            assert (list(a) if isinstance(a, tuple) else a) == b, f"{where}: {a!r} in default.yaml, {b!r} typed"

    same(written, typed)
    # The mask settings are the training code's own defaults (training hosts read them without pydantic).
    assert Config().train.masks.model_dump() == MaskConfig().__dict__
    # The train section documents the training code's dataclasses: their defaults, key for key.
    same(written["train"], {**to_dict(ModelSizes()), **to_dict(TrainSettings())}, "train")


def test_the_train_section_is_the_training_dataclasses():
    """Its fields, types, defaults and bounds are those of ModelSizes, TrainSettings and MaskConfig (defined
    once, beside the code); a field added there is a config key, with no other edit."""
    import dataclasses

    from geojepa.config import Config, MaskSettings, TrainConfig
    from geojepa.model.sizes import ModelSizes
    from geojepa.train.settings import MaskConfig, TrainSettings

    fields = [f.name for c in (ModelSizes, TrainSettings) for f in dataclasses.fields(c)]
    assert list(TrainConfig.model_fields) == fields
    assert list(MaskSettings.model_fields) == [f.name for f in dataclasses.fields(MaskConfig)]
    cfg = load_config(overrides=["train.width=64", "train.masks.blocks=2", "train.betas=[0.8, 0.9]"])
    assert cfg.train.as_model_sizes() == ModelSizes(width=64)
    assert cfg.train.as_train_settings() == TrainSettings(masks=MaskConfig(blocks=2), betas=(0.8, 0.9))
    assert Config().train.as_train_settings() == TrainSettings()


@pytest.mark.parametrize("override,needle", [
    ("train.widht=3", "unknown config key 'train.widht'"),
    ("train.masks.blokcs=3", "unknown config key 'train.masks.blokcs'"),
    ("train.epochs=0", "train.epochs: Input should be greater than 0"),
    ("train.masks.random_ratio=1", "train.masks.random_ratio: Input should be less than 1"),
    ("train.regulariser=vicrge", "train.regulariser"),
    ("train.masks.area_aspect=[2, 1]", "train.masks: area_aspect=[2.0, 1.0]: expected 0 < low <= high"),
])
def test_a_bad_training_setting_fails_when_the_config_is_loaded_naming_it(override, needle):
    with pytest.raises(GeoJepaError) as e:
        load_config(overrides=[override])
    assert str(e.value).startswith(f"--set {override}: ") and needle in str(e.value), str(e.value)


def test_the_training_dataclasses_check_their_own_bounds_without_pydantic():
    """What a bare GPU host builds from the launcher's JSON is checked there too, naming the field."""
    from geojepa.model.sizes import ModelConfig, ModelSizes
    from geojepa.settings import from_dict
    from geojepa.train.settings import MaskConfig, TrainRun, TrainSettings

    with pytest.raises(ValueError, match=r"^epochs=0: should be greater than 0"):
        TrainSettings(epochs=0)
    with pytest.raises(ValueError, match=r"^width=-1"):
        ModelConfig(dims=(8, 0, 0), width=-1)
    with pytest.raises(ValueError, match=r"^p_random=1.5: should be less than or equal to 1"):
        MaskConfig(p_random=1.5)
    with pytest.raises(ValueError, match=r"unknown TrainSettings setting\(s\) 'lrr'"):
        from_dict(TrainSettings, {"lrr": 1.0})
    # The run's JSON form (train_config.json, each checkpoint's config) is flat, and reads back the same.
    run = TrainRun(model=ModelSizes(width=64), settings=TrainSettings(masks=MaskConfig(blocks=2)), out_dir="/m")
    flat = run.to_json()
    assert flat["width"] == 64 and flat["masks"]["blocks"] == 2 and flat["betas"] == [0.9, 0.95]
    assert flat["data"] == ["/m"] and flat["regions"] == ["m"]
    assert TrainRun.from_json(flat) == run
    assert TrainRun.from_json({"work_dir": "/m", "width": 64, "masks": {"blocks": 2}}) == run
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'widht'"):
        TrainRun.from_json({**flat, "widht": 3})


def test_the_training_settings_import_with_the_standard_library_alone():
    """geojepa.config reads them without torch; a GPU host without pydantic, mlflow or prefect builds them."""
    import subprocess
    import sys

    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'pydantic', 'mlflow', 'prefect', 'torch', 'numpy', 'yaml', 'pyarrow'}:
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
from geojepa.train.settings import TrainRun
from geojepa.model.sizes import ModelConfig
TrainRun.from_json({"out_dir": "/m", "width": 64, "masks": {"area_aspect": [0.5, 3]}})
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
