"""tasks/core/generation.py: batched generation equals one-by-one (repetition controls on or off), keeps
input order, cuts like training; the repetition controls look at generated tokens only."""

from __future__ import annotations

import pytest
from conftest import sample_rows

from tasks.core.generation import (
    GeneratedNoRepeatNGram,
    GeneratedRepetitionPenalty,
    GenerationSettings,
    _decode_until_eos,
    generate,
    repetition_processors,
)

TEMPLATE = "为下面的论文摘要拟一个标题。\n摘要：{text}\n标题："


def _random_weights(model_dir, std):
    import torch

    from tasks.core.modeling import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std, generator=g)
    return model, tokenizer


@pytest.fixture(scope="module")
def sharp_model(tiny_model_dir):
    """The tiny model with large random weights: a freshly initialised one (std 0.02) writes the same
    character for every input, which would make an equality test pass vacuously."""
    return _random_weights(tiny_model_dir, 0.3)


@pytest.fixture(scope="module")
def looping_model(tiny_model_dir):
    """Weights between the two: a different text for (nearly) every input, and each one loops
    ("警警警警…", "率走俗薪薪薪薪左左左…"), as greedy decoding of a lightly trained model does."""
    return _random_weights(tiny_model_dir, 0.12)


@pytest.fixture(scope="module")
def copying_model(tiny_model_dir):
    """Small random weights: every input gets the prompt's last character repeated ("：：：…")."""
    return _random_weights(tiny_model_dir, 0.05)


def _generate(model, tokenizer, texts, batch_size, max_new_tokens=8, **kw):
    settings = GenerationSettings(
        prompt_template=TEMPLATE, use_chat_template=True, max_new_tokens=max_new_tokens, batch_size=batch_size, **kw
    )
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


# --- repetition controls --------------------------------------------------------------------------


def _repeated_bigrams(text):
    grams = [text[i : i + 2] for i in range(len(text) - 1)]
    return len(grams) - len(set(grams))


def test_repetition_controls_stop_loops_and_batched_equals_one_by_one(looping_model):
    model, tokenizer = looping_model
    texts = [r["text"][: 30 + 5 * i] for i, r in enumerate(sample_rows(12))]
    plain = _generate(model, tokenizer, texts, batch_size=1, max_new_tokens=24)
    assert sum(_repeated_bigrams(t) for t in plain) > 50, "the model must loop for the controls to matter"
    for controls in ({"no_repeat_ngram_size": 2}, {"repetition_penalty": 1.5}, {"no_repeat_ngram_size": 3, "repetition_penalty": 1.2}):
        one_by_one = _generate(model, tokenizer, texts, batch_size=1, max_new_tokens=24, **controls)
        assert one_by_one != plain, controls
        assert len(set(one_by_one)) >= len(texts) - 1 and all(one_by_one)
        assert _generate(model, tokenizer, texts, batch_size=5, max_new_tokens=24, **controls) == one_by_one, controls
        assert _generate(model, tokenizer, texts, batch_size=12, max_new_tokens=24, **controls) == one_by_one, controls
        if controls.get("no_repeat_ngram_size") == 2:  # one character per token: no bigram twice
            assert all(_repeated_bigrams(t) == 0 for t in one_by_one)


def test_repetition_controls_let_the_model_copy_from_the_prompt(copying_model):
    model, tokenizer = copying_model
    texts = [r["text"][:40] for r in sample_rows(3)]
    plain = _generate(model, tokenizer, texts, batch_size=1, max_new_tokens=6)
    first = plain[0][0]
    assert first in TEMPLATE and set(plain[0]) == {first}, "the model copies a prompt character over and over"
    # Each token at most once, and a heavy penalty: the prompt's own tokens are not touched, so the
    # first token is still the copied one (transformers' options would forbid / penalise it).
    for controls in ({"no_repeat_ngram_size": 1}, {"repetition_penalty": 100.0}):
        out = _generate(model, tokenizer, texts, batch_size=3, max_new_tokens=6, **controls)
        assert all(o[0] == first for o in out), controls
        assert all(first not in o[1:] for o in out), controls


def test_processors_read_only_the_generated_columns():
    """On [prompt | generated] they act as transformers' processors on the generated part alone."""
    import torch
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    width, vocab = 7, 11
    for generated in (1, 2, 5, 9):
        ids = torch.randint(0, 4, (3, width + generated), generator=g)  # small alphabet: many repeats
        scores = torch.randn(3, vocab, generator=g)
        for n in (1, 2, 3):
            ours = GeneratedNoRepeatNGram(n, width)(ids, scores.clone())
            assert torch.equal(ours, NoRepeatNGramLogitsProcessor(n)(ids[:, width:], scores.clone()))
        ours = GeneratedRepetitionPenalty(1.7, width)(ids, scores.clone())
        assert torch.equal(ours, RepetitionPenaltyLogitsProcessor(1.7)(ids[:, width:], scores.clone()))

    # The prompt holds the bigram (5, 6) and token 9; nothing generated yet, then one 5.
    prompt = torch.tensor([[9, 5, 6, 9, 5]])
    scores = torch.zeros(1, 12) + 1.0
    assert torch.equal(GeneratedNoRepeatNGram(2, 5)(prompt, scores), scores)
    assert torch.equal(GeneratedRepetitionPenalty(2.0, 5)(prompt, scores), scores)
    after = torch.cat([prompt, torch.tensor([[5]])], dim=1)
    assert torch.isfinite(GeneratedNoRepeatNGram(2, 5)(after, scores)).all(), "6 may follow 5: (5, 6) is only in the prompt"
    penalised = GeneratedRepetitionPenalty(2.0, 5)(after, scores)
    assert penalised[0, 5] == 0.5 and penalised[0, 9] == 1.0 and penalised[0, 6] == 1.0


def test_settings_of_older_models_and_bad_values():
    old = {"prompt_template": TEMPLATE, "use_chat_template": True, "max_new_tokens": 8, "batch_size": 4}
    settings = GenerationSettings.from_dict(old)
    assert (settings.no_repeat_ngram_size, settings.repetition_penalty) == (0, 1.0)
    assert len(repetition_processors(settings, 10)) == 0
    assert GenerationSettings.from_dict(settings.to_dict()) == settings
    tuned = GenerationSettings.from_dict({**old, "no_repeat_ngram_size": 3, "repetition_penalty": 1.2})
    assert tuned.output_key() != settings.output_key() and len(repetition_processors(tuned, 10)) == 2
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        GenerationSettings(TEMPLATE, True, 8, no_repeat_ngram_size=-1)
    with pytest.raises(ValueError, match="repetition_penalty"):
        GenerationSettings(TEMPLATE, True, 8, repetition_penalty=0.0)
