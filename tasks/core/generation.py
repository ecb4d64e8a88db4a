"""Greedy, deterministic, batched summary generation: the one generation path for evaluate, quantize,
select and serve.

Rows are sorted by prompt length so each batch holds prompts of similar length (little padding),
padded on the left so every row's next token sits in the last column, and decoded with the KV cache.
Results come back in input order. Batched and one-by-one generation give the same text: transformers
builds `position_ids` from the attention mask, so a left-padded row sees exactly the positions it would
see alone, and padded keys are masked out.

Repetition controls (`no_repeat_ngram_size`, `repetition_penalty`) are our own logits processors
(`repetition_processors`), which look only at the tokens generated after the prompt. transformers' own
act on the whole sequence, prompt included, in a decoder-only model: they forbid copying an n-gram of
the source and, with pad = eos, penalise eos in left-padded rows, so batched would differ from
one-by-one. The prompt width is the input width, and left padding puts every row's first generated
token in the same column, so "generated" is `input_ids[:, prompt_width:]` for every row.

A row stops at the first of its stop tokens (`stop_token_ids`): every eos the generation config
names, the tokenizer's eos, and the chat template's end-of-turn token. A model trained on a chat
template ends its answer with the latter (Qwen2's `<|im_end|>`), which a base model's generation
config usually does not list.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tasks.core.prompt import ChatTemplateError, chat_format, encode_prompt, uses_chat_template

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """How a summary is generated: everything that changes the text, plus the batch size (which does not).

    Attributes:
        prompt_template: the `{text}` template (params `data.prompt_template`).
        use_chat_template: wrap the prompt in the tokenizer's chat template when it has one.
        max_new_tokens: generation stops at a stop token (`stop_token_ids`) or after this many new tokens.
        max_source_length: when set, a longer prompt has its *text* cut exactly as training cuts it
            (`tasks.core.prompt.encode_prompt`), so the model sees at test time what it was trained on.
        batch_size: prompts per forward pass (batched and one-by-one generation give the same text).
        no_repeat_ngram_size: when > 0, no n-gram of this size occurs twice among the generated tokens
            (the prompt is not looked at: a source n-gram may be copied).
        repetition_penalty: when != 1, a token already generated has its logit divided by this (multiplied
            when negative), as in transformers but over the generated tokens only.
    """

    prompt_template: str
    use_chat_template: bool
    max_new_tokens: int
    max_source_length: int | None = None
    batch_size: int = 32
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @classmethod
    def of(cls, params: Any) -> GenerationSettings:
        """The settings the params name (`tasks.core.config.GENERATION_KEYS`; a stage's slice or `Params`)."""
        return cls(
            prompt_template=params.data.prompt_template,
            use_chat_template=params.data.use_chat_template,
            max_new_tokens=params.evaluate.max_new_tokens,
            max_source_length=params.train.max_source_length,
            batch_size=params.evaluate.batch_size,
            no_repeat_ngram_size=params.evaluate.no_repeat_ngram_size,
            repetition_penalty=params.evaluate.repetition_penalty,
        )

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> GenerationSettings:
        """From a logged model's `sftflow.json` (which holds more keys: language, quantization).

        A model registered before the repetition controls existed lacks them: it generated without
        them, which their defaults (0 and 1.0) reproduce.
        """
        return cls(
            prompt_template=settings["prompt_template"],
            use_chat_template=bool(settings["use_chat_template"]),
            max_new_tokens=int(settings["max_new_tokens"]),
            max_source_length=settings.get("max_source_length"),
            batch_size=int(settings["batch_size"]),
            no_repeat_ngram_size=int(settings.get("no_repeat_ngram_size", 0)),
            repetition_penalty=float(settings.get("repetition_penalty", 1.0)),
        )

    def output_key(self) -> dict[str, Any]:
        """The settings that change what is generated (the batch size does not): a cache key's part."""
        return {k: v for k, v in asdict(self).items() if k != "batch_size"}

    def to_dict(self) -> dict[str, Any]:
        """All settings as a JSON-safe dict (the registered model's `sftflow.json` holds them)."""
        return asdict(self)


def generate(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    settings: GenerationSettings,
    *,
    progress: bool = False,
) -> list[str]:
    """Generate one summary per text with greedy decoding.

    Args:
        model: a Hugging Face causal LM (any device; inputs follow `model.device`).
        tokenizer: its tokenizer (pad token set; `load_model_and_tokenizer` guarantees it).
        texts: source texts.
        settings: prompt, length limits and batch size.
        progress: show a tqdm bar over batches.

    Returns:
        The generated summaries (new tokens before the first stop token, special tokens skipped,
        whitespace stripped), in the order of `texts`. A row whose first new token is a stop token
        yields "" (the caller counts it).
    """
    import torch
    from tqdm.auto import tqdm

    batch_size, max_new_tokens = settings.batch_size, settings.max_new_tokens
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts = list(texts)
    if not texts:
        return []
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; load it with tasks.core.modeling.load_model_and_tokenizer")

    prompt_ids = encode_prompts(tokenizer, texts, settings)
    lengths = [len(ids) for ids in prompt_ids]
    # Longest first: the widest batch runs first (memory errors show at once) and padding stays small.
    order = sorted(range(len(texts)), key=lambda i: (-lengths[i], i))
    context = getattr(model.config, "max_position_embeddings", None)
    if context and max(lengths) + max_new_tokens > context:
        log.warning(
            "the longest prompt (%d tokens) + max_new_tokens (%d) exceeds the model context (%d); "
            "its output is unreliable: shorten the texts (validate.max_text_chars) or max_new_tokens",
            max(lengths), max_new_tokens, context,
        )

    gen_config = greedy_config(model, tokenizer, max_new_tokens, use_chat_template=settings.use_chat_template)
    eos_ids = set(_as_list(gen_config.eos_token_id))
    was_training = model.training
    model.eval()
    outputs: list[str] = [""] * len(texts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress):
                input_ids, attention_mask = _left_pad([prompt_ids[i] for i in batch], tokenizer.pad_token_id)
                out = model.generate(
                    input_ids=input_ids.to(model.device),
                    attention_mask=attention_mask.to(model.device),
                    generation_config=gen_config,
                    logits_processor=repetition_processors(settings, input_ids.shape[1]),
                )
                new_tokens = out[:, input_ids.shape[1] :].tolist()
                for i, ids in zip(batch, new_tokens):
                    outputs[i] = _decode_until_eos(tokenizer, ids, eos_ids)
    finally:
        model.train(was_training)
    return outputs


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """Left-pad token id lists into (input_ids, attention_mask) tensors: the last column is every row's last token."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for n, r in enumerate(rows):
        if r:
            ids[n, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[n, width - len(r) :] = 1
    return ids, mask


def encode_prompts(tokenizer: Any, texts: Sequence[str], settings: GenerationSettings) -> list[list[int]]:
    """The prompt token ids the model sees for each text (generate and the app's streaming share it).

    With `settings.max_source_length` the text is cut exactly as training cuts it (`encode_prompt`).
    """
    prompt_ids, truncated = [], 0
    for t in texts:
        ids, cut = encode_prompt(tokenizer, t, settings.prompt_template, settings.use_chat_template, settings.max_source_length)
        prompt_ids.append(ids)
        truncated += cut
    if truncated:
        log.info("%d of %d texts cut to fit max_source_length=%d tokens", truncated, len(texts), settings.max_source_length)
    return prompt_ids


def stop_token_ids(model: Any, tokenizer: Any, use_chat_template: bool = True) -> list[int]:
    """Every token that ends an answer, in this order, without repeats: the eos (one or a list) of the
    model's generation config, the tokenizer's eos, and the end-of-turn token of the chat template when
    prompts go through it (`tasks.core.prompt.chat_format`).

    A template whose assistant turn cannot be located adds no token (training refuses such a template;
    a zero-shot candidate may still carry one): a warning says so.

    Raises:
        ValueError: none of them defines a token.
    """
    config = getattr(model, "generation_config", None)
    ids = [*_as_list(getattr(config, "eos_token_id", None)), *_as_list(tokenizer.eos_token_id)]
    if uses_chat_template(tokenizer, use_chat_template):
        try:
            ids.append(chat_format(tokenizer).end_of_turn_id)
        except ChatTemplateError as e:
            log.warning("generation stops only on eos: %s", e)
    if not ids:
        raise ValueError("neither the model's generation config nor the tokenizer defines an eos token")
    return list(dict.fromkeys(ids))


def greedy_config(model: Any, tokenizer: Any, max_new_tokens: int, use_chat_template: bool = True) -> Any:
    """The model's generation config made plain greedy (no sampling, beams or penalties from the hub),
    stopping on every stop token (`stop_token_ids`).

    It carries no repetition controls: those are `repetition_processors(settings, prompt_width)`,
    passed beside it as `model.generate(..., generation_config=..., logits_processor=...)` by
    `generate` and the app's streaming alike.
    """
    from transformers import GenerationConfig

    base = model.generation_config if model.generation_config is not None else GenerationConfig()
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_token_ids(model, tokenizer, use_chat_template),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=base.bos_token_id,
        use_cache=True,
    )


def repetition_processors(settings: GenerationSettings, prompt_width: int) -> Any:
    """The `LogitsProcessorList` of the settings' repetition controls, looking only at the columns from
    `prompt_width` on (the generated tokens). Empty when both are off.

    Args:
        settings: `no_repeat_ngram_size` and `repetition_penalty`.
        prompt_width: the width of the input handed to `model.generate` (left-padded: every row's
            generated tokens start there).
    """
    from transformers import LogitsProcessorList

    processors = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        processors.append(GeneratedRepetitionPenalty(settings.repetition_penalty, prompt_width))
    if settings.no_repeat_ngram_size > 0:
        processors.append(GeneratedNoRepeatNGram(settings.no_repeat_ngram_size, prompt_width))
    return processors


class GeneratedRepetitionPenalty:
    """transformers' `RepetitionPenaltyLogitsProcessor` over the generated tokens only: a token that was
    generated before has its logit divided by `penalty` (multiplied when the logit is negative)."""

    def __init__(self, penalty: float, prompt_width: int) -> None:
        if not penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
        self.penalty, self.prompt_width = float(penalty), int(prompt_width)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        generated = input_ids[:, self.prompt_width :]
        if generated.shape[1] == 0:
            return scores
        picked = torch.gather(scores, 1, generated)
        picked = torch.where(picked < 0, picked * self.penalty, picked / self.penalty)
        return scores.scatter(1, generated, picked)


class GeneratedNoRepeatNGram:
    """transformers' `NoRepeatNGramLogitsProcessor` over the generated tokens only: a token that would
    complete an n-gram already generated in this row gets -inf (a prompt n-gram may be generated)."""

    def __init__(self, ngram_size: int, prompt_width: int) -> None:
        if ngram_size < 1:
            raise ValueError(f"no_repeat_ngram_size must be >= 1 here, got {ngram_size}")
        self.n, self.prompt_width = int(ngram_size), int(prompt_width)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        generated = input_ids[:, self.prompt_width :]
        n, length = self.n, generated.shape[1]
        if length + 1 < n:
            return scores
        scores = scores.clone()
        for row, ids in enumerate(generated.tolist()):
            prefix = tuple(ids[length - n + 1 :]) if n > 1 else ()
            banned = {ids[i + n - 1] for i in range(length - n + 1) if tuple(ids[i : i + n - 1]) == prefix}
            if banned:
                scores[row, sorted(banned)] = float("-inf")
        return scores


def _decode_until_eos(tokenizer: Any, ids: list[int], eos_ids: set[int]) -> str:
    """Decode the tokens before the first stop token (what follows it is padding)."""
    for n, t in enumerate(ids):
        if t in eos_ids:
            ids = ids[:n]
            break
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def _as_list(x: Any) -> list[int]:
    """An int or a list of ints as a list."""
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [int(x)]

