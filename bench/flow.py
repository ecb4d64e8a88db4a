"""The `retrain` flow: unchanged re-run vs cold run, and orchestration overhead vs plain stage functions.

Both arms work on fresh copies of this project (tracked and new files, `git init`ed, its own DVC cache
and remote, its own sqlite MLflow store) with the tiny data and params of the flow tests
(`tests/flow_helpers.make_tiny_project`): the worst case for overhead, since every stage's own work is
small. The same environment for every arm: the one `make run` has, with no thread variables
(OMP_NUM_THREADS, OPENBLAS_NUM_THREADS), so numpy and torch would start thread pools: under
OMP_NUM_THREADS=1 (the flow tests') the warm interpreter once forked every stage while under `make run`
it refused them all. The warm arms must fork every stage command (`warm_refusals`), else the benchmark fails.

- plain: one fresh interpreter calls `tasks.<stage>.run(params)` for each stage the flow runs
  (`PLAIN_STAGES`: the DVC stages, then register and promote), each timed; the baseline is the sum of those times.
- cold: `flows.retrain.retrain` on a second fresh copy under one `prefect_test_harness` (the temporary
  Prefect server starts before the clock does, as a deployed server would already be up). Each stage
  runs as `dvc repro --single-item <stage>`, its `sftflow <stage>` started in the flow's warm stage
  interpreter (flows/warm_stages.py), plus push, MLflow logging, register and promote.
- re-run: the same flow again on the unchanged copy (the data-change trigger answers "nothing changed").
- fresh: the cold flow on a third copy with SFTFLOW_WARM_STAGES=0: every stage's `sftflow` in a fresh
  interpreter, as before the warm stages (and as `dvc repro` alone runs them). Its pretrain, train and
  align models must equal the warm flow's bit for bit (`same_outputs`), else the benchmark fails.
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


# Unset in every arm, as in a user's shell (`make run`): each library picks its own thread count.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "MKL_NUM_THREADS")


def _env(project: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    return dict(env, MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(project))


def warm_refusals(project: Path) -> list[str]:
    """The stage commands the warm interpreter of a flow run in `project` refused (its log's "refused" lines)."""
    from flows.warm_stages import LOG_FILE

    log = project / LOG_FILE
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.exists() else []
    return [line for line in lines if " refused `" in line]


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


def run_flows(project: Path, fresh_project: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The retrain flow cold, then again unchanged, then cold on `fresh_project` with fresh interpreters
    (SFTFLOW_WARM_STAGES=0); each result with its measured `wall_seconds`."""
    from flows.warm_stages import WARM_ENV

    from prefect.testing.utilities import prefect_test_harness

    from flows.retrain import retrain

    env = {**_env(project), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    keys = ("MLFLOW_TRACKING_URI", "TOKENIZERS_PARALLELISM", "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK", WARM_ENV, *THREAD_VARIABLES)
    saved = {k: os.environ.get(k) for k in keys}
    cwd = Path.cwd()
    os.environ.update({k: env[k] for k in keys if k in env})
    for k in (WARM_ENV, *THREAD_VARIABLES):
        os.environ.pop(k, None)
    runs = []

    def timed(where: Path) -> None:
        os.chdir(where)  # mlflow's default store and relative paths resolve against the cwd
        start = time.perf_counter()
        result = retrain(params_path=str(where / "params.yaml"))
        runs.append({**result, "wall_seconds": time.perf_counter() - start, "refused": warm_refusals(where)})

    try:
        with prefect_test_harness(server_startup_timeout=180):
            timed(project)
            timed(project)
            os.environ.update({WARM_ENV: "0", "MLFLOW_TRACKING_URI": _env(fresh_project)["MLFLOW_TRACKING_URI"]})
            timed(fresh_project)
    finally:
        os.chdir(cwd)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return runs[0], runs[1], runs[2]


# Outputs the warm and the fresh-interpreter flow must write bit for bit alike (same data, params, threads).
COMPARED_OUTPUTS = ("artifacts/pretrain/model", "artifacts/train/model", "artifacts/align/model")


def same_outputs(warm: Path, fresh: Path) -> dict[str, str]:
    """Content hashes of COMPARED_OUTPUTS, equal in both copies; RuntimeError naming the first that differs."""
    from tasks.core.io import dir_sha256

    hashes = {}
    for rel in COMPARED_OUTPUTS:
        a, b = dir_sha256(warm / rel), dir_sha256(fresh / rel)
        if a != b:
            raise RuntimeError(f"the warm-stage flow and the fresh-interpreter flow wrote different {rel}: {a} vs {b}")
        hashes[rel] = a
    return hashes


def main() -> dict[str, Any]:
    """Time plain stages, the cold flow and the unchanged re-run; return rows for the runner's table."""
    with tempfile.TemporaryDirectory(prefix="sftflow-bench-flow-") as tmp:
        plain = run_plain(make_tiny_project(Path(tmp) / "plain"))
        cold, rerun, fresh = run_flows(make_tiny_project(Path(tmp) / "flow"), make_tiny_project(Path(tmp) / "fresh"))
        same_models = same_outputs(Path(tmp) / "flow", Path(tmp) / "fresh")
    refused = cold["refused"] + rerun["refused"]
    if refused:
        raise RuntimeError(f"the warm stage interpreter refused {len(refused)} stage command(s), which then started fresh: {refused[:3]}")

    if cold["status"] != "registered" or rerun["status"] != "nothing changed" or fresh["status"] != "registered":
        raise RuntimeError(
            f"unexpected flow outcomes: cold {cold['status']!r}, re-run {rerun['status']!r} ({rerun.get('reason')}), "
            f"fresh interpreters {fresh['status']!r}"
        )
    stage_sum = sum(plain["seconds"].values())
    flow_stage_seconds = {s["stage"]: s["seconds"] for s in cold["stages"]}
    fresh_stage_seconds = {s["stage"]: s["seconds"] for s in fresh["stages"]}
    dvc_stage_sum = sum(flow_stage_seconds.values())
    fresh_stage_sum = sum(fresh_stage_seconds.values())
    dvc_plain_sum = sum(plain["seconds"][s] for s in flow_stage_seconds)
    per_stage_extra = (dvc_stage_sum - dvc_plain_sum) / len(flow_stage_seconds)
    fresh_per_stage_extra = (fresh_stage_sum - dvc_plain_sum) / len(fresh_stage_seconds)
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
            "target": "<= 2.00x",
            "note": (
                f"flow {cold['wall_seconds']:.1f} s vs sum of {len(plain['seconds'])} stage run() {stage_sum:.1f} s "
                f"(that interpreter's whole life: {plain['wall_seconds']:.1f} s); the {len(flow_stage_seconds)} DVC stages take "
                f"{dvc_stage_sum:.1f} s in the flow vs {dvc_plain_sum:.1f} s as functions "
                f"(+{per_stage_extra:.1f} s each: `dvc repro`, its `sftflow` forked from the warm interpreter); tiny params: the "
                f"{fixed:.0f} s fixed cost is <= 10% once the stages take >= {fixed / 0.10:.0f} s"
            ),
        },
        {
            "name": "flow: warm stages / a fresh interpreter per stage",
            "ratio": round(cold["wall_seconds"] / fresh["wall_seconds"], 2),
            "target": "< 1.00x",
            "note": (
                f"cold flow {cold['wall_seconds']:.1f} s vs {fresh['wall_seconds']:.1f} s with SFTFLOW_WARM_STAGES=0 "
                f"({fresh['wall_seconds'] / stage_sum:.2f}x the plain functions; its DVC stages {fresh_stage_sum:.1f} s, "
                f"+{fresh_per_stage_extra:.1f} s each); both wrote the same pretrain, train and align models; every stage "
                f"command forked (none refused), no thread variables set"
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
        "fresh_stage_seconds": fresh_stage_seconds,
        "fresh_cold_seconds": fresh["wall_seconds"],
        "model_sha256": same_models,
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
