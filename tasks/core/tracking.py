"""MLflow tracking helpers: where the store is, and logging what a stage wrote into a run.

The flow starts and ends one MLflow run per flow run and calls these helpers after each stage;
they read only the files a stage wrote (`metrics/<stage>.json`, `plots/<stage>/`,
`artifacts/<stage>/`), so nothing is computed twice and a stage stays testable without MLflow.

Default store: `sqlite:///<project root>/mlflow.db` with artifacts in `<project root>/mlartifacts`
(the project root is the working directory, as for DVC); `MLFLOW_TRACKING_URI` switches to any
tracking server. Browse the default store with
`mlflow ui --backend-store-uri sqlite:///mlflow.db --default-artifact-root ./mlartifacts`.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from tasks.core.config import Params, save_params
from tasks.core.errors import StageError
from tasks.core.io import read_json

log = logging.getLogger(__name__)

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
# Files a stage writes that are worth keeping beside the run; model folders and data splits are
# versioned by DVC and the registry, so they are not copied again.
ARTIFACT_SUFFIXES = {".json", ".html", ".md", ".csv", ".png", ".svg", ".txt", ".yaml"}
STAGE_EXTRA_SUFFIXES = {"evaluate": {".jsonl"}}  # the test predictions
MAX_ARTIFACT_BYTES = 5 << 20
# The loss curve's step series; metrics/train.json's final `train_loss` keeps the plain `train.` name.
LOSS_SERIES_PREFIX = "train.curve."


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else the sqlite file in the project root (the cwd)."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return f"sqlite:///{(Path.cwd() / DB_FILE).resolve()}"


def default_artifact_location() -> str | None:
    """Artifact root for a new experiment: `mlartifacts` beside a sqlite store, else the server's default."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / ARTIFACTS_DIR).as_uri()


def setup_mlflow(experiment: str) -> str:
    """Point MLflow at the store and make `experiment` (params `register.experiment`) the active one.

    Args:
        experiment: the experiment's name; created when it does not exist.

    Returns:
        The experiment id.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    name = experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        try:
            experiment_id = mlflow.create_experiment(name, artifact_location=default_artifact_location())
        except MlflowException:
            # Another process created it between our lookup and create.
            experiment = mlflow.get_experiment_by_name(name)
            if experiment is None:
                raise
            experiment_id = experiment.experiment_id
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    log.info("MLflow store %s, experiment %r (id %s)", uri, name, experiment_id)
    return experiment_id


def _run_id(run_id: str | None) -> str:
    """The given run id, else the active run's; the flow may call from a thread without one."""
    if run_id:
        return run_id
    import mlflow

    run = mlflow.active_run()
    if run is None:
        raise StageError("no active MLflow run: start one with mlflow.start_run() or pass run_id")
    return run.info.run_id


def flatten_metrics(obj: Any, prefix: str) -> dict[str, float]:
    """Numeric leaves of a metrics dict as `prefix.key.subkey` -> float (bools as 0/1, others skipped)."""
    out: dict[str, float] = {}

    def walk(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{key}.{k}", v)
        elif isinstance(value, bool) or isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)

    walk(prefix, obj)
    return out


def _log_metrics(client: Any, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, v, now, step) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):  # log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=items[i : i + 1000])


def log_params(params: Params, run_id: str | None = None) -> int:
    """Log every parameter, flattened (`train.learning_rate`), plus the params hash as a tag.

    Args:
        params: the resolved parameters of this run.
        run_id: the run to log to; default the active run.

    Returns:
        The number of parameters logged.
    """
    import mlflow
    from mlflow.entities import Param

    run_id = _run_id(run_id)
    client = mlflow.MlflowClient()
    flat = {k: ("null" if v is None else str(v)) for k, v in params.flat().items()}
    items = [Param(k, v) for k, v in flat.items()]
    for i in range(0, len(items), 100):  # log_batch takes at most 100 params
        client.log_batch(run_id, params=items[i : i + 100])
    client.set_tag(run_id, "params.sha256", params.digest())
    return len(items)


def log_loss_series(params: Params, run_id: str | None = None) -> int:
    """Log `plots/train/loss.csv` as step series `train.curve.<column>` (train_loss, val_loss...).

    Returns:
        The number of points logged (0 when the file does not exist).
    """
    import mlflow
    from mlflow.entities import Metric

    path = params.layout.plots_dir("train") / "loss.csv"
    if not path.exists():
        log.info("no %s: no loss series to log", path)
        return 0
    run_id = _run_id(run_id)
    now = int(time.time() * 1000)
    points: list[Metric] = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "step" not in reader.fieldnames:
            raise StageError(f"{path} must have a `step` column; it has {reader.fieldnames}")
        for lineno, row in enumerate(reader, 2):
            try:
                step = int(float(row["step"]))
            except (TypeError, ValueError) as e:
                raise StageError(f"{path}:{lineno}: step {row['step']!r} is not a number") from e
            for column, raw in row.items():
                if column == "step" or raw in (None, ""):
                    continue  # val_loss is only there at eval steps
                try:
                    value = float(raw)
                except ValueError as e:
                    raise StageError(f"{path}:{lineno}: {column}={raw!r} is not a number") from e
                if math.isfinite(value):
                    points.append(Metric(f"{LOSS_SERIES_PREFIX}{column}", value, now, step))
    client = mlflow.MlflowClient()
    for i in range(0, len(points), 1000):
        client.log_batch(run_id, metrics=points[i : i + 1000])
    return len(points)


def _stage_files(params: Params, stage: str) -> list[Path]:
    """Small report files under artifacts/<stage>/, skipping model folders."""
    root = params.layout.stage_dir(stage)
    if not root.is_dir():
        return []
    suffixes = ARTIFACT_SUFFIXES | STAGE_EXTRA_SUFFIXES.get(stage, set())
    model_dirs = [p.parent for p in root.rglob("config.json") if (p.parent / "tokenizer_config.json").exists()
                  or any(p.parent.glob("*.safetensors"))]
    files = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.suffix not in suffixes or any(d in p.parents for d in model_dirs):
            continue
        if p.stat().st_size > MAX_ARTIFACT_BYTES:
            log.info("not logging %s (%d bytes > %d)", p, p.stat().st_size, MAX_ARTIFACT_BYTES)
            continue
        files.append(p)
    return files


def log_stage(params: Params, stage: str, run_id: str | None = None) -> dict[str, float]:
    """Log what a stage wrote: its metrics under the stage prefix, its plots and report files.

    `metrics/<stage>.json` becomes metrics `<stage>.<key>` (nested keys joined by dots), files
    under `plots/<stage>/` go to the artifact folder `plots/<stage>`, small report files under
    `artifacts/<stage>/` (not model weights) to `<stage>/`; for `train` the loss curve is logged
    as a step series too.

    Args:
        params: the run's parameters (paths).
        stage: a stage name.
        run_id: the run to log to; default the active run.

    Returns:
        The metrics logged.

    Raises:
        StageError: there is no run, or a metrics/plots file is malformed.
    """
    import mlflow

    run_id = _run_id(run_id)
    client = mlflow.MlflowClient()
    metrics: dict[str, float] = {}
    metrics_file = params.layout.metrics_file(stage)
    if metrics_file.exists():
        try:
            metrics = flatten_metrics(read_json(metrics_file), stage)
        except ValueError as e:
            raise StageError(f"{metrics_file} is not valid JSON: {e}") from e
        _log_metrics(client, run_id, metrics)
    plots = params.layout.plots_dir(stage)
    if plots.is_dir() and any(plots.iterdir()):
        client.log_artifacts(run_id, str(plots), artifact_path=f"plots/{stage}")
    for f in _stage_files(params, stage):
        rel = f.relative_to(params.layout.stage_dir(stage)).parent.as_posix()
        client.log_artifact(run_id, str(f), artifact_path=stage if rel == "." else f"{stage}/{rel}")
    if stage == "train":
        log_loss_series(params, run_id)
    log.info("logged stage %s: %d metrics", stage, len(metrics))
    return metrics


def log_run_files(params: Params, run_id: str | None = None, dvc_lock: Path = Path("dvc.lock")) -> None:
    """Log the resolved params.yaml and dvc.lock (when there is one) as artifacts of the run."""
    import mlflow

    run_id = _run_id(run_id)
    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "params.yaml"
        save_params(params, resolved)
        client.log_artifact(run_id, str(resolved))
    if dvc_lock.exists():
        client.log_artifact(run_id, str(dvc_lock))
