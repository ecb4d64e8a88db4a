"""Helpers for tests that run the whole flow: a tiny git+DVC copy of the project, and real
MLflow/Prefect servers on loopback ports, each in its own process group so a test can stop all of it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
from conftest import ROOT, TINY_RUN_OVERRIDES, sample_rows

BIN = Path(sys.executable).parent  # the venv's console scripts: mlflow, prefect, sftflow, dvc


def tiny_project_overrides(data_rel: str) -> list[str]:
    """conftest's tiny_overrides, but with paths left relative: dvc.yaml's outs live in the project."""
    return [f"data.path={data_rel}", *TINY_RUN_OVERRIDES, "train.torch_threads=1"]


def make_tiny_project(dest: Path, rows: int = 120) -> Path:
    """Copy the project (tracked and new files) into `dest` as its own git repo, with tiny data and params.

    Args:
        dest: an empty folder.
        rows: demo rows written to `data/tiny.jsonl`.

    Returns:
        `dest`, now a project root (dvc.yaml, params.yaml with the tiny overrides written in).
    """
    from flows.dvc_stage import write_overrides

    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    data = dest / "data" / "tiny.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sample_rows(rows)), encoding="utf-8")
    write_overrides(dest / "params.yaml", tiny_project_overrides("data/tiny.jsonl"))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "copy"], cwd=dest, check=True)
    return dest


# ----------------------------------------------------------------------------- real servers


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_group(cmd: list[str], log_file: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """Start `cmd` in a new session (its own process group), output to `log_file`."""
    with log_file.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


def stop_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the process group of `proc`, SIGKILL it if it outlives `timeout`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=timeout)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()
    # Children may outlive the leader (uvicorn workers, job runners): kill what is left of the group
    # and wait until the kernel has taken it down, so a caller can check that nothing remains.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while group_members({proc.pid}) and time.monotonic() < deadline:
        time.sleep(0.1)


def group_members(pgids: set[int]) -> list[psutil.Process]:
    """Live processes (zombies excluded) in any of the given process groups, wherever they were reparented."""
    left = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) in pgids and p.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return left


def wait_http(url: str, proc: subprocess.Popen, log_file: Path, timeout: float = 120.0) -> None:
    """Poll `url` until it answers 200; fail early with the server's log when the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}:\n{log_file.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s:\n{log_file.read_text(errors='replace')[-3000:]}")


def start_mlflow_server(workdir: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` (sqlite store and served artifacts under `workdir`) on 127.0.0.1.

    Returns:
        The process (leader of its own group; wait for it with `wait_http(uri + "/health", ...)`)
        and its tracking URI.
    """
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    # No job runner: it starts eight Python processes for GenAI jobs that sftflow never submits.
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    cmd = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination", str(workdir / "artifacts"), "--serve-artifacts",
    ]
    return start_group(cmd, workdir / "server.log", env=env, cwd=workdir), f"http://127.0.0.1:{port}"


def start_prefect_server(workdir: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A real `prefect server start` with its own PREFECT_HOME and sqlite database under `workdir`.

    Returns:
        The process (leader of its own group) and its API URL (`http://127.0.0.1:<port>/api`).
    """
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(workdir),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{workdir / 'prefect.db'}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        DO_NOT_TRACK="1",
    )
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return start_group(cmd, workdir / "server.log", env=env, cwd=workdir), f"http://127.0.0.1:{port}/api"
