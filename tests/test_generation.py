"""tasks/core/generation.py: batched generation equals one-by-one, keeps input order, cuts like training."""

from __future__ import annotations

import pytest
from conftest import sample_rows

from tasks.core.generation import GenerationSettings, _decode_until_eos, generate

TEMPLATE = "为下面的论文摘要拟一个标题。\n摘要：{text}\n标题："


@pytest.fixture(scope="module")
def sharp_model(tiny_model_dir):
    """The tiny model with large random weights: a freshly initialised one (std 0.02) writes the same
    character for every input, which would make an equality test pass vacuously."""
    import torch

    from tasks.core.modeling import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3, generator=g)
    return model, tokenizer


def _generate(model, tokenizer, texts, batch_size, **kw):
    settings = GenerationSettings(prompt_template=TEMPLATE, use_chat_template=True, max_new_tokens=8, batch_size=batch_size, **kw)
    return generate(model, tokenizer, texts, settings)


def test_batched_equals_one_by_one(sharp_model):
    model, tokenizer = sharp_model
    # Short texts (lengths 30..85 chars) so every batch holds prompts of different lengths: real left padding.
    texts = [r["text"][: 30 + 5 * i] for i, r in enumerate(sample_rows(12))]
    one_by_one = _generate(model, tokenizer, texts, batch_size=1)
    assert len(set(one_by_one)) == len(texts), "outputs must differ per text for the comparison to mean anything"
    assert all(one_by_one)
    assert _generate(model, tokenizer, texts, batch_size=4) == one_by_one
    assert _generate(model, tokenizer, texts, batch_size=12) == one_by_one


def test_results_come_back_in_input_order(sharp_model):
    model, tokenizer = sharp_model
    texts = [r["text"][: 20 + 10 * i] for i, r in enumerate(sample_rows(5))]
    forward = _generate(model, tokenizer, texts, batch_size=2)
    backward = _generate(model, tokenizer, texts[::-1], batch_size=2)
    assert backward == forward[::-1]


def test_max_source_length_cuts_the_text_like_training(sharp_model):
    model, tokenizer = sharp_model
    text = sample_rows(1)[0]["text"]
    overhead = len(TEMPLATE.replace("{text}", ""))  # one token per character with the char tokenizer
    limit = overhead + 40
    cut = _generate(model, tokenizer, [text], batch_size=1, max_source_length=limit)
    assert cut == _generate(model, tokenizer, [text[:40]], batch_size=1)
    assert cut != _generate(model, tokenizer, [text], batch_size=1)


def test_decoding_stops_at_the_first_eos(tiny_model_dir):
    from tasks.core.modeling import load_model_and_tokenizer

    _, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    ids = tokenizer("标题", add_special_tokens=False)["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert _decode_until_eos(tokenizer, ids + [eos] + ids + [pad], {eos}) == "标题"
    assert _decode_until_eos(tokenizer, [eos] + ids, {eos}) == ""


def test_empty_input_and_bad_batch_size(sharp_model):
    model, tokenizer = sharp_model
    assert _generate(model, tokenizer, [], batch_size=4) == []
    with pytest.raises(ValueError, match="batch_size"):
        _generate(model, tokenizer, ["x"], batch_size=0)
