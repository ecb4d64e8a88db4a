"""`sftflow deploy` and prefect.yaml against a real `prefect server start` on a free loopback port."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CRON = "0 3 * * 1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real Prefect server with its own PREFECT_HOME; yields the env its clients need."""
    home = tmp_path_factory.mktemp("prefect_home")
    port = _free_port()
    env = dict(os.environ, PREFECT_HOME=str(home), COLUMNS="250", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    log = (home / "server.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield dict(env, PREFECT_API_URL=url)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _run(cmd: list[str], env: dict, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def test_sftflow_deploy_creates_scheduled_deployment(prefect_server, tmp_path):
    out = _run([str(BIN / "sftflow"), "deploy", "--cron", CRON, "-S", "evaluate.rows=10"], prefect_server)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"deployment": "retrain/retrain-scheduled"' in out.stdout

    listed = _run([str(BIN / "prefect"), "deployment", "ls"], prefect_server)
    assert listed.returncode == 0, listed.stderr
    assert "retrain/retrain-scheduled" in listed.stdout
    schedules = _run([str(BIN / "prefect"), "deployment", "schedule", "ls", "retrain/retrain-scheduled"], prefect_server)
    assert f"cron: {CRON}" in schedules.stdout, schedules.stdout + schedules.stderr

    inspected = _run([str(BIN / "prefect"), "deployment", "inspect", "retrain/retrain-scheduled"], prefect_server)
    assert str(ROOT / "params.yaml") in inspected.stdout
    assert "evaluate.rows=10" in inspected.stdout  # the override travels as a deployment parameter
    assert "'force': False" in inspected.stdout
    assert "'work_pool_name': 'sftflow'" in inspected.stdout


def test_deploy_rejects_bad_cron_and_bad_override(prefect_server):
    bad_cron = _run([str(BIN / "sftflow"), "deploy", "--cron", "0 3 * *"], prefect_server)
    assert bad_cron.returncode == 2
    assert "not a valid cron expression" in bad_cron.stderr
    bad_key = _run([str(BIN / "sftflow"), "deploy", "--cron", CRON, "-S", "train.no_such_key=1"], prefect_server)
    assert bad_key.returncode == 2
    assert "no_such_key" in bad_key.stderr


def test_deploy_needs_a_server(tmp_path):
    env = dict(os.environ, PREFECT_HOME=str(tmp_path))
    env.pop("PREFECT_API_URL", None)
    out = _run([str(BIN / "sftflow"), "deploy", "--cron", CRON], env)
    assert out.returncode == 2
    assert "PREFECT_API_URL is not set" in out.stderr


def test_prefect_yaml_deploys_the_same_schedule(prefect_server, tmp_path):
    # prefect deploy reads ./prefect.yaml and imports the entrypoint; run it on a copy of the project files.
    for name in ("prefect.yaml", "params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "flows", tmp_path / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(prefect_server, PWD=str(tmp_path))
    out = _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    schedules = _run([str(BIN / "prefect"), "deployment", "schedule", "ls", "retrain/retrain-scheduled"], env)
    assert f"cron: {CRON}" in schedules.stdout
    inspected = _run([str(BIN / "prefect"), "deployment", "inspect", "retrain/retrain-scheduled"], env)
    assert str(tmp_path) in inspected.stdout  # the worker runs the flow in the deploying folder


def test_deploy_serve_registers_and_keeps_serving(prefect_server):
    proc = subprocess.Popen(
        [str(BIN / "sftflow"), "deploy", "--cron", CRON, "--name", "retrain-served", "--serve"],
        cwd=ROOT, env=prefect_server, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            schedules = _run([str(BIN / "prefect"), "deployment", "schedule", "ls", "retrain/retrain-served"], prefect_server)
            if f"cron: {CRON}" in schedules.stdout:
                break
            assert proc.poll() is None, proc.stdout.read().decode()  # --serve blocks while it serves
            time.sleep(2)
        else:
            pytest.fail("the served deployment never appeared")
        assert proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
