import math

import pytest
from conftest import ROOT, write_tiny_splits
from safetensors.torch import load_file

from tasks.core.config import load_params
from tasks.core.errors import StageError
from tasks.core.io import read_json, write_json
from tasks.core.modeling import load_model_and_tokenizer
from tasks.pretrain import pack_blocks, run


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


def test_local_base_is_copied_or_pretrained(tmp_path, params_for, tiny_model_dir):
    before = load_file(tiny_model_dir / "model.safetensors")
    out = tmp_path / "artifacts" / "pretrain" / "model" / "model.safetensors"

    metrics = run(params_for(f"model.base={tiny_model_dir}", "pretrain.enabled=false"))
    assert metrics["base"] == str(tiny_model_dir) and not metrics["pretrained"]
    after = load_file(out)
    assert all((before[k] == after[k]).all() for k in before)

    # select's choice wins over model.base; continued pretraining changes every weight
    write_json(tmp_path / "artifacts" / "select" / "choice.json", {"base": str(tiny_model_dir)})
    metrics = run(params_for("pretrain.max_steps=2"))
    assert metrics["base_source"].endswith("choice.json") and metrics["pretrained"]
    after = load_file(out)
    unchanged = [k for k in before if (before[k] == after[k]).all()]
    assert not unchanged, f"parameters not updated by pretraining: {unchanged}"


def test_pack_blocks_joins_documents_with_eos(tiny_model_dir):
    _, tok = load_model_and_tokenizer(tiny_model_dir)
    blocks = pack_blocks(tok, ["摘要一", "标题"], block_size=3)
    flat = [i for b in blocks for i in b]
    assert all(len(b) == 3 for b in blocks)
    first, second = (tok(t, add_special_tokens=False)["input_ids"] for t in ("摘要一", "标题"))
    assert flat == first + [tok.eos_token_id] + second  # 3 + 1 + 2 tokens: two full blocks, eos of the last dropped
