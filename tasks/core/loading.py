"""Load a registered model version with sftflow's own code, after checking every file against the
hashes recorded when it was registered. Serving and promotion load models only through here.

`mlflow.pyfunc.load_model` runs the Python file it downloads from the artifact store (the model is
logged "from code"), so whoever can write to that store (MinIO, a shared folder) could run code in
the app and in the promote task. This loader runs none of it:

- `tasks.register.log_and_register` records the sha256 of every file of the logged model (weights,
  tokenizer, config, `sftflow.json`, `MLmodel`, the environment files and the pyfunc code file) as
  the version tag `sftflow.files_sha256`, a JSON object `{path: sha256}`. A tag lives in the tracking
  database, behind the tracking server's permissions, not in the artifact store.
- `load_registered` downloads the version's artifacts, refuses to go on when any file differs from,
  is missing from, or is not in that list, and then reads the Hugging Face folder and the settings
  with the installed package (`tasks.core.modeling`, `tasks.core.variants`), with
  `trust_remote_code` off and no pickled weights; the downloaded `pyfunc_model.py` is never imported.

`mlflow.pyfunc.load_model("models:/...")` keeps working for anyone who chooses to trust the store.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

# access_hint and CREDENTIAL_VARIABLES live in tasks.core.access; imported here for existing callers.
from tasks.core.access import CREDENTIAL_VARIABLES, access_hint  # noqa: F401
from tasks.core.errors import StageError
from tasks.core.generation import GenerationSettings, generate
from tasks.core.io import file_sha256

log = logging.getLogger(__name__)

MANIFEST_TAG = "sftflow.files_sha256"
MLMODEL_FILE = "MLmodel"
# MLflow writes this (the registered name and version) into a model folder it downloads through
# models:/, into the store itself when the store is a local folder; accepted only with those values.
REGISTRY_META_FILE = "registered_model_meta"
# Weights that unpickle on load (torch.load): never read from a registered model.
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Files whose `auto_map` would make transformers import Python from the model folder.
REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json", "processor_config.json")
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w.-]+))$")


@dataclass(frozen=True)
class LoadedModel:
    """A registered version loaded by sftflow's code: what `predict` of its pyfunc would use.

    Attributes:
        name: registered model name.
        version: version number.
        model: the causal LM (eval mode; the full model in float32 on the CPU, or on the GPU when asked; a
            variant in the dtype and on the device class quantize scored it in: `tasks.core.variants.load_quantized`).
        tokenizer: its tokenizer (pad token set, left padding).
        settings: the version's `sftflow.json` (generation settings, language, quantization).
        files: the verified manifest, path -> sha256.
    """

    name: str
    version: str
    model: Any
    tokenizer: Any
    settings: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def generation(self) -> GenerationSettings:
        """The generation settings the version was evaluated with."""
        return GenerationSettings.from_dict(self.settings)

    def predict(self, texts: list[str]) -> list[str]:
        """One greedy summary per text, exactly as the version's pyfunc `predict` gives it."""
        return generate(self.model, self.tokenizer, list(texts), self.generation)


# ----------------------------------------------------------------------------- manifests


def file_manifest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, keyed by its POSIX path relative to `root`, sorted."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def encode_manifest(files: dict[str, str]) -> str:
    """The tag value of a manifest: compact JSON, keys sorted."""
    return json.dumps(dict(sorted(files.items())), separators=(",", ":"))


def decode_manifest(value: str, what: str) -> dict[str, str]:
    """The `{path: sha256}` of a `sftflow.files_sha256` tag; StageError when it is malformed."""
    try:
        files = json.loads(value)
    except json.JSONDecodeError as e:
        raise StageError(f"{what}: tag {MANIFEST_TAG} is not valid JSON ({e.msg}); re-register the model") from e
    if not isinstance(files, dict) or not files or not all(
        isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for k, v in files.items()
    ):
        raise StageError(f"{what}: tag {MANIFEST_TAG} is not a {{path: sha256}} object; re-register the model")
    return files


def manifest_mismatches(root: Path, expected: dict[str, str]) -> list[str]:
    """Every way the files under `root` differ from `expected` (changed, missing, unexpected); [] if none."""
    found = file_manifest(root)
    problems = []
    for path in sorted(expected.keys() | found.keys()):
        want, got = expected.get(path), found.get(path)
        if want is None:
            problems.append(f"{path}: not in the registered file list (added after registration)")
        elif got is None:
            problems.append(f"{path}: missing")
        elif want != got:
            problems.append(f"{path}: sha256 {got[:12]}... but {want[:12]}... was registered")
    return problems


def logged_model_manifest(artifact_uri: str, local_sources: dict[str, Path]) -> dict[str, str]:
    """The manifest of a model just logged at `artifact_uri`, for `tasks.register.log_and_register`.

    Files under a path of `local_sources` (the pyfunc artifacts: `hf_model` folder, `sftflow.json`)
    are hashed from the local copy that was uploaded, after checking that the stored file exists with
    the same size; the rest (MLmodel, environment files, code), small and written by MLflow, are
    downloaded and hashed.

    Args:
        artifact_uri: the logged model's artifact location (`get_model_version_download_uri` form).
        local_sources: pyfunc artifact name (`hf_model`, `settings`) -> the local file or folder logged.

    Returns:
        path -> sha256 of every stored file.

    Raises:
        StageError: a stored file has no local counterpart or another size (the upload went wrong).
    """
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(artifact_uri)
    listed: dict[str, int | None] = {}

    def walk(path: str | None) -> None:
        for info in repo.list_artifacts(path):
            if info.is_dir:
                walk(info.path)
            else:
                listed[info.path] = info.file_size

    walk(None)
    if MLMODEL_FILE not in listed:
        raise StageError(f"{artifact_uri} has no {MLMODEL_FILE}: the model was not logged completely; register again")
    files: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        mlmodel = Path(repo.download_artifacts(MLMODEL_FILE, tmp))
        stored_paths = _artifact_paths(mlmodel, artifact_uri)
        mapped = {stored_paths[name]: Path(source) for name, source in local_sources.items()}
        for path, size in sorted(listed.items()):
            local = _local_counterpart(path, mapped)
            if local is None:
                files[path] = file_sha256(Path(repo.download_artifacts(path, tmp)))
                continue
            if not local.is_file() or (size is not None and local.stat().st_size != size):
                raise StageError(f"{artifact_uri}/{path} does not match the uploaded {local}: register again")
            files[path] = file_sha256(local)
    return files


def _local_counterpart(path: str, mapped: dict[str, Path]) -> Path | None:
    for stored, local in mapped.items():
        if path == stored:
            return local
        if path.startswith(stored + "/"):
            return local / path[len(stored) + 1:]
    return None


def _artifact_paths(mlmodel_file: Path, what: str) -> dict[str, str]:
    """The pyfunc artifacts' paths inside the model folder, from its (verified) MLmodel."""
    import yaml

    try:
        spec = yaml.safe_load(mlmodel_file.read_text(encoding="utf-8")) or {}
        artifacts = spec["flavors"]["python_function"]["artifacts"]
        paths = {str(name): str(entry["path"]) for name, entry in artifacts.items()}
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise StageError(f"{what}: {MLMODEL_FILE} names no python_function artifacts ({e!r}); re-register the model") from e
    for name, path in paths.items():
        pure = PurePosixPath(path)
        if pure.is_absolute() or ".." in pure.parts:
            raise StageError(f"{what}: {MLMODEL_FILE} puts artifact {name!r} outside the model folder ({path})")
    return paths


# ----------------------------------------------------------------------------- loading


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, version, alias) of `models:/<name>/<version>` or `models:/<name>@<alias>`.

    Raises:
        StageError: any other form (stages, `latest`, runs:/ URIs are not loaded here).
    """
    match = _MODELS_URI.match(uri.strip())
    if match is None:
        raise StageError(f"{uri!r} is not models:/<name>/<version> or models:/<name>@<alias>")
    return match["name"], match["version"], match["alias"]


def load_registered(uri: str, *, client: Any = None, device: str | None = None) -> LoadedModel:
    """Download a registered version, verify every file against its registration hashes and load it.

    Args:
        uri: `models:/<name>/<version>` or `models:/<name>@<alias>`.
        client: an `MlflowClient`; default: one on the current tracking URI.
        device: where a full-precision version generates: `cuda` loads it in float32 on the GPU as the
            evaluate stage scores it (placed by `tasks.core.modeling.inference_placement`, refused with the
            figures before loading when it does not fit); default and `cpu`: the CPU. A quantized variant
            always loads in the dtype and on the device class its marker records (where quantize scored it).

    Returns:
        The loaded model, tokenizer and settings.

    Raises:
        StageError: the version cannot be read, has no recorded hashes, any file differs from them,
            or the folder asks for remote code or holds pickled weights. Nothing is loaded then.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    client = client or mlflow.MlflowClient()
    name, version, alias = parse_models_uri(uri)
    try:
        mv = client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        raise StageError(f"cannot read {uri} from the registry: {e}.{access_hint(e)}") from e
    what = f"{name} version {mv.version}"
    raw = (mv.tags or {}).get(MANIFEST_TAG)
    if not raw:
        raise StageError(
            f"refusing to load {what}: it has no {MANIFEST_TAG} tag, so its files cannot be checked "
            "(registered before file hashes were recorded, or not by `sftflow register`). Register the model "
            "again with `sftflow register`; mlflow.pyfunc.load_model still loads it if you trust the artifact store"
        )
    expected = decode_manifest(raw, what)
    with tempfile.TemporaryDirectory(prefix="sftflow-load-") as tmp:
        try:
            download_uri = client.get_model_version_download_uri(name, mv.version)
            root = Path(mlflow.artifacts.download_artifacts(artifact_uri=download_uri, dst_path=tmp))
        except (MlflowException, OSError) as e:
            raise StageError(f"cannot download {what} from the artifact store: {e}.{access_hint(e)}") from e
        problems = _registry_meta_problems(root, expected, name, str(mv.version))
        problems += manifest_mismatches(root, expected)
        if problems:
            raise StageError(
                f"refusing to load {what}: its files in the artifact store ({download_uri}) differ from those "
                f"registered ({MANIFEST_TAG}): {'; '.join(problems[:10])}"
                f"{f' (and {len(problems) - 10} more)' if len(problems) > 10 else ''}. Someone or something changed "
                "the stored model after registration: do not serve it; register the model again from its source"
            )
        model, tokenizer, settings = _load_verified(root, what, device)
    log.info("loaded %s (%d files verified, quantization: %s)", what, len(expected), settings.get("quantization"))
    return LoadedModel(name=name, version=str(mv.version), model=model, tokenizer=tokenizer, settings=settings,
                       files=expected)


def _registry_meta_problems(root: Path, expected: dict[str, str], name: str, version: str) -> list[str]:
    """Check and drop MLflow's `registered_model_meta` when it is not in the manifest (see REGISTRY_META_FILE)."""
    import yaml

    meta = root / REGISTRY_META_FILE
    if REGISTRY_META_FILE in expected or not meta.is_file():
        return []
    try:
        content = yaml.safe_load(meta.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        content = None
    named = {str(k): str(v) for k, v in content.items()} if isinstance(content, dict) else None  # version: int or str
    if named != {"model_name": name, "model_version": version}:
        return [f"{REGISTRY_META_FILE}: does not name {name} version {version}"]
    meta.unlink()
    return []


def _load_verified(root: Path, what: str, device: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """Read the settings and load the Hugging Face folder of a verified download, with no remote code."""
    from tasks.core import pyfunc_model  # deferred: its import registers the pyfunc (mlflow.models.set_model)
    from tasks.core.modeling import load_for_inference, load_model_and_tokenizer
    from tasks.core.variants import MARKER_FILE, load_quantized

    paths = _artifact_paths(root / MLMODEL_FILE, what)
    missing = [a for a in (pyfunc_model.MODEL_ARTIFACT, pyfunc_model.SETTINGS_ARTIFACT) if a not in paths]
    if missing:
        raise StageError(f"{what}: {MLMODEL_FILE} lacks the artifacts {missing}; re-register the model")
    settings_file = root / paths[pyfunc_model.SETTINGS_ARTIFACT]
    model_dir = root / paths[pyfunc_model.MODEL_ARTIFACT]
    try:
        settings = json.loads(settings_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise StageError(f"{what}: cannot read {pyfunc_model.SETTINGS_FILE} ({e}); re-register the model") from e
    lacking = [k for k in pyfunc_model.SETTINGS_KEYS if k not in settings]
    if lacking:
        raise StageError(f"{what}: {pyfunc_model.SETTINGS_FILE} lacks {lacking}; re-register the model")
    pickled = sorted(p.name for p in model_dir.rglob("*") if p.suffix in PICKLED_SUFFIXES)
    if pickled:
        raise StageError(f"refusing to load {what}: pickled files {pickled[:5]} in its model folder (only safetensors load)")
    for name in REMOTE_CODE_FILES:
        config = model_dir / name
        if config.is_file() and "auto_map" in json.loads(config.read_text(encoding="utf-8")):
            raise StageError(f"refusing to load {what}: its {name} maps classes to code in the model folder (auto_map); "
                             "remote code never runs here")
    if (model_dir / MARKER_FILE).exists():
        model, tokenizer = load_quantized(model_dir)
    elif device in (None, "cpu"):
        model, tokenizer = load_model_and_tokenizer(model_dir, trust_remote_code=False)
    else:  # float32 on the GPU, as evaluate scored it: placed, and checked to fit, before any weight is read
        model, tokenizer = load_for_inference(model_dir, "float32", device)
    model.eval()
    return model, tokenizer, settings
