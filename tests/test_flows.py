"""Prefect flows on the Kotka sample against a real (temporary) Prefect API: the pipeline end to end with
MLflow grouping and artifacts, skipping on re-runs, failures, a stage killed mid-way, Dask partitions,
the deployments file (the compose stack: tests/test_compose.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml

from data_contracts import TILE_ENTITIES, TOKENS, read_table
from geojepa.evaluate.peers import missing as missing_peers
from tests.test_fetch import server  # noqa: F401 (a Geofabrik look-alike on loopback)

ROOT = Path(__file__).resolve().parent.parent
FAST = ["train.width=32", "train.depth=1", "train.heads=2", "train.mlp=64", "train.pred_width=16",
        "train.pred_depth=1", "train.pred_heads=2", "train.batch_tiles=8", "train.max_steps=3", "train.num_workers=0",
        "train.device=cpu", "tokens.geometry_epochs=1", "tokens.geometry_max_shapes=800", "tokens.geometry_dim=32",
        "evaluate.seeds=2", "evaluate.max_epochs=40", "evaluate.patience=5", "evaluate.map=pca",
        "evaluate.gallery_queries=1"]


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):  # 30 s is not enough on 2 busy cores
        yield


@pytest.fixture(scope="module")
def piped(tmp_path_factory):
    """The pipeline flow on a corpus of Kotka (train) and central Moscow (holdout), with MLflow on, into a fresh
    work root."""
    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("pipeline")
    corpus = root / "corpus.yaml"
    corpus.write_text(yaml.safe_dump({"name": "mini", "regions": [
        {"name": "kotka", "source": "kotka", "role": "train"},
        {"name": "moscow", "source": "moscow-centre-2020", "role": "holdout", "imagery": None}]}))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    rows = pipeline(corpus=str(corpus), work_root=str(root), overrides=FAST)
    return root, rows, corpus


STAGES = ["extract", "tile", "extract", "tile", "tokenizer", "tokens", "tokens", "train", "evaluate", "evaluate",
          "report"]


def test_pipeline_runs_every_stage_groups_mlflow_runs_and_leaves_artifacts(piped):
    import mlflow
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    root, rows, _ = piped
    assert sorted(r["stage"] for r in rows) == sorted(STAGES)
    assert not any(r["result"].startswith("unchanged") for r in rows)
    assert (root / "kotka" / "eval" / "report.md").exists() and (root / "moscow" / "eval" / "report.md").exists()
    evaluated = {r["region"]: r["result"] for r in rows if r["stage"] == "evaluate"}
    assert evaluated["kotka"].startswith("train:") and evaluated["moscow"].startswith("holdout:")
    assert "holdout: the model never saw" in (root / "moscow" / "eval" / "report.md").read_text()
    assert (root / "mini-model" / "corpus_report.md").exists()

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlruns.db'}")
    exp = client.get_experiment_by_name("geojepa")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert sorted(r.data.tags["stage"] for r in children) == sorted(s for s in STAGES if s != "report")
    assert any(k.startswith("corpus.all.masked.building_count.") for k in parent[0].data.metrics)
    seen = next(r for r in children if r.data.tags["stage"] == "evaluate" and r.data.tags["work_dir"].endswith("kotka"))
    if not missing_peers():  # the SRAI peers (the `peers` extra), under stable names
        assert "masked.building_count.hex2vec.mlp.mae" in seen.data.metrics
        assert seen.data.metrics["peers.geovex.fit_seconds"] > 0
    trained = next(r for r in children if r.data.tags["stage"] == "train")
    assert [i.dataset.name for i in trained.inputs.dataset_inputs] == ["kotka/tokens/train"]
    version = client.search_model_versions("name = 'geojepa-encoder'")[0]
    assert version.tags["regions"] == "kotka" and version.tags["tokenizer_digest"] and version.tags["corpus"] == "mini"
    assert "trained on the train splits of kotka" in version.description
    # The registered version resolves to its checkpoint, for `evaluate --model models:/geojepa-encoder/N`.
    from geojepa.config import load_config
    from geojepa.encoding.models import resolve_model

    got = resolve_model(f"models:/geojepa-encoder/{version.version}", load_config(), root / ".models")
    made = sorted((root / "mini-model" / "checkpoints").glob("step-*.pt"))[-1]
    assert got.read_bytes() == made.read_bytes()

    wanted = {"pipeline-mini", "build-tiles-kotka", "build-tiles-moscow", "evaluation-mini-kotka",
              "evaluation-mini-moscow", "corpus-report-mini", "mlflow-mini"}
    with get_client(sync_client=True) as c:
        found = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=sorted(wanted))))
    assert {a.key for a in found} == wanted
    link = next(a for a in found if a.key == "mlflow-mini")
    assert parent[0].info.run_id in link.data


def test_rerun_on_unchanged_inputs_skips_every_stage_and_the_parent_still_shows_them(piped, caplog):
    import logging

    import mlflow

    from flows.pipeline import pipeline

    root, first, corpus = piped
    caplog.set_level(logging.INFO)
    rows = pipeline(corpus=str(corpus), work_root=str(root), overrides=FAST)
    assert all(r["result"].startswith("unchanged") for r in rows if r["stage"] != "report"), rows
    assert "unchanged since the last run: skipped" in caplog.text
    assert "is up to date with its inputs" in caplog.text  # the library's own lines reach the flow's log

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlruns.db'}")
    exp = client.get_experiment_by_name("geojepa")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    made = {r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[-1].info.run_id}
    skipped = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["stage"] for r in skipped) == sorted(s for s in STAGES if s != "report")
    assert all(r.data.tags["skipped"] == "true" and r.data.tags["made_by_run"] in made for r in skipped)


def test_scheduled_retrain_on_unchanged_data_skips_every_stage(piped):
    from flows.pipeline import retrain

    root, _, corpus = piped
    rows = retrain(corpus=str(corpus), work_root=str(root), overrides=FAST)
    assert sorted(r["stage"] for r in rows) == sorted(STAGES)
    assert all(r["result"].startswith("unchanged") for r in rows if r["stage"] != "report"), rows


def test_build_tiles_downloads_a_geofabrik_region_through_transient_errors(server, tmp_path):  # noqa: F811
    from flows.build_tiles import build_tiles

    server.fail_next = 2  # two 503s: the download's own backoff rides them out
    rows = build_tiles(region="finland/kotka", work_dir=str(tmp_path / "kotka"), imagery=None,
                       index_url=f"{server.base}/index.json", overrides=["tracking.enabled=false"])
    assert (tmp_path / "kotka" / "kotka-latest.osm.pbf").exists()
    assert rows[0]["result"] == "2752 entities" and rows[1]["result"].startswith("69 tiles")


def test_tasks_retry_transient_failures_but_never_bad_input():
    from prefect import flow, task

    from geojepa.errors import GeoJepaError, TransientError
    from tasks.stages import _retry_unless_bad_input

    calls = {"transient": 0, "bad": 0}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=_retry_unless_bad_input)
    def flaky(kind: str) -> str:
        calls[kind] += 1
        if kind == "transient" and calls[kind] < 3:
            raise TransientError("service unavailable")
        if kind == "bad":
            raise GeoJepaError("x.osm.pbf: not a PBF")
        return "ok"

    @flow
    def both():
        return flaky("transient"), flaky("bad", return_state=True)

    ok, bad = both()
    assert ok == "ok" and calls["transient"] == 3
    assert bad.is_failed() and calls["bad"] == 1


def test_a_failed_training_fails_the_flow_with_the_tail_of_its_log(piped):
    from flows.train import train

    root, _, _ = piped
    w = root / "kotka"
    before = (w / "manifests" / "tokens.json").read_bytes()
    state = train(str(root / "other-model"), overrides=[*FAST, "train.lr=1e30"], data=[str(w)],
                  return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "torchrun exit" in message and "non-finite loss" in message  # the child's own error, from the log tail
    assert (w / "manifests" / "tokens.json").read_bytes() == before


def test_a_missing_pbf_fails_build_tiles_naming_the_file(tmp_path):
    from flows.build_tiles import build_tiles

    state = build_tiles(region="x", pbf=str(tmp_path / "nope.osm.pbf"), work_dir=str(tmp_path / "w"),
                        overrides=["tracking.enabled=false"], return_state=True)
    assert state.is_failed()
    assert "nope.osm.pbf" in str(state.result(raise_on_failure=False))
    assert not (tmp_path / "w" / "entities.parquet").exists()


def test_a_stage_killed_midway_leaves_earlier_artifacts_and_the_next_run_resumes_there(piped, tmp_path):
    """Tiles are built; SIGKILL the first tokens run while it writes its shards. The tile artifacts stay
    intact, no half-written shards appear, and the next pipeline run skips extract and tile, cleans up and
    finishes the tokens."""
    from flows.build_tiles import build_tiles
    from flows.cache_tokens import cache_tokens
    from geojepa import manifest

    root, _, _ = piped
    w = tmp_path / "kotka"
    w.mkdir()
    for name in ("entities.parquet", "tiles.parquet", "tile_entities.parquet", "tile_images.parquet", "manifests"):
        (shutil.copytree if (root / "kotka" / name).is_dir() else shutil.copy)(root / "kotka" / name, w / name)
    for later in ("tokens", "train", "evaluate"):
        (w / "manifests" / f"{later}.json").unlink(missing_ok=True)
    tiles_hash = manifest.file_sha256(w / "tile_entities.parquet")
    overrides = ["tracking.enabled=false", *FAST]
    cmd = [sys.executable, "-m", "geojepa.cli", "tokens", str(w), *[a for o in overrides for a in ("--set", o)]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(w.glob(".tokens.tmp-*/*.parquet")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the stage finished before it could be killed"
    assert list(w.glob(".tokens.tmp-*")) and not (w / "tokens").exists()  # died mid-write, published nothing
    assert manifest.file_sha256(w / "tile_entities.parquet") == tiles_hash

    rows = build_tiles(region="kotka", work_dir=str(w), overrides=overrides)
    assert all(r["result"].startswith("unchanged") for r in rows)
    summary = cache_tokens(str(w), overrides=overrides)
    assert not summary.skipped and summary.summary.tiles > 0
    assert read_table(w / "tokens", TOKENS, columns=["tile_id"]).num_rows == summary.summary.tiles
    assert not list(w.glob(".*.tmp-*"))


def test_dask_task_runner_cuts_the_same_tiles_as_threads(tmp_path):
    from flows.build_tiles import build_tiles

    out = {}
    for runner in ("threads", "dask"):
        w = tmp_path / runner
        build_tiles(region="kotka", work_dir=str(w), overrides=[
            "tracking.enabled=false", f"orchestration.task_runner={runner}", "tile.partition_groups=1"])
        t = read_table(w / "tile_entities.parquet", TILE_ENTITIES, columns=["tile_id", "entity_id", "geometry"])
        out[runner] = t.sort_by([("tile_id", "ascending"), ("entity_id", "ascending"), ("geometry", "ascending")])
    assert out["dask"].num_rows > 1000 and out["dask"].equals(out["threads"])
    assert pc.count_distinct(out["dask"]["tile_id"]).as_py() > 20


def test_deployments_name_real_flows_with_valid_parameters_and_a_retraining_schedule():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = set()
    for d in spec["deployments"]:
        f = load_flow_from_entrypoint(str(ROOT / d["entrypoint"]))
        f.validate_parameters(d.get("parameters", {}))
        names.add(f"{f.name}/{d['name']}")
        assert d["work_pool"]["name"] == "geojepa-process"
    assert {"build-tiles/sample", "pipeline/corpus-demo", "pipeline/corpus", "retrain/corpus-demo"} <= names
    retrain = next(d for d in spec["deployments"] if d["entrypoint"].endswith(":retrain"))
    assert retrain["schedules"][0]["cron"]


def test_the_library_never_imports_prefect():
    code = ("import pkgutil, importlib, sys, geojepa\n"
            "for m in pkgutil.walk_packages(geojepa.__path__, 'geojepa.'):\n"
            "    if not m.name.endswith('__main__'):\n"
            "        importlib.import_module(m.name)\n"
            "assert 'prefect' not in sys.modules, 'prefect imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
