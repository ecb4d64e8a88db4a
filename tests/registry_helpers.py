"""Builders for the register/promote tests: the upstream files those stages read, written by hand."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

from tasks.core.io import dir_sha256, file_sha256, write_json, write_jsonl

_STORE_ROOT: list[Path] = []  # one sqlite store per test session: creating its tables takes seconds


@contextmanager
def sqlite_store(tmp_path_factory):
    """Point MLflow (via MLFLOW_TRACKING_URI) at the session's sqlite store in a tmp dir, for a module's tests.

    Modules share the store but not model names, so their versions and aliases never meet.
    """
    import mlflow

    if not _STORE_ROOT:
        _STORE_ROOT.append(tmp_path_factory.mktemp("mlflow"))
    root = _STORE_ROOT[0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        # setup_mlflow sets the registry URI too, and mlflow exports it as MLFLOW_REGISTRY_URI: undone below.
        mp.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{root / 'mlflow.db'}")
        yield root
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def write_test_split(params, rows: list[dict]) -> Path:
    """artifacts/split/test.jsonl with canonical rows."""
    path = params.layout.stage_dir("split") / "test.jsonl"
    write_jsonl(path, [{"id": r["id"], "text": r["text"], "summary": r["summary"]} for r in rows])
    return path


def build_upstream(params, model_dir: Path, rows: list[dict], rouge_l: list[float]) -> None:
    """What register reads: the fine-tuned model, the test split, predictions with per-row ROUGE-L, metrics.

    The per-row scores are given, so a test decides exactly how good each "model" looks.
    """
    assert len(rows) == len(rouge_l)
    target = params.layout.final_model
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(model_dir, target)
    test_path = write_test_split(params, rows)
    write_jsonl(
        params.layout.stage_dir("evaluate") / "predictions.jsonl",
        [{"id": r["id"], "prediction": "x", "reference": r["summary"], "rouge-l": s} for r, s in zip(rows, rouge_l)],
    )
    mean = sum(rouge_l) / len(rouge_l)
    write_json(
        params.layout.metrics_file("evaluate"),
        {"rouge-1": mean + 5, "rouge-2": mean / 2, "rouge-l": mean, "bleu-4": 1.0, "test_rows": len(rows),
         "test_sha256": file_sha256(test_path), "model_sha256": dir_sha256(target), "base": {"rouge-l": 0.5}},
    )
    write_json(params.layout.metrics_file("validate"), {"success": True, "rows": 120})
