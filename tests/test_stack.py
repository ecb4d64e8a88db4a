"""The compose topology without Docker (issue 9): a real `mlflow server` and a real `prefect server`
on loopback ports, the tiny flow run as `sftflow run` pointed at them by environment variables alone,
and everything read back through the servers' REST APIs (not their Python clients).

Runs in CI (`make stack-test`); the servers start concurrently, each in its own process group, and
the test checks that stopping them leaves no process behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
from flow_helpers import (
    BIN,
    group_members,
    make_tiny_project,
    start_group,
    start_mlflow_server,
    start_prefect_server,
    stop_group,
    wait_http,
)

from flows import FLOW_STAGES
from tasks.core.config import load_params

FLOW_TIMEOUT_S = 600  # the tiny flow takes ~1 min on 2 quiet cores; a loaded CI box gets headroom


def _get(url: str, **query: str) -> dict[str, Any]:
    full = f"{url}?{urllib.parse.urlencode(query)}" if query else url
    with urllib.request.urlopen(full, timeout=30) as r:
        return json.load(r)


def _post(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def _flow_env(tmp_path: Path, mlflow_uri: str, prefect_api: str) -> dict[str, str]:
    """The laptop's environment with only the two service URLs set (and no Prefect profile of the user's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(
        MLFLOW_TRACKING_URI=mlflow_uri,
        PREFECT_API_URL=prefect_api,
        PREFECT_HOME=str(tmp_path / "client-home"),  # an empty profile: nothing but the env var names the server
        OMP_NUM_THREADS="1",
        MLFLOW_ENABLE_ASYNC_LOGGING="false",
    )
    return env


@pytest.mark.slow
def test_flow_runs_against_real_mlflow_and_prefect_servers(tmp_path):
    before = {c.pid for c in psutil.Process().children(recursive=True)}  # other tests' business, not ours
    groups: list[subprocess.Popen] = []
    try:
        # Both servers boot (10-20 s each) while the project copy is built.
        mlflow_proc, mlflow_uri = start_mlflow_server(tmp_path / "mlflow")
        groups.append(mlflow_proc)
        prefect_proc, prefect_api = start_prefect_server(tmp_path / "prefect")
        groups.append(prefect_proc)
        project = make_tiny_project(tmp_path / "project")
        params = load_params(project / "params.yaml")
        model_name = params.register.model_name
        wait_http(f"{mlflow_uri}/health", mlflow_proc, tmp_path / "mlflow" / "server.log")
        wait_http(f"{prefect_api}/health", prefect_proc, tmp_path / "prefect" / "server.log")

        flow_log = tmp_path / "flow.log"
        flow = start_group([str(BIN / "sftflow"), "run"], flow_log, env=_flow_env(tmp_path, mlflow_uri, prefect_api), cwd=project)
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

        # --- MLflow, over REST: the run, its metrics and artifacts, the version and the alias.
        api = f"{mlflow_uri}/api/2.0/mlflow"
        experiment = _get(f"{api}/experiments/get-by-name", experiment_name=params.register.experiment)["experiment"]
        runs = _post(f"{api}/runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
        assert len(runs) == 1, runs
        run = runs[0]
        assert run["info"]["status"] == "FINISHED"
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert 0.0 <= metrics["evaluate.rouge-l"] <= 100.0
        assert tags["sftflow.outcome"] == "registered"
        run_id = run["info"]["run_id"]
        artifacts = {f["path"] for f in _get(f"{api}/artifacts/list", run_id=run_id)["files"]}
        assert {"params.yaml", "dvc.lock"} <= artifacts, artifacts
        # Served artifacts: the client uploaded through the server into its --artifacts-destination.
        assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:"), run["info"]["artifact_uri"]
        assert list((tmp_path / "mlflow" / "artifacts").rglob("params.yaml"))

        champion = _get(f"{api}/registered-models/alias", name=model_name, alias="champion")["model_version"]
        assert champion["version"] == "1" and champion["run_id"] == run_id
        assert champion["status"] == "READY"
        registered = _get(f"{api}/registered-models/get", name=model_name)["registered_model"]
        # The first version is the newest (challenger) and, with no champion to beat, the champion.
        assert {a["alias"]: a["version"] for a in registered["aliases"]} == {"champion": "1", "challenger": "1"}

        # --- Prefect, over REST: the flow run the MLflow run points at, and its tasks.
        flow_run_id = tags["prefect.flow_run_id"]
        flow_runs = _post(f"{prefect_api}/flow_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
        assert len(flow_runs) == 1
        assert flow_runs[0]["state_type"] == "COMPLETED", flow_runs[0]["state"]
        assert _get(f"{prefect_api}/flows/{flow_runs[0]['flow_id']}")["name"] == "retrain"
        every_run = _post(f"{prefect_api}/flow_runs/filter", {})
        assert [r["id"] for r in every_run] == [flow_run_id]  # the only run this server saw is ours
        # Task runs reach the server as events; give its recorder a moment after the flow exits.
        expected = set(FLOW_STAGES)  # every DVC stage, register and promote
        deadline = time.monotonic() + 30
        while True:
            task_runs = _post(f"{prefect_api}/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
            states = {t["name"]: t["state_type"] for t in task_runs}
            if expected <= states.keys() and all(states[n] == "COMPLETED" for n in expected) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert all(states.get(n) == "COMPLETED" for n in expected), states
    finally:
        pgids = {p.pid for p in groups}  # each was started as its session's (and group's) leader
        for proc in reversed(groups):
            stop_group(proc)
    left = group_members(pgids)
    assert left == [], [(p.pid, p.cmdline()) for p in left]
    ours = [c for c in psutil.Process().children(recursive=True) if c.pid not in before and c.status() != psutil.STATUS_ZOMBIE]
    assert ours == [], [(c.pid, c.cmdline()) for c in ours]
