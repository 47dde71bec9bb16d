"""A corpus: many regions, one frozen tokenizer, one model.

A corpus file (YAML) lists regions by name with their source, imagery and
role::

    name: demo
    regions:
      - {name: kotka, source: kotka, role: train}                  # a bundled extract (data/samples/kotka.osm.pbf)
      - {name: wight, source: /data/wight.osm.pbf, role: train}    # a PBF path (relative: to the corpus file)
      - {name: monaco, source: geofabrik:europe/monaco, role: holdout, imagery: null}

``train`` regions give the tokenizer its vocabulary and shapes and the model
its training tiles (their ``train`` split); ``holdout`` regions are only
tokenised and evaluated: training never sees any of their tiles.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from geojepa.config import read_yaml_mapping
from geojepa.errors import GeoJepaError
from geojepa.workdir import WorkDir

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CorpusRegion(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    source: str  # a bundled extract's name, a PBF path, or geofabrik:<region id>
    role: Literal["train", "holdout"]
    imagery: str | list[str] | None = "render"
    weight: float | None = Field(None, gt=0)  # sampling weight in training (None: proportional to tiles, capped)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.match(v):
            raise ValueError(f"region name {v!r}: letters, digits, '.', '_' and '-' only (it names a folder)")
        return v


class Corpus(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    regions: tuple[CorpusRegion, ...]
    path: Path | None = None  # the file it was read from (set by load_corpus)

    @model_validator(mode="after")
    def _check(self) -> Corpus:
        names = [r.name for r in self.regions]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"region names repeated: {dup}")
        if not any(r.role == "train" for r in self.regions):
            raise ValueError("no region has role 'train'")
        return self

    def train_regions(self) -> list[CorpusRegion]:
        return [r for r in self.regions if r.role == "train"]

    def holdout_regions(self) -> list[CorpusRegion]:
        return [r for r in self.regions if r.role == "holdout"]

    def work_dir(self, region: CorpusRegion, work_root: Path | str) -> WorkDir:
        return WorkDir(Path(work_root) / region.name)

    def tokenizer_dir(self, work_root: Path | str) -> Path:
        return Path(work_root) / f"{self.name}-tokenizer"

    def model_dir(self, work_root: Path | str) -> Path:
        return Path(work_root) / f"{self.name}-model"

    def pbf(self, region: CorpusRegion) -> Path | None:
        """The region's PBF file; None for a Geofabrik region (downloaded by the flow)."""
        if region.source.startswith("geofabrik:"):
            return None
        if region.source.endswith(".pbf"):
            p = Path(region.source)
            return p if p.is_absolute() or self.path is None else (self.path.parent / p)
        return SAMPLES / f"{region.source}.osm.pbf"

    def geofabrik_id(self, region: CorpusRegion) -> str | None:
        return region.source.removeprefix("geofabrik:") if region.source.startswith("geofabrik:") else None


def load_corpus(path: Path | str) -> Corpus:
    """Read and check a corpus file: every error names the file (and the region)."""
    path = Path(path)
    tree = read_yaml_mapping(path, "corpus", "a mapping with 'name' and 'regions'")
    try:
        corpus = Corpus.model_validate({**tree, "path": path.resolve()})
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"])
            if err["loc"][:1] == ("regions",) and len(err["loc"]) > 1 and isinstance(tree.get("regions"), list):
                i = err["loc"][1]
                if isinstance(i, int) and isinstance(tree["regions"][i], dict):
                    where = f"region {tree['regions'][i].get('name', i)!r}: " + ".".join(map(str, err["loc"][2:]))
            problems.append(f"unknown key {where!r}" if err["type"] == "extra_forbidden" else f"{where}: {err['msg']}")
        raise GeoJepaError(f"{path}: " + "; ".join(problems)) from None
    for r in corpus.regions:
        pbf = corpus.pbf(r)
        if pbf is not None and not pbf.is_file():
            hint = (f"no bundled extract data/samples/{r.source}.osm.pbf" if not r.source.endswith(".pbf")
                    else f"no file {pbf}")
            raise GeoJepaError(f"{path}: region {r.name!r}: source {r.source!r}: {hint} (a bundled extract's "
                               f"name, a *.osm.pbf path, or geofabrik:<region id>)")
    return corpus


def mark_region(w: WorkDir, corpus: Corpus, region: CorpusRegion) -> None:
    """Record in ``W/region.json`` which corpus the region belongs to and its role (``train`` refuses holdouts)."""
    w.path.mkdir(parents=True, exist_ok=True)
    record = {"name": region.name, "role": region.role, "corpus": corpus.name, "source": region.source}
    if w.region() != record:
        w.region_file.write_text(json.dumps(record, indent=2))
