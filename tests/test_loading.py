"""tasks.core.loading: a registered version loads only when every stored file matches the hashes
recorded at registration, and no code from the artifact store runs. The app and promote go through it,
so a version whose weights were changed in the store is refused by both and never served."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import ROOT, sample_rows
from registry_helpers import sqlite_store, write_test_split

from tasks.core.errors import StageError

MODEL = "loading-tamper"
TEXTS = [r["text"][:120] for r in sample_rows(3)]


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    """Four versions of one tiny model (each tagged differently, so none is reused); champion = 1."""
    from mlflow import MlflowClient

    from tasks.core.config import load_params
    from tasks.core.tracking import setup_mlflow
    from tasks.register import log_and_register

    tmp = tmp_path_factory.mktemp("loading")
    with sqlite_store(tmp_path_factory), pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        params = load_params(ROOT / "params.yaml", [
            f"register.model_name={MODEL}", f"paths.artifacts={tmp / 'artifacts'}", f"paths.metrics={tmp / 'metrics'}",
            f"paths.plots={tmp / 'plots'}", "evaluate.max_new_tokens=6",
        ])
        setup_mlflow(params.register.experiment)
        versions = [str(log_and_register(tiny_model_dir, params, tags={"case": str(n)}).version) for n in range(4)]
        client = MlflowClient()
        client.set_registered_model_alias(MODEL, "champion", versions[0])
        test_path = write_test_split(params, [{"id": str(i), "text": t, "summary": "题目"} for i, t in enumerate(TEXTS)])
        yield {"params": params, "client": client, "versions": versions, "test_path": test_path, "tmp": tmp}


def _stored(client, version: str) -> Path:
    """The version's folder in the (local) artifact store: what an intruder with store access edits."""
    uri = client.get_model_version_download_uri(MODEL, version)
    assert uri.startswith("file://"), uri
    return Path(urlparse(uri).path)


def _hf_dir(root: Path) -> Path:
    """The Hugging Face folder inside a stored model (named after the folder that was logged)."""
    return next(root.glob("artifacts/*/model.safetensors")).parent


def test_manifest_covers_every_stored_file(registry):
    from tasks.core.loading import MANIFEST_TAG, file_manifest

    client, version = registry["client"], registry["versions"][0]
    recorded = json.loads(client.get_model_version(MODEL, version).tags[MANIFEST_TAG])
    stored = file_manifest(_stored(client, version))
    stored.pop("registered_model_meta", None)  # MLflow adds it to a local store when a version is downloaded
    assert recorded == stored
    names = {Path(p).name for p in recorded}
    assert {"MLmodel", "model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
            "sftflow.json", "pyfunc_model.py", "requirements.txt"} <= names


def test_verified_load_generates_exactly_what_the_pyfunc_predicts(registry):
    import mlflow
    import pandas as pd

    from tasks.core.loading import load_registered

    loaded = load_registered(f"models:/{MODEL}@champion")
    assert loaded.version == registry["versions"][0]
    expected = list(mlflow.pyfunc.load_model(f"models:/{MODEL}/{loaded.version}").predict(pd.DataFrame({"text": TEXTS})))
    assert loaded.predict(TEXTS) == expected


def test_tampered_weights_are_refused_by_the_app_and_by_promote(registry, monkeypatch):
    """The acceptance case: weights changed in the store after registration, then made champion."""
    import mlflow

    from tasks import promote
    from tasks.serve import ChampionServer

    params, client = registry["params"], registry["client"]
    good, tampered = registry["versions"][0], registry["versions"][1]
    server = ChampionServer(params, client=client)
    server.refresh()
    assert server.current.version == good

    weights = _hf_dir(_stored(client, tampered)) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-16:] = bytes(16)  # same size, other numbers: what a silent swap of weights looks like
    weights.write_bytes(bytes(data))

    def never(*args, **kwargs):
        raise AssertionError("mlflow.pyfunc.load_model ran: code from the artifact store would execute")

    monkeypatch.setattr(mlflow.pyfunc, "load_model", never)
    client.set_registered_model_alias(MODEL, "champion", tampered)
    try:
        refused = f"refusing to load {MODEL} version {tampered}: .*model.safetensors: sha256 .* registered"
        with pytest.raises(StageError, match=refused):
            server.refresh()
        assert server.current.version == good  # the app keeps serving what it verified
        with pytest.raises(StageError, match=refused):
            ChampionServer(params, client=client).start()  # a fresh app does not start on it
        with pytest.raises(StageError, match=refused):
            promote.rescore(params, MODEL, tampered, registry["test_path"])
    finally:
        client.set_registered_model_alias(MODEL, "champion", good)


def test_added_file_and_missing_hashes_are_refused(registry):
    from tasks.core.loading import MANIFEST_TAG, load_registered

    client = registry["client"]
    added, unhashed = registry["versions"][2], registry["versions"][3]
    (_hf_dir(_stored(client, added)) / "modeling_evil.py").write_text("import os\n")
    with pytest.raises(StageError, match="modeling_evil.py: not in the registered file list"):
        load_registered(f"models:/{MODEL}/{added}")
    client.delete_model_version_tag(MODEL, unhashed, MANIFEST_TAG)
    with pytest.raises(StageError, match=f"no {MANIFEST_TAG} tag.*sftflow register"):
        load_registered(f"models:/{MODEL}/{unhashed}")


def test_a_verified_folder_asking_for_remote_code_or_pickles_is_refused(registry, tmp_path):
    import mlflow

    from tasks.core.loading import _load_verified

    client, version = registry["client"], registry["versions"][0]
    src = Path(mlflow.artifacts.download_artifacts(artifact_uri=client.get_model_version_download_uri(MODEL, version),
                                                   dst_path=str(tmp_path)))
    model_dir = _hf_dir(src)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "m.Model"}}))
    with pytest.raises(StageError, match="auto_map.*remote code never runs"):
        _load_verified(src, "v")
    (model_dir / "config.json").write_text(json.dumps(config))
    shutil.copy(model_dir / "model.safetensors", model_dir / "pytorch_model.bin")
    with pytest.raises(StageError, match=r"pickled files \['pytorch_model.bin'\]"):
        _load_verified(src, "v")


def test_models_uri_forms():
    from tasks.core.loading import parse_models_uri

    assert parse_models_uri("models:/a-b/12") == ("a-b", "12", None)
    assert parse_models_uri("models:/a@champion") == ("a", None, "champion")
    for bad in ("runs:/x/model", "models:/a/latest", "models:/a", "/tmp/model"):
        with pytest.raises(StageError, match="is not models:/"):
            parse_models_uri(bad)
