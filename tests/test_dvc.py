"""DVC on a fresh copy of the project: repro, nothing to redo, clean status, push, param-driven rerun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, sample_rows

BIN = Path(sys.executable).parent
GIT_ENV = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture
def project(tmp_path) -> tuple[Path, dict[str, str]]:
    """The tracked files of this repository, committed to a new git repo, with 120 demo rows as data."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    dest = tmp_path / "project"
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():  # a tracked file another engineer deleted but not yet committed is skipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    small = dest / "data" / "small.jsonl"
    small.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sample_rows(120)), encoding="utf-8")
    params = dest / "params.yaml"
    text = params.read_text(encoding="utf-8")
    assert "  path: data/sample/zh_summ.jsonl" in text
    params.write_text(text.replace("  path: data/sample/zh_summ.jsonl", "  path: data/small.jsonl", 1), encoding="utf-8")
    (dest / "dvc.lock").unlink(missing_ok=True)  # start from nothing, as on a fresh clone's first run

    env = {
        **os.environ,
        **GIT_ENV,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `sftflow` in dvc.yaml's cmd
        "PYTHONPATH": str(dest),  # the copy's tasks/, not the checkout's
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site-cache"),
    }
    _run(["git", "init", "-q"], dest, env)
    _run(["git", "add", "-A"], dest, env)
    _run(["git", "commit", "-q", "-m", "copy"], dest, env)
    return dest, env


def test_repro_then_nothing_to_do_then_push_then_param_change_reruns_split_only(project):
    dest, env = project
    dvc = str(BIN / "dvc")

    out = _run([dvc, "repro", "split"], dest, env)
    assert "Running stage 'validate'" in out and "Running stage 'split'" in out
    metrics = json.loads((dest / "metrics" / "split.json").read_text())
    sizes = {s: len((dest / "artifacts" / "split" / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()) for s in ("train", "val", "test")}
    assert sizes == {s: metrics[f"{s}_rows"] for s in sizes} and sum(sizes.values()) == metrics["rows"] >= 115
    lock = (dest / "dvc.lock").read_text()
    assert "sftflow-v1" in lock and "artifacts/split" in lock

    out = _run([dvc, "repro", "split"], dest, env)
    assert "Running stage" not in out
    assert "didn't change" in out or "up to date" in out

    assert "Data and pipelines are up to date" in _run([dvc, "status", "split"], dest, env)

    _run([dvc, "push"], dest, env)
    remote = dest / ".dvc-remote"
    assert remote.is_dir() and any(p.is_file() for p in remote.rglob("*"))

    params = dest / "params.yaml"
    params.write_text(params.read_text(encoding="utf-8").replace("salt: sftflow-v1", "salt: sftflow-v2", 1), encoding="utf-8")
    out = _run([dvc, "repro", "split"], dest, env)
    assert "Running stage 'split'" in out and "Running stage 'validate'" not in out
    new_metrics = json.loads((dest / "metrics" / "split.json").read_text())
    assert new_metrics["sha256"] != metrics["sha256"]
    assert "Data and pipelines are up to date" in _run([dvc, "status", "split"], dest, env)
