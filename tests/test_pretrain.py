import math

import pytest
import torch
from conftest import ROOT, write_tiny_splits
from safetensors.torch import load_file

from tasks.core.config import ParamsError, load_params
from tasks.core.errors import StageError
from tasks.core.io import file_sha256, read_json, write_json
from tasks.core.modeling import load_model_and_tokenizer
from tasks.core.prompt import answer_ids, encode_prompt
from tasks.core.stage_params import StageParams
from tasks.pretrain import _framed_blocks, pack_blocks, pseudo_summary, run


@pytest.fixture
def params_for(tmp_path, tiny_overrides):
    write_tiny_splits(tmp_path / "artifacts")

    def make(*extra):
        return load_params(ROOT / "params.yaml", [*tiny_overrides, *extra])

    return make


def test_scratch_base_is_pretrained_and_loads_like_a_hub_model(tmp_path, params_for):
    params = params_for("pretrain.max_steps=20", "pretrain.learning_rate=0.02", "pretrain.warmup_ratio=0")
    metrics = run(params)

    model_dir = tmp_path / "artifacts" / "pretrain" / "model"
    _model, tok = load_model_and_tokenizer(str(model_dir))
    # A random init scores about ln(vocab); twenty steps must already beat that clearly.
    assert metrics["val_loss"] < math.log(len(tok)) - 0.5
    assert metrics["steps"] == 20 and metrics["base"] == "scratch"
    assert metrics["objective"] == "lead"  # auto, for a scratch base
    assert read_json(tmp_path / "metrics" / "pretrain.json") == metrics
    # The template's own characters are in the vocabulary, so prompts have no <unk>.
    ids = tok(params.data.prompt_template.replace("{text}", ""), add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    csv = (tmp_path / "plots" / "pretrain" / "loss.csv").read_text().splitlines()
    assert csv[0] == "step,train_loss,val_loss" and len(csv) > 2
    assert (tmp_path / "plots" / "pretrain" / "loss.png").stat().st_size > 0


def test_scratch_base_without_pretraining_is_an_error(params_for):
    with pytest.raises(StageError, match="pretrain.enabled"):
        run(params_for("pretrain.enabled=false"))


def test_a_real_base_with_default_params_is_not_pretrained(tmp_path, params_for, tiny_model_dir):
    # `-S model.base=<dir>` and nothing else: pretrain.enabled is auto, so the base reaches train as it was.
    before = load_file(tiny_model_dir / "model.safetensors")
    params = params_for(f"model.base={tiny_model_dir}")
    assert params.pretrain.enabled == "auto"
    metrics = run(params)
    assert metrics["base"] == str(tiny_model_dir) and not metrics["pretrained"] and metrics["pretrain_method"] is None
    assert "steps" not in metrics and not (tmp_path / "plots" / "pretrain" / "loss.csv").exists()
    after = load_file(tmp_path / "artifacts" / "pretrain" / "model" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(after[k].dtype == before[k].dtype for k in before)


def test_local_base_is_copied_or_pretrained(tmp_path, params_for, tiny_model_dir):
    before = load_file(tiny_model_dir / "model.safetensors")
    out = tmp_path / "artifacts" / "pretrain" / "model" / "model.safetensors"

    metrics = run(params_for(f"model.base={tiny_model_dir}", "pretrain.enabled=false"))
    assert metrics["base"] == str(tiny_model_dir) and not metrics["pretrained"]
    after = load_file(out)
    assert all((before[k] == after[k]).all() for k in before)

    # select's choice wins over model.base; continued pretraining (train.method full) changes every weight,
    # at its own learning rate
    write_json(tmp_path / "artifacts" / "select" / "choice.json", {"base": str(tiny_model_dir)})
    metrics = run(params_for("pretrain.max_steps=2", "pretrain.enabled=true", "pretrain.continued_learning_rate=0.001"))
    assert metrics["base_source"].endswith("choice.json") and metrics["pretrained"]
    assert metrics["pretrain_method"] == "full" and metrics["learning_rate"] == 0.001
    after = load_file(out)
    unchanged = [k for k in before if (before[k] == after[k]).all()]
    assert not unchanged, f"parameters not updated by pretraining: {unchanged}"


def test_continued_pretraining_goes_through_lora_when_train_does(tmp_path, params_for, tiny_model_dir):
    before = load_file(tiny_model_dir / "model.safetensors")
    corpus = tmp_path / "extra.txt"
    corpus.write_text("水运工程施工项目全过程管理。\n\n基于深度学习的文本摘要方法研究。\n", encoding="utf-8")
    metrics = run(params_for(
        f"model.base={tiny_model_dir}", "pretrain.enabled=true", "pretrain.max_steps=2", "train.method=lora",
        "train.lora.target_modules=[q_proj, v_proj]", "pretrain.continued_learning_rate=0.01", f"pretrain.corpus=[{corpus}]",
    ))
    assert metrics["pretrain_method"] == "lora" and metrics["learning_rate"] == 0.01
    assert metrics["corpus_documents"] == 2 and metrics["corpus_sha256"] == {str(corpus): file_sha256(corpus)}
    after = load_file(tmp_path / "artifacts" / "pretrain" / "model" / "model.safetensors")
    assert before.keys() == after.keys(), "the adapter is merged: the saved model has the base's parameters"
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), changed


def test_corpus_files_are_checked_and_need_pretraining(tmp_path, params_for, tiny_model_dir):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ParamsError, match=f"pretrain.corpus: {missing} does not exist"):
        run(params_for(f"pretrain.corpus=[{missing}]"))
    present = tmp_path / "extra.txt"
    present.write_text("一些文本", encoding="utf-8")
    # a real base under `auto` is not pretrained, so listing a corpus is a mistake, not silently ignored
    with pytest.raises(ParamsError, match="pretrain.enabled is auto"):
        run(params_for(f"model.base={tiny_model_dir}", f"pretrain.corpus=[{present}]"))


def test_pack_blocks_joins_documents_with_eos(tiny_model_dir):
    _, tok = load_model_and_tokenizer(tiny_model_dir)
    blocks = pack_blocks(tok, ["摘要一", "标题"], block_size=3)
    flat = [i for b in blocks for i in b]
    assert all(len(b) == 3 for b in blocks)
    first, second = (tok(t, add_special_tokens=False)["input_ids"] for t in ("摘要一", "标题"))
    assert flat == first + [tok.eos_token_id] + second  # 3 + 1 + 2 tokens: two full blocks, eos of the last dropped


def test_pseudo_summaries_are_the_lead_or_the_principal_clause():
    text = "本文研究水稻产量。氮肥影响产量，氮肥过量降低水稻产量；结论是适量施肥。"
    # lead: whole opening clauses while they fit, trailing punctuation dropped
    assert pseudo_summary(text, "lead", 9, "zh") == "本文研究水稻产量"
    assert pseudo_summary(text, "lead", 16, "zh") == "本文研究水稻产量。氮肥影响产量"
    assert pseudo_summary(text, "lead", 5, "zh") == "本文研究水"  # a first clause longer than the cap is cut
    # gap-sentence: F1 of character bigrams against the rest of the text. "氮肥过量降低水稻产量；" has 10
    # bigrams, 4 of them (氮肥 水稻 稻产 产量) among the rest's 24: F1 = 2*0.4*(4/24)/(0.4+4/24) = 0.235, above
    # the first clause's 0.176, the second's 0.118 and the last's 0.
    assert pseudo_summary(text, "gap-sentence", 30, "zh") == "氮肥过量降低水稻产量"
    en = "We study rice. Nitrogen lowers rice yield. Nitrogen costs money."
    assert pseudo_summary(en, "lead", 40, "en") == "We study rice"
    assert pseudo_summary(en, "lead", 50, "en") == "We study rice. Nitrogen lowers rice yield"
    # F1 of words against the rest is 2 x shared / 10 words: the second sentence shares rice and nitrogen (0.4),
    # the others one word each (0.2)
    assert pseudo_summary(en, "gap-sentence", 80, "en") == "Nitrogen lowers rice yield"


def test_lead_objective_frames_each_train_text_as_the_task(params_for, tiny_model_dir):
    params = StageParams(params_for(), "pretrain")
    _, tok = load_model_and_tokenizer(tiny_model_dir)
    rows = [
        {"text": "第一段摘要讲水稻。后面还有很多内容", "summary": "水稻标题"},
        {"text": "第二段摘要讲小麦，后面还有内容", "summary": "小麦产量研究"},
    ]
    blocks = _framed_blocks(params, "lead", tok, rows, ["语料文档一。更多"], block_size=64)
    template, chat = params.data.prompt_template, params.data.use_chat_template
    framed = blocks[:3]
    for block, text in zip(framed, [rows[0]["text"], rows[1]["text"], "语料文档一。更多"]):
        prompt, _ = encode_prompt(tok, text, template, chat)
        lead = pseudo_summary(text, "lead", 6, "zh")  # 6: the nearest-rank 90th percentile of the summary lengths 4 and 6
        assert block == prompt + answer_ids(tok, text, lead, template, chat)
        assert lead in text
    # the reference summaries are plain packed text after the framed examples, never an answer
    assert [i for b in blocks[3:] for i in b] == pack_blocks(tok, [r["summary"] for r in rows], 64)[0]
