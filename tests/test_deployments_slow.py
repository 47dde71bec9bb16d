"""The product's way in: a real `prefect server` on loopback, the process work pool, `prefect deploy --all`,
a worker, and `prefect deployment run 'build-tiles/sample'` to completion. Slow (about a minute and a half):
run with `pytest -m slow`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from data_contracts import TILES, read_table

ROOT = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).with_name("prefect"))
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "prefect server exited"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


def _declared() -> list[str]:
    """FLOW/DEPLOYMENT of every deployment in prefect.yaml, the flow's name read from its entrypoint's flow."""
    import importlib.util

    import yaml

    out = []
    for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]:
        path, func = d["entrypoint"].split(":")
        spec = importlib.util.spec_from_file_location(f"_entry_{Path(path).stem}", ROOT / path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out.append(f"{getattr(module, func).name}/{d['name']}")
    return out


def test_deployment_run_build_tiles_sample_on_a_real_server(tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "COLUMNS": "200",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}",
    }
    started: list[subprocess.Popen] = []

    def start(*args: str, log: str) -> subprocess.Popen:
        p = subprocess.Popen([PREFECT, *args], cwd=ROOT, env=env, stdout=open(tmp_path / log, "w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
        started.append(p)
        return p

    def run(*args: str, timeout: float = 300) -> str:
        out = subprocess.run([PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    try:
        server = start("server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui", log="server.log")
        _wait_healthy(api, server)
        run("work-pool", "create", "geojepa-process", "--type", "process")
        run("--no-prompt", "deploy", "--all")
        deployments = run("deployment", "ls")
        expected = _declared()
        assert "build-tiles/sample" in expected and len(expected) >= 4, expected
        for name in expected:  # every deployment prefect.yaml declares, under its flow's name
            assert name in deployments, deployments
        start("worker", "start", "--pool", "geojepa-process", log="worker.log")
        work = tmp_path / "work" / "kotka"
        out = run("deployment", "run", "build-tiles/sample", "--param", f"work_dir={work}", "--watch",
                  "--watch-timeout", "300", timeout=330)
        assert "Completed" in out, out + (tmp_path / "worker.log").read_text()[-3000:]
        tiles = read_table(work / "tiles.parquet", TILES, columns=["split"])
        assert tiles.num_rows > 20
        summary = json.loads((work / "manifests" / "tile.json").read_text())["summary"]
        assert summary["tiles"] == tiles.num_rows
        artifact = run("artifact", "inspect", "build-tiles-kotka")
        flat = "".join(artifact.split())  # the CLI wraps long lines
        assert "tiles.parquet" in flat and "entities.parquet" in flat and "69tiles" in flat
    finally:
        for p in reversed(started):
            try:
                os.killpg(p.pid, 15)
                p.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, 9)
