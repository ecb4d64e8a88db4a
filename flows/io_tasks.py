"""The flow's tasks that talk to MLflow or the DVC remote: the data-change trigger, logging to the
flow's MLflow run, register, promote and `dvc push`. Each retries (a server restart or a network
blip should not fail a run that trained for minutes); the DVC stages never do (flows/dvc_stage.py).

Registry lookups are `tasks.core.registry`'s; this module only calls them. The tracking server's 401
or 403 fails the task with a StageError naming the login variables (`tasks.core.access.tracking_access`:
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD), retried like any other error."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows.dvc_stage import _subprocess_env, _tool, run_logger, stream_command
from tasks.core import registry
from tasks.core.access import tracking_access
from tasks.core.config import Params, ParamsError
from tasks.core.errors import StageError
from tasks.core.io import file_sha256
from tasks.core.stages import DVC_STAGES

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


def io_task(name: str) -> Any:
    """Decorator: a Prefect task called `name`, uncached, retried IO_RETRIES times with IO_RETRY_DELAYS."""
    return task(name=name, task_run_name=name, cache_policy=NO_CACHE, retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS)


def raw_data_sha256(params: Params) -> str | None:
    """Content hash of the raw data file, as the register stage tags it (`data.sha256`); None if it is missing."""
    path = Path(params.data.path)
    return file_sha256(path) if path.is_file() else None


def alignment_inputs(params: Params) -> dict[str, str]:
    """What align learns from besides the params, as the registered version tags it: the closed feedback
    snapshots' hash (`feedback.sha256`) and the preference file's (`align.data.sha256`); empty when align is off.
    A missing preference file hashes as none here (the align stage fails naming it)."""
    from tasks.core.feedback import closed_sha256
    from tasks.core.preferences import NO_FILE, preference_file_sha256

    if not params.align.enabled:
        return {}
    data = params.align.data
    return {
        "feedback.sha256": closed_sha256(params.align.feedback_dir),
        "align.data.sha256": preference_file_sha256(data) if data is not None and Path(data).is_file() else NO_FILE,
    }


def snapshot_feedback(params: Params) -> str | None:
    """Close the app's open feedback file into a snapshot align reads (`tasks.core.feedback`); its name, or None."""
    from tasks.core.feedback import FeedbackStore

    if not params.align.enabled:
        return None
    store = FeedbackStore(params.align.feedback_dir)
    closed = store.snapshot()
    return closed.name if closed is not None else None


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


@io_task("check-trigger")
def check_trigger(params: Params, force: bool) -> dict[str, Any]:
    """The data-change trigger: compare the raw data, params, feedback snapshot and preference file hashes with
    the champion's tags (the feedback and file only when `align.enabled`).

    Args:
        params: the resolved parameters.
        force: retrain whatever the champion's tags say.

    Returns:
        {"retrain": bool, "reason": str, "champion": version or None, "data_sha256": str or None}.

    Raises:
        StageError: the tracking server refused the request (401/403), naming the variables to set or check.
    """
    from tasks.core.tracking import setup_mlflow

    data_hash = raw_data_sha256(params)
    with tracking_access("check-trigger (reading the champion's data and params hashes)"):
        setup_mlflow(params.register.experiment)
        champion = registry.champion_version(params.register.model_name)
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
    from tasks.core.feedback import EMPTY_SHA256
    from tasks.core.preferences import NO_FILE

    # A champion registered before align existed learnt from no feedback and no preference file.
    recorded = {"feedback.sha256": EMPTY_SHA256, "align.data.sha256": NO_FILE}
    for key, value in alignment_inputs(params).items():
        if tags.get(key, recorded[key]) != value:
            what = "feedback" if key == "feedback.sha256" else f"preference file {params.align.data}"
            return {**out, "retrain": True, "reason": f"new {what} since champion v{champion.version}"}
    return {
        **out,
        "retrain": False,
        "reason": f"data and parameters match champion v{champion.version} (run with --force to retrain anyway)",
    }


@io_task("log-to-mlflow")
def log_to_mlflow(params: Params, run_id: str) -> None:
    """Log params, every stage's metrics/plots/reports, the resolved params.yaml and dvc.lock to the run."""
    from tasks.core.tracking import log_params, log_run_files, log_stage

    with tracking_access("log-to-mlflow"):
        log_params(params, run_id)
        for stage in DVC_STAGES:
            log_stage(params, stage, run_id)
        log_run_files(params, run_id)


@io_task("register")
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
        with tracking_access("register"), _mlflow_run(run_id):
            return tasks.register.run(params, flow_run_id=flow_run_id)
    except (MlflowException, requests.RequestException, OSError) as e:
        raise StageError(
            f"register failed talking to the MLflow tracking server at {mlflow.get_tracking_uri()} "
            f"({type(e).__name__}: {e}); check that it is up (MLFLOW_TRACKING_URI), then run again: "
            "what this run trained is kept and will be registered once"
        ) from e


@io_task("promote")
def promote(params: Params, run_id: str) -> dict[str, Any]:
    """Gate the newest version to `champion` (or leave it `challenger`), inside the flow's MLflow run."""
    import tasks.promote

    with tracking_access("promote"), _mlflow_run(run_id):
        return tasks.promote.run(params)


@io_task("push")
def push(root: str) -> None:
    """`dvc push`: copy the run's outputs to the DVC remote, so the registered version's data can be pulled."""
    log = run_logger()
    rc, tail = stream_command([_tool("dvc"), "push"], cwd=Path(root), emit=lambda line: log.info("%s", line), env=_subprocess_env(Path(root)))
    if rc != 0:
        excerpt = "\n".join(tail[-10:])
        raise StageError(f"dvc push failed (exit code {rc}); local results are kept. Its last output:\n{excerpt}")


def mark_failed(client: Any, run_id: str, uri: str) -> None:
    """End the MLflow run FAILED; when the server is down too, log that and let the original error stand."""
    try:
        client.set_tag(run_id, "sftflow.outcome", "failed")
        client.set_terminated(run_id, "FAILED")
    except Exception as e:  # noqa: BLE001 - the stage's error is the one to raise, not this follow-up
        run_logger().warning("could not mark MLflow run %s FAILED at %s: %s: %s", run_id, uri, type(e).__name__, e)
