"""The `retrain` Prefect flow: validate → split → select → pretrain → train → evaluate → quantize →
register → promote, one Prefect task per stage.

Who decides what (DESIGN.md): every file-producing task runs its DVC stage
(`dvc repro --single-item <stage>`), so DVC's cache decides what is stale and `dvc repro` alone
reproduces the same files; Prefect only sequences, retries I/O and shows each stage's logs; MLflow
receives what the stages wrote. Nothing here computes a metric.

Two skips, in this order:

1. The data-change trigger (before any stage). When the champion in the MLflow registry was trained
   on the same raw data (`data.sha256` tag) with the same parameters (`params.sha256` tag), the run
   stops at once and says "nothing changed": the champion already is this data's model. `--force`
   (flow parameter `force`) skips this check, e.g. after a code change, which the champion's tags
   do not capture.
2. DVC's cache (every stage). Each stage runs only when its deps or params changed; changing only
   `evaluate:` params re-runs evaluate and what follows. When no stage ran and this exact model
   (content hash of `artifacts/train/model`) is already registered, register and promote are skipped
   and the run says "nothing changed" too. `--force` does not bypass DVC: `dvc repro --force` does.

`-S key=value` overrides: DVC stages read `params.yaml`, so the flow validates the overrides, then
writes them into `params.yaml` (comments kept, like `dvc exp run -S`) before the first stage. They
stay there afterwards, so `dvc status` and `dvc repro` agree with the outputs the run left.

A failing stage fails the flow: earlier outputs stay (DVC committed them), register and promote
never run, the MLflow run ends FAILED, and the next run starts at the first stale stage.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from tasks.config import (
    DEFAULT_PARAMS_FILE,
    Params,
    ParamsError,
    load_params,
    params_from_dict,
    parse_override,
    read_params_file,
)
from tasks.errors import StageError
from tasks.io import dir_sha256, file_sha256

# The DVC stages, in dvc.yaml order; register and promote follow in Python (they talk to MLflow).
DVC_STAGES = ("validate", "split", "select", "pretrain", "train", "evaluate", "quantize")
# Tasks that talk to MLflow or the DVC remote: a server restart or a network blip should not fail
# a run that trained for minutes. Training never retries: a failure there is not transient.
IO_RETRIES = 3
# First delay between I/O retries, doubled after each (2, 4, 8 s); tests that stop a server set it shorter.
RETRY_DELAY_ENV = "SFTFLOW_IO_RETRY_DELAY_SECONDS"


def _io_retry_delays() -> list[float]:
    """Delays between the I/O tasks' retries: exponential from SFTFLOW_IO_RETRY_DELAY_SECONDS (default 2)."""
    raw = os.environ.get(RETRY_DELAY_ENV, "").strip()
    if not raw:
        return exponential_backoff(backoff_factor=2)(IO_RETRIES)
    try:
        first = float(raw)
    except ValueError:
        first = -1.0
    if first < 0:
        raise ParamsError(f"{RETRY_DELAY_ENV}={raw!r} is not a number of seconds >= 0; unset it for the default (2)")
    return [first * 2**i for i in range(IO_RETRIES)]


IO_RETRY_DELAYS = _io_retry_delays()
PROGRESS_LOG_SECONDS = 10.0  # a tqdm bar redraws many times a second; log it this often
NOTHING_CHANGED = "nothing changed"
SUMMARY_ARTIFACT_KEY = "retrain-summary"


# --------------------------------------------------------------------------------------- helpers


def _logger() -> Any:
    """Prefect's run logger inside a flow/task, the module logger outside (e.g. in `.fn()` tests)."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        import logging

        return logging.getLogger(__name__)


@contextlib.contextmanager
def _chdir(path: Path) -> Iterator[None]:
    """Run inside the project root (stages use paths relative to it), then go back."""
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def _project_lock(root: Path) -> Iterator[None]:
    """One retrain at a time per project: two runs would write the same DVC outputs and aliases."""
    lock_path = root / ".dvc" / "tmp" / "sftflow-retrain.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise StageError(
                f"another retrain run holds {lock_path}; wait for it to finish (two runs would write the same outputs)"
            ) from e
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _tool(name: str) -> str:
    """A console script of this interpreter's environment (the venv's dvc, sftflow), else PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise StageError(f"`{name}` not found next to {sys.executable} or on PATH; install the project (make setup)")
    return found


def _subprocess_env(root: Path) -> dict[str, str]:
    """Env for stage subprocesses: the venv first on PATH (dvc.yaml runs `sftflow <stage>`), unbuffered output.

    The project root goes first on PYTHONPATH so a stage runs the code of the project it belongs to
    (the one DVC hashed as the stage's deps), not whichever checkout the venv was installed from.
    """
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


_LINE_END = re.compile(rb"\r\n|\r|\n")


def stream_command(cmd: list[str], *, cwd: Path, emit: Callable[[str], None], env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run a command, passing each output line (stdout and stderr) to `emit` as it appears.

    Progress-bar redraws (lines ended by a bare carriage return) are passed on at most every
    PROGRESS_LOG_SECONDS, and the last one always, so a tqdm bar shows in the Prefect UI without
    flooding it.

    Args:
        cmd: the command and its arguments.
        cwd: working directory.
        emit: called with each line (without its line ending).
        env: environment (default: the current one).

    Returns:
        The exit code and the last 40 lines.
    """
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    tail: deque[str] = deque(maxlen=40)
    buf = b""
    pending_progress: str | None = None
    last_progress = 0.0
    while chunk := proc.stdout.read1(65536):
        buf += chunk
        while match := _LINE_END.search(buf):
            segment, ending, buf = buf[: match.start()], match.group(), buf[match.end() :]
            text = segment.decode("utf-8", errors="replace").rstrip()
            if not text:
                continue
            if ending == b"\r":
                pending_progress = text
                if time.monotonic() - last_progress >= PROGRESS_LOG_SECONDS:
                    emit(text)
                    last_progress, pending_progress = time.monotonic(), None
                continue
            emit(text)
            tail.append(text)
            pending_progress = None
    if pending_progress:
        emit(pending_progress)
    if buf.strip():
        text = buf.decode("utf-8", errors="replace").rstrip()
        emit(text)
        tail.append(text)
    return proc.wait(), list(tail)


def _lock_entry(root: Path, stage: str) -> Any:
    """The stage's entry in dvc.lock (None before its first run)."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return None
    return (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {}).get(stage)


def write_overrides(params_path: Path, overrides: list[str]) -> Params:
    """Validate `-S` overrides against params.yaml, then write them into it (comments kept), like `dvc exp run -S`.

    Args:
        params_path: the project's params.yaml (the file the DVC stages read).
        overrides: `section.key=value` strings.

    Returns:
        The validated parameters as the stages will now read them.

    Raises:
        ParamsError: an override names an unknown key or a bad value; params.yaml is then left as it was.
    """
    params = load_params(params_path, overrides)  # validates everything before touching the file
    if overrides:
        from dvc.utils.serialize import modify_yaml

        with modify_yaml(params_path) as data:
            for item in overrides:
                parts, value = parse_override(item)
                node = data
                for p in parts[:-1]:
                    if node.get(p) is None:
                        node[p] = {}
                    node = node[p]
                node[parts[-1]] = value
        # What DVC will read must be what was validated.
        if params_from_dict(read_params_file(params_path), str(params_path)) != params:
            raise ParamsError(f"writing {overrides} into {params_path} did not give the validated parameters")
    return params


def raw_data_sha256(params: Params) -> str | None:
    """Content hash of the raw data file, as the register stage tags it (`data.sha256`); None if it is missing."""
    path = Path(params.data.path)
    return file_sha256(path) if path.is_file() else None


# ------------------------------------------------------------------------------------ stage tasks


def run_dvc_stage(stage: str, root: str) -> dict[str, Any]:
    """Run one DVC stage (`dvc repro --single-item <stage>`), streaming its output into the run log.

    Args:
        stage: a stage of dvc.yaml.
        root: the project root (holds dvc.yaml and params.yaml).

    Returns:
        {"stage", "ran": whether DVC executed the stage's command, "seconds"}.

    Raises:
        StageError: the stage failed; the message holds the end of its output.
    """
    log = _logger()
    root_path = Path(root)
    before = _lock_entry(root_path, stage)
    started = time.monotonic()
    cmd = [_tool("dvc"), "repro", "--single-item", stage]
    log.info("$ %s", " ".join(["dvc", *cmd[1:]]))
    saw_running = False

    def emit(line: str) -> None:
        nonlocal saw_running
        saw_running = saw_running or line.startswith(f"Running stage '{stage}'")
        log.info("%s", line)

    rc, tail = stream_command(cmd, cwd=root_path, emit=emit, env=_subprocess_env(root_path))
    seconds = round(time.monotonic() - started, 2)
    if rc != 0:
        excerpt = "\n".join(tail[-15:])
        raise StageError(f"stage `{stage}` failed (dvc repro exit code {rc}) after {seconds:.0f} s; its last output:\n{excerpt}")
    ran = saw_running or _lock_entry(root_path, stage) != before
    log.info("stage %s: %s in %.1f s", stage, "ran" if ran else "up to date, skipped by DVC", seconds)
    return {"stage": stage, "ran": ran, "seconds": seconds}


# One Prefect task per DVC stage, named like the stage (DESIGN.md); no retries: training is not transient.
STAGE_TASKS = {
    stage: task(run_dvc_stage, name=stage, cache_policy=NO_CACHE, retries=0, task_run_name=stage)
    for stage in DVC_STAGES
}


@contextlib.contextmanager
def _mlflow_run(run_id: str) -> Iterator[None]:
    """Make the flow's MLflow run active here (it already is when tasks run in the flow's thread)."""
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    # Resumed in another thread; the flow sets the final status, so don't let end_run decide it.
    mlflow.start_run(run_id=run_id)
    try:
        yield
    finally:
        mlflow.end_run(status="RUNNING")


@task(name="check-trigger", task_run_name="check-trigger", cache_policy=NO_CACHE, retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS)
def check_trigger(params: Params, force: bool) -> dict[str, Any]:
    """The data-change trigger: compare the raw data hash and params hash with the champion's tags.

    Args:
        params: the resolved parameters.
        force: retrain whatever the champion's tags say.

    Returns:
        {"retrain": bool, "reason": str, "champion": version or None, "data_sha256": str or None}.
    """
    from tasks.tracking import setup_mlflow

    data_hash = raw_data_sha256(params)
    setup_mlflow(params)
    champion = champion_version(params)
    out: dict[str, Any] = {"data_sha256": data_hash, "champion": champion.version if champion else None}
    if force:
        return {**out, "retrain": True, "reason": "forced (--force)"}
    if champion is None:
        return {**out, "retrain": True, "reason": "no champion yet"}
    if data_hash is None:
        return {**out, "retrain": True, "reason": f"raw data {params.data.path} is missing (validate will say why)"}
    tags = champion.tags
    if tags.get("data.sha256") != data_hash:
        return {**out, "retrain": True, "reason": f"raw data changed since champion v{champion.version}"}
    if tags.get("params.sha256") != params.digest():
        return {**out, "retrain": True, "reason": f"parameters changed since champion v{champion.version}"}
    return {
        **out,
        "retrain": False,
        "reason": f"data and parameters match champion v{champion.version} (run with --force to retrain anyway)",
    }


def champion_version(params: Params) -> Any:
    """The registry's champion ModelVersion, or None when there is none yet."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_model_version_by_alias(params.register.model_name, "champion")
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(e).lower():
            return None
        raise


def registered_version_for_model(params: Params, model_sha256: str) -> Any:
    """The version an earlier flow run registered for these weights and parameters, or None.

    Parameters count too: the registered model carries generation settings and evaluate metrics.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    name = params.register.model_name
    for version in client.search_model_versions(f"name = '{name}'"):
        if not version.run_id:
            continue
        run = client.get_run(version.run_id)
        tags = run.data.tags
        if tags.get("sftflow.model_sha256") == model_sha256 and tags.get("params.sha256") == params.digest():
            return version
    return None


def _awaits_promotion(params: Params, version: Any) -> bool:
    """True when a run registered `version` and failed before promote judged it (and nothing newer exists)."""
    from mlflow import MlflowClient

    if "promote.decision" in (version.tags or {}):
        return False
    versions = MlflowClient().search_model_versions(f"name = '{params.register.model_name}'")
    return max(int(v.version) for v in versions) == int(version.version)


@task(name="log-to-mlflow", task_run_name="log-to-mlflow", cache_policy=NO_CACHE, retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS)
def log_to_mlflow(params: Params, run_id: str) -> None:
    """Log params, every stage's metrics/plots/reports, the resolved params.yaml and dvc.lock to the run."""
    from tasks.tracking import log_params, log_run_files, log_stage

    log_params(params, run_id)
    for stage in DVC_STAGES:
        log_stage(params, stage, run_id)
    log_run_files(params, run_id)


@task(name="register", task_run_name="register", cache_policy=NO_CACHE, retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS)
def register(params: Params, run_id: str, flow_run_id: str | None) -> dict[str, Any]:
    """Register the fine-tuned model and its quantized variants inside the flow's MLflow run.

    A version that already holds the same content is reused (tasks.register), so retries never
    duplicate one. An MLflow failure is raised as a StageError that names the tracking URI.
    """
    import mlflow
    import requests
    from mlflow.exceptions import MlflowException

    import tasks.register

    # tasks.register reuses a version that already holds this content, so a retry after a
    # half-finished attempt (a variant registered, its main version not) registers nothing twice.
    try:
        with _mlflow_run(run_id):
            return tasks.register.run(params, flow_run_id=flow_run_id)
    except (MlflowException, requests.RequestException, OSError) as e:
        raise StageError(
            f"register failed talking to the MLflow tracking server at {mlflow.get_tracking_uri()} "
            f"({type(e).__name__}: {e}); check that it is up (MLFLOW_TRACKING_URI), then run again: "
            "what this run trained is kept and will be registered once"
        ) from e


@task(name="promote", task_run_name="promote", cache_policy=NO_CACHE, retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS)
def promote(params: Params, run_id: str) -> dict[str, Any]:
    """Gate the newest version to `champion` (or leave it `challenger`), inside the flow's MLflow run."""
    import tasks.promote

    with _mlflow_run(run_id):
        return tasks.promote.run(params)


@task(name="push", task_run_name="push", cache_policy=NO_CACHE, retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS)
def push(root: str) -> None:
    """`dvc push`: copy the run's outputs to the DVC remote, so the registered version's data can be pulled."""
    log = _logger()
    rc, tail = stream_command([_tool("dvc"), "push"], cwd=Path(root), emit=lambda line: log.info("%s", line), env=_subprocess_env(Path(root)))
    if rc != 0:
        excerpt = "\n".join(tail[-10:])
        raise StageError(f"dvc push failed (exit code {rc}); local results are kept. Its last output:\n{excerpt}")


# ----------------------------------------------------------------------------------- the summary

TABLE_METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def _read_metrics(params: Params, stage: str) -> dict[str, Any]:
    path = params.paths.metrics_file(stage)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _lookup(metrics: dict[str, Any], key: str) -> Any:
    """`a.b` as a flat key, else as nested dicts (evaluate writes `base: {rouge-l: ...}`)."""
    if key in metrics:
        return metrics[key]
    node: Any = metrics
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def metrics_table(params: Params) -> str:
    """Markdown table of the scores the stages wrote: model, base, baseline and each quantized variant."""
    evaluate = _read_metrics(params, "evaluate")
    quantize = _read_metrics(params, "quantize")
    rows = [
        ("fine-tuned model", {m: _lookup(evaluate, m) for m in TABLE_METRICS}),
        ("base model", {m: _lookup(evaluate, f"base.{m}") for m in TABLE_METRICS}),
        (
            f"lead-k baseline (k={_lookup(evaluate, 'baseline.k') or '?'})",
            {m: _lookup(evaluate, f"baseline.{m}") for m in TABLE_METRICS},
        ),
    ]
    for method in params.quantize.methods:
        rows.append((f"quantized {method}", {m: _lookup(quantize, f"{method}.{m}") for m in TABLE_METRICS}))
    lines = ["| model | " + " | ".join(TABLE_METRICS) + " |", "|---|" + "---:|" * len(TABLE_METRICS)]
    lines += [f"| {name} | " + " | ".join(_fmt(v[m]) for m in TABLE_METRICS) + " |" for name, v in rows]
    return "\n".join(lines)


def summary_markdown(result: dict[str, Any], params: Params) -> str:
    """The run's markdown report: outcome, stages, metrics table, promotion decision, MLflow run."""
    lines = [f"# retrain: {result['status']}", ""]
    if result.get("reason"):
        lines += [f"Reason: {result['reason']}", ""]
    if result.get("stages"):
        lines += ["| stage | DVC | seconds |", "|---|---|---:|"]
        lines += [f"| {s['stage']} | {'ran' if s['ran'] else 'up to date'} | {s['seconds']:.1f} |" for s in result["stages"]]
        lines.append("")
    lines += ["## Test-split scores (F1 × 100)", "", metrics_table(params), ""]
    promotion = result.get("promotion")
    if promotion:
        lines += [
            "## Promotion",
            "",
            (
                f"Decision: **{promotion.get('decision', '?')}** for version {promotion.get('version', '?')}; "
                f"champion: version {promotion.get('champion', '?')} ({promotion.get('reason', 'no reason given')})"
            ),
            "",
            "```json",
            json.dumps(promotion, ensure_ascii=False, indent=2, default=str),
            "```",
            "",
        ]
    if result.get("registered_version") is not None:
        lines.append(f"Registered: `{params.register.model_name}` version {result['registered_version']}")
    if result.get("champion") is not None:
        lines.append(f"Champion: `models:/{params.register.model_name}@champion` (version {result['champion']})")
    if result.get("mlflow_run_id"):
        lines.append(f"MLflow run: `{result['mlflow_run_id']}` at `{result.get('mlflow_tracking_uri')}`")
    if result.get("error"):
        lines += ["", "## Error", "", "```", str(result["error"]), "```"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ flow


@flow(name="retrain")
def retrain(params_path: str = str(DEFAULT_PARAMS_FILE), overrides: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Validate, split, select, pretrain, train, evaluate, quantize, register and promote.

    Args:
        params_path: the project's params.yaml; its folder is the project root (holds dvc.yaml).
        overrides: `section.key=value` overrides, written into params.yaml before the stages run.
        force: skip the data-change trigger (DVC still skips stages that are up to date).

    Returns:
        {"status": "registered" | "nothing changed", "stages": [...], "registered_version",
        "promotion", "champion", "mlflow_run_id", "mlflow_tracking_uri", "reason", "summary"}.

    Raises:
        ParamsError: bad parameters (nothing runs).
        StageError: a stage failed; nothing was registered or promoted.
    """
    import mlflow
    from mlflow import MlflowClient
    from prefect.runtime import flow_run

    log = get_run_logger()
    params_file = Path(params_path).resolve()
    root = params_file.parent
    if not (root / "dvc.yaml").exists():
        raise ParamsError(f"{params_file} is not in a DVC project root (no dvc.yaml beside it); pass the project's params.yaml")
    if params_file.name != "params.yaml":
        raise ParamsError(f"the DVC stages read params.yaml, not {params_file.name}; edit params.yaml or use -S key=value")
    started = time.monotonic()
    with _chdir(root), _project_lock(root):
        params = write_overrides(params_file, list(overrides or []))
        result: dict[str, Any] = {"status": None, "stages": [], "flow_run_id": flow_run.id}
        trigger = check_trigger(params, force)
        log.info("data-change trigger: %s", trigger["reason"])
        result["champion"] = trigger["champion"]
        if not trigger["retrain"]:
            result.update(status=NOTHING_CHANGED, reason=trigger["reason"])
            return _finish(result, params, started)

        from tasks.tracking import setup_mlflow

        experiment_id = setup_mlflow(params)
        client = MlflowClient()
        run_id = client.create_run(
            experiment_id, run_name=flow_run.name, tags={"prefect.flow_run_id": str(flow_run.id), "sftflow.trigger": trigger["reason"]}
        ).info.run_id
        result.update(mlflow_run_id=run_id, mlflow_tracking_uri=mlflow.get_tracking_uri())
        log.info("MLflow run %s at %s", run_id, result["mlflow_tracking_uri"])
        try:
            for stage in DVC_STAGES:
                result["stages"].append(STAGE_TASKS[stage](stage, str(root)))
            push(str(root))  # before register: a version must never point at outputs the remote lacks
            log_to_mlflow(params, run_id)
            model_sha256 = dir_sha256(params.paths.stage_dir("train") / "model")
            client.set_tag(run_id, "sftflow.model_sha256", model_sha256)
            already = None if any(s["ran"] for s in result["stages"]) else registered_version_for_model(params, model_sha256)
            if already is not None and not _awaits_promotion(params, already):
                result.update(
                    status=NOTHING_CHANGED,
                    reason=f"every stage was up to date and version {already.version} holds this model and parameters",
                )
                client.set_tag(run_id, "sftflow.outcome", NOTHING_CHANGED)
                client.set_terminated(run_id, "FINISHED")
                return _finish(result, params, started)
            if already is None:
                registered = register(params, run_id, str(flow_run.id) if flow_run.id else None)
                result["registered_version"] = registered.get("version")
            else:  # registered by a run that failed before promote: promote it now, don't register twice
                log.info("version %s holds this model but was never promoted; promoting it", already.version)
                result["registered_version"] = int(already.version)
            result["promotion"] = promote(params, run_id)
            champion = champion_version(params)
            result["champion"] = champion.version if champion else None
            result.update(status="registered", reason=trigger["reason"])
            client.set_tag(run_id, "sftflow.outcome", "registered")
            client.set_terminated(run_id, "FINISHED")
        except BaseException as e:
            result.update(status="failed", error=str(e))
            _mark_failed(client, run_id, result["mlflow_tracking_uri"])
            _finish(result, params, started)
            raise
        return _finish(result, params, started)


def _mark_failed(client: Any, run_id: str, uri: str) -> None:
    """End the MLflow run FAILED; when the server is down too, log that and let the original error stand."""
    try:
        client.set_tag(run_id, "sftflow.outcome", "failed")
        client.set_terminated(run_id, "FAILED")
    except Exception as e:  # noqa: BLE001 - the stage's error is the one to raise, not this follow-up
        _logger().warning("could not mark MLflow run %s FAILED at %s: %s: %s", run_id, uri, type(e).__name__, e)


def _finish(result: dict[str, Any], params: Params, started: float) -> dict[str, Any]:
    """Publish the markdown artifact and log the outcome."""
    result["seconds"] = round(time.monotonic() - started, 1)
    markdown = summary_markdown(result, params)
    result["summary"] = markdown
    try:
        create_markdown_artifact(markdown=markdown, key=SUMMARY_ARTIFACT_KEY, description=f"retrain: {result['status']}")
    except Exception as e:  # noqa: BLE001 - the report is a convenience; its failure must not hide the run's outcome
        _logger().warning("could not publish the Prefect artifact: %s", e)
    _logger().info("retrain %s in %.1f s%s", result["status"], result["seconds"], f" ({result['reason']})" if result.get("reason") else "")
    return result


def next_steps(params: Params) -> str:
    """Where to look after a run: MLflow UI, Prefect UI, the app."""
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    prefect_line = (
        f"  Prefect UI:  runs at {api.removesuffix('/api')} (prefect flow-run ls)"
        if api
        else "  Prefect UI:  prefect server start, then PREFECT_API_URL=http://127.0.0.1:4200/api sftflow run (prefect flow-run ls lists runs)"
    )
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow_line = f"  MLflow UI:   mlflow ui --backend-store-uri {uri}" if uri else "  MLflow UI:   mlflow ui --backend-store-uri sqlite:///mlflow.db  (http://127.0.0.1:5000)"
    return "\n".join(
        [
            "Where to look next:",
            mlflow_line,
            prefect_line,
            f"  The app:     sftflow serve   (http://{params.serve.host}:{params.serve.port}, serves models:/{params.register.model_name}@champion)",
            "  Lineage:     sftflow lineage champion",
        ]
    )


def main(params_path: Path | str = DEFAULT_PARAMS_FILE, overrides: list[str] | None = None, force: bool = False) -> int:
    """`sftflow run`: run the retrain flow, print its summary table and where to look next.

    Args:
        params_path: the project's params.yaml.
        overrides: `section.key=value` overrides (written into params.yaml, like `dvc exp run -S`).
        force: skip the data-change trigger.

    Returns:
        0 when the flow finished (registered or nothing changed).

    Raises:
        ParamsError, StageError: bad parameters or a failed stage (the CLI prints them, exit 2 / 1).
    """
    # The temporary server's telemetry heartbeat races its own fresh sqlite file ("database is locked"
    # tracebacks in the output) and would phone home: off unless the user set it.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    result = retrain(params_path=str(params_path), overrides=list(overrides or []), force=force)
    params = load_params(params_path)
    print()
    print(result["summary"])
    print(f"retrain {result['status']} in {result['seconds']:.0f} s")
    print(next_steps(params))
    return 0
