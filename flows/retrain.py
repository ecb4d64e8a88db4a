"""The `retrain` Prefect flow: `flows.FLOW_STAGES` (each DVC stage, then register and promote), one Prefect
task per stage. It only sequences them: the tasks are flows/dvc_stage.py's and flows/io_tasks.py's.

Who decides what (DESIGN.md): every file-producing task runs its DVC stage
(`dvc repro --single-item <stage>`), so DVC's cache decides what is stale and `dvc repro` alone
reproduces the same files; Prefect only sequences, retries I/O and shows each stage's logs; MLflow
receives what the stages wrote. Nothing here computes a metric.

Two skips, in this order:

1. The data-change trigger (before any stage). When the champion in the MLflow registry was trained
   on the same raw data (`data.sha256` tag) with the same parameters (`params.sha256` tag), and aligned
   on the same feedback snapshots (`feedback.sha256`, closed just before: `tasks.core.feedback`) and
   preference file (`align.data.sha256`), the run stops at once and says "nothing changed": the champion already is this data's model. `--force`
   (flow parameter `force`) skips this check, e.g. after a code change, which the champion's tags
   do not capture.
2. DVC's cache (every stage). Each stage runs only when its deps or params changed; changing only
   `evaluate:` params re-runs evaluate and what follows. When no stage ran and this exact model
   (content hash of the final model, `artifacts/align/model`) is already registered, register and promote are skipped
   and the run says "nothing changed" too. `--force` does not bypass DVC: `dvc repro --force` does.

`-S key=value` overrides: DVC stages read `params.yaml`, so the flow validates the overrides, then
writes them into `params.yaml` (comments kept, like `dvc exp run -S`) before the first stage. They
stay there afterwards, so `dvc status` and `dvc repro` agree with the outputs the run left.

A failing stage fails the flow: earlier outputs stay (DVC committed them), register and promote
never run, the MLflow run ends FAILED, and the next run starts at the first stale stage.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.dvc_stage import STAGE_TASKS, _subprocess_env, _tool, write_overrides
from flows.io_tasks import check_trigger, log_to_mlflow, mark_failed, promote, push, register, snapshot_feedback
from flows.lock import _chdir, _project_lock
from flows.report import finish, next_steps
from flows.warm_stages import WARM_ENV, enabled, stage_runner, warmups_for
from tasks.core import registry
from tasks.core.access import prefect_access, tracking_access
from tasks.core.config import DEFAULT_PARAMS_FILE, ParamsError, load_params
from tasks.core.errors import StageError
from tasks.core.io import dir_sha256
from tasks.core.stages import DVC_STAGES

NOTHING_CHANGED = "nothing changed"
EPHEMERAL_STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
EPHEMERAL_STARTUP_TIMEOUT_SECONDS = 120  # Prefect's default is 20 s; see _wait_longer_for_the_temporary_server


@flow(name="retrain")
def retrain(params_path: str = str(DEFAULT_PARAMS_FILE), overrides: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Validate, split, select, pretrain, train, align, evaluate, quantize, register and promote.

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
    from prefect.runtime import flow_run

    log = get_run_logger()
    params_file = Path(params_path).resolve()
    root = params_file.parent
    if not (root / "dvc.yaml").exists():
        raise ParamsError(f"{params_file} is not in a DVC project root (no dvc.yaml beside it); pass the project's params.yaml")
    if params_file.name != "params.yaml":
        raise ParamsError(f"the DVC stages read params.yaml, not {params_file.name}; edit params.yaml or use -S key=value")
    started = time.monotonic()
    with _chdir(root), _project_lock(root), contextlib.ExitStack() as warm_stack:
        params = write_overrides(params_file, list(overrides or []))
        result: dict[str, Any] = {"status": None, "stages": [], "flow_run_id": flow_run.id}
        warm = enabled()
        # Started before the trigger check, so its imports overlap MLflow's start-up here; stopped at once when
        # no stage runs. The stage commands get the environment pinned now (flows/warm_stages.py).
        runner = warm_stack.enter_context(
            stage_runner(root, _subprocess_env(root), _tool("sftflow"), log, warm, warmups_for(params.data.language))
        )
        import mlflow  # seconds: after the warm interpreter started, which imports meanwhile
        from mlflow import MlflowClient

        # Feedback sent from now on waits for the next run: align reads only closed snapshots.
        closed = snapshot_feedback(params)
        if closed is not None:
            log.info("closed the feedback store's open records into %s", closed)
        trigger = check_trigger(params, force)
        log.info("data-change trigger: %s", trigger["reason"])
        result["champion"] = trigger["champion"]
        if not trigger["retrain"]:
            result.update(status=NOTHING_CHANGED, reason=trigger["reason"])
            return finish(result, params, started)

        from tasks.core.tracking import setup_mlflow

        with tracking_access("retrain (creating the flow's MLflow run)"):
            experiment_id = setup_mlflow(params.register.experiment)
            client = MlflowClient()
            run_id = client.create_run(
                experiment_id, run_name=flow_run.name, tags={"prefect.flow_run_id": str(flow_run.id), "sftflow.trigger": trigger["reason"]}
            ).info.run_id
        result.update(mlflow_run_id=run_id, mlflow_tracking_uri=mlflow.get_tracking_uri())
        log.info("MLflow run %s at %s", run_id, result["mlflow_tracking_uri"])
        name = params.register.model_name
        try:
            if not warm:
                log.info("%s=0: every stage's `sftflow` starts in a fresh interpreter", WARM_ENV)
            for stage in DVC_STAGES:
                result["stages"].append(STAGE_TASKS[stage](stage, str(root), runner))
            warm_stack.close()  # the stages are done: the warm interpreter's memory is freed before register
            push(str(root))  # before register: a version must never point at outputs the remote lacks
            log_to_mlflow(params, run_id)
            model_sha256 = dir_sha256(params.layout.final_model)
            client.set_tag(run_id, registry.RUN_MODEL_TAG, model_sha256)
            already = None if any(s["ran"] for s in result["stages"]) else registry.registered_version_for_model(name, model_sha256, params.digest())
            if already is not None and not registry.awaits_promotion(name, already):
                result.update(
                    status=NOTHING_CHANGED,
                    reason=f"every stage was up to date and version {already.version} holds this model and parameters",
                )
                client.set_tag(run_id, "sftflow.outcome", NOTHING_CHANGED)
                client.set_terminated(run_id, "FINISHED")
                return finish(result, params, started)
            if already is None:
                registered = register(params, run_id, str(flow_run.id) if flow_run.id else None)
                result["registered_version"] = registered.get("version")
            else:  # registered by a run that failed before promote: promote it now, don't register twice
                log.info("version %s holds this model but was never promoted; promoting it", already.version)
                result["registered_version"] = int(already.version)
            result["promotion"] = promote(params, run_id)
            champion = registry.champion_version(name)
            result["champion"] = champion.version if champion else None
            result.update(status="registered", reason=trigger["reason"])
            client.set_tag(run_id, "sftflow.outcome", "registered")
            client.set_terminated(run_id, "FINISHED")
        except BaseException as e:
            result.update(status="failed", error=str(e))
            mark_failed(client, run_id, result["mlflow_tracking_uri"])
            finish(result, params, started)
            raise
        return finish(result, params, started)


def _wait_longer_for_the_temporary_server() -> None:
    """Give Prefect's temporary server EPHEMERAL_STARTUP_TIMEOUT_SECONDS to start, unless the user chose a timeout.

    Without PREFECT_API_URL each run starts a temporary server, and its first start on a fresh
    PREFECT_HOME migrates a new database: on a busy machine that outlasted Prefect's default 20 s
    ("Timed out while attempting to connect to ephemeral Prefect API server"; over 40 s with two
    busy processes per core). Waiting longer costs nothing when it starts quickly. A timeout set in
    the environment or the Prefect profile wins.
    """
    import prefect.context
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or "startup_timeout_seconds" in settings.server.ephemeral.model_fields_set:
        return  # a configured server needs no temporary one; a timeout the user chose stands
    os.environ.setdefault(EPHEMERAL_STARTUP_TIMEOUT_ENV, str(EPHEMERAL_STARTUP_TIMEOUT_SECONDS))
    # Prefect read the environment when it was imported; re-read it so this process sees the value.
    refresh = getattr(prefect.context, "refresh_global_settings_context", None)
    if refresh is not None:
        refresh()


def main(params_path: Path | str = DEFAULT_PARAMS_FILE, overrides: list[str] | None = None, force: bool = False) -> int:
    """`sftflow run`: run the retrain flow, print its summary table and where to look next.

    Args:
        params_path: the project's params.yaml.
        overrides: `section.key=value` overrides (written into params.yaml, like `dvc exp run -S`).
        force: skip the data-change trigger.

    Returns:
        0 when the flow finished (registered or nothing changed).

    Raises:
        ParamsError, StageError: bad parameters, a failed stage, a temporary Prefect server that
            did not start, or a server that refused the login: the Prefect API's 401 names
            PREFECT_API_AUTH_STRING, the tracking server's 401/403 MLFLOW_TRACKING_USERNAME /
            MLFLOW_TRACKING_PASSWORD (the CLI prints them, exit 2 / 1).
    """
    # The temporary server's telemetry heartbeat races its own fresh sqlite file ("database is locked"
    # tracebacks in the output) and would phone home: off unless the user set it.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    _wait_longer_for_the_temporary_server()
    try:
        # A refused login names its variable: Prefect's (before any stage), or MLflow's (the tasks name their
        # own step; this catches the flow's other calls).
        with prefect_access(), tracking_access("retrain"):
            result = retrain(params_path=str(params_path), overrides=list(overrides or []), force=force)
    except RuntimeError as e:
        if "ephemeral Prefect API server" not in str(e):
            raise
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        raise StageError(
            "the temporary Prefect server (started because PREFECT_API_URL is not set) did not answer within "
            f"{PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()} s, so no stage ran. Start a server once "
            "(`prefect server start`) and `export PREFECT_API_URL=http://127.0.0.1:4200/api`, or wait longer: "
            f"`export {EPHEMERAL_STARTUP_TIMEOUT_ENV}=300`. Prefect said: {str(e)[:500]}"
        ) from e
    params = load_params(params_path)
    print()
    print(result["summary"])
    print(f"retrain {result['status']} in {result['seconds']:.0f} s")
    print(next_steps(params))
    return 0
