"""The MLflow model registry as sftflow uses it: names, aliases, tags, version lookups and the
per-row score store. Every stage and the flow ask here; only `promote` moves `champion`.

- The full model is registered as `register.model_name`; a quantized variant as
  `<model_name>-<method>`, and the main version points at it with the tag `sftflow.variant.<method>`.
- Every version carries `sftflow.content_sha256` (what it holds), so a retried register reuses it.
- The per-row ROUGE-L of a version on a test split is an artifact of its run,
  `row_scores/<test split sha256>.json`, so promotion compares versions row by row without generating.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from tasks.core.errors import StageError
from tasks.core.io import write_json

CHAMPION = "champion"
CHALLENGER = "challenger"
VARIANT_TAG = "sftflow.variant."
VARIANT_OF_TAG = "sftflow.variant_of"
CONTENT_TAG = "sftflow.content_sha256"
# Tags of the flow's MLflow run (not of a version): which weights it produced and what came of it.
RUN_MODEL_TAG = "sftflow.model_sha256"
RUN_PARAMS_TAG = "params.sha256"
DECISION_TAG = "promote.decision"
ROW_METRIC = "rouge-l"
ROW_SCORES_DIR = "row_scores"


def model_name_of(model_name: str, quantization: str | None = None) -> str:
    """Registered name of the full model, or of its quantized variant `<name>-<method>`."""
    return f"{model_name}-{quantization}" if quantization else model_name


def variant_uri_tag(method: str) -> str:
    """Tag on a main version whose value is the `models:/` URI of its `method` variant."""
    return f"{VARIANT_TAG}{method}"


def variant_uris(tags: dict[str, str]) -> dict[str, str]:
    """{method: models:/ URI} of the variants a main version's tags point at."""
    return {k[len(VARIANT_TAG):]: v for k, v in (tags or {}).items() if k.startswith(VARIANT_TAG)}


def client() -> Any:
    """An `MlflowClient` on the store `tasks.core.tracking.setup_mlflow` chose."""
    from mlflow import MlflowClient

    return MlflowClient()


def _missing(e: Exception) -> bool:
    return getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(e).lower()


def resolve_version(mlflow_client: Any, name: str, version: str | int) -> Any:
    """A ModelVersion from a number or an alias (`champion`), with a clear error when there is none."""
    from mlflow.exceptions import MlflowException

    text = str(version).strip()
    try:
        if text.isdigit():
            return mlflow_client.get_model_version(name, text)
        return mlflow_client.get_model_version_by_alias(name, text)
    except MlflowException as e:
        raise StageError(f"{name} has no version or alias {text!r}: see `mlflow ui` or `sftflow lineage champion`") from e


def alias_version(mlflow_client: Any, name: str, alias: str) -> str | None:
    """The version number an alias points at, or None."""
    version = mlflow_client.get_registered_model(name).aliases.get(alias)
    return None if version is None else str(version)


def champion_version(name: str) -> Any:
    """The champion ModelVersion of registered model `name`, or None when there is none yet."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, CHAMPION)
    except MlflowException as e:
        if _missing(e):
            return None
        raise


def newest_version(mlflow_client: Any, name: str) -> Any:
    """The highest version of a registered model.

    Raises:
        StageError: the model has no version (or cannot be listed).
    """
    from mlflow.exceptions import MlflowException

    try:
        versions = mlflow_client.search_model_versions(f"name='{name}'")
    except MlflowException as e:
        raise StageError(f"cannot list versions of {name}: {e}") from e
    if not versions:
        raise StageError(f"{name} has no registered version: run `sftflow register` first")
    return max(versions, key=lambda v: int(v.version))


def find_version_with_content(name: str, content: str) -> Any:
    """The READY version of registered model `name` tagged with this content hash (the oldest), or None."""
    matches = [
        v
        for v in client().search_model_versions(f"name = '{name}'")
        if v.tags.get(CONTENT_TAG) == content and str(v.status).upper().endswith("READY")
    ]
    return min(matches, key=lambda v: int(v.version)) if matches else None


def registered_version_for_model(name: str, model_sha256: str, params_sha256: str) -> Any:
    """The version an earlier flow run registered for these weights and parameters, or None.

    Parameters count too: the registered model carries generation settings and evaluate metrics.
    """
    c = client()
    for version in c.search_model_versions(f"name = '{name}'"):
        if not version.run_id:
            continue
        tags = c.get_run(version.run_id).data.tags
        if tags.get(RUN_MODEL_TAG) == model_sha256 and tags.get(RUN_PARAMS_TAG) == params_sha256:
            return version
    return None


def awaits_promotion(name: str, version: Any) -> bool:
    """True when a run registered `version` and failed before promote judged it (and nothing newer exists)."""
    if DECISION_TAG in (version.tags or {}):
        return False
    versions = client().search_model_versions(f"name = '{name}'")
    return max(int(v.version) for v in versions) == int(version.version)


def save_row_scores(run_id: str, test_sha256: str, scores: dict[str, float]) -> None:
    """Store per-row ROUGE-L of a run's model on the test split with that hash, as a run artifact."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{test_sha256}.json"
        write_json(path, {"test_sha256": test_sha256, "metric": ROW_METRIC, "scores": scores})
        client().log_artifact(run_id, str(path), artifact_path=ROW_SCORES_DIR)


def load_row_scores(run_id: str, test_sha256: str) -> dict[str, float] | None:
    """Per-row ROUGE-L stored in a run for that test split, or None when there are none for it."""
    c = client()
    names = {Path(f.path).name for f in c.list_artifacts(run_id, ROW_SCORES_DIR)}
    if f"{test_sha256}.json" not in names:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = c.download_artifacts(run_id, f"{ROW_SCORES_DIR}/{test_sha256}.json", tmp)
        return {str(k): float(v) for k, v in json.loads(Path(local).read_text(encoding="utf-8"))["scores"].items()}
