"""The align stage: DPO learns a systematic preference (held-out reward accuracy, weights moved), pairs come
from feedback, the preference file and the model's own outputs but never from val/test rows, and the gate
keeps the fine-tuned model when the aligned one is worse."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import ROOT, sample_rows, write_tiny_splits
from safetensors.torch import load_file

from tasks.core.config import load_params
from tasks.core.feedback import FeedbackStore, closed_sha256
from tasks.core.io import read_json, read_jsonl, write_jsonl

# Steps fast enough for tests: one thread, a learning rate that moves a 32-wide model in a few steps.
FAST = ["train.torch_threads=1", "align.warmup_ratio=0", "align.gate_rows=8", "align.save_steps=5"]


@pytest.fixture
def project(tmp_path, tiny_overrides, tiny_model_dir):
    """Tiny splits and the tiny model as the fine-tuned model; returns (overrides, artifacts dir)."""
    artifacts = tmp_path / "artifacts"
    write_tiny_splits(artifacts)
    shutil.copytree(tiny_model_dir, artifacts / "train" / "model")
    return [*tiny_overrides, *FAST, f"align.feedback_dir={tmp_path / 'feedback'}"], artifacts


def toy_preferences(path, rows):
    """Pairs whose chosen and rejected differ systematically: the reference title, and the same title running on
    into a loop (what a weak model writes). Short prompts keep the steps fast."""
    write_jsonl(path, [{"prompt": r["text"][:40], "chosen": r["summary"], "rejected": r["summary"] + "的研究" * 3} for r in rows])
    return path


def params_of(overrides, *extra):
    return load_params(ROOT / "params.yaml", [*overrides, *extra])


def changed_tensors(before_dir, after_dir):
    before, after = load_file(before_dir / "model.safetensors"), load_file(after_dir / "model.safetensors")
    return sorted(k for k in before if not torch.equal(before[k], after[k]))


@pytest.mark.parametrize("method, lr", [("full", "0.005"), ("lora", "0.02")])
def test_dpo_learns_a_systematic_preference_on_held_out_pairs(tmp_path, project, method, lr):
    from tasks.align import run

    overrides, artifacts = project
    prefs = toy_preferences(tmp_path / "prefs.jsonl", sample_rows(48))
    metrics = run(params_of(
        overrides, f"align.data={prefs}", "align.self_pairs=false", "align.max_pairs=48", "align.held_out_share=0.25",
        "align.max_steps=12", f"align.learning_rate={lr}", "align.max_drop=100", f"train.method={method}",
    ))
    assert metrics["pairs_file"] == 48 and metrics["pairs_held_out"] == 12
    assert metrics["held_out_reward_accuracy"] >= 0.9, metrics
    assert metrics["held_out_reward_margin"] > 0
    assert metrics["final"] == "aligned", metrics["reason"]
    changed = changed_tensors(artifacts / "train" / "model", artifacts / "align" / "model")
    assert changed, "DPO moved no weight"
    if method == "lora":  # merged: only adapted layers moved, embeddings and norms did not
        assert not any("embed" in k or "norm" in k for k in changed), changed
    saved = read_json(tmp_path / "metrics" / "align.json")
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= saved.keys()
    assert (tmp_path / "plots" / "align" / "rewards.csv").read_text().startswith("step,loss,rewards/chosen")


def test_the_gate_keeps_the_fine_tuned_model_when_the_aligned_one_is_worse(tmp_path, project, monkeypatch):
    import tasks.align as align

    overrides, artifacts = project
    prefs = toy_preferences(tmp_path / "prefs.jsonl", sample_rows(16))
    # An injected worse aligned model: every val generation it makes scores 0.
    real = align.Evaluator.evaluate

    def worse(self, model, rows, **kwargs):
        predictions, scores = real(self, model, rows, **kwargs)
        if str(model).endswith(".aligned"):
            return [""] * len(rows), self.score([""] * len(rows), [r["summary"] for r in rows])
        return predictions, scores

    monkeypatch.setattr(align.Evaluator, "evaluate", worse)
    monkeypatch.setattr(align, "score_row", lambda p, r, language: {"rouge-l": 0.0})
    # The fine-tuned model must score above 0 for "worse" to mean anything: score its rows as 50.
    real_score = align.Evaluator.score

    def score(self, predictions, references):
        out = real_score(self, predictions, references)
        if any(predictions):
            for row in out["per_row"]:
                row["rouge-l"] = 50.0
            out["rouge-l"] = 50.0
        return out

    monkeypatch.setattr(align.Evaluator, "score", score)
    metrics = align.run(params_of(overrides, f"align.data={prefs}", "align.self_pairs=false", "align.max_steps=2"))
    assert metrics["final"] == "fine-tuned"
    assert metrics["gate"]["passed"] is False and metrics["gate"]["low"] < -0.5
    assert "kept the fine-tuned model" in metrics["reason"] and "align.max_drop" in metrics["reason"]
    assert changed_tensors(artifacts / "train" / "model", artifacts / "align" / "model") == []
    assert read_json(tmp_path / "metrics" / "align.json")["final"] == "fine-tuned"


def test_disabled_align_passes_the_fine_tuned_model_through(tmp_path, project):
    from tasks.align import run
    from tasks.core.io import dir_sha256

    overrides, artifacts = project
    metrics = run(params_of(overrides, "align.enabled=false"))
    assert metrics["final"] == "fine-tuned" and metrics["reason"] == "align.enabled is false"
    assert dir_sha256(artifacts / "align" / "model") == dir_sha256(artifacts / "train" / "model") == metrics["model_sha256"]


def test_pairs_come_in_source_order_and_never_from_val_or_test(tmp_path, project, monkeypatch):
    import tasks.align as align

    overrides, artifacts = project
    val = read_jsonl(artifacts / "split" / "val.jsonl")
    train = read_jsonl(artifacts / "split" / "train.jsonl")
    store = FeedbackStore(tmp_path / "feedback", per_minute=0)
    store.submit(text=train[0]["text"], output="模型的输出", rating="bad", correction="更好的标题", user="a")
    store.submit(text=train[1]["text"], output="好标题", rating="good", user="a")  # no correction: no pair
    store.submit(text=val[0]["text"] + "。", output="输出", rating="bad", correction="改正", user="b")  # near-duplicate of val
    store.snapshot()
    store.submit(text=train[2]["text"], output="晚到的", rating="bad", correction="下次再用", user="a")  # after the snapshot
    with (tmp_path / "feedback" / "closed").joinpath("zz-corrupt.jsonl").open("w") as f:
        f.write("{not json\n")
    prefs = tmp_path / "prefs.jsonl"
    write_jsonl(prefs, [{"prompt": train[3]["text"], "chosen": "甲", "rejected": "乙"},
                        {"prompt": test_text(artifacts), "chosen": "甲", "rejected": "乙"},
                        {"prompt": train[4]["text"], "chosen": "同", "rejected": "同"}])
    monkeypatch.setattr(align, "dpo", lambda *a, **k: pytest.fail("counts only"))
    params = params_of(overrides, f"align.data={prefs}", "align.max_pairs=6", "align.generate_rows=8", "align.max_rouge_l=100")
    from tasks.core.feedback import read_closed
    from tasks.core.stage_params import stage_params

    pairs, counts = align.build_pairs(stage_params(params, "align"), read_closed(tmp_path / "feedback"), artifacts / "train" / "model")
    assert [p.source for p in pairs] == ["feedback", "file", "self", "self", "self", "self"]
    assert pairs[0].chosen == "更好的标题" and pairs[0].rejected == "模型的输出"
    assert counts["feedback_records"] == 3 and counts["feedback_corrupt"] == 1
    assert counts["feedback_without_correction"] == 1 and counts["feedback_near_duplicates_dropped"] == 1
    assert counts["file_rows"] == 3 and counts["file_same_answers"] == 1 and counts["file_near_duplicates_dropped"] == 1
    held = {r["text"] for name in ("val", "test") for r in read_jsonl(artifacts / "split" / f"{name}.jsonl")}
    assert not any(p.text in held for p in pairs)
    assert all(p.text != train[2]["text"] for p in pairs)  # the record after the snapshot waits


def test_text(artifacts):
    return read_jsonl(artifacts / "split" / "test.jsonl")[0]["text"]


test_text.__test__ = False  # a helper, not a test


def test_a_preference_file_without_its_columns_fails_naming_them(tmp_path, project):
    from tasks.align import run
    from tasks.core.errors import DataError

    overrides, _ = project
    bad = tmp_path / "bad.csv"
    bad.write_text("question,good\nq,a\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"lacks the columns \['prompt', 'chosen', 'rejected'\]"):
        run(params_of(overrides, f"align.data={bad}", "align.self_pairs=false"))
    empty = tmp_path / "empty.csv"
    empty.write_text("prompt,chosen,rejected\n一段文字,,差的标题\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"fails its checks: expect_column_values_to_not_be_null on `chosen` \(1 rows\)"):
        run(params_of(overrides, f"align.data={empty}", "align.self_pairs=false"))


def test_metrics_name_the_feedback_snapshot(tmp_path, project):
    from tasks.align import run

    overrides, _ = project
    store = FeedbackStore(tmp_path / "feedback", per_minute=0)
    store.submit(text=sample_rows(1)[0]["text"], output="输出", rating="bad", correction="改正的标题", user="u")
    store.snapshot()
    metrics = run(params_of(overrides, "align.self_pairs=false", "align.max_steps=1", "align.max_drop=100"))
    assert metrics["pairs_feedback"] == 1
    assert metrics["feedback_sha256"] == closed_sha256(tmp_path / "feedback")
    assert json.loads((tmp_path / "artifacts" / "align" / "pairs.jsonl").read_text().splitlines()[0])["source"] == "feedback"
    assert [r["correction"] for r in read_jsonl(tmp_path / "artifacts" / "align" / "feedback.jsonl")] == ["改正的标题"]


def test_a_killed_run_resumes_from_its_last_complete_checkpoint(tmp_path, project):
    from tasks.align import run

    overrides, artifacts = project
    prefs = toy_preferences(tmp_path / "prefs.jsonl", sample_rows(16))
    args = [f"align.data={prefs}", "align.self_pairs=false", "align.max_steps=4", "align.save_steps=2",
            "align.batch_size=4", "align.max_drop=100"]
    first = run(params_of(overrides, *args))
    ckpt = artifacts / "align" / "checkpoints"
    assert first["resumed_from_step"] == 0 and sorted(p.name for p in ckpt.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    shutil.rmtree(ckpt / "checkpoint-4")  # as if killed after the checkpoint at step 2
    (ckpt / "checkpoint-3").mkdir()  # and mid-way through writing the next one
    again = run(params_of(overrides, *args))
    assert again["resumed_from_step"] == 2 and again["steps"] == 4 and again["steps_run"] == 2
    assert not (ckpt / "checkpoint-3").exists()
    # Run again with every step checkpointed: nothing is trained, the last checkpoint is the model.
    done = run(params_of(overrides, *args))
    assert done["steps_run"] == 0 and done["model_sha256"] == again["model_sha256"]
    # Other pairs: the checkpoints are not theirs, training starts afresh.
    other = run(params_of(overrides, *args, "align.max_pairs=12"))
    assert other["resumed_from_step"] == 0


def test_the_trigger_sees_new_feedback_and_a_changed_preference_file(tmp_path, project):
    from flows.io_tasks import alignment_inputs, snapshot_feedback
    from tasks.core.feedback import EMPTY_SHA256

    overrides, _ = project
    prefs = toy_preferences(tmp_path / "prefs.jsonl", sample_rows(4))
    params = params_of(overrides, f"align.data={prefs}")
    first = alignment_inputs(params)
    assert first["feedback.sha256"] == EMPTY_SHA256 and len(first["align.data.sha256"]) == 64
    FeedbackStore(tmp_path / "feedback").submit(text=sample_rows(1)[0]["text"], output="输出", rating="good", user="u")
    assert alignment_inputs(params) == first  # still open: the next run's snapshot will hold it
    assert snapshot_feedback(params) is not None
    second = alignment_inputs(params)
    assert second["feedback.sha256"] != first["feedback.sha256"] and second["align.data.sha256"] == first["align.data.sha256"]
    toy_preferences(prefs, sample_rows(5))
    assert alignment_inputs(params)["align.data.sha256"] != first["align.data.sha256"]
    assert alignment_inputs(params_of(overrides, "align.enabled=false")) == {}  # align off: feedback changes nothing


def test_lineage_names_the_feedback_snapshot_the_file_and_the_pairs(tmp_path, project):
    from tasks.core.io import write_json
    from tasks.core.registry import lineage_of
    from tasks.register import alignment_tags

    overrides, _ = project
    params = params_of(overrides)
    write_json(params.layout.metrics_file("align"), {"feedback_sha256": "f" * 64, "data_sha256": "none", "final": "aligned",
                                                     "pairs_feedback": 3, "pairs_file": 0, "pairs_self": 61, "reason": "kept"})
    from tasks.core.stage_params import stage_params

    tags = alignment_tags(stage_params(params, "register"))
    assert tags["feedback.sha256"] == "f" * 64 and json.loads(tags["align.pairs"]) == {"feedback": 3, "file": 0, "self": 61}
    text = lineage_of("m", 1, "run", tags, [], {}).text()
    assert f"aligned model  feedback snapshot sha256 {'f' * 64}  preference file none  pairs: 3 feedback, 0 file, 61 self" in text
