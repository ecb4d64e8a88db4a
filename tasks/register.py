"""The `register` stage: log the fine-tuned model to MLflow and register a version with lineage tags.

Every version carries what a reviewer needs to trace it: the data content hash (and DVC's md5 from
dvc.lock), the validation result, the split hashes, the params hash, the base model, the code commit
and whether the tree was dirty, the Prefect flow run id and the evaluate metrics (as tags of the
version and metrics of its run). The per-row ROUGE-L of the test predictions is stored in the run
(`row_scores/<test split sha256>.json`) so `promote` compares two versions row by row without
generating again. Quantized variants in `artifacts/quantize/<method>/` are registered as versions
of `<model_name>-<method>` (a GGUF one only when it passed quantize's gate); the main version points at each with a `sftflow.variant.<method>` tag
and carries quantize's decision to serve it or not (`sftflow.variant_served.<method>`: `true`/`false`,
`sftflow.variant_reason.<method>`: e.g. "slower than full precision: ratio a–b"), which the app follows.

Registration is idempotent: every version carries `sftflow.content_sha256`, a hash of what it
holds (weights, tokenizer, generation settings, the pyfunc code, requirements and the lineage tags
that describe it, not when or by whom it was made). A version with the same hash is reused instead of
registering a copy, so a register killed between a variant and its main version, or retried after
a partial attempt, converges to exactly one version per content and leaves no orphan.

Everything the stage reads is checked before anything is written to MLflow, so a failed upstream
run registers nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from tasks.core.decoding import apply_decoding, decoding_file
from tasks.core.errors import StageError
from tasks.core.generation import GenerationSettings
from tasks.core.gguf import GGUF_FILE, GGUF_METHODS
from tasks.core.scoring import SCORING_VERSION, score_row
from tasks.core.io import dir_sha256, file_sha256, read_json, read_jsonl, write_json
from tasks.core.layout import SPLITS
from tasks.core.loading import MANIFEST_TAG, decode_manifest, encode_manifest, logged_model_manifest, manifest_mismatches
from tasks.core.registry import (
    CONTENT_TAG,
    ROW_METRIC,
    SETTINGS_SHA_TAG,
    SETTINGS_TAG,
    VARIANT_OF_TAG,
    VARIANT_TAG_PREFIXES,
    client,
    find_version_with_content,
    load_row_scores,
    resolve_version,
    model_name_of,
    row_scores_key,
    save_row_scores,
    variant_scores_key,
    settings_sha256,
    variant_decision_tags,
    variant_uri_tag,
    variant_uris,
    version_lineage,
)
from tasks.core.stage_params import StageParams, stage_entry
from tasks.core.tracking import flatten_metrics, setup_mlflow
from tasks.core.variants import MARKER_FILE, read_marker, variant_placement

log = logging.getLogger(__name__)

MODEL_ARTIFACT_NAME = "model"
REQUIRED_METRICS = ("rouge-1", "rouge-2", "rouge-l")
# Tags that say when and by whom a version was made, not what it holds: a retry differs only in these.
# (the files' hashes are derived from the files the content hash covers already)
_CIRCUMSTANCE_TAGS = frozenset({"code.commit", "code.dirty", "prefect.flow_run_id", CONTENT_TAG, MANIFEST_TAG})
# Files a run writes into the checkout itself: dvc.lock, `-S` overrides in params.yaml (their hash is
# recorded as params.sha256), DVC's .dvc files and the .gitignore entries it adds for its outputs.
PIPELINE_WRITTEN = ("dvc.lock", "params.yaml", "**/*.dvc", "**/.gitignore")
_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "pandas", "jieba", "rouge-chinese")


# ----------------------------------------------------------------------------- inputs and lineage


def _check_model_dir(path: Path, what: str) -> None:
    if not (path / "config.json").exists():
        raise StageError(f"{what} {path} has no config.json: run the stage that writes it first")


def evaluate_metrics(params: StageParams) -> dict[str, float]:
    """The evaluate stage's aggregate metrics (top-level numbers of metrics/evaluate.json).

    Raises:
        StageError: the file is missing or lacks rouge-1/rouge-2/rouge-l (evaluate did not finish).
    """
    path = params.layout.metrics_file("evaluate")
    if not path.exists():
        raise StageError(f"{path} does not exist: run `sftflow evaluate` before registering")
    raw = read_json(path)
    missing = [k for k in REQUIRED_METRICS if not isinstance(raw.get(k), (int, float))]
    if missing:
        raise StageError(f"{path} lacks the metrics {missing}: re-run `sftflow evaluate`")
    return {k: float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def variant_row_scores(params: StageParams, variant_dirs: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Per-row ROUGE-L by row id of each variant, from the texts quantize generated for it
    (artifacts/quantize/predictions.jsonl), scored as evaluate scores; a variant without a column is left out."""
    path = params.layout.stage_dir("quantize") / "predictions.jsonl"
    if not variant_dirs or not path.exists():
        return {}
    rows = read_jsonl(path)
    return {
        method: {str(r["id"]): float(score_row(r[method], r["reference"], params.data.language)[ROW_METRIC]) for r in rows}
        for method in variant_dirs
        if rows and all(isinstance(r.get(method), str) for r in rows)
    }


def row_scores_from_predictions(params: StageParams) -> dict[str, float]:
    """Per-row ROUGE-L by row id, from artifacts/evaluate/predictions.jsonl.

    Raises:
        StageError: the file is missing, empty, or a row lacks `id` / `rouge-l`.
    """
    path = params.layout.stage_dir("evaluate") / "predictions.jsonl"
    if not path.exists():
        raise StageError(f"{path} does not exist: run `sftflow evaluate` before registering")
    try:
        rows = read_jsonl(path)
    except ValueError as e:
        raise StageError(str(e)) from e
    if not rows:
        raise StageError(f"{path} is empty: re-run `sftflow evaluate`")
    scores = {}
    for n, row in enumerate(rows, 1):
        if "id" not in row or not isinstance(row.get(ROW_METRIC), (int, float)):
            raise StageError(f"{path}:{n}: the row lacks `id` or a numeric `{ROW_METRIC}`; re-run `sftflow evaluate`")
        scores[str(row["id"])] = float(row[ROW_METRIC])
    return scores


def split_hashes(params: StageParams) -> dict[str, str]:
    """sha256 of each split file that exists (`split.test_sha256` is what promotion compares on)."""
    out = {}
    for name in SPLITS:
        path = params.layout.split(name)
        if path.exists():
            out[f"split.{name}_sha256"] = file_sha256(path)
    return out


def _dvc_data_md5(params: StageParams, lock_file: Path) -> str | None:
    """DVC's md5 of the raw data, from the validate stage's deps in dvc.lock."""
    if not lock_file.exists():
        return None
    lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
    deps = ((lock.get("stages") or {}).get("validate") or {}).get("deps") or []
    wanted = Path(params.data.path)
    for dep in deps:
        if Path(dep.get("path", "")) == wanted or Path(dep.get("path", "")).resolve() == wanted.resolve():
            return dep.get("md5") or dep.get("hash")
    return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def code_version() -> dict[str, str]:
    """`code.commit` and `code.dirty` of the working tree ("unknown" outside a git checkout).

    Dirty means a change to tracked source or config (`PIPELINE_WRITTEN` excluded: the run's own
    outputs are not code), so a fresh clone's run records `code.dirty: false`.
    """
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        log.warning("not a git checkout (or no git): code.commit is recorded as unknown")
        return {"code.commit": "unknown", "code.dirty": "unknown"}
    excluded = [f":(exclude,glob){pattern}" for pattern in PIPELINE_WRITTEN]
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *excluded)
    return {"code.commit": commit, "code.dirty": "unknown" if status is None else str(bool(status)).lower()}


def lineage_tags(params: StageParams, flow_run_id: str | None = None, lock_file: Path = Path("dvc.lock")) -> dict[str, str]:
    """The tags that trace a model version to its data, validation, splits, params and code.

    Raises:
        StageError: neither the data file nor a dvc.lock entry for it exists (no data hash), or the
            test split is missing.
    """
    tags: dict[str, str] = {"data.path": str(params.data.path)}
    data_path = Path(params.data.path)
    md5 = _dvc_data_md5(params, lock_file)
    if data_path.is_file():
        tags["data.sha256"] = file_sha256(data_path)
    if md5:
        tags["data.dvc_md5"] = md5
    if "data.sha256" not in tags and not md5:
        raise StageError(
            f"no content hash for the data: {data_path} does not exist and dvc.lock has no validate dep for it; "
            "run `dvc repro` (or `dvc pull`) so the data is there"
        )
    validate_file = params.layout.metrics_file("validate")
    if validate_file.exists():
        success = read_json(validate_file).get("success")
        tags["validate.success"] = "unknown" if success is None else str(bool(success)).lower()
    else:
        log.warning("%s does not exist: validate.success is recorded as unknown", validate_file)
        tags["validate.success"] = "unknown"
    splits = split_hashes(params)
    if "split.test_sha256" not in splits:
        raise StageError(
            f"{params.layout.split('test')} does not exist: run `sftflow split` "
            "(promotion compares versions on the test split it names)"
        )
    tags.update(splits)
    tags.update(code_version())
    tags["params.sha256"] = params.digest()
    tags["model.base"] = params.model.base
    tags["prefect.flow_run_id"] = flow_run_id or "none"
    tags.update(_training_determinism(params))
    tags.update(alignment_tags(params))
    return tags


def alignment_tags(params: StageParams) -> dict[str, str]:
    """What the align stage learnt from and decided (`metrics/align.json`), as lineage tags: the feedback
    snapshots' and preference file's sha256 (the data-change trigger compares them), the pair counts per
    source, which model is final and why."""
    path = params.layout.metrics_file("align")
    if not path.exists():
        return {}
    align = read_json(path)
    tags = {
        "feedback.sha256": str(align.get("feedback_sha256", "?")),
        "align.data.sha256": str(align.get("data_sha256", "?")),
        "align.final": str(align.get("final", "?")),
        "align.pairs": json.dumps({s: int(align.get(f"pairs_{s}", 0)) for s in ("feedback", "file", "self")}, sort_keys=True),
    }
    if align.get("reason"):
        tags["align.reason"] = str(align["reason"])[:500]
    return tags


def _training_determinism(params: StageParams) -> dict[str, str]:
    """Whether the same inputs would train the same weights (`metrics/train.json`), as lineage tags."""
    path = params.layout.metrics_file("train")
    train = read_json(path) if path.exists() else {}
    if "deterministic" not in train:
        return {"train.deterministic": "unknown"}
    tags = {"train.deterministic": str(bool(train["deterministic"])).lower()}
    if train.get("deterministic_reason"):
        tags["train.deterministic_reason"] = str(train["deterministic_reason"])[:500]
    return tags


def quantize_metrics(params: StageParams) -> dict[str, float]:
    """Numeric leaves of metrics/quantize.json as `quantize.<key>` (empty when there is none)."""
    path = params.layout.metrics_file("quantize")
    return flatten_metrics(read_json(path), "quantize") if path.exists() else {}


# ----------------------------------------------------------------------------- logging a model


def _requirements(quantization: str | None = None) -> list[str]:
    """Pinned requirements of the loaded model (listed here so MLflow does not infer them by loading it); a
    GGUF variant adds llama-cpp-python."""
    reqs = []
    for name in (*_REQUIREMENTS, *(("llama-cpp-python",) if quantization in GGUF_METHODS else ())):
        try:
            reqs.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            continue
    return reqs


def generation_settings(params: StageParams, quantization: str | None = None) -> dict[str, Any]:
    """The `sftflow.json` of a logged model: how `predict` generates (exactly as evaluate does, with the
    repetition controls evaluate used or chose on val: `artifacts/evaluate/decoding.json`)."""
    settings = apply_decoding(GenerationSettings.of(params), decoding_file(params.layout))
    return {
        **settings.to_dict(),
        "language": params.data.language,
        "quantization": quantization,
    }


def content_sha256(model_dir: Path, params: StageParams, tags: dict[str, Any], quantization: str | None = None) -> str:
    """Hash of what a version registered from `model_dir` with `tags` would hold.

    Covers the folder's files, the generation settings, the pyfunc code and pinned requirements that
    are logged with it, and its tags except those that only record circumstances (code commit, flow
    run id) or point at variants (a main version is relinked to its variants, see `run`).
    """
    from tasks.core import pyfunc_model  # deferred: importing MLflow's model code registers it (set_model)

    described = {
        k: str(v) for k, v in sorted(tags.items()) if k not in _CIRCUMSTANCE_TAGS and not k.startswith(VARIANT_TAG_PREFIXES)
    }
    content = {
        "model": dir_sha256(model_dir),
        "settings": generation_settings(params, quantization),
        "code": file_sha256(Path(pyfunc_model.__file__)),
        "requirements": _requirements(quantization),
        "tags": described,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def log_and_register(
    model_dir: Path,
    params: StageParams,
    *,
    tags: dict[str, Any],
    registered_name: str | None = None,
    quantization: str | None = None,
) -> Any:
    """Log a Hugging Face model folder as an MLflow pyfunc model and register it, unless it already is.

    The model is logged "from code" (tasks/core/pyfunc_model.py): its artifacts are the folder as it is
    (safetensors + tokenizer) and `sftflow.json`; nothing is pickled. Logged in the active run if
    there is one, else in a new run of the `register.experiment` experiment. When a READY version of
    the registered model already holds the same content (`content_sha256`) and carries its file
    hashes, that version is returned and nothing is logged: a retried or resumed register does not
    make copies.

    The new version is tagged `sftflow.files_sha256`: the sha256 of every file of the logged model
    (weights, tokenizer, config, `sftflow.json`, `MLmodel`, environment and code files), which
    `tasks.core.loading.load_registered` checks before it loads anything (a version without it,
    registered before this tag existed, is not reused).

    Args:
        model_dir: the model folder (the final model `artifacts/align/model` or a quantized variant folder).
        params: parameters (generation settings, experiment and model name).
        tags: tags of the new version (lineage).
        registered_name: registered model name; default `register.model_name`.
        quantization: the quantization method of a variant folder (loaded with tasks.quantize).

    Returns:
        The `mlflow.entities.model_registry.ModelVersion`, new or reused.

    Raises:
        StageError: the folder is not a model folder, or the stored files do not match it.
    """
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from tasks.core import pyfunc_model  # deferred: importing MLflow's model code registers it (set_model)

    model_dir = Path(model_dir)
    if not model_dir.is_dir() or not any(model_dir.iterdir()):
        raise StageError(f"model folder {model_dir} does not exist or is empty")
    _check_model_dir(model_dir, "model folder")
    weights = "*.gguf" if quantization in GGUF_METHODS else "*.safetensors"
    if not list(model_dir.glob(weights)):
        raise StageError(f"{model_dir} holds no {weights[1:]} weights: save it with tasks.core.modeling.save_model "
                         "(a GGUF variant: re-run `sftflow quantize`)")
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")) or list(model_dir.glob("*.pkl")):
        raise StageError(f"{model_dir} holds pickled weights (.bin/.pt/.pkl): only safetensors are registered")
    name = registered_name or model_name_of(params.register.model_name, quantization)
    started = mlflow.active_run() is None
    if started:
        setup_mlflow(params.register.experiment)
    content = content_sha256(model_dir, params, tags, quantization)
    existing = find_version_with_content(name, content)
    if existing is not None and not existing.tags.get(MANIFEST_TAG):
        log.info("%s version %s holds this content but no %s: registering a version with file hashes",
                 name, existing.version, MANIFEST_TAG)
    elif existing is not None:
        log.info("%s version %s already holds %s (content %s): reusing it", name, existing.version, model_dir, content[:12])
        return existing
    tags = {**tags, CONTENT_TAG: content}
    signature = ModelSignature(inputs=Schema([ColSpec("string", "text")]), outputs=Schema([ColSpec("string")]))
    if started:
        mlflow.start_run(run_name="register")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            settings_file = Path(tmp) / pyfunc_model.SETTINGS_FILE
            write_json(settings_file, generation_settings(params, quantization))
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT_NAME if quantization is None else f"{MODEL_ARTIFACT_NAME}-{quantization}",
                python_model=str(Path(pyfunc_model.__file__).resolve()),
                artifacts={pyfunc_model.MODEL_ARTIFACT: str(model_dir), pyfunc_model.SETTINGS_ARTIFACT: str(settings_file)},
                signature=signature,
                pip_requirements=_requirements(quantization),
            )
            # Hashes of what is stored now, kept in the registry (not the artifact store) for the loader.
            stored_at = mlflow.MlflowClient().get_logged_model(info.model_id).artifact_location
            files = logged_model_manifest(
                stored_at, {pyfunc_model.MODEL_ARTIFACT: model_dir, pyfunc_model.SETTINGS_ARTIFACT: settings_file}
            )
        tags[MANIFEST_TAG] = encode_manifest(files)
        version = mlflow.register_model(info.model_uri, name, tags={k: str(v) for k, v in tags.items()})
    finally:
        if started:
            mlflow.end_run()
    log.info("registered %s version %s from %s", name, version.version, model_dir)
    return version


# ----------------------------------------------------------------------------- the stage


@stage_entry("register")
def run(params: StageParams, *, flow_run_id: str | None = None) -> dict[str, Any]:
    """Register the final model (`artifacts/align/model`) and its quantized variants with lineage tags.

    Args:
        params: the run's parameters.
        flow_run_id: the Prefect flow run that produced the model (a tag; "none" when run by hand).

    Returns:
        `version` (the version of `register.model_name` holding this model, new or reused),
        `model_name`, `run_id`, `reused` (an earlier run registered that version), `variants`
        ({method: models:/ URI}), and the lineage tags.

    Raises:
        StageError: an upstream output is missing or incomplete (nothing is registered then).
    """
    import mlflow

    # Read and check everything first: a failed upstream run must not leave a version behind.
    model_dir = params.layout.final_model
    _check_model_dir(model_dir, "the fine-tuned model")
    model_sha = dir_sha256(model_dir)
    metrics = evaluate_metrics(params)
    row_scores = row_scores_from_predictions(params)
    tags = lineage_tags(params, flow_run_id)
    quant = quantize_metrics(params)
    variant_dirs = _variant_dirs(params, model_sha)
    _check_made_from(params, model_sha, tags["split.test_sha256"], bool(variant_dirs))
    settings = generation_settings(params)
    tags[SETTINGS_TAG] = json.dumps(_settings_key(settings), ensure_ascii=False, sort_keys=True)
    tags[SETTINGS_SHA_TAG] = settings_sha256(_settings_key(settings))
    # Metrics live on the run (below); the version's tags hold lineage, and these hashes of what it scored.
    tags["evaluate.metrics_sha256"] = hashlib.sha256(json.dumps({**metrics, **quant}, sort_keys=True).encode()).hexdigest()
    tags["evaluate.row_scores_sha256"] = hashlib.sha256(json.dumps(row_scores, sort_keys=True).encode()).hexdigest()
    scores_key = row_scores_key(tags["split.test_sha256"], tags[SETTINGS_SHA_TAG], SCORING_VERSION)

    started = mlflow.active_run() is None
    if started:
        setup_mlflow(params.register.experiment)
        mlflow.start_run(run_name="register")
    try:
        run_id = mlflow.active_run().info.run_id
        mlflow.log_metrics({f"evaluate.{k}": v for k, v in metrics.items()} | quant)
        save_row_scores(run_id, scores_key, row_scores)
        # Each variant's rows as quantize scored them (same rows, settings, dtype and device class): promote
        # compares a version as it is served, and reads these instead of generating them again.
        for method, scores in variant_row_scores(params, variant_dirs).items():
            save_row_scores(run_id, variant_scores_key(scores_key, method, variant_placement(read_marker(variant_dirs[method]))[1]), scores)
        # Variants first: the main version (what promote looks at) appears only once they exist.
        variants = {}
        for method, folder in variant_dirs.items():
            v = log_and_register(folder, params, tags=tags | {VARIANT_OF_TAG: model_name_of(params.register.model_name)},
                                 quantization=method)
            variants[method] = f"models:/{v.name}/{v.version}"
        # quantize's decision on each variant (served or not, and why): resolve_variant reads it.
        decisions = variant_decision_tags(read_json(params.layout.metrics_file("quantize")), variants) if variants else {}
        version = log_and_register(
            model_dir, params, tags=tags | {variant_uri_tag(m): uri for m, uri in variants.items()} | decisions
        )
        _link_variants(version, variants, decisions)
    finally:
        if started:
            mlflow.end_run()
    result = {
        "version": int(version.version),
        "model_name": version.name,
        "run_id": run_id,
        "reused": version.run_id != run_id,
        "variants": variants,
        "tags": tags,
    }
    log.info("%s %s version %s (%d variants)", "reused" if result["reused"] else "registered", version.name,
             version.version, len(variants))
    return result


def _check_made_from(params: StageParams, model_sha256: str, test_sha256: str, has_variants: bool) -> None:
    """Refuse metrics computed for other weights or another test split than what is registered.

    Raises:
        StageError: metrics/evaluate.json (or metrics/quantize.json) names another model hash or test split.
    """
    evaluate_file = params.layout.metrics_file("evaluate")
    evaluated = read_json(evaluate_file)
    if evaluated.get("test_sha256") and evaluated["test_sha256"] != test_sha256:
        raise StageError(
            f"{evaluate_file} was computed on another test split "
            f"({evaluated['test_sha256'][:12]}, now {test_sha256[:12]}): re-run `sftflow evaluate`"
        )
    checks = [(evaluate_file, evaluated.get("model_sha256"), "evaluate")]
    quantize_file = params.layout.metrics_file("quantize")
    if has_variants:
        checks.append((quantize_file, read_json(quantize_file).get("model_sha256"), "quantize"))
    for path, measured, stage in checks:
        if measured != model_sha256:
            raise StageError(
                f"{path} was computed for other weights ({str(measured)[:12]}) than {params.layout.final_model} "
                f"({model_sha256[:12]}): re-run `sftflow {stage}` (and what follows) before registering; nothing was registered"
            )


def _settings_key(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that change a version's generations and scores (not batch size or quantization)."""
    return {k: v for k, v in settings.items() if k not in {"batch_size", "quantization"}}


def _link_variants(version: Any, variants: dict[str, str], decisions: dict[str, str] | None = None) -> None:
    """Point a (possibly reused) main version's `sftflow.variant.<method>` tags at these variants, and set
    quantize's serving decision on them (`variant_decision_tags`)."""
    for method, uri in variants.items():
        if version.tags.get(variant_uri_tag(method)) != uri:
            client().set_model_version_tag(version.name, version.version, variant_uri_tag(method), uri)
            log.info("%s version %s: %s now points at %s", version.name, version.version, variant_uri_tag(method), uri)
    for tag, value in (decisions or {}).items():
        if version.tags.get(tag) != value:
            client().set_model_version_tag(version.name, version.version, tag, value)
            log.info("%s version %s: %s = %s", version.name, version.version, tag, value)


def _variant_dirs(params: StageParams, model_sha256: str) -> dict[str, Path]:
    """The quantized variants of `quantize.methods` the quantize stage wrote (folders with its marker)
    from these weights (`model_sha256`): a variant of other weights is refused."""
    found = {}
    metrics_file = params.layout.metrics_file("quantize")
    measured = read_json(metrics_file) if metrics_file.exists() else {}
    for method in params.quantize.methods:
        folder = params.layout.variant_dir(method)
        if not (folder / MARKER_FILE).exists():
            log.info("no quantized variant %s in %s: not registering one", method, folder)
            continue
        marker = read_marker(folder)
        if marker["method"] != method:
            raise StageError(f"{folder / MARKER_FILE} says {marker['method']!r}, not {method!r}: re-run `sftflow quantize`")
        if marker.get("source_sha256") != model_sha256:
            raise StageError(
                f"{folder} was quantized from other weights ({str(marker.get('source_sha256'))[:12]}) than "
                f"{params.layout.final_model} ({model_sha256[:12]}): re-run `sftflow quantize`; nothing was registered"
            )
        _check_model_dir(folder, f"the {method} variant")
        if method in GGUF_METHODS and measured.get(f"{method}.passed") is not True:
            # A GGUF file that failed the gate (quality or conversion check) is not registered: nobody exports it.
            log.info("the %s variant did not pass quantize's gate (%s): not registering it", method,
                     measured.get(f"{method}.reason") or "no measurement")
            continue
        found[method] = folder
    if found and not params.layout.metrics_file("quantize").exists():
        raise StageError(
            f"{params.layout.metrics_file('quantize')} does not exist but variants do: re-run `sftflow quantize` "
            "(promotion gates each variant on its measured ROUGE-L drop)"
        )
    return found


# ----------------------------------------------------------------------------- lineage


@stage_entry("register")
def lineage(params: StageParams, version: str | int) -> str:
    """The chain of a model version: data → validation → splits → params → code → metrics → aliases.

    Args:
        params: parameters (model name, store).
        version: a version number or an alias (`champion`, `challenger`).

    Returns:
        A multi-line report.

    Raises:
        StageError: the version or alias does not exist.
    """
    setup_mlflow(params.register.experiment)
    return version_lineage(client(), params.register.model_name, version).text()


# ----------------------------------------------------------------------------- Ollama export


@stage_entry("register")
def export_ollama(params: StageParams, version: str | int, out_dir: Path, variant: str | None = None) -> dict[str, Any]:
    """Write a registered version's GGUF variant and an Ollama `Modelfile` for it into `out_dir`.

    The variant's files are downloaded and checked against the hashes recorded at registration (as
    `tasks.core.loading.load_registered` checks them) before anything is written; the Modelfile renders
    the prompt the variant was scored on and stops where it stopped (`tasks.core.gguf.ollama_modelfile`).

    Args:
        params: parameters (`register.model_name`, the store).
        version: a version number or an alias (`champion`).
        out_dir: where `model.gguf` and `Modelfile` go (created).
        variant: `gguf-f16`, `gguf-q8_0` or `gguf-q4_k_m`; default: of the version's registered GGUF
            variants (all passed quantize's gate), the one with the lowest latency ratio in its run.

    Returns:
        `version`, `variant`, `uri`, `gguf`, `modelfile` and the `ollama create` command.

    Raises:
        StageError: the version has no registered GGUF variant (or not the one asked for), or its stored
            files differ from those registered.
    """
    import mlflow
    from transformers import AutoConfig, GenerationConfig

    from tasks.core import pyfunc_model  # deferred: importing MLflow's model code registers it (set_model)
    from tasks.core.gguf import ollama_modelfile, runtime_adds_bos
    from tasks.core.modeling import load_tokenizer

    setup_mlflow(params.register.experiment)
    c = client()
    name = params.register.model_name
    mv = resolve_version(c, name, version)
    registered = {m: uri for m, uri in variant_uris(mv.tags).items() if m in GGUF_METHODS}
    if not registered:
        raise StageError(f"{name} version {mv.version} has no registered GGUF variant: add gguf-q8_0 or gguf-q4_k_m to "
                         "quantize.methods (the gguf extra installed), then run quantize and register")
    if variant is None:
        ratios = c.get_run(mv.run_id).data.metrics if mv.run_id else {}
        variant = min(registered, key=lambda m: (ratios.get(f"quantize.{m}.latency_ratio_high", float("inf")), m))
    elif variant not in registered:
        raise StageError(f"{name} version {mv.version} has no registered {variant} variant; it has {sorted(registered)}")
    uri = registered[variant]
    vname, vversion = uri[len("models:/"):].rsplit("/", 1)
    vmv = c.get_model_version(vname, vversion)
    what = f"{vname} version {vversion}"
    raw = (vmv.tags or {}).get(MANIFEST_TAG)
    if not raw:
        raise StageError(f"refusing to export {what}: it has no {MANIFEST_TAG} tag, so its files cannot be checked; register it again")
    expected = decode_manifest(raw, what)
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="sftflow-export-") as tmp:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=c.get_model_version_download_uri(vname, vversion), dst_path=tmp))
        meta = root / "registered_model_meta"  # MLflow's own note of name and version, written on download
        if meta.is_file() and "registered_model_meta" not in expected:
            meta.unlink()
        problems = manifest_mismatches(root, expected)
        if problems:
            raise StageError(f"refusing to export {what}: its stored files differ from those registered: {'; '.join(problems[:5])}")
        model_dir = next(p.parent for p in root.rglob(GGUF_FILE))
        settings_file = next(root.rglob(pyfunc_model.SETTINGS_FILE))
        settings = json.loads(settings_file.read_text(encoding="utf-8"))
        tokenizer = load_tokenizer(str(model_dir), trust_remote_code=False)
        generation_config = (GenerationConfig.from_pretrained(model_dir) if (model_dir / "generation_config.json").is_file()
                             else GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir)))
        header = (f"Written by `sftflow export --ollama {version}`: {name} version {mv.version}, its {variant} variant ({uri}).\n"
                  "Greedy, with the prompt and stop tokens the variant was scored with by `sftflow quantize`.")
        text = ollama_modelfile(tokenizer, generation_config, settings, GGUF_FILE, header, runtime_adds_bos(model_dir / GGUF_FILE))
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_dir / GGUF_FILE, out_dir / GGUF_FILE)
    (out_dir / "Modelfile").write_text(text, encoding="utf-8")
    result = {"version": str(mv.version), "variant": variant, "uri": uri, "gguf": str(out_dir / GGUF_FILE),
              "modelfile": str(out_dir / "Modelfile"), "ollama": f"ollama create {name}-{variant} -f {out_dir / 'Modelfile'}"}
    log.info("exported %s version %s (%s) for Ollama to %s", name, mv.version, variant, out_dir)
    return result
