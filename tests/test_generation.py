"""tasks/core/generation.py: batched generation equals one-by-one (repetition controls on or off), keeps
input order, cuts like training; the repetition controls look at generated tokens only. Its own greedy
loop gives transformers' `model.generate` text one row at a time, with prompts run row by row (the CPU
prefill) or as one batch with their shared prefix computed once or per row (the accelerator prefill),
rows leaving the batch at their stop token, on the scratch model, a PEFT-wrapped one and a Qwen2 with
its real chat template."""

from __future__ import annotations

import pytest
from conftest import sample_rows

import tasks.core.generation as generation
from tasks.core.generation import (
    GeneratedNoRepeatNGram,
    GeneratedRepetitionPenalty,
    GenerationSettings,
    _decode_until_eos,
    decodes_with_own_loop,
    encode_prompts,
    generate,
    greedy_config,
    repetition_processors,
    prefills_row_by_row,
    shared_prefix_length,
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
    bare = GenerationSettings(prompt_template="{text}", use_chat_template=False, max_new_tokens=4, batch_size=2)
    with pytest.raises(ValueError, match="text 1 gives an empty prompt"):
        generate(model, tokenizer, ["摘要", ""], bare)


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


# --- the own greedy loop ----------------------------------------------------------------------------


def _plain_one_by_one(model, tokenizer, texts, settings):
    """What a user writes: transformers' `model.generate` on one row at a time (sftflow's prompt tokens,
    stop tokens and repetition controls)."""
    import torch

    config = greedy_config(model, tokenizer, settings.max_new_tokens, use_chat_template=settings.use_chat_template)
    out = []
    with torch.inference_mode():
        for ids in encode_prompts(tokenizer, texts, settings):
            x = torch.tensor([ids])
            new = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config,
                                 logits_processor=repetition_processors(settings, len(ids)))[0, len(ids):]
            out.append(_decode_until_eos(tokenizer, new.tolist(), set(config.eos_token_id)))
    return out


def _settings(batch_size, max_new_tokens=8, template=TEMPLATE, use_chat_template=True, **kw):
    return GenerationSettings(prompt_template=template, use_chat_template=use_chat_template,
                              max_new_tokens=max_new_tokens, batch_size=batch_size, **kw)


def _decode_batch_sizes(model):
    """Record the number of rows of every one-column (decoding) forward."""
    sizes = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == 1:
            sizes.append(ids.shape[0])

    return sizes, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_shared_prefix_length():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 9]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2, "each row keeps at least its last token"
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_length([[5, 2], [1, 2]]) == 0
    assert shared_prefix_length([[1, 2, 3]]) == 0, "a single row has nothing to share"


def test_decoding_mask_is_an_additive_bias_over_the_prompt_and_new_columns():
    import torch

    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    bias = generation._attention_bias(mask, 3, torch.bfloat16)
    assert bias.shape == (2, 1, 1, 7) and bias.dtype == torch.bfloat16
    low = torch.finfo(torch.bfloat16).min
    assert bias[0, 0, 0].tolist() == [low, low, 0, 0, 0, 0, 0], "a row's left padding is hidden, its prompt and new tokens seen"
    assert bias[1, 0, 0].tolist() == [0] * 7


def _batched_prefill(monkeypatch):
    """Make `generate` prefill as on an accelerator (the whole batch at once, the shared prefix once)."""
    monkeypatch.setattr(generation, "prefills_row_by_row", lambda device: False)


@pytest.mark.parametrize("prefill", ["row by row", "batched"])
def test_own_loop_equals_model_generate_one_by_one(sharp_model, looping_model, monkeypatch, prefill):
    import torch

    assert prefills_row_by_row(torch.device("cpu")) and not prefills_row_by_row(torch.device("cuda", 0))
    if prefill == "batched":
        _batched_prefill(monkeypatch)
    model, tokenizer = sharp_model
    assert decodes_with_own_loop(model)
    texts = [r["text"][: 30 + 5 * i] for i, r in enumerate(sample_rows(12))]
    plain = _plain_one_by_one(model, tokenizer, texts, _settings(1))
    assert len(set(plain)) == len(texts) and all(plain)
    for batch_size in (1, 5, 12):
        assert generate(model, tokenizer, texts, _settings(batch_size)) == plain, batch_size
    model, tokenizer = looping_model
    controls = {"no_repeat_ngram_size": 3, "repetition_penalty": 1.2}
    plain = _plain_one_by_one(model, tokenizer, texts, _settings(1, 24, **controls))
    assert plain != _plain_one_by_one(model, tokenizer, texts, _settings(1, 24))
    assert generate(model, tokenizer, texts, _settings(12, 24, **controls)) == plain


def test_shared_prefix_computed_once_or_per_row_gives_the_same_text(sharp_model, monkeypatch):
    model, tokenizer = sharp_model
    texts = [r["text"][: 30 + 5 * i] for i, r in enumerate(sample_rows(12))]
    rows = encode_prompts(tokenizer, texts, _settings(12))
    assert shared_prefix_length(rows) >= len(TEMPLATE.split("{text}")[0]), "the template's instruction is shared"
    row_by_row = generate(model, tokenizer, texts, _settings(6))
    _batched_prefill(monkeypatch)
    prefix_forwards, handle = [], model.register_forward_pre_hook(
        lambda m, a, k: prefix_forwards.append(k["input_ids"].shape) if k["input_ids"].shape[0] == 1 else None, with_kwargs=True
    )
    try:
        shared = generate(model, tokenizer, texts, _settings(6))
    finally:
        handle.remove()
    assert prefix_forwards and all(shape[1] >= len(TEMPLATE.split("{text}")[0]) for shape in prefix_forwards)
    assert shared == row_by_row
    monkeypatch.setattr(generation, "shared_prefix_length", lambda rows: 0)
    assert generate(model, tokenizer, texts, _settings(6)) == shared


@pytest.mark.parametrize(("prefill", "leave_share"), [("row by row", 8), ("batched", 8), ("row by row", 10**6)])
def test_rows_leave_the_batch_at_their_stop_token_and_the_text_stays(sharp_model, monkeypatch, prefill, leave_share):
    """Finished rows leave in groups (an eighth of the batch, as shipped) or one by one (10**6)."""
    if prefill == "batched":
        _batched_prefill(monkeypatch)
    monkeypatch.setattr(generation, "LEAVE_SHARE", leave_share)
    model, tokenizer = sharp_model
    texts = [r["text"][: 30 + 5 * i] for i, r in enumerate(sample_rows(12))]
    # Make a character the model writes often a stop token as well: rows then end at different steps.
    free = generate(model, tokenizer, texts, _settings(12, 16))
    counts = {}
    for t in free:
        for ch in set(t[1:]):
            counts[ch] = counts.get(ch, 0) + 1
    stop_char = max(counts, key=counts.get)
    stop_id = tokenizer.convert_tokens_to_ids(stop_char)
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop_id]
    try:
        plain = _plain_one_by_one(model, tokenizer, texts, _settings(1, 16))
        sizes, handle = _decode_batch_sizes(model)
        try:
            batched = generate(model, tokenizer, texts, _settings(12, 16))
        finally:
            handle.remove()
    finally:
        model.generation_config.eos_token_id = saved
    lengths = sorted(len(t) for t in plain)
    assert len(set(lengths)) >= 3 and lengths[0] < 16, f"rows must stop at different steps: {lengths}"
    assert batched == plain
    assert sizes[0] == 12 and sizes[-1] < 12 and sizes == sorted(sizes, reverse=True), sizes


def test_own_loop_equals_the_model_generate_path(sharp_model, monkeypatch):
    """The path other models take (`model.generate` on left-padded batches) writes the same text."""
    model, tokenizer = sharp_model
    texts = [r["text"][: 30 + 5 * i] for i, r in enumerate(sample_rows(12))]
    own = generate(model, tokenizer, texts, _settings(5, no_repeat_ngram_size=2))
    monkeypatch.setattr(generation, "decodes_with_own_loop", lambda model: False)
    assert generate(model, tokenizer, texts, _settings(5, no_repeat_ngram_size=2)) == own


def test_which_models_the_own_loop_decodes(sharp_model):
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, MistralConfig

    model, tokenizer = sharp_model
    assert not decodes_with_own_loop(object())
    sliding = MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, sliding_window=8)
    assert not decodes_with_own_loop(AutoModelForCausalLM.from_config(sliding))
    # PEFT: the wrapper forwards `cache` and `position_ids` to the model; the adapter's B is 0 at first.
    texts = [r["text"][:40] for r in sample_rows(4)]
    before = generate(model, tokenizer, texts, _settings(4))
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert decodes_with_own_loop(peft_model)
    with torch.no_grad():
        assert generate(peft_model, tokenizer, texts, _settings(4)) == before


@pytest.fixture(scope="module")
def qwen2_chat(tmp_path_factory):
    """A tiny Qwen2 with Qwen2.5's real tokenizer and chat template (system turn, `<|im_end|>`), sharp weights."""
    from real_tokenizers import tiny_model

    return _random_weights(tiny_model("qwen2", tmp_path_factory.mktemp("qwen2-chat")), 0.3)


def test_real_chat_template_shares_its_system_turn_and_matches_one_by_one(qwen2_chat, monkeypatch):
    model, tokenizer = qwen2_chat
    assert decodes_with_own_loop(model)
    texts = [r["text"][: 20 + 7 * i] for i, r in enumerate(sample_rows(8))]
    settings = _settings(8, 10)
    rows = encode_prompts(tokenizer, texts, settings)
    system_turn = tokenizer("<|im_start|>system", add_special_tokens=False)["input_ids"]
    assert rows[0][: len(system_turn)] == system_turn and shared_prefix_length(rows) > len(system_turn) + 5
    plain = _plain_one_by_one(model, tokenizer, texts, settings)
    assert len(set(plain)) >= len(texts) - 1, plain
    assert generate(model, tokenizer, texts, settings) == plain  # row by row
    _batched_prefill(monkeypatch)
    assert generate(model, tokenizer, texts, settings) == plain
    assert generate(model, tokenizer, texts, _settings(3, 10)) == plain
    monkeypatch.setattr(generation, "shared_prefix_length", lambda rows: 0)
    assert generate(model, tokenizer, texts, settings) == plain
