"""The compose stack (docker-compose.yml, docker/): valid, wired, pinned, restartable, health-checked, and no
secret in the file, on a command line, or left as the placeholder of .env.example.

Docker does not run on the development machines: the file is validated with `docker compose config` (or
Debian's `docker-compose`), which needs no engine, and checked from its parsed form; the secrets check
script runs here with sh."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
LONG_RUNNING = ("postgres", "minio", "mlflow", "prefect-server", "prefect-worker")
GOOD_ENV = {"POSTGRES_USER": "geojepa", "POSTGRES_PASSWORD": "Xk3dP0aQ9vRt", "MINIO_ROOT_USER": "geojepa",
            "MINIO_ROOT_PASSWORD": "Lm2sW8eYq4Zn"}


def _compose() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) and subprocess.run([*cmd, "version"], capture_output=True).returncode == 0:
            return cmd
    return None


def _config(env_file: Path) -> subprocess.CompletedProcess:
    # Only the env file given: variables of the calling shell must not fill in for it.
    env = {k: v for k, v in os.environ.items() if k not in GOOD_ENV and k != "VOYAGE_API_KEY"}
    return subprocess.run([*_compose(), "--env-file", str(env_file), "config"], cwd=ROOT, capture_output=True,
                          text=True, env=env)


needs_compose = pytest.mark.skipif(
    _compose() is None, reason="neither `docker compose` nor docker-compose is installed"
)


@pytest.fixture(scope="module")
def services() -> dict:
    if _compose() is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    out = _config(ROOT / ".env.example")
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)["services"]


def _text(value) -> str:
    return " ".join(value) if isinstance(value, list) else str(value or "")


def _env(service: dict) -> dict:
    env = service.get("environment", {})
    return dict(e.split("=", 1) for e in env) if isinstance(env, list) else env


def test_services_are_wired(services):
    assert {"check-env", "postgres", "minio", "minio-init", "mlflow", "prefect-server", "prefect-worker"} <= set(
        services
    )
    for name, s in services.items():
        for port in s.get("ports", []):
            host = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
            assert host == "127.0.0.1", (name, port)
    assert "@postgres:5432/prefect" in _env(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "@postgres:5432/mlflow" in _env(services["mlflow"])["MLFLOW_BACKEND_STORE_URI"]
    assert "s3://mlflow" in _text(services["mlflow"]["command"])
    worker = services["prefect-worker"]
    assert _env(worker)["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert _env(worker)["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "geojepa-process" in _text(worker["command"]) and "deploy --all" in _text(worker["command"])


def test_mlflow_accepts_the_host_names_it_is_called_by(services):
    """MLflow 3 answers 403 "Invalid Host header" to hosts not allowed; the worker calls it mlflow:5000."""
    command = services["mlflow"]["command"]
    command = command if isinstance(command, list) else command.split()
    hosts = command[command.index("--allowed-hosts") + 1].split(",")
    worker_host = _env(services["prefect-worker"])["MLFLOW_TRACKING_URI"].removeprefix("http://")
    assert worker_host in hosts and "mlflow" in hosts
    assert {"127.0.0.1:*", "localhost:*"} <= set(hosts) and "*" not in hosts


def test_images_are_pinned_and_mlflow_is_built_not_installed_at_start(services):
    for name, s in services.items():
        if "build" in s:
            continue
        image = s["image"]
        tag = image.rpartition(":")[2]
        assert ":" in image and tag != "latest" and re.search(r"\d", tag), (name, image)
        if image.startswith("postgres:"):
            assert re.fullmatch(r"\d+\.\d+", tag), image  # a minor release, not the moving major tag
        if image.startswith("minio/"):
            assert tag.startswith("RELEASE."), image
    mlflow = services["mlflow"]
    assert mlflow["build"]["dockerfile"] == "docker/mlflow.Dockerfile"
    assert "pip install" not in _text(mlflow.get("command")) + _text(mlflow.get("entrypoint"))
    dockerfile = (ROOT / "docker" / "mlflow.Dockerfile").read_text()
    assert re.search(r"^FROM ghcr\.io/mlflow/mlflow:v\d+\.\d+\.\d+$", dockerfile, re.M)
    for package in ("psycopg2-binary", "boto3"):
        assert re.search(rf"{package}==\d+\.\d+\.\d+", dockerfile), package


def test_restart_policies_and_healthchecks(services):
    for name in LONG_RUNNING:
        assert services[name].get("restart") == "unless-stopped", name
    for name in ("check-env", "minio-init"):  # one-shot jobs
        assert services[name].get("restart") == "no", name
    for name in ("postgres", "minio", "mlflow", "prefect-server", "prefect-worker"):
        assert services[name]["healthcheck"]["test"], name
    assert "5000/health" in _text(services["mlflow"]["healthcheck"]["test"])
    assert "8080/health" in _text(services["prefect-worker"]["healthcheck"]["test"])
    assert "--with-healthcheck" in _text(services["prefect-worker"]["command"])
    assert services["prefect-worker"]["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_no_secret_in_the_file_nor_on_a_command_line(services):
    raw = (ROOT / "docker-compose.yml").read_text()
    assert "change-me" not in raw
    for var in GOOD_ENV:  # every use of a secret fails at once when it is unset
        uses = re.findall(rf"(?<!\$)\$\{{{var}[^}}]*\}}", raw)  # not $${...}: the container's own
        assert uses and all(u.startswith(f"${{{var}:?") for u in uses), (var, uses)
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    for name, s in services.items():
        argv = _text(s.get("command")) + " " + _text(s.get("entrypoint"))
        for secret in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"):
            assert example[secret] not in argv, (name, secret)
    # Every service holding a secret starts only after the check, directly or through its dependencies.
    for name in ("postgres", "minio"):
        assert services[name]["depends_on"]["check-env"]["condition"] == "service_completed_successfully"


@needs_compose
def test_a_missing_secret_stops_the_stack_at_once(tmp_path):
    env = tmp_path / "partial.env"
    env.write_text("POSTGRES_USER=geojepa\nMINIO_ROOT_USER=geojepa\nMINIO_ROOT_PASSWORD=Lm2sW8eYq4Zn\n")
    out = _config(env)
    assert out.returncode != 0 and "POSTGRES_PASSWORD" in out.stderr, out.stderr


def _check_env(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(ROOT / "docker" / "check-env.sh"), *args], env={"PATH": os.environ["PATH"], **env},
                          capture_output=True, text=True)


def test_placeholders_of_env_example_are_refused(services):
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    check = services["check-env"]
    names = [a for a in check["entrypoint"] if re.fullmatch(r"[A-Z_]+", a)]
    assert set(GOOD_ENV) <= set(names)
    out = _check_env({k: example[k] for k in names}, *names)
    assert out.returncode == 1 and "POSTGRES_PASSWORD" in out.stderr and "placeholder" in out.stderr, out.stderr
    out = _check_env({**GOOD_ENV, "POSTGRES_PASSWORD": ""}, *names)
    assert out.returncode == 1 and "POSTGRES_PASSWORD is empty" in out.stderr
    assert _check_env(GOOD_ENV, *names).returncode == 0
    # The MLflow image checks its store URI (which holds the password) the same way, then runs the server.
    out = _check_env({"MLFLOW_BACKEND_STORE_URI": "postgresql://geojepa:Xk3dP0aQ9vRt@postgres:5432/mlflow",
                      "AWS_SECRET_ACCESS_KEY": "Lm2sW8eYq4Zn"},
                     "MLFLOW_BACKEND_STORE_URI", "AWS_SECRET_ACCESS_KEY", "--", "echo", "started")
    assert out.returncode == 0 and out.stdout == "started\n"
    out = _check_env({"MLFLOW_BACKEND_STORE_URI": "postgresql://geojepa:change-me@postgres:5432/mlflow",
                      "AWS_SECRET_ACCESS_KEY": "x"}, "MLFLOW_BACKEND_STORE_URI", "--", "echo", "started")
    assert out.returncode == 1 and out.stdout == ""
    dockerfile = (ROOT / "docker" / "mlflow.Dockerfile").read_text()
    assert '"MLFLOW_BACKEND_STORE_URI", "AWS_SECRET_ACCESS_KEY", "--"]' in dockerfile and "ENTRYPOINT" in dockerfile
