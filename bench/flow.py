"""The `retrain` flow: unchanged re-run vs cold run, and orchestration overhead vs plain stage functions.

Both arms work on fresh copies of this project (tracked and new files, `git init`ed, its own DVC cache
and remote, its own sqlite MLflow store) with the tiny data and params of the flow tests
(`tests/flow_helpers.make_tiny_project`): the worst case for overhead, since every stage's own work is
small. The same environment for both arms: OMP_NUM_THREADS=1, as in the flow tests.

- plain: one fresh interpreter calls `tasks.<stage>.run(params)` for each stage the flow runs
  (`PLAIN_STAGES`: the DVC stages, then register and promote), each timed; the baseline is the sum of those times.
- cold: `flows.retrain.retrain` on a second fresh copy under one `prefect_test_harness` (the temporary
  Prefect server starts before the clock does, as a deployed server would already be up). Each stage
  runs as `dvc repro --single-item <stage>` (a fresh interpreter per stage), plus push, MLflow
  logging, register and promote.
- re-run: the same flow again on the unchanged copy (the data-change trigger answers "nothing changed").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flows import FLOW_STAGES

ROOT = Path(__file__).resolve().parents[1]
# What the flow runs (the DVC stages of tasks.core.stages, then register and promote), as plain functions.
PLAIN_STAGES = FLOW_STAGES
PLAIN_TIMEOUT_S = 300

# Runs in the copy: each stage as a plain function, timed, results as JSON on the last line.
PLAIN_SCRIPT = """
import importlib, json, sys, time
t0 = time.perf_counter()
from tasks.core.config import load_params
params = load_params("params.yaml")
seconds = {}
for stage in sys.argv[1:]:
    module = importlib.import_module(f"tasks.{stage}")
    start = time.perf_counter()
    module.run(params)
    seconds[stage] = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "process_seconds": time.perf_counter() - t0}))
"""


def make_tiny_project(dest: Path) -> Path:
    """The flow tests' tiny git+DVC copy of this project (`tests/flow_helpers.py`), so the bench runs what they run."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from flow_helpers import make_tiny_project as make

    dest.mkdir(parents=True)
    return make(dest)


def _env(project: Path) -> dict[str, str]:
    return dict(
        os.environ,
        MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(project),
    )


def run_plain(project: Path) -> dict[str, Any]:
    """Every stage as a plain function in one fresh interpreter; returns per-stage and process seconds."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_SCRIPT, *PLAIN_STAGES],
        cwd=project, env=_env(project), capture_output=True, text=True, timeout=PLAIN_TIMEOUT_S, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"plain stage run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - start
    return result


def run_flow_twice(project: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The retrain flow cold, then again unchanged; each result with its measured `wall_seconds`."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.retrain import retrain

    env = {**_env(project), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    keys = ("MLFLOW_TRACKING_URI", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK")
    saved = {k: os.environ.get(k) for k in keys}
    cwd = Path.cwd()
    os.environ.update({k: env[k] for k in keys})
    try:
        with prefect_test_harness(server_startup_timeout=180):
            os.chdir(project)  # mlflow's default store and relative paths resolve against the cwd
            runs = []
            for _ in range(2):
                start = time.perf_counter()
                result = retrain(params_path=str(project / "params.yaml"))
                runs.append({**result, "wall_seconds": time.perf_counter() - start})
    finally:
        os.chdir(cwd)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return runs[0], runs[1]


def main() -> dict[str, Any]:
    """Time plain stages, the cold flow and the unchanged re-run; return rows for the runner's table."""
    with tempfile.TemporaryDirectory(prefix="sftflow-bench-flow-") as tmp:
        plain = run_plain(make_tiny_project(Path(tmp) / "plain"))
        cold, rerun = run_flow_twice(make_tiny_project(Path(tmp) / "flow"))

    if cold["status"] != "registered" or rerun["status"] != "nothing changed":
        raise RuntimeError(f"unexpected flow outcomes: cold {cold['status']!r}, re-run {rerun['status']!r} ({rerun.get('reason')})")
    stage_sum = sum(plain["seconds"].values())
    flow_stage_seconds = {s["stage"]: s["seconds"] for s in cold["stages"]}
    dvc_stage_sum = sum(flow_stage_seconds.values())
    dvc_plain_sum = sum(plain["seconds"][s] for s in flow_stage_seconds)
    per_stage_extra = (dvc_stage_sum - dvc_plain_sum) / len(flow_stage_seconds)
    # The overhead is a fixed cost per run, not a share: stages this long would bring it to 10%.
    fixed = cold["wall_seconds"] - stage_sum
    rows = [
        {
            "name": "flow: unchanged re-run / cold run",
            "ratio": f"{rerun['wall_seconds'] / cold['wall_seconds']:.1%}",
            "target": "<= 10%",
            "note": f"re-run {rerun['wall_seconds']:.1f} s ({rerun['reason']}) vs cold {cold['wall_seconds']:.1f} s",
        },
        {
            "name": "flow: cold flow / plain stage functions",
            "ratio": round(cold["wall_seconds"] / stage_sum, 2),
            "target": "<= 1.10x",
            "note": (
                f"flow {cold['wall_seconds']:.1f} s vs sum of {len(plain['seconds'])} stage run() {stage_sum:.1f} s "
                f"(that interpreter's whole life: {plain['wall_seconds']:.1f} s); the {len(flow_stage_seconds)} DVC stages take "
                f"{dvc_stage_sum:.1f} s in the flow vs {dvc_plain_sum:.1f} s as functions "
                f"(+{per_stage_extra:.1f} s each: `dvc repro` + a fresh interpreter); tiny params: the "
                f"{fixed:.0f} s fixed cost is <= 10% once the stages take >= {fixed / 0.10:.0f} s"
            ),
        },
    ]
    result = {
        "name": "flow",
        "rows": rows,
        "plain_stage_seconds": plain["seconds"],
        "plain_process_seconds": plain["process_seconds"],
        "plain_wall_seconds": plain["wall_seconds"],
        "flow_stage_seconds": flow_stage_seconds,
        "cold_seconds": cold["wall_seconds"],
        "cold_flow_reported_seconds": cold["seconds"],
        "rerun_seconds": rerun["wall_seconds"],
        "rerun_reason": rerun["reason"],
        "overhead": cold["wall_seconds"] / stage_sum - 1,
        "fixed_overhead_seconds": fixed,
    }
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return result


if __name__ == "__main__":
    main()
