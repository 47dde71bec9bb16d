"""The lifecycle every stage goes through, in one place.

1. recover what a killed earlier run left half-done in the work directory;
2. the expected manifest: content hashes of the inputs, the config section, the code version;
3. skip when fresh (the manifest matches and the outputs still hash as recorded): the result then is rebuilt
   from the summary recorded when the outputs were made, marked ``skipped``, and under a pipeline's MLflow
   parent run a "skipped" run links to the run that made them;
4. otherwise an MLflow run; the stage writes each output folder into the staging folder the lifecycle hands
   it (``staging``: a temporary sibling, swapped in when the block succeeds);
5. the manifest, with the summary and the MLflow run id, once the outputs are in place.

Every stage returns a ``StageResult``: the stage, whether it was skipped, its MLflow run and its ``Summary``,
a subclass each stage module defines with the figures the flows and the command line read as typed fields.
Every figure the stage recorded stays in ``Summary.figures`` (the manifest's summary); ``StageResult.as_dict()``
is the flat record the command line prints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Generic, Self, TypeVar

from data_contracts import replace_folder
from geojepa import manifest
from geojepa.config import Config
from geojepa.tracking import StageRun, record_skip, stage_run
from geojepa.workdir import Folder, WorkDir, temporary

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Summary:
    """A stage's figures: every one it recorded (``figures``: the manifest's ``summary``, what MLflow and the
    command line show) and, as typed fields of a subclass, those the flows and the command line read."""

    figures: dict[str, Any] = field(repr=False)

    @classmethod
    def of(cls, figures: dict[str, Any]) -> Self:
        """The summary of recorded ``figures`` (a fresh run's, or a skipped stage's from its manifest): each
        typed field is the figure of its name (None where none was recorded)."""
        return cls(figures=dict(figures), **{f.name: figures.get(f.name) for f in fields(cls) if f.name != "figures"})


S = TypeVar("S", bound=Summary)


@dataclass(frozen=True)
class StageResult(Generic[S]):
    """What a stage returns: its name, whether it was skipped (its outputs were fresh), the MLflow run that made
    its outputs, and its typed summary."""

    stage: str
    skipped: bool
    mlflow_run_id: str | None
    summary: S

    def as_dict(self) -> dict[str, Any]:
        """The flat record the command line prints: every recorded figure, then stage, skipped, MLflow run."""
        return {**self.summary.figures, "stage": self.stage, "skipped": self.skipped,
                "mlflow_run_id": self.mlflow_run_id}


class Lifecycle:
    def __init__(self, stage: str, work_dir: Path | str, cfg: Config, inputs: dict[str, Path], config: dict[str, Any],
                 code: tuple[str, ...], section: str | None = None):
        self.stage, self.work_dir, self.cfg, self.section = stage, Path(work_dir), cfg, section
        manifest.recover(self.work_dir)
        self.expected = manifest.expected_manifest(stage, inputs, config, manifest.code_version(*code))
        self.tracker: StageRun | None = None

    def skipped(self, force: bool = False, kind: type[S] = Summary) -> StageResult[S] | None:
        """The result recorded when the outputs were made, marked skipped, when they are fresh (its summary a
        ``kind``); else None (the stage must run)."""
        if force or not manifest.is_fresh(self.work_dir, self.expected):
            return None
        record = json.loads(WorkDir(self.work_dir).manifest(self.stage).read_text())
        made_by = record.get("mlflow_run_id")
        log.info("%s: %s is up to date with its inputs, config and code: skipped", self.stage, self.work_dir)
        record_skip(self.stage, self.work_dir, self.cfg, made_by)
        return StageResult(self.stage, True, made_by, kind.of(record.get("summary", {})))

    @contextlib.contextmanager
    def run(self) -> Iterator[StageRun]:
        with stage_run(self.stage, self.work_dir, self.cfg, section=self.section,
                       inputs=self.expected["inputs"]) as run:
            self.tracker = run
            yield run

    @contextlib.contextmanager
    def staging(self, final: Path | Folder) -> Iterator[Path | Folder]:
        """An empty staging folder for the output folder ``final`` (its temporary sibling ``.NAME.tmp-PID``, of
        the same type), put in place of ``final`` when the block succeeds and removed either way; after a killed
        run, the next one's ``recover`` sweeps it."""
        tmp = final.temporary() if isinstance(final, Folder) else temporary(Path(final))
        path = Path(tmp)
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        try:
            yield tmp
            replace_folder(path, final)
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def publish(self, outputs: list[Path], summary: S) -> StageResult[S]:
        """Record the manifest of ``outputs`` (paths in the work directory, already in place) with ``summary``'s
        figures; the stage's result."""
        run_id = self.tracker.run_id if self.tracker else None
        names = [Path(p).relative_to(self.work_dir).as_posix() for p in outputs]
        manifest.write_manifest(self.work_dir, self.expected, names, summary=summary.figures, mlflow_run_id=run_id)
        return StageResult(self.stage, False, run_id, summary)
