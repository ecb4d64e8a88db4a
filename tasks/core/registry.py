"""The MLflow model registry as sftflow uses it: names, aliases, tags, version lookups and the
per-row score store. Every stage and the flow ask here; only `promote` moves `champion`.

- The full model is registered as `register.model_name`; a quantized variant as
  `<model_name>-<method>`, and the main version points at it with the tag `sftflow.variant.<method>`,
  and says with `sftflow.variant_served.<method>` (`true`/`false`) and `sftflow.variant_reason.<method>`
  whether quantize found it worth serving (quality and, on the CPU, speed) and why.
- Every version carries `sftflow.content_sha256` (what it holds), so a retried register reuses it.
- The per-row ROUGE-L of a version on a test split is an artifact of its run,
  `row_scores/<test split sha256>.json`, so promotion compares versions row by row without generating.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.errors import StageError
from tasks.core.io import write_json
from tasks.core.layout import SPLITS

CHAMPION = "champion"
CHALLENGER = "challenger"
VARIANT_TAG = "sftflow.variant."
VARIANT_OF_TAG = "sftflow.variant_of"
# quantize's decision on each variant, on the main version: served or not (`true`/`false`), and why.
VARIANT_SERVED_TAG = "sftflow.variant_served."
VARIANT_REASON_TAG = "sftflow.variant_reason."
# Every tag of a main version that is about its variants (not what the version itself holds).
VARIANT_TAG_PREFIXES = (VARIANT_TAG, VARIANT_SERVED_TAG, VARIANT_REASON_TAG)
CONTENT_TAG = "sftflow.content_sha256"
# Tags of the flow's MLflow run (not of a version): which weights it produced and what came of it.
RUN_MODEL_TAG = "sftflow.model_sha256"
RUN_PARAMS_TAG = "params.sha256"
DECISION_TAG = "promote.decision"
# How a version generates (its `sftflow.json` less batch size) and that dict's hash: the gate scores
# each version under its own settings, and row scores are keyed by the hash.
SETTINGS_TAG = "sftflow.settings"
SETTINGS_SHA_TAG = "sftflow.settings_sha256"
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


def variant_decision_tags(quantize_metrics: dict[str, Any], methods: Any) -> dict[str, str]:
    """The tags of a main version that record quantize's serving decision on each of its variants.

    Args:
        quantize_metrics: metrics/quantize.json (`<method>.served`, `<method>.reason`).
        methods: the variants registered with the version.

    Returns:
        {`sftflow.variant_served.<method>`: `true`/`false`, `sftflow.variant_reason.<method>`: why}; a
        variant measured before the speed check existed (no `<method>.served`) gets none (and is served).
    """
    tags: dict[str, str] = {}
    for method in methods:
        served = quantize_metrics.get(f"{method}.served")
        if served is None:
            continue
        tags[f"{VARIANT_SERVED_TAG}{method}"] = "true" if served else "false"
        tags[f"{VARIANT_REASON_TAG}{method}"] = str(quantize_metrics.get(f"{method}.reason") or "")
    return tags


def resolve_variant(params: Any, model_version: Any, device: str) -> tuple[str, str, str | None]:
    """Which variant of a version the app serves on `device` (`cpu` or `cuda`), its model URI, and a note
    when it is not the one `serve:` asks for. The app serves this, and `promote` scores this.

    Evaluated = served: `full` is the version itself (float32, as evaluate scored it); `fastest` is the
    quickest CPU variant quantize decided to serve (`fastest_cpu_variant`); any other variant
    (`int8`, `gguf-*`, `bf16`, `bnb-*`) is served only when it is registered (its own registered model, which the
    version's tag `sftflow.variant.<method>` points at) and quantize scored it on this device class:
    int8 and GGUF on the CPU, bitsandbytes on a GPU, bf16 where its run's metric `quantize.bf16.on_cuda` says,
    and quantize did not decide against serving it (`sftflow.variant_served.<method>` is not `false`:
    a CPU variant slower than full precision, or one whose ROUGE-L failed the gate).
    Otherwise full precision is served and the note says why.

    Args:
        params: the params (`serve.variant_cpu`, `serve.variant_gpu`, `register.model_name`).
        model_version: the `ModelVersion` of `register.model_name`.
        device: the device class the app runs on.

    Returns:
        (variant served, `models:/` URI to load, note or None).
    """
    version = str(model_version.version)
    key = f"serve.variant_{'gpu' if device == 'cuda' else 'cpu'}"
    wanted = params.serve.variant_gpu if device == "cuda" else params.serve.variant_cpu
    own_uri = f"models:/{params.register.model_name}/{version}"
    if wanted == "fastest":
        wanted, note = fastest_cpu_variant(model_version)
        if note:
            return "full", own_uri, f"{key}=fastest: {note}"
    if wanted == "full":
        return wanted, own_uri, None
    tag = variant_uri_tag(wanted)
    uri = (model_version.tags or {}).get(tag)
    if not uri:
        note = (
            f"variant {wanted} was asked for ({key}) but version {version} has no tag {tag}: serving full "
            f"precision. Add {wanted} to quantize.methods and run quantize and register to add the variant."
        )
        return "full", own_uri, note
    from tasks.core.variants import CPU_METHODS, GPU_METHODS

    scored_on = "cpu" if wanted in CPU_METHODS else "cuda" if wanted in GPU_METHODS else None
    if scored_on is None:  # bf16: where quantize ran
        try:
            on_cuda = client().get_run(model_version.run_id).data.metrics.get(f"quantize.{wanted}.on_cuda")
        except Exception:  # noqa: BLE001 - no run to read: the device class is unknown
            on_cuda = None
        scored_on = None if on_cuda is None else "cuda" if on_cuda else "cpu"
    if scored_on != device:
        where = "an unknown device" if scored_on is None else f"the {scored_on.upper()}"
        note = (
            f"variant {wanted} was asked for ({key}) but version {version}'s was scored on {where}, not this "
            f"{device.upper()}: serving full precision (the app serves a variant only as it was evaluated). Run "
            f"quantize and register where the app runs."
        )
        return "full", own_uri, note
    if (model_version.tags or {}).get(f"{VARIANT_SERVED_TAG}{wanted}") == "false":
        reason = (model_version.tags or {}).get(f"{VARIANT_REASON_TAG}{wanted}") or "no reason recorded"
        note = (
            f"variant {wanted} was asked for ({key}) and is registered, but quantize decided not to serve it: "
            f"{reason}. Serving full precision."
        )
        return "full", own_uri, note
    return wanted, uri, None


def fastest_cpu_variant(model_version: Any) -> tuple[str, str | None]:
    """`serve.variant_cpu: fastest`: of a version's registered variants scored on the CPU that quantize
    decided to serve (`sftflow.variant_served.<method>` is `true`: its quality gate passed and it was faster
    than full precision in every repeat), the one with the lowest highest latency ratio
    (`quantize.<method>.latency_ratio_high` of the version's run).

    Returns:
        (the variant, None), or ("full", why none qualifies).
    """
    tags = model_version.tags or {}
    served = [m for m in variant_uris(tags) if tags.get(f"{VARIANT_SERVED_TAG}{m}") == "true"]
    if not served:
        return "full", f"version {model_version.version} has no registered variant that quantize decided to serve: serving full precision"
    try:
        metrics = client().get_run(model_version.run_id).data.metrics
    except Exception:  # noqa: BLE001 - no run to read: no ratio to rank by
        metrics = {}
    on_cpu = {m: metrics.get(f"quantize.{m}.latency_ratio_high") for m in served
              if metrics.get(f"quantize.{m}.on_cuda") == 0.0 and metrics.get(f"quantize.{m}.latency_ratio_high") is not None}
    if not on_cpu:
        return "full", (f"version {model_version.version}'s served variants {served} have no latency ratio measured on "
                        "the CPU in its run: serving full precision")
    return min(on_cpu, key=lambda m: (on_cpu[m], m)), None


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
        if _missing(e) or hidden_or_missing(e, name):
            return None
        raise


def hidden_or_missing(e: Exception, name: str) -> bool:
    """True when the server denied a request about registered model `name` because it does not exist.

    MLflow's basic-auth server answers 403, not 404, to a non-admin asking about a model that does not
    exist (it does not tell who may see what); a search lists only the models the user can read, so
    when it does not list `name` either, there is no such model for this user.
    """
    if getattr(e, "error_code", None) != "PERMISSION_DENIED" and "error code 403" not in str(e):
        return False
    return not client().search_registered_models(filter_string=f"name = '{name}'")


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


def settings_sha256(settings: dict[str, Any]) -> str:
    """Hash of a version's generation settings (`SETTINGS_TAG`)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def row_scores_key(test_sha256: str, settings_sha: str | None, scoring_version: int) -> str:
    """The name per-row scores are stored under: the test split, the version's settings, the scoring code.

    Two versions' scores are compared only under equal test split and scoring version, each generated
    with the settings it is registered (and served) with.
    """
    return f"{test_sha256}.{(settings_sha or 'unknown')[:16]}.s{scoring_version}"


def variant_scores_key(base_key: str, variant: str, device: str) -> str:
    """Where a variant's per-row scores are stored beside the full model's (`row_scores_key`): scores of
    another variant or device class are never reused."""
    return base_key if variant == "full" else f"{base_key}.{variant}-{device}"


def save_row_scores(run_id: str, key: str, scores: dict[str, float]) -> None:
    """Store per-row ROUGE-L of a run's model under `row_scores_key`, as a run artifact."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{key}.json"
        write_json(path, {"key": key, "metric": ROW_METRIC, "scores": scores})
        client().log_artifact(run_id, str(path), artifact_path=ROW_SCORES_DIR)


def load_row_scores(run_id: str, key: str) -> dict[str, float] | None:
    """Per-row ROUGE-L stored in a run under `key`, or None when there are none under it."""
    return read_row_scores(client(), run_id, key)


def read_row_scores(mlflow_client: Any, run_id: str, key: str) -> dict[str, float] | None:
    """`load_row_scores` through a given client (a reader that must not touch the global tracking URI)."""
    names = {Path(f.path).name for f in mlflow_client.list_artifacts(run_id, ROW_SCORES_DIR)}
    if f"{key}.json" not in names:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow_client.download_artifacts(run_id, f"{ROW_SCORES_DIR}/{key}.json", tmp)
        return {str(k): float(v) for k, v in json.loads(Path(local).read_text(encoding="utf-8"))["scores"].items()}


def runs_by_id(mlflow_client: Any, run_ids: list[str]) -> dict[str, Any]:
    """The MLflow runs with these ids (deleted ones too), in a few searches rather than one call each.

    A version's metrics live on the run that registered it, so a view of many versions reads their
    runs here. A run id that is gone (the run was garbage-collected) is absent from the result.
    """
    from mlflow.entities import ViewType

    wanted = sorted({r for r in run_ids if r})
    if not wanted:
        return {}
    experiments = [e.experiment_id for e in mlflow_client.search_experiments(view_type=ViewType.ALL)]
    found: dict[str, Any] = {}
    for i in range(0, len(wanted), 100):  # keep each filter short
        chunk = wanted[i : i + 100]
        ids = ", ".join(f"'{r}'" for r in chunk)
        for run in mlflow_client.search_runs(
            experiments, filter_string=f"attributes.run_id IN ({ids})", run_view_type=ViewType.ALL, max_results=len(chunk)
        ):
            found[run.info.run_id] = run
    return found


@dataclass(frozen=True)
class Lineage:
    """The chain of a model version: data → validation → splits → params → code → flow run → metrics →
    promotion → aliases (then its variants), as `sftflow lineage` prints it and the review dashboard shows it.

    Attributes:
        name: registered model name.
        version: version number.
        run_id: the MLflow run that registered it.
        steps: (step, what the registry says) in chain order.
    """

    name: str
    version: str
    run_id: str | None
    steps: tuple[tuple[str, str], ...]

    def text(self) -> str:
        """The multi-line report of `sftflow lineage`."""
        lines = [f"{self.name} version {self.version}  (run {self.run_id})"]
        for n, (step, value) in enumerate(self.steps):
            head = "  " + ("" if n == 0 else "  " if step == "variants" else "↓ ") + step
            lines.append(f"{head:<13} {value}")
        return "\n".join(lines)


def lineage_of(
    name: str, version: str | int, run_id: str | None, tags: dict[str, str], aliases: list[str], run_metrics: dict[str, float]
) -> Lineage:
    """The lineage of a version from what the registry holds on it (no calls here).

    Args:
        name: registered model name.
        version: version number.
        run_id: the run that registered it.
        tags: the version's tags.
        aliases: the aliases pointing at it.
        run_metrics: the metrics of its run (`evaluate.*` are listed).
    """
    t = tags or {}
    metrics = {k[len("evaluate."):]: f"{v:.4f}" for k, v in sorted(run_metrics.items()) if k.startswith("evaluate.")}
    dirty = {"true": " (tree dirty: uncommitted changes)", "false": ""}.get(t.get("code.dirty", ""), " (dirty: unknown)")
    steps = [
        ("data", f"{t.get('data.path', '?')}  sha256 {t.get('data.sha256', '?')}"
         + (f"  dvc md5 {t['data.dvc_md5']}" if "data.dvc_md5" in t else "")),
        ("validation", f"success={t.get('validate.success', '?')}"),
        ("splits", "  ".join(f"{s} {t.get(f'split.{s}_sha256', '?')[:12]}" for s in SPLITS)),
        ("params", f"sha256 {t.get('params.sha256', '?')}  base model {t.get('model.base', '?')}"),
        ("alignment", _alignment(t)),
        ("code", f"commit {t.get('code.commit', '?')}{dirty}"),
        ("flow run", t.get("prefect.flow_run_id", "?")),
        ("metrics", "  ".join(f"{k} {v}" for k, v in metrics.items()) or "(none)"),
        ("promotion", t.get(DECISION_TAG, "not yet gated") + (f": {t['promote.reason']}" if "promote.reason" in t else "")),
        ("aliases", ", ".join(sorted(aliases)) or "(none)"),
    ]
    variants = variant_uris(t)
    if variants:
        steps.append(("variants", "  ".join(f"{m} {uri}" for m, uri in sorted(variants.items()))))
    return Lineage(name=name, version=str(version), run_id=run_id, steps=tuple(steps))


def _alignment(t: dict[str, str]) -> str:
    """The lineage step of align: which model is final, the feedback snapshot and preference file, the pairs."""
    if "feedback.sha256" not in t:
        return "(no align stage)"
    try:
        pairs = ", ".join(f"{n} {s}" for s, n in json.loads(t.get("align.pairs", "{}")).items())
    except ValueError:
        pairs = t.get("align.pairs", "?")
    return (f"{t.get('align.final', '?')} model  feedback snapshot sha256 {t['feedback.sha256']}  "
            f"preference file {t.get('align.data.sha256', '?')}  pairs: {pairs or 'none'}")


def version_lineage(mlflow_client: Any, name: str, version: str | int) -> Lineage:
    """The lineage of a version number or alias, read from the registry.

    Raises:
        StageError: the version or alias does not exist.
    """
    mv = resolve_version(mlflow_client, name, version)
    aliases = mlflow_client.get_registered_model(name).aliases
    own = [a for a, v in aliases.items() if str(v) == str(mv.version)]
    run_metrics = mlflow_client.get_run(mv.run_id).data.metrics if mv.run_id else {}
    return lineage_of(name, mv.version, mv.run_id, mv.tags, own, run_metrics)
