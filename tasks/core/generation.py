"""Greedy, deterministic, batched summary generation: the one generation path for evaluate, quantize,
select and serve.

Rows are sorted by prompt length so each batch holds prompts of similar length (little padding),
padded on the left so every row's next token sits in the last column, and decoded with the KV cache.
Results come back in input order. Batched and one-by-one generation give the same text: transformers
builds `position_ids` from the attention mask, so a left-padded row sees exactly the positions it would
see alone, and padded keys are masked out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tasks.core.prompt import build_prompt, encode_example

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """How a summary is generated: everything that changes the text, plus the batch size (which does not).

    Attributes:
        prompt_template: the `{text}` template (params `data.prompt_template`).
        use_chat_template: wrap the prompt in the tokenizer's chat template when it has one.
        max_new_tokens: generation stops at eos or after this many new tokens.
        max_source_length: when set, a longer prompt has its *text* cut exactly as training cuts it
            (`tasks.core.prompt.encode_example`), so the model sees at test time what it was trained on.
        batch_size: prompts per forward pass (batched and one-by-one generation give the same text).
    """

    prompt_template: str
    use_chat_template: bool
    max_new_tokens: int
    max_source_length: int | None = None
    batch_size: int = 32

    @classmethod
    def of(cls, params: Any) -> GenerationSettings:
        """The settings the params name (`tasks.core.config.GENERATION_KEYS`; a stage's slice or `Params`)."""
        return cls(
            prompt_template=params.data.prompt_template,
            use_chat_template=params.data.use_chat_template,
            max_new_tokens=params.evaluate.max_new_tokens,
            max_source_length=params.train.max_source_length,
            batch_size=params.evaluate.batch_size,
        )

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> GenerationSettings:
        """From a logged model's `sftflow.json` (which holds more keys: language, quantization)."""
        return cls(
            prompt_template=settings["prompt_template"],
            use_chat_template=bool(settings["use_chat_template"]),
            max_new_tokens=int(settings["max_new_tokens"]),
            max_source_length=settings.get("max_source_length"),
            batch_size=int(settings["batch_size"]),
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
        The generated summaries (new tokens only, special tokens skipped, whitespace stripped), in the
        order of `texts`. A row whose first new token is eos yields "" (the caller counts it).
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

    gen_config = greedy_config(model, tokenizer, max_new_tokens)
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

    With `settings.max_source_length` the text is cut exactly as training cuts it (`encode_example`).
    """
    prompt_template, use_chat_template = settings.prompt_template, settings.use_chat_template
    max_source_length = settings.max_source_length
    if max_source_length is None:
        has_chat = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
        prompts = [build_prompt(t, prompt_template, tokenizer, use_chat_template) for t in texts]
        # A chat template already spells out BOS and friends; adding them again would double them.
        return tokenizer(prompts, add_special_tokens=not has_chat)["input_ids"]
    prompt_ids = []
    truncated = 0
    for t in texts:
        # The prompt part of a training example (labels -100), for an empty summary.
        f = encode_example(tokenizer, t, "", prompt_template, use_chat_template, max_source_length, 1)
        prompt_ids.append([i for i, label in zip(f["input_ids"], f["labels"]) if label == -100])
        truncated += f["truncated_source"]
    if truncated:
        log.info("%d of %d texts cut to fit max_source_length=%d tokens", truncated, len(texts), max_source_length)
    return prompt_ids


def greedy_config(model: Any, tokenizer: Any, max_new_tokens: int) -> Any:
    """The model's generation config made plain greedy: no sampling, beams or penalties from the hub."""
    from transformers import GenerationConfig

    base = model.generation_config if model.generation_config is not None else GenerationConfig()
    eos = base.eos_token_id if base.eos_token_id is not None else tokenizer.eos_token_id
    if eos is None:
        raise ValueError("neither the model's generation config nor the tokenizer defines an eos token")
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=base.bos_token_id,
        use_cache=True,
    )


def _decode_until_eos(tokenizer: Any, ids: list[int], eos_ids: set[int]) -> str:
    """Decode the tokens before the first eos (what follows it is padding)."""
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

