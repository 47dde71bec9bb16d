"""The lifecycle every stage goes through, in one place.

1. recover what a killed earlier run left half-done in the work directory;
2. the expected manifest: content hashes of the inputs, the config section, the code version;
3. skip when fresh (the manifest matches and the outputs still hash as recorded): the summary then is the
   one recorded when the outputs were made, marked ``skipped``, and under a pipeline's MLflow parent run a
   "skipped" run links to the run that made them;
4. otherwise an MLflow run; the stage writes into temporaries and publishes them by rename;
5. the manifest, with the summary and the MLflow run id, once the outputs are in place.

Every stage returns one summary shape: ``{"stage", "skipped", "mlflow_run_id", ...its own figures}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from geojepa import manifest
from geojepa.config import Config
from geojepa.tracking import StageRun, record_skip, stage_run
from geojepa.workdir import WorkDir

log = logging.getLogger(__name__)


class Lifecycle:
    def __init__(self, stage: str, work_dir: Path | str, cfg: Config, inputs: dict[str, Path], config: dict[str, Any],
                 code: tuple[str, ...], section: str | None = None):
        self.stage, self.work_dir, self.cfg, self.section = stage, Path(work_dir), cfg, section
        manifest.recover(self.work_dir)
        self.expected = manifest.expected_manifest(stage, inputs, config, manifest.code_version(*code))
        self.tracker: StageRun | None = None

    def skipped(self, force: bool = False) -> dict | None:
        """The recorded summary, marked skipped, when the outputs are fresh; else None (the stage must run)."""
        if force or not manifest.is_fresh(self.work_dir, self.expected):
            return None
        record = json.loads(WorkDir(self.work_dir).manifest(self.stage).read_text())
        made_by = record.get("mlflow_run_id")
        log.info("%s: %s is up to date with its inputs, config and code: skipped", self.stage, self.work_dir)
        record_skip(self.stage, self.work_dir, self.cfg, made_by)
        return {**record.get("summary", {}), "stage": self.stage, "skipped": True, "mlflow_run_id": made_by}

    @contextlib.contextmanager
    def run(self) -> Iterator[StageRun]:
        with stage_run(self.stage, self.work_dir, self.cfg, section=self.section,
                       inputs=self.expected["inputs"]) as run:
            self.tracker = run
            yield run

    def publish(self, outputs: list[Path], summary: dict[str, Any]) -> dict:
        """Record the manifest of ``outputs`` (paths in the work directory, already in place)."""
        run_id = self.tracker.run_id if self.tracker else None
        names = [Path(p).relative_to(self.work_dir).as_posix() for p in outputs]
        manifest.write_manifest(self.work_dir, self.expected, names, summary=summary, mlflow_run_id=run_id)
        return {**summary, "stage": self.stage, "skipped": False, "mlflow_run_id": run_id}
