"""The compose topology without Docker (issues 9 and 17), secured as the stack runs it: a real
`mlflow server --app-name basic-auth` started by the stack's own entrypoint (docker/mlflow_server.py)
with its users made by docker/mlflow_users.py, and a real `prefect server` with an auth string, both on
loopback ports. The tiny flow runs as `sftflow run` with the pipeline's credentials in its environment
alone; everything is read back through the servers' REST APIs (not their Python clients):

- a request without (or with a wrong) login gets 401 from both servers;
- the pipeline registers and promotes; the read-only reviewer reads the registry and loads the champion
  through the verified loader, but cannot move an alias (403);
- no credential value appears in any MLflow param, tag, logged file or artifact, Prefect log line or
  server log;
- weights changed in the artifact store are refused by the loader, through the real server.

Runs in CI (`make test-system`); the servers start concurrently, each in its own process group, and
the test checks that stopping them leaves no process behind.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
from flow_helpers import (
    BIN,
    free_port,
    group_members,
    make_tiny_project,
    start_group,
    stop_group,
    wait_http,
)

from flows import FLOW_STAGES
from tasks.core.config import load_params
from tasks.core.errors import StageError

FLOW_TIMEOUT_S = 600  # the tiny flow takes ~1 min on 2 quiet cores; a loaded CI box gets headroom
DOCKER = Path(__file__).resolve().parents[1] / "docker"


def _logins() -> dict[str, tuple[str, str]]:
    """Distinctive users and passwords for this run (the credential scan looks for the passwords)."""
    tag = os.urandom(4).hex()
    return {role: (f"{role}-{tag}", f"{role}-pw-{os.urandom(10).hex()}") for role in ("admin", "pipeline", "reviewer")}


def _auth_header(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _call(url: str, body: dict[str, Any] | None = None, auth: tuple[str, str] | str | None = None, **query: str) -> Any:
    """GET (no body) or POST JSON; `auth` is (user, password) or a Prefect auth string."""
    full = f"{url}?{urllib.parse.urlencode(query)}" if query else url
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers.update(_auth_header(*(auth if isinstance(auth, tuple) else auth.split(":", 1))))
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(full, data=data, headers=headers, method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def _status(url: str, body: dict[str, Any] | None = None, auth: tuple[str, str] | str | None = None, **query: str) -> int:
    try:
        _call(url, body, auth, **query)
    except urllib.error.HTTPError as e:
        return e.code
    return 200


def start_basic_auth_mlflow(workdir: Path, logins: dict[str, tuple[str, str]]) -> tuple[subprocess.Popen, str]:
    """The stack's MLflow entrypoint with sqlite stores (tracking and users) under `workdir`, on loopback."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        MLFLOW_AUTH_ADMIN_USERNAME=logins["admin"][0],
        MLFLOW_AUTH_ADMIN_PASSWORD=logins["admin"][1],
        MLFLOW_FLASK_SERVER_SECRET_KEY=os.urandom(16).hex(),
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # no job runner: eight processes sftflow never uses
    )
    cmd = [
        sys.executable, str(DOCKER / "mlflow_server.py"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--auth-database-uri", f"sqlite:///{workdir / 'auth.db'}",
        "--artifacts-destination", str(workdir / "artifacts"), "--config-dir", str(workdir / "config"),
    ]
    return start_group(cmd, workdir / "server.log", env=env, cwd=workdir), f"http://127.0.0.1:{port}"


def create_users(uri: str, logins: dict[str, tuple[str, str]], log_file: Path) -> None:
    """docker/mlflow_users.py, as the stack's `mlflow-users` service runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_TRACKING_USERNAME=logins["admin"][0], MLFLOW_TRACKING_PASSWORD=logins["admin"][1])
    for role in ("pipeline", "reviewer"):
        env[f"MLFLOW_{role.upper()}_USERNAME"], env[f"MLFLOW_{role.upper()}_PASSWORD"] = logins[role]
    out = subprocess.run([sys.executable, str(DOCKER / "mlflow_users.py")], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    log_file.write_text(out.stdout + out.stderr)
    assert out.returncode == 0, out.stdout + out.stderr


def start_prefect_server_with_auth(workdir: Path, auth_string: str) -> tuple[subprocess.Popen, str]:
    """`prefect server start` with an auth string, its own PREFECT_HOME and sqlite database, on loopback."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(workdir),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{workdir / 'prefect.db'}",
        PREFECT_SERVER_API_AUTH_STRING=auth_string,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        DO_NOT_TRACK="1",
    )
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return start_group(cmd, workdir / "server.log", env=env, cwd=workdir), f"http://127.0.0.1:{port}/api"


def _flow_env(tmp_path: Path, mlflow_uri: str, prefect_api: str, login: tuple[str, str], auth_string: str) -> dict[str, str]:
    """The laptop's environment with only the service URLs and the pipeline's credentials set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(
        MLFLOW_TRACKING_URI=mlflow_uri,
        MLFLOW_TRACKING_USERNAME=login[0],
        MLFLOW_TRACKING_PASSWORD=login[1],
        PREFECT_API_URL=prefect_api,
        PREFECT_API_AUTH_STRING=auth_string,
        PREFECT_HOME=str(tmp_path / "client-home"),  # an empty profile: nothing but the env vars name the server
        OMP_NUM_THREADS="1",
        MLFLOW_ENABLE_ASYNC_LOGGING="false",
    )
    return env


def _secret_leaks(texts: dict[str, str], files: list[Path], secrets: dict[str, str]) -> list[str]:
    """`<where>: <which secret>` for each text or file holding a secret value."""
    found = [f"{where}: {name}" for where, text in texts.items() for name, value in secrets.items() if value in text]
    for path in files:
        data = path.read_bytes()
        found += [f"{path}: {name}" for name, value in secrets.items() if value.encode() in data]
    return found


@pytest.mark.slow
def test_secured_flow_runs_against_real_mlflow_and_prefect_servers(tmp_path, monkeypatch):
    before = {c.pid for c in psutil.Process().children(recursive=True)}  # other tests' business, not ours
    groups: list[subprocess.Popen] = []
    logins = _logins()
    prefect_auth = f"ops:{os.urandom(12).hex()}"
    secrets = {f"{role} password": pw for role, (_, pw) in logins.items()} | {"prefect auth string": prefect_auth,
                                                                             "prefect password": prefect_auth.split(":")[1]}
    pipeline, reviewer = logins["pipeline"], logins["reviewer"]
    try:
        # Both servers boot (10-20 s each) while the project copy is built.
        mlflow_proc, mlflow_uri = start_basic_auth_mlflow(tmp_path / "mlflow", logins)
        groups.append(mlflow_proc)
        prefect_proc, prefect_api = start_prefect_server_with_auth(tmp_path / "prefect", prefect_auth)
        groups.append(prefect_proc)
        project = make_tiny_project(tmp_path / "project")
        params = load_params(project / "params.yaml")
        model_name = params.register.model_name
        wait_http(f"{mlflow_uri}/health", mlflow_proc, tmp_path / "mlflow" / "server.log")  # health needs no login
        wait_http(f"{prefect_api}/health", prefect_proc, tmp_path / "prefect" / "server.log")
        create_users(mlflow_uri, logins, tmp_path / "mlflow" / "users.log")
        api = f"{mlflow_uri}/api/2.0/mlflow"

        # --- No login, no entry: 401 from both, and for a wrong password too.
        assert _status(f"{api}/experiments/search", {"max_results": 1}) == 401
        assert _status(f"{api}/experiments/search", {"max_results": 1}, auth=(pipeline[0], "wrong")) == 401
        assert _status(f"{prefect_api}/flow_runs/filter", {}) == 401
        assert _status(f"{prefect_api}/flow_runs/filter", {}, auth="ops:wrong") == 401

        flow_log = tmp_path / "flow.log"
        env = _flow_env(tmp_path, mlflow_uri, prefect_api, pipeline, prefect_auth)
        flow = start_group([str(BIN / "sftflow"), "run"], flow_log, env=env, cwd=project)
        groups.append(flow)
        try:
            rc = flow.wait(timeout=FLOW_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = None
        output = flow_log.read_text(errors="replace")
        assert rc == 0, f"sftflow run exited with {rc}:\n{output[-4000:]}"
        assert "retrain registered" in output

        # Nothing fell back to the laptop defaults: no sqlite store, no local artifact folder.
        assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists()

        # --- MLflow, over REST as the read-only reviewer: the run, its metrics and artifacts, the version, the alias.
        experiment = _call(f"{api}/experiments/get-by-name", auth=reviewer, experiment_name=params.register.experiment)["experiment"]
        runs = _call(f"{api}/runs/search", {"experiment_ids": [experiment["experiment_id"]]}, auth=reviewer)["runs"]
        assert len(runs) == 1, runs
        run = runs[0]
        assert run["info"]["status"] == "FINISHED"
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert 0.0 <= metrics["evaluate.rouge-l"] <= 100.0
        assert tags["sftflow.outcome"] == "registered"
        run_id = run["info"]["run_id"]
        artifacts = {f["path"] for f in _call(f"{api}/artifacts/list", auth=reviewer, run_id=run_id)["files"]}
        assert {"params.yaml", "dvc.lock"} <= artifacts, artifacts
        # Served artifacts: the client uploaded through the server into its --artifacts-destination.
        assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:"), run["info"]["artifact_uri"]
        assert list((tmp_path / "mlflow" / "artifacts").rglob("params.yaml"))

        # The pipeline registered and promoted: with no champion to beat, the first version is champion.
        champion = _call(f"{api}/registered-models/alias", auth=reviewer, name=model_name, alias="champion")["model_version"]
        assert champion["version"] == "1" and champion["run_id"] == run_id
        assert champion["status"] == "READY"
        registered = _call(f"{api}/registered-models/get", auth=reviewer, name=model_name)["registered_model"]
        aliases = {a["alias"]: a["version"] for a in registered["aliases"]}
        assert aliases["champion"] == "1" and aliases.get("challenger", "1") == "1", aliases

        # --- The reviewer can read but not move an alias; the champion stays where the pipeline put it.
        move = {"name": model_name, "alias": "champion", "version": "1"}
        assert _status(f"{api}/registered-models/alias", move, auth=reviewer) == 403
        assert _status(f"{api}/registered-models/alias", {**move, "alias": "reviewer-pick"}, auth=reviewer) == 403
        after = _call(f"{api}/registered-models/get", auth=reviewer, name=model_name)["registered_model"]["aliases"]
        assert {a["alias"]: a["version"] for a in after} == aliases

        # --- The app's path: the reviewer loads the champion through the verified loader.
        from tasks.core.loading import load_registered

        monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", reviewer[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", reviewer[1])
        import mlflow

        mlflow.set_tracking_uri(mlflow_uri)  # over any URI an earlier test of this process set
        mlflow.set_registry_uri(mlflow_uri)
        loaded = load_registered(f"models:/{model_name}@champion")
        assert loaded.version == "1" and isinstance(loaded.predict(["一段用来测试的文本"])[0], str)

        # --- Prefect, over REST with the auth string: the flow run the MLflow run points at, and its tasks.
        flow_run_id = tags["prefect.flow_run_id"]
        flow_runs = _call(f"{prefect_api}/flow_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}}, auth=prefect_auth)
        assert len(flow_runs) == 1
        assert flow_runs[0]["state_type"] == "COMPLETED", flow_runs[0]["state"]
        assert _call(f"{prefect_api}/flows/{flow_runs[0]['flow_id']}", auth=prefect_auth)["name"] == "retrain"
        every_run = _call(f"{prefect_api}/flow_runs/filter", {}, auth=prefect_auth)
        assert [r["id"] for r in every_run] == [flow_run_id]  # the only run this server saw is ours
        # Task runs reach the server as events; give its recorder a moment after the flow exits.
        expected = set(FLOW_STAGES)  # every DVC stage, register and promote
        deadline = time.monotonic() + 30
        while True:
            task_runs = _call(f"{prefect_api}/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}}, auth=prefect_auth)
            states = {t["name"]: t["state_type"] for t in task_runs}
            if expected <= states.keys() and all(states[n] == "COMPLETED" for n in expected) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert all(states.get(n) == "COMPLETED" for n in expected), states

        # --- No credential anywhere: params, tags (runs, models, versions), logged files, Prefect logs, server logs.
        texts: dict[str, str] = {"run params and tags": json.dumps(run["data"])}
        texts["registered model"] = json.dumps(registered)
        for v in _call(f"{api}/model-versions/search", auth=reviewer, max_results="1000")["model_versions"]:
            texts[f"version {v['name']}/{v['version']}"] = json.dumps(v)
        logs = _call(f"{prefect_api}/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200},
                     auth=prefect_auth)
        assert logs, "the flow run left no log lines on the Prefect server"
        texts["prefect log lines"] = "\n".join(line["message"] for line in logs)
        texts["flow run parameters"] = json.dumps(flow_runs[0].get("parameters"))
        stored = [p for root in (tmp_path / "mlflow" / "artifacts", project / "artifacts", project / "metrics")
                  for p in root.rglob("*") if p.is_file()]
        server_logs = [tmp_path / "mlflow" / "server.log", tmp_path / "prefect" / "server.log", flow_log,
                       tmp_path / "mlflow" / "users.log"]
        leaks = _secret_leaks(texts, [*stored, *server_logs, project / "params.yaml", project / "dvc.lock"], secrets)
        assert leaks == [], leaks

        # --- Weights changed in the artifact store: the loader refuses them, through the real server.
        weights = next(p for p in (tmp_path / "mlflow" / "artifacts").rglob("model.safetensors")
                       if f"/{champion['source'].rsplit('/', 1)[-1]}/" in str(p))
        weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
        with pytest.raises(StageError, match=r"refusing to load .*/model\.safetensors: sha256 .* was registered"):
            load_registered(f"models:/{model_name}@champion")
    finally:
        import mlflow

        mlflow.set_tracking_uri(None)  # this process pointed MLflow at the server for the loader
        pgids = {p.pid for p in groups}  # each was started as its session's (and group's) leader
        for proc in reversed(groups):
            stop_group(proc)
    left = group_members(pgids)
    assert left == [], [(p.pid, p.cmdline()) for p in left]
    ours = [c for c in psutil.Process().children(recursive=True) if c.pid not in before and c.status() != psutil.STATUS_ZOMBIE]
    assert ours == [], [(c.pid, c.cmdline()) for c in ours]
