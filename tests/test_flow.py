"""The `retrain` flow: small tasks through `.fn()`, and real flow runs under one `prefect_test_harness`
on a copy of the project (tiny data, tiny model, its own DVC cache/remote and sqlite MLflow store)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.core import stages
from tasks.core.config import load_params
from tasks.core.errors import StageError

ROOT = Path(__file__).resolve().parents[1]
DVC_STAGES = list(stages.DVC_STAGES)  # dvc.yaml order; the flow runs them in it


# ------------------------------------------------------------------------------- units (.fn())


def test_stream_command_passes_lines_and_throttles_progress(tmp_path):
    from flows.dvc_stage import stream_command

    script = (
        "import sys\n"
        "print('first line')\n"
        "for i in range(200):\n"
        "    sys.stderr.write(f'\\rprogress {i}')\n"
        "sys.stderr.write('\\n')\n"
        "print('last line')\n"
        "sys.exit(3)\n"
    )
    seen: list[str] = []
    rc, tail = stream_command([sys.executable, "-c", script], cwd=tmp_path, emit=seen.append)
    assert rc == 3
    assert seen[0] == "first line" and seen[-1] == "last line"
    progress = [s for s in seen if s.startswith("progress")]
    # 200 redraws in well under PROGRESS_LOG_SECONDS: the first, and the last kept when the line ends.
    assert progress[0] == "progress 0" and progress[-1] == "progress 199"
    assert len(progress) <= 3
    assert tail[-1] == "last line"


def _through_runner(runner: dict, base_env: dict, args: list[str], **extra_env: str) -> tuple[int, list[str]]:
    """`sftflow ARGS` as a DVC stage command of the flow runs it: the runner's `sftflow` first on PATH,
    its output read from the runner's named pipe. Returns the exit code and the lines read."""
    from collections import deque

    from flows.dvc_stage import pump_lines
    from flows.warm_stages import stage_env, stage_output

    lines: list[str] = []
    with stage_output(runner, lambda stream: pump_lines(stream, lines.append, deque())) as output_env:
        env = {**stage_env(base_env, runner), **output_env, **extra_env}
        proc = subprocess.run(["sftflow", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300, check=False)
    return proc.returncode, lines


def test_warm_stage_interpreter_runs_a_command_as_a_fresh_one_would(tmp_path):
    """A command forked from the warm interpreter prints what the real `sftflow` prints and exits with its
    code; it runs under the run's pinned environment; one whose environment differs from the server's is
    refused, said so, and run fresh."""
    import logging

    from flows.dvc_stage import _subprocess_env, _tool
    from flows.warm_stages import LOG_FILE, stage_runner

    base_env = _subprocess_env(ROOT)
    real = subprocess.run([_tool("sftflow"), "params"], cwd=ROOT, env=base_env, capture_output=True, text=True, timeout=120, check=True)
    expected = [line.rstrip() for line in real.stdout.splitlines() if line.strip()]
    log = logging.getLogger("test")
    with stage_runner(tmp_path, base_env, _tool("sftflow"), log, warm=True) as runner:
        assert runner["socket"]
        rc, lines = _through_runner(runner, base_env, ["params"])
        assert rc == 0 and lines == expected  # forked, its stdout in the named pipe, nothing else in it
        rc, lines = _through_runner(runner, base_env, ["validate", "-p", str(tmp_path / "missing.yaml")])
        assert rc == 2, lines  # the CLI's exit code for bad params
        assert any("missing.yaml" in line for line in lines), lines
        # A variable of the command's own is dropped: the run's pinned environment is the command's.
        rc, lines = _through_runner(runner, base_env, ["params"], SFTFLOW_TEST_PROBE="1")
        assert rc == 0 and lines == expected
        # A pinned environment other than the server's: refused, said so, run fresh.
        other = tmp_path / "other-env.json"
        other.write_text(json.dumps({**json.loads(Path(runner["env_file"]).read_text(encoding="utf-8")), "SFTFLOW_TEST_PROBE": "1"}))
        rc, lines = _through_runner(runner, base_env, ["params"], SFTFLOW_STAGE_ENV=str(other))
        assert rc == 0
        assert "cannot run it: the command's environment differs from the one its libraries were imported under (SFTFLOW_TEST_PROBE)" in lines[0]
        assert lines[1:] == expected  # the fresh interpreter's output, in the same pipe
    server_log = (tmp_path / LOG_FILE).read_text(encoding="utf-8")
    assert server_log.count("started `sftflow params`") == 2 and "started `sftflow validate -p" in server_log
    assert "refused `sftflow params`: the command's environment differs" in server_log
    with stage_runner(tmp_path, base_env, _tool("sftflow"), log, warm=False) as runner:  # SFTFLOW_WARM_STAGES=0
        assert not runner["socket"]
        rc, lines = _through_runner(runner, base_env, ["params"])
        assert rc == 0 and lines == expected


def _without_thread_settings(env: dict[str, str]) -> dict[str, str]:
    """`env` as a user's shell has it: no OMP_NUM_THREADS (conftest sets 1) or OPENBLAS_NUM_THREADS, so
    numpy's OpenBLAS and torch's OpenMP would start thread pools (2+ cores)."""
    return {k: v for k, v in env.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS")}


@pytest.mark.system  # starts the warm server and waits for its whole preload (~15 s)
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: no library starts a thread pool")
def test_warm_interpreter_forks_under_a_users_thread_settings(tmp_path):
    """With no thread variables set (as `make run` runs), the warm interpreter's preloaded numpy and torch leave
    no thread pool behind, so it forks the command instead of refusing it (every stage used to start fresh)."""
    import logging
    import time

    from flows.dvc_stage import _subprocess_env, _tool
    from flows.warm_stages import LOG_FILE, stage_runner

    base_env = _without_thread_settings(_subprocess_env(ROOT))
    log_path = tmp_path / LOG_FILE
    with stage_runner(tmp_path, base_env, _tool("sftflow"), logging.getLogger("test"), warm=True) as runner:
        deadline = time.monotonic() + 240
        while "preloaded" not in (log_path.read_text(encoding="utf-8") if log_path.exists() else ""):
            assert time.monotonic() < deadline, "the warm interpreter did not finish preloading"
            time.sleep(0.5)
        rc, lines = _through_runner(runner, base_env, ["params", "--markdown"])
        assert rc == 0 and lines[0] == "# Parameters", lines[:3]  # forked: no "cannot run it" line first
    server_log = log_path.read_text(encoding="utf-8")
    assert "started `sftflow params --markdown`" in server_log and "refused" not in server_log, server_log


def test_warm_interpreter_children_get_a_fresh_interpreters_thread_counts(tmp_path):
    """The server imports OpenBLAS and torch with one thread (no pool to make forking unsafe); a forked child
    gets back the counts a fresh interpreter starts with, under the same environment."""
    probe = (
        "import json, threadpoolctl, numpy, torch, transformers.modeling_utils, sklearn\n"
        "blas = [i['num_threads'] for i in threadpoolctl.threadpool_info() if i['internal_api'] == 'openblas']\n"
        "print(json.dumps({'torch': torch.get_num_threads(), 'openblas': blas}))\n"
    )
    warm = (
        "import json, os, socket, sys\n"
        "from flows import warm_server as ws\n"
        "server = ws.Server(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))\n"
        "os.environ.update(ws.IMPORT_ONLY_ENV)\n"
        "for name in ('numpy', 'torch', 'transformers.modeling_utils', 'sklearn'):\n"
        "    ws._import_single_threaded(server, name)\n"
        "assert ws._other_threads() == [], ws._other_threads()\n"
        "sys.stdout.flush()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    ws._restore_threads(server.fresh_threads)\n"
        f"    exec({probe!r})\n"
        "    sys.stdout.flush(); os._exit(0)\n"
        "assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0\n"
    )
    for extra in ({}, {"OMP_NUM_THREADS": "1"}):
        env = {**_without_thread_settings(dict(os.environ)), "PYTHONPATH": str(ROOT), **extra}
        fresh = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120, check=True)
        forked = subprocess.run([sys.executable, "-c", warm], env=env, cwd=tmp_path, input="", capture_output=True, text=True, timeout=240)
        assert forked.returncode == 0, forked.stderr[-2000:]
        assert json.loads(forked.stdout.strip().splitlines()[-1]) == json.loads(fresh.stdout), (extra, forked.stdout, fresh.stdout)


def test_a_dvc_stage_runs_in_process_with_its_command_output_in_the_log(tmp_path):
    """run_dvc_stage: DVC in this process, the command's output and DVC's messages in the run log (and in
    the error of a stage that fails), "ran" from DVC; `dvc status` agrees afterwards."""
    from flows.dvc_stage import run_dvc_stage

    dvc = Path(sys.executable).parent / "dvc"
    subprocess.run([str(dvc), "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  good:\n    cmd: sftflow params --markdown\n    deps: [in.txt]\n"
        f"  bad:\n    cmd: sftflow validate -p {tmp_path / 'missing.yaml'}\n",
        encoding="utf-8",
    )
    (tmp_path / "in.txt").write_text("1\n", encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        lines: list[str] = []
        mp.setattr("flows.dvc_stage.run_logger", lambda: _ListLogger(lines))
        result = run_dvc_stage("good", str(tmp_path))
        assert result["stage"] == "good" and result["ran"] is True
        assert "Running stage 'good':" in lines and "> sftflow params --markdown" in lines
        assert any(line.startswith("| `data.path` |") for line in lines), lines[:20]  # the command's stdout
        lines.clear()
        assert run_dvc_stage("good", str(tmp_path))["ran"] is False
        assert "Stage 'good' didn't change, skipping" in lines
        with pytest.raises(StageError, match=r"(?s)stage `bad` failed \(failed to reproduce 'bad'.*missing\.yaml"):
            run_dvc_stage("bad", str(tmp_path))
    status = subprocess.run([str(dvc), "status", "good"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert "up to date" in status.stdout, status.stdout + status.stderr


class _ListLogger:
    """A run logger that keeps each INFO message."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def info(self, msg: str, *args: object) -> None:
        self.lines.append(msg % args if args else msg)

    warning = info


def test_write_overrides_keeps_comments_and_rejects_unknown_keys(tmp_path):
    from flows.dvc_stage import write_overrides
    from tasks.core.config import ParamsError

    params_file = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_file)
    before = params_file.read_text(encoding="utf-8")
    with pytest.raises(ParamsError, match="no_such_key"):
        write_overrides(params_file, ["evaluate.no_such_key=1"])
    assert params_file.read_text(encoding="utf-8") == before  # a bad override leaves the file alone

    params = write_overrides(params_file, ["evaluate.rows=7", "train.lora.r=4"])
    text = params_file.read_text(encoding="utf-8")
    assert params.evaluate.rows == 7 and params.train.lora.r == 4
    assert load_params(params_file).evaluate.rows == 7  # what the DVC stages will read
    # Comments survive, as with `dvc exp run -S`: every one of them, in order.
    comments = [line.split("#", 1)[1] for line in before.splitlines() if "#" in line]
    assert comments and [line.split("#", 1)[1] for line in text.splitlines() if "#" in line] == comments


def test_metrics_table_reads_the_stage_files(tmp_path):
    from flows.report import metrics_table

    params = load_params(ROOT / "params.yaml", [f"paths.metrics={tmp_path}"])
    # evaluate nests base/baseline figures; flat `section.key` names are read too.
    (tmp_path / "evaluate.json").write_text(
        json.dumps({"rouge-l": 31.256, "base": {"rouge-l": 5.0}, "baseline": {"rouge-l": 12.5, "k": 20}})
    )
    (tmp_path / "quantize.json").write_text(json.dumps({"int8.rouge-l": 30.9}))
    table = metrics_table(params)
    lines = table.splitlines()
    assert lines[0] == "| model | rouge-1 | rouge-2 | rouge-l | bleu-4 |"
    assert "| final model | – | – | 31.26 | – |" in lines  # no metrics/align.json: which model it is, unknown
    assert "| base model | – | – | 5.00 | – |" in lines
    assert "| lead-k baseline (k=20) | – | – | 12.50 | – |" in lines
    assert "| quantized int8 | – | – | 30.90 | – |" in lines


def test_the_final_model_row_says_which_model_align_kept(tmp_path):
    from flows.report import final_model_label, metrics_table

    params = load_params(ROOT / "params.yaml", [f"paths.metrics={tmp_path}"])
    assert final_model_label(params) == "final model"
    cases = [
        ({"final": "aligned", "gate": {"passed": True}}, "final model (aligned)"),
        ({"final": "fine-tuned", "gate": {"passed": False}}, "final model (fine-tuned; align gate kept it)"),
        ({"final": "fine-tuned", "reason": "align.enabled is false"}, "final model (fine-tuned)"),
    ]
    for align, label in cases:
        (tmp_path / "align.json").write_text(json.dumps(align))
        assert final_model_label(params) == label
    assert f"| {label} |" in metrics_table(params)


def test_outputs_table_reads_what_evaluate_noticed(tmp_path):
    from flows.report import outputs_table

    params = load_params(ROOT / "params.yaml", [f"paths.metrics={tmp_path}"])
    (tmp_path / "evaluate.json").write_text(json.dumps({
        "outputs": {"distinct_share": 0.456, "repeat_share": 0.5, "length_ratio": 1.234},
        "baseline": {"outputs": {"distinct_share": 1.0, "repeat_share": 0.0, "length_ratio": 1.0}},
    }))
    lines = outputs_table(params).splitlines()
    assert "| final model | 46% | 50% | 1.23 |" in lines
    assert "| base model | – | – | – |" in lines
    assert "| lead-k baseline | 100% | 0% | 1.00 |" in lines


def test_retries_only_on_io_tasks():
    from flows import io_tasks
    from flows.dvc_stage import STAGE_TASKS

    assert list(STAGE_TASKS) == DVC_STAGES  # one task per DVC stage, in order
    for name in DVC_STAGES:
        assert STAGE_TASKS[name].retries == 0, name  # training is never retried
        assert STAGE_TASKS[name].name == name  # the Prefect task carries the stage's name
    for io_task in (io_tasks.register, io_tasks.promote, io_tasks.push, io_tasks.log_to_mlflow, io_tasks.check_trigger):
        assert io_task.retries == io_tasks.IO_RETRIES > 0
        assert io_task.retry_delay_seconds == [2, 4, 8]  # exponential backoff


def _env_without_prefect(home: Path, **extra: str) -> dict[str, str]:
    """This process's env minus every PREFECT_* setting (so no PREFECT_API_URL), with its own PREFECT_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_HOME": str(home), **extra}


def test_run_waits_longer_for_the_temporary_server_unless_told(tmp_path):
    # In a fresh interpreter: main re-reads Prefect's process-wide settings, which a harness here may hold.
    code = (
        "from flows.retrain import _wait_longer_for_the_temporary_server as wait\n"
        "from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as timeout\n"
        "wait()\n"
        "print(timeout.value())\n"
    )

    def timeout_seen(**extra: str) -> str:
        out = subprocess.run([sys.executable, "-c", code], env=_env_without_prefect(tmp_path, **extra), capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().splitlines()[-1]

    assert timeout_seen() == "120"  # Prefect's default, 20 s, is too short for a first start on a busy machine
    assert timeout_seen(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="45") == "45"  # the user's setting wins


def test_run_explains_a_temporary_server_that_does_not_start(tmp_path):
    # A timeout of 0 s: the temporary server can never answer in time, and no stage may run.
    (tmp_path / "dvc.yaml").write_text("stages: {}\n", encoding="utf-8")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    env = _env_without_prefect(
        tmp_path / "prefect-home",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0",
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    sftflow = Path(sys.executable).parent / "sftflow"
    out = subprocess.run([str(sftflow), "run", "-p", str(tmp_path / "params.yaml")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "sftflow run: the temporary Prefect server (started because PREFECT_API_URL is not set) did not answer" in out.stderr
    assert "prefect server start" in out.stderr and "export PREFECT_API_URL=" in out.stderr
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in out.stderr
    assert "Traceback" not in out.stderr


# ------------------------------------------------------------------------ the flow, end to end


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A git+DVC copy of the project (tracked and new files) with tiny data and params, MLflow in tmp."""
    from flow_helpers import make_tiny_project

    dest = make_tiny_project(tmp_path_factory.mktemp("project"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{dest / 'mlflow.db'}")
        mp.setenv("OMP_NUM_THREADS", "1")
        yield dest


@pytest.fixture(scope="module")
def harness(project):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def _task_states(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.state.type.value for r in runs}


def _versions(name: str = "sftflow-summarizer") -> list[int]:
    from mlflow import MlflowClient

    return sorted(int(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'"))


def _champion(name: str = "sftflow-summarizer") -> int:
    from mlflow import MlflowClient

    return int(MlflowClient().get_model_version_by_alias(name, "champion").version)


def _run_flow(project: Path, **kwargs):
    from flows.retrain import retrain

    cwd = Path.cwd()
    os.chdir(project)  # mlflow's default store and relative paths resolve against the cwd
    try:
        return retrain(params_path=str(project / "params.yaml"), **kwargs)
    finally:
        os.chdir(cwd)


@pytest.mark.slow
def test_flow_cold_run_registers_and_promotes(project, harness):
    import mlflow

    result = _run_flow(project)
    assert result["status"] == "registered"
    assert [s["stage"] for s in result["stages"]] == DVC_STAGES
    assert all(s["ran"] for s in result["stages"])
    states = _task_states(result["flow_run_id"])
    for name in [*DVC_STAGES, "check-trigger", "push", "log-to-mlflow", "register", "promote"]:
        assert states.get(name) == "COMPLETED", (name, states)
    assert _versions() == [1] and _champion() == 1
    # A fresh clone's run is not "dirty": the run's own dvc.lock, params.yaml and .gitignore writes are no code change.
    assert mlflow.MlflowClient().get_model_version("sftflow-summarizer", "1").tags["code.dirty"] == "false"
    run = mlflow.MlflowClient().get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert "evaluate.rouge-l" in run.data.metrics
    assert run.data.tags["sftflow.outcome"] == "registered"
    assert "| final model (" in result["summary"] and "Champion" in result["summary"]
    assert (project / "dvc.lock").exists()
    # `dvc status` agrees: the flow ran DVC's stages, so DVC alone sees nothing stale.
    dvc = Path(sys.executable).parent / "dvc"
    status = subprocess.run([str(dvc), "status"], cwd=project, capture_output=True, text=True, check=False)
    assert "up to date" in status.stdout, status.stdout + status.stderr


@pytest.mark.slow
def test_flow_rerun_unchanged_says_nothing_changed(project, harness):
    result = _run_flow(project)
    assert result["status"] == "nothing changed"
    assert "match champion v1" in result["reason"]
    assert set(_task_states(result["flow_run_id"])) == {"check-trigger"}  # no DVC stage, no register
    assert _versions() == [1]


@pytest.mark.slow
def test_flow_evaluate_change_reruns_evaluate_onwards(project, harness):
    # baseline_max_k is read by evaluate only (select and quantize list other evaluate.* keys in dvc.yaml).
    result = _run_flow(project, overrides=["evaluate.baseline_max_k=30"])
    ran = {s["stage"]: s["ran"] for s in result["stages"]}
    assert ran == {"validate": False, "split": False, "select": False, "pretrain": False, "train": False,
                   "align": False, "evaluate": True, "quantize": False}, ran
    assert "parameters changed since champion v1" in result["reason"]
    # The registered model carries the new scores and params: a new version, gated against v1.
    assert result["status"] == "registered"
    assert _versions() == [1, 2]
    assert result["promotion"]["version"] == 2
    states = _task_states(result["flow_run_id"])
    assert states["register"] == states["promote"] == "COMPLETED"


@pytest.mark.slow
def test_flow_serve_change_makes_no_new_version(project, harness):
    """`serve:` changes neither the model nor its scores: no stage runs, nothing is registered again."""
    before = _versions()
    result = _run_flow(project, overrides=["serve.port=7999"])
    assert result["status"] == "nothing changed", result
    assert _versions() == before


@pytest.mark.slow
@pytest.mark.system  # two whole flow runs when alone (`make test-system`); `make test` keeps its time budget
def test_flow_new_feedback_alone_starts_a_retrain_that_learns_from_it(project, harness):
    """Feedback sent to the app is the only change: no --force, the run is not skipped, align counts the
    pair it made from the correction, and the new version's lineage names the feedback snapshot."""
    import json

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient().get_model_version_by_alias("sftflow-summarizer", "champion")
    except MlflowException:  # run alone: a champion first
        assert _run_flow(project)["status"] == "registered"

    from tasks.core.config import load_params
    from tasks.core.feedback import FeedbackStore, closed_sha256
    from tasks.register import lineage

    train_text = json.loads((project / "artifacts/split/train.jsonl").read_text(encoding="utf-8").splitlines()[0])["text"]
    store = FeedbackStore(project / "data" / "feedback", per_minute=0)
    store.submit(text=train_text, output="模型写的标题", rating="bad", correction="读者改正的标题", user="reader")
    champion_before = MlflowClient().get_model_version_by_alias("sftflow-summarizer", "champion")
    # The champion's own params (an earlier test moved evaluate.baseline_max_k), so the feedback is the only change.
    back = ["evaluate.baseline_max_k=60"]
    assert load_params(project / "params.yaml", back).digest() == champion_before.tags["params.sha256"]
    result = _run_flow(project, overrides=back)
    assert "new feedback since champion" in result["reason"], result["reason"]
    ran = {s["stage"]: s["ran"] for s in result["stages"]}
    assert ran["align"] and not ran["train"], ran
    align = json.loads((project / "metrics/align.json").read_text(encoding="utf-8"))
    assert align["pairs_feedback"] == 1 and align["feedback_records"] == 1
    snapshot = closed_sha256(project / "data" / "feedback")
    assert align["feedback_sha256"] == snapshot != champion_before.tags["feedback.sha256"]
    assert not store.open_file.exists()  # the flow closed the open records into a snapshot
    assert result["status"] == "registered"
    newest = MlflowClient().get_model_version("sftflow-summarizer", str(result["registered_version"]))
    assert newest.tags["feedback.sha256"] == snapshot and json.loads(newest.tags["align.pairs"])["feedback"] == 1
    cwd = Path.cwd()
    os.chdir(project)
    try:
        text = lineage(load_params(project / "params.yaml"), result["registered_version"])
    finally:
        os.chdir(cwd)
    assert f"feedback snapshot sha256 {snapshot}" in text and "1 feedback" in text


@pytest.mark.slow
def test_a_change_in_the_generating_code_regenerates_under_dvc_repro(project):
    """dvc.yaml re-runs evaluate when generation code changes; the generation cache must not hand back old text."""
    source = project / "tasks" / "core" / "generation.py"
    original = source.read_text(encoding="utf-8")
    dvc = Path(sys.executable).parent / "dvc"
    env = {**os.environ, "PYTHONPATH": str(project), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    try:
        source.write_text(original + "\n_CACHE_PROBE = 1  # a change to the code that generates\n", encoding="utf-8")
        out = subprocess.run([str(dvc), "repro", "--single-item", "evaluate"], cwd=project, env=env,
                             capture_output=True, text=True, check=False)
    finally:
        source.write_text(original, encoding="utf-8")
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "Running stage 'evaluate'" in log
    assert "generation cache hit" not in log, log[-3000:]


@contextlib.contextmanager
def _busy_cores(per_core: int) -> Iterator[int]:
    """`per_core` spinning Python processes for each core this process may use; always killed on the way out."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(per_core * len(os.sched_getaffinity(0))):
            procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        yield len(procs)
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


@pytest.mark.slow
def test_run_starts_its_temporary_prefect_server_on_a_busy_machine(project, tmp_path):
    """`sftflow run` with no PREFECT_API_URL on a fresh PREFECT_HOME while every core is busy.

    The temporary server's first start migrates a new database; with two spinning processes per core
    that took over 40 s here, past Prefect's default 20 s. After the runs above only evaluate and what
    follows re-run (alone, this test trains the tiny project from scratch, and still registers).
    """
    from flow_helpers import start_group, stop_group

    env = _env_without_prefect(tmp_path / "prefect-home")
    log_file = tmp_path / "run.log"
    cmd = [str(Path(sys.executable).parent / "sftflow"), "run", "-p", str(project / "params.yaml"), "-S", "evaluate.baseline_max_k=25"]
    with _busy_cores(per_core=2):
        proc = start_group(cmd, log_file, env=env, cwd=project)
        try:
            rc = proc.wait(timeout=900)
        finally:
            stop_group(proc)  # the run and its temporary server, also when the wait timed out
    output = log_file.read_text(encoding="utf-8", errors="replace")
    assert rc == 0, output[-4000:]
    assert "Starting temporary server" in output  # it did use a temporary server
    assert "retrain registered" in output, output[-4000:]


@pytest.mark.slow
def test_flow_failing_stage_registers_nothing(project, harness):
    import mlflow

    (project / "data" / "tiny.jsonl").write_text('{"id": "1", "text": "broken\n', encoding="utf-8")
    before, champion = _versions(), _champion()
    with pytest.raises(StageError, match="stage `validate` failed"):
        _run_flow(project)
    assert _versions() == before and _champion() == champion
    assert (project / "artifacts" / "train" / "model").is_dir()  # earlier outputs are kept
    runs = mlflow.search_runs(experiment_names=["sftflow"], filter_string="tags.`sftflow.outcome` = 'failed'")
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FAILED"
