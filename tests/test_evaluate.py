"""tasks/evaluate.py: the stage end to end on tiny artifacts, the lead-k baseline and the generation cache."""

from __future__ import annotations

import shutil

import pytest
from conftest import ROOT, sample_rows

from tasks.core.config import load_params
from tasks.core.errors import StageError
from tasks.core.io import file_sha256, read_json, read_jsonl, write_jsonl


@pytest.fixture
def stage_params(tmp_path, tiny_overrides, tiny_model_dir):
    """Upstream artifacts built by hand: split files from demo rows, the tiny model as base and fine-tuned."""
    import torch

    from tasks.core.modeling import load_model_and_tokenizer, save_model

    rows = sample_rows(40)
    split = tmp_path / "artifacts" / "split"
    write_jsonl(split / "train.jsonl", rows[:20])
    write_jsonl(split / "val.jsonl", rows[20:30])
    write_jsonl(split / "test.jsonl", rows[30:40])
    shutil.copytree(tiny_model_dir, tmp_path / "artifacts" / "pretrain" / "model")
    # The "fine-tuned" model differs from the base so the two really get generated separately.
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3, generator=g)
    save_model(model, tokenizer, tmp_path / "artifacts" / "align" / "model")  # the final model
    # No decoding search here: these tests count generations (tests/test_evaluate.py's tune tests turn it on).
    overrides = tiny_overrides + [f"evaluate.cache_dir={tmp_path / 'cache'}", "evaluate.baseline_max_k=15",
                                  "evaluate.tune_decoding=false"]
    return load_params(ROOT / "params.yaml", overrides)


def test_evaluate_stage_end_to_end(stage_params, monkeypatch):
    from tasks import evaluate
    from tasks.core import evaluation

    calls = []
    real_generate = evaluation.generate
    monkeypatch.setattr(evaluation, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))

    metrics = evaluate.run(stage_params)
    assert len(calls) == 2  # fine-tuned and base
    for outputs in (metrics["outputs"], metrics["base"]["outputs"], metrics["baseline"]["outputs"]):
        assert set(outputs) == {"distinct_share", "repeat_share", "mean_length", "reference_mean_length", "length_ratio"}
        assert 0 < outputs["distinct_share"] <= 1 and 0 <= outputs["repeat_share"] <= 1

    out = stage_params.layout.stage_dir("evaluate")
    test_file = stage_params.layout.stage_dir("split") / "test.jsonl"
    predictions = read_jsonl(out / "predictions.jsonl")
    assert [p["id"] for p in predictions] == [r["id"] for r in read_jsonl(test_file)]
    assert set(predictions[0]) >= {"id", "text", "reference", "prediction", "rouge-1", "rouge-2", "rouge-l", "bleu-4"}
    assert metrics == read_json(stage_params.layout.metrics_file("evaluate"))
    for m in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"):
        assert metrics[m] == pytest.approx(sum(p[m] for p in predictions) / len(predictions))
        assert metrics[f"{m}_low"] <= metrics[m] <= metrics[f"{m}_high"]
        assert m in metrics["base"] and m in metrics["baseline"]
    assert metrics["test_rows"] == 10
    assert metrics["test_sha256"] == file_sha256(test_file)
    assert metrics["empty_predictions"] == sum(not p["prediction"].strip() for p in predictions)
    assert 1 <= metrics["baseline"]["k"] <= 15
    baseline = read_jsonl(out / "baseline_predictions.jsonl")
    assert all(b["prediction"] == b["text"][: metrics["baseline"]["k"]] for b in baseline)
    assert len(read_jsonl(out / "base_predictions.jsonl")) == 10
    assert metrics["base"]["model_sha256"] != metrics["model_sha256"]
    assert {"rouge-l_delta", "rouge-l_low", "rouge-l_high"} <= set(metrics["gain_over_base"])
    png = stage_params.layout.plots_dir("evaluate") / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Unchanged models, rows and generation params: served from the cache, not generated again.
    again = evaluate.run(stage_params)
    assert len(calls) == 2
    assert again == metrics
    # A generation parameter changes what is written: both models generate again.
    stage_params.evaluate.max_new_tokens = 4
    evaluate.run(stage_params)
    assert len(calls) == 4


def test_evaluate_model_accepts_a_loaded_model(stage_params):
    from tasks.core.evaluation import Evaluator
    from tasks.core.modeling import load_model_and_tokenizer

    model_dir = stage_params.layout.final_model
    rows = read_jsonl(stage_params.layout.stage_dir("split") / "test.jsonl")[:4]
    evaluator = Evaluator.of(stage_params)
    from_dir, scores_dir = evaluator.evaluate(model_dir, rows, progress=False)
    model, tokenizer = load_model_and_tokenizer(model_dir)
    loaded, scores_loaded = evaluator.evaluate(model, rows, tokenizer=tokenizer, progress=False)
    assert loaded == from_dir
    assert scores_loaded["rouge-l"] == scores_dir["rouge-l"]
    with pytest.raises(StageError, match="tokenizer"):
        evaluator.evaluate(model, rows, progress=False)


def test_lead_k_is_chosen_on_val_rows():
    from tasks.evaluate import choose_lead_k, lead

    # Each summary is exactly the first four characters of its text: lead-4 scores 100, any other k less.
    rows = [
        {"text": "我爱北京天安门，天安门上太阳升。", "summary": "我爱北京"},
        {"text": "今天天气很好我们去公园散步吧。", "summary": "今天天气"},
    ]
    k, best = choose_lead_k(rows, 10, "zh")
    assert k == 4 and lead(rows[0]["text"], k, "zh") == "我爱北京"
    assert best == pytest.approx(100, abs=1e-4)
    rows[1]["summary"] = "今天天气很好"  # now a longer lead pays on row 2 more than it costs on row 1
    assert choose_lead_k(rows, 10, "zh")[0] > 4
    assert lead("The cat sat on the mat", 3, "en") == "The cat sat"


def test_missing_model_names_the_fix(stage_params):
    from tasks.evaluate import run

    shutil.rmtree(stage_params.layout.stage_dir("pretrain") / "model")
    with pytest.raises(StageError, match="score_base=false"):
        run(stage_params)


def test_a_change_in_the_generating_code_is_never_served_from_the_cache(stage_params, monkeypatch, tmp_path):
    """The cache key holds the source of the code that generates: edit it and the models generate anew."""
    import sys

    from tasks import evaluate
    from tasks.core import evaluation

    probe = tmp_path / "probe_pkg"
    probe.mkdir()
    (probe / "sftflow_generation_probe.py").write_text("STOP_AFTER = 1\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(probe))
    monkeypatch.setattr(evaluation, "GENERATING_MODULES", (*evaluation.GENERATING_MODULES, "sftflow_generation_probe"))
    calls = []
    real_generate = evaluation.generate
    monkeypatch.setattr(evaluation, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    evaluation._sources_sha256.cache_clear()
    evaluate.run(stage_params)
    evaluate.run(stage_params)
    assert len(calls) == 2  # the second run came from the cache
    (probe / "sftflow_generation_probe.py").write_text("STOP_AFTER = 2\n", encoding="utf-8")
    evaluation._sources_sha256.cache_clear()  # a new stage process reads the sources afresh
    evaluate.run(stage_params)
    assert len(calls) == 4  # fine-tuned and base generated again
    sys.modules.pop("sftflow_generation_probe", None)


def test_the_cache_key_names_runtime_device_and_dtype(stage_params):
    from tasks.core.evaluation import Evaluator, model_placement, runtime_versions

    evaluator = Evaluator.of(stage_params)
    rows = read_jsonl(stage_params.layout.split("test"))[:2]
    assert set(runtime_versions()) == {"torch", "transformers", "tokenizers"}
    assert model_placement(None) == {"device": "cpu", "dtype": "torch.float32"}

    class Half:  # a loaded model in another dtype is another generation
        device = type("D", (), {"type": "cpu"})()
        dtype = "torch.bfloat16"

    assert evaluator.cache_key("m", rows) != evaluator.cache_key("m", rows, Half())


def test_decoding_is_chosen_on_val_rows_only_and_used_by_quantize_and_register(stage_params, monkeypatch):
    from dataclasses import replace

    from tasks import evaluate, register
    from tasks.core import evaluation
    from tasks.core.decoding import DECODING_GRID, apply_decoding, decoding_file
    from tasks.core.generation import GenerationSettings

    layout = stage_params.layout
    val = read_jsonl(layout.split("val"))
    test = read_jsonl(layout.split("test"))
    calls = []
    real_generate = evaluation.generate
    monkeypatch.setattr(evaluation, "generate", lambda m, t, texts, s, **k: calls.append((list(texts), s)) or real_generate(m, t, texts, s, **k))
    stage_params.evaluate.tune_decoding = True
    metrics = evaluate.run(stage_params)

    # Tuning generates the val rows once per grid point, before the test split is touched at all.
    val_texts, test_texts = [r["text"] for r in val], [r["text"] for r in test]
    tuning = [s for texts, s in calls if texts == val_texts]
    assert [{"no_repeat_ngram_size": s.no_repeat_ngram_size, "repetition_penalty": s.repetition_penalty} for s in tuning] == list(DECODING_GRID)
    assert all(texts in (val_texts, test_texts) for texts, _ in calls)
    assert [texts for texts, _ in calls[: len(DECODING_GRID)]] == [val_texts] * len(DECODING_GRID)
    decoding = read_json(decoding_file(layout))
    assert decoding["tuned"] and decoding["val_rows"] == len(val) and len(decoding["grid"]) == len(DECODING_GRID)
    best = max(decoding["grid"], key=lambda p: p["rouge-l"])["rouge-l"]
    chosen = {k: decoding[k] for k in ("no_repeat_ngram_size", "repetition_penalty")}
    assert {**chosen, "rouge-l": best} in decoding["grid"]
    assert metrics["decoding"] == {k: v for k, v in decoding.items() if k not in {"model_sha256", "params"}}
    # The test split was generated with the choice, by both models.
    assert [(s.no_repeat_ngram_size, s.repetition_penalty) for texts, s in calls if texts == test_texts] == [tuple(chosen.values())] * 2

    # Other test rows (other references too) change nothing about the choice: it never reads them.
    write_jsonl(layout.split("test"), [{**r, "summary": "无关"} for r in sample_rows(50)[40:50]])
    stage_params.evaluate.cache_dir = stage_params.evaluate.cache_dir.parent / "cache2"
    evaluate.run(stage_params)
    assert read_json(decoding_file(layout))["grid"] == decoding["grid"]

    # quantize and register generate with the file's choice; one written for other weights or params is refused.
    params_settings = GenerationSettings.of(stage_params)
    assert apply_decoding(params_settings, decoding_file(layout), decoding["model_sha256"]) == replace(params_settings, **chosen)
    assert {k: register.generation_settings(stage_params)[k] for k in chosen} == chosen
    with pytest.raises(StageError, match="other weights"):
        apply_decoding(params_settings, decoding_file(layout), "0" * 64)
    with pytest.raises(StageError, match="re-run `sftflow evaluate`"):
        apply_decoding(replace(params_settings, repetition_penalty=1.5), decoding_file(layout))
    assert apply_decoding(params_settings, layout.stage_dir("evaluate") / "absent.json") == params_settings


def test_tuning_needs_val_rows(stage_params):
    from tasks.core.decoding import choose_decoding
    from tasks.core.evaluation import Evaluator

    with pytest.raises(StageError, match="val split is empty"):
        choose_decoding(Evaluator.of(stage_params), "unused", [], "zh")
    with pytest.raises(StageError, match="grid is empty"):
        choose_decoding(Evaluator.of(stage_params), "unused", [{"text": "a", "summary": "b"}], "zh", grid=())


def test_a_missing_final_model_names_the_stage_that_writes_it(stage_params):
    from tasks import evaluate

    shutil.rmtree(stage_params.layout.final_model)
    with pytest.raises(StageError, match=f"run `sftflow {stage_params.layout.final_model_stage}` first"):
        evaluate.run(stage_params)
    assert stage_params.layout.final_model_stage == "align"
