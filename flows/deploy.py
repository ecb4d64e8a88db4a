"""`sftflow deploy`: a scheduled Prefect deployment of the `retrain` flow.

Two ways to run the scheduled flow runs, both against the Prefect server named by `PREFECT_API_URL`
(start one with `prefect server start`; without it Prefect would use a temporary server that
vanishes with this process, so `deploy` refuses):

- default: a deployment on the process work pool `sftflow` (created when missing, env
  `SFTFLOW_WORK_POOL` renames it), with the code pulled from this project folder. Runs start when
  a worker polls the pool: `prefect worker start --pool sftflow` from the project's venv.
- `--serve`: `flow.serve`: this process registers the deployment and runs its scheduled runs itself
  until stopped (no work pool, no worker).

`prefect.yaml` in the project root declares the same deployment for `prefect deploy --all`.
The deployment's parameters are the params file (absolute path), the `-S` overrides (checked
now, written into params.yaml by each run, see flows/retrain.py) and `force: false`, so a
scheduled run retrains only when the data or the params differ from the champion's.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from flows import FLOW_STAGES
from tasks.core.config import DEFAULT_PARAMS_FILE, ParamsError, load_params

log = logging.getLogger(__name__)

DEFAULT_WORK_POOL = "sftflow"
ENTRYPOINT = "flows/retrain.py:retrain"


def work_pool_name() -> str:
    """The process work pool deployments go to (`SFTFLOW_WORK_POOL`, default `sftflow`)."""
    return os.environ.get("SFTFLOW_WORK_POOL", "").strip() or DEFAULT_WORK_POOL


def _check_server() -> str:
    """The configured Prefect API URL; a deployment on a temporary server would vanish with this process."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ParamsError(
            "PREFECT_API_URL is not set: start a server (`prefect server start`) and "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` (or `prefect config set PREFECT_API_URL=...`)"
        )
    return url


def _ensure_process_pool(name: str) -> None:
    """Create the process work pool when the server has none of that name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            log.info("created process work pool %r", name)
            return
        if pool.type != "process":
            raise ParamsError(f"work pool {name!r} is a {pool.type!r} pool; set SFTFLOW_WORK_POOL to a process pool name")


def deploy(
    params_path: Path | str = DEFAULT_PARAMS_FILE,
    cron: str = "0 3 * * 1",
    name: str = "retrain-scheduled",
    overrides: list[str] | None = None,
    serve: bool = False,
) -> dict[str, Any]:
    """Create (or update) a deployment of `retrain` with a cron schedule.

    Args:
        params_path: the project's params.yaml (its folder is the project root).
        cron: a cron expression, e.g. "0 3 * * 1" (Mondays 03:00, the server's timezone: UTC).
        name: the deployment name; the full name is `retrain/<name>`.
        overrides: `-S section.key=value` overrides passed to every scheduled run.
        serve: run the schedule in this process with `flow.serve` (blocks) instead of a work pool.

    Returns:
        The deployment's full name, id, schedule, parameters, work pool and how to run it.

    Raises:
        ParamsError: bad params/overrides, a bad cron expression, or no Prefect server configured.
    """
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    from flows.retrain import retrain

    params_file = Path(params_path).resolve()
    root = params_file.parent
    load_params(params_file, overrides)  # fail now, not at 3 a.m.
    try:
        CronSchedule(cron=cron)  # Prefect's own check, the one the server applies
    except ValidationError as e:
        raise ParamsError(f'--cron {cron!r} is not a valid cron expression (five fields, e.g. "0 3 * * 1")') from e
    if not (root / "flows" / "retrain.py").exists():
        raise ParamsError(f"{root} holds no flows/retrain.py: pass the params.yaml of the sftflow project")
    api_url = _check_server()
    parameters = {"params_path": str(params_file), "overrides": list(overrides or []), "force": False}
    description = f"Retrain when the data or params changed: {' → '.join(FLOW_STAGES)}"

    if serve:
        log.info("serving retrain/%s on %r; scheduled runs execute in this process (Ctrl-C stops)", name, cron)
        os.chdir(root)
        retrain.serve(name=name, cron=cron, parameters=parameters, description=description)
        return {"deployment": f"retrain/{name}", "cron": cron, "served": True}

    pool = work_pool_name()
    _ensure_process_pool(pool)
    deployment_id = retrain.from_source(source=str(root), entrypoint=ENTRYPOINT).deploy(
        name=name,
        work_pool_name=pool,
        cron=cron,
        parameters=parameters,
        description=description,
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,  # the "use .serve for local development" hint: `--serve` is that
    )
    return {
        "deployment": f"retrain/{name}",
        "id": str(deployment_id),
        "cron": cron,
        "parameters": parameters,
        "work_pool": pool,
        "api_url": api_url,
        "next": [
            f"prefect worker start --pool {pool}   # runs the scheduled flow runs (from this venv)",
            f"prefect deployment run 'retrain/{name}'   # one run now",
            "prefect flow-run ls   # the runs",
        ],
    }
