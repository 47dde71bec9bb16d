"""evaluate: probes, baselines, retrieval and the report of a checkpoint, with the report as an artifact."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.common import key
from geojepa.lifecycle import StageResult
from geojepa.workdir import WorkDir
from tasks.stages import evaluate as evaluate_task


@flow(name="evaluate")
def evaluate(work_dir: str, config_path: str | None = None, overrides: list[str] | None = None,
             checkpoint: str | None = None, model: str | None = None) -> StageResult:
    """Evaluate one region with ``model`` (a checkpoint, a model folder or models:/name/N)."""
    result = evaluate_task(work_dir, config_path, overrides, checkpoint, model)
    report = WorkDir(work_dir).eval.report
    create_markdown_artifact(key=key("evaluation", Path(work_dir).name), markdown=report.read_text(),
                             description=f"evaluation report ({report})")
    return result
