"""Shared test fixtures: offline, single-threaded, tiny data and a tiny model built from a config."""

from __future__ import annotations

import os

# Before any library import: no network, no telemetry, one thread per process (2-core machines).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "zh_summ.jsonl"


def sample_rows(n: int) -> list[dict]:
    """The first n rows of the shipped demo data."""
    rows = []
    with SAMPLE.open(encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


# Whole-system fault and topology tests: real servers, killed flow runs, minutes each. They run in
# CI as their own step (`make test-system`), so `make test` stays a quick loop for developers.
SYSTEM_TEST_FILES = {"test_reliability.py", "test_stack.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SYSTEM_TEST_FILES:
            item.add_marker(pytest.mark.system)


def write_tiny_splits(artifacts: Path, n: int = 120) -> None:
    """Train/val/test splits (80/10/10) of the first n demo rows, as the split stage writes them."""
    from tasks.core.io import write_jsonl

    rows = [{"id": r["id"], "text": r["text"], "summary": r["summary"]} for r in sample_rows(n)]
    a, b = int(n * 0.8), int(n * 0.9)
    for name, part in (("train", rows[:a]), ("val", rows[a:b]), ("test", rows[b:])):
        write_jsonl(artifacts / "split" / f"{name}.jsonl", part)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """120 real demo rows as JSONL under tmp_path."""
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sample_rows(120)), encoding="utf-8")
    return path


# The tiniest model and step counts that still exercise every stage; shared by the unit tests
# (tiny_overrides) and the whole-flow tests (flow_helpers.tiny_project_overrides).
TINY_RUN_OVERRIDES = [
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.num_kv_heads=1",
    "model.intermediate_size=64",
    "model.max_position_embeddings=512",
    "pretrain.max_steps=4",
    "pretrain.batch_size=8",
    "pretrain.block_size=64",
    "train.max_steps=4",
    "train.batch_size=8",
    # the rate these few steps were sized for; the shipped 5e-4 is tuned for 300 steps of the default model
    "train.learning_rate=0.002",
    "train.save_steps=2",
    "train.eval_steps=2",
    "train.logging_steps=1",
    "train.deepspeed_config=null",
    # align: a few self-generated pairs, two DPO steps, the gate on 8 val rows
    "align.max_pairs=8",
    "align.generate_rows=8",
    "align.max_steps=2",
    "align.batch_size=4",
    "align.gate_rows=8",
    "evaluate.max_new_tokens=8",
    "evaluate.bootstrap_samples=50",
    "promote.bootstrap_samples=50",
]


@pytest.fixture
def tiny_overrides(tmp_path, tiny_data) -> list[str]:
    """`-S` overrides that point every output into tmp_path and shrink the model and steps."""
    return [
        f"data.path={tiny_data}",
        f"paths.artifacts={tmp_path / 'artifacts'}",
        f"paths.metrics={tmp_path / 'metrics'}",
        f"paths.plots={tmp_path / 'plots'}",
        *TINY_RUN_OVERRIDES,
    ]


@pytest.fixture
def tiny_params(tmp_path, tiny_overrides):
    """Params loaded from the shipped params.yaml with tiny_overrides applied."""
    from tasks.core.config import load_params

    return load_params(ROOT / "params.yaml", tiny_overrides)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 decoder with a character tokenizer, trained on nothing, saved as a HF folder."""
    from tasks.core.config import ModelConfig
    from tasks.core.io import set_seed
    from tasks.core.modeling import build_scratch_model, save_model, train_tokenizer

    set_seed(0)
    rows = sample_rows(200)
    tok = train_tokenizer([r["text"] for r in rows] + [r["summary"] for r in rows], kind="char", vocab_size=3000)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
    model = build_scratch_model(cfg, tok)
    out = tmp_path_factory.mktemp("tiny_model")
    save_model(model, tok, out)
    return out
