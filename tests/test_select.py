"""tasks/select.py: the better of two tiny bases is chosen; missing candidates are skipped or fail by name."""

from __future__ import annotations

import pytest
from conftest import ROOT, sample_rows

from tasks.core.config import load_params
from tasks.core.errors import StageError
from tasks.core.io import read_json, write_jsonl

TEMPLATE = "为下面的论文摘要拟一个标题。\n摘要：{text}\n标题："


@pytest.fixture(scope="module")
def trained_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model after 20 full-batch steps on 60 other demo rows: val loss ~7.0 against ~7.55 untrained."""
    import torch

    from tasks.core.modeling import load_model_and_tokenizer, save_model
    from tasks.core.prompt import collate_features, encode_example

    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    features = [
        encode_example(tokenizer, r["text"], r["summary"], TEMPLATE, True, 96, 32) for r in sample_rows(100)[40:]
    ]
    batch = collate_features(features, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(20):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("trained_model")
    save_model(model, tokenizer, out)
    return out


@pytest.fixture
def select_params(tmp_path, tiny_overrides):
    rows = sample_rows(40)
    split = tmp_path / "artifacts" / "split"
    write_jsonl(split / "train.jsonl", sample_rows(300)[40:])  # the scratch tokenizer's corpus
    write_jsonl(split / "val.jsonl", rows[16:40])

    def make(candidates, metric="loss"):
        overrides = tiny_overrides + [
            f"model.candidates={candidates}",
            f"select.metric={metric}",
            "select.rows=8",
            "train.max_source_length=96",
            "train.max_target_length=32",
            f"evaluate.cache_dir={tmp_path / 'cache'}",
        ]
        return load_params(ROOT / "params.yaml", overrides)

    return make


def test_the_better_base_is_chosen_and_both_are_in_the_table(select_params, tiny_model_dir, trained_model_dir):
    from tasks.select import run

    params = select_params([str(tiny_model_dir), str(trained_model_dir)])
    metrics = run(params)
    assert metrics["chosen"] == str(trained_model_dir)
    table = metrics["candidates"]
    assert set(table) == {str(tiny_model_dir), str(trained_model_dir)}
    assert table[str(trained_model_dir)]["loss"] < table[str(tiny_model_dir)]["loss"] - 0.3
    for entry in table.values():
        assert {"loss", "rouge-1", "rouge-2", "rouge-l", "bleu-4", "rouge-l_low", "rouge-l_high"} <= set(entry)
    choice = read_json(params.layout.stage_dir("select") / "choice.json")
    assert choice["base"] == str(trained_model_dir)
    assert choice["candidates"] == [str(tiny_model_dir), str(trained_model_dir)]
    assert read_json(params.layout.metrics_file("select")) == metrics
    assert (params.layout.plots_dir("select") / "candidates.png").read_bytes()[:4] == b"\x89PNG"


def test_scratch_candidate_and_a_missing_dir_is_reported_and_skipped(select_params, trained_model_dir, tmp_path):
    from tasks.select import run

    missing = tmp_path / "no_such_model"
    params = select_params(["scratch", str(missing), str(trained_model_dir)])
    metrics = run(params)
    assert set(metrics["candidates"]) == {"scratch", str(trained_model_dir)}
    assert str(missing) in metrics["skipped"] and "does not exist" in metrics["skipped"][str(missing)]
    # A fresh random decoder knows nothing of the task: its loss is near log(vocab size) per character.
    assert metrics["candidates"]["scratch"]["loss"] > metrics["candidates"][str(trained_model_dir)]["loss"]
    assert metrics["chosen"] == str(trained_model_dir)
    assert read_json(params.layout.stage_dir("select") / "choice.json")["skipped"] == [str(missing)]


def test_all_missing_fails_naming_each(select_params, tmp_path):
    from tasks.select import run

    a, b = tmp_path / "missing_a", tmp_path / "missing_b"
    with pytest.raises(StageError) as err:
        run(select_params([str(a), str(b)]))
    assert str(a) in str(err.value) and str(b) in str(err.value)


def test_one_candidate_passes_through_without_loading(select_params, monkeypatch):
    import tasks.core.modeling
    from tasks.select import run

    def forbidden(*args, **kwargs):
        raise AssertionError("a single candidate must not be loaded")

    monkeypatch.setattr(tasks.core.modeling, "load_model_and_tokenizer", forbidden)
    params = select_params([])
    run(params)
    choice = read_json(params.layout.stage_dir("select") / "choice.json")
    assert choice == {"base": "scratch", "candidates": ["scratch"], "scored": False}
