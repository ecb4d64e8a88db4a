"""The prompt template: one function turns a text into the model's input, for train, evaluate and serve."""

from __future__ import annotations

from typing import Any


def build_prompt(text: str, template: str, tokenizer: Any | None = None, use_chat_template: bool = True) -> str:
    """Fill the template with the text; wrap it in the tokenizer's chat template when it has one.

    Args:
        text: the source text.
        template: a string with the `{text}` placeholder (params `data.prompt_template`).
        tokenizer: a Hugging Face tokenizer, or None.
        use_chat_template: use `tokenizer.chat_template` when the tokenizer defines one.

    Returns:
        The prompt string; the summary follows it directly.
    """
    content = template.replace("{text}", text)
    if use_chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    return content


def encode_example(
    tokenizer: Any,
    text: str,
    summary: str,
    template: str,
    use_chat_template: bool,
    max_source_length: int,
    max_target_length: int,
) -> dict[str, Any]:
    """Turn one (text, summary) pair into training features: the loss falls on the summary only.

    The prompt (template + text, chat-wrapped when the tokenizer has a chat template) is tokenized
    exactly as generation tokenizes it, then the summary tokens and eos follow. When the prompt is
    longer than `max_source_length` tokens the *text* is cut (the template's instruction and answer
    cue are kept). A summary longer than `max_target_length` tokens is cut too, and then carries no
    eos (the model must not learn to stop there); both cuts are flagged so callers count them.

    Args:
        tokenizer: a Hugging Face tokenizer with an eos token.
        text: the source text.
        summary: the reference summary.
        template: the prompt template with `{text}` (params `data.prompt_template`).
        use_chat_template: wrap the prompt in the tokenizer's chat template when it has one.
        max_source_length: most prompt tokens.
        max_target_length: most summary tokens, eos included.

    Returns:
        `input_ids`, `attention_mask`, `labels` (-100 on prompt tokens), `truncated_source`,
        `truncated_target`.

    Raises:
        ValueError: the tokenizer has no eos token, or the template alone does not fit
            `max_source_length`.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; set one so the model learns where a summary ends")
    chat = bool(use_chat_template and getattr(tokenizer, "chat_template", None))

    def prompt_ids(source: str) -> list[int]:
        prompt = build_prompt(source, template, tokenizer, use_chat_template)
        # A chat template already spells out its special tokens; a plain prompt gets the usual ones.
        return tokenizer(prompt, add_special_tokens=not chat)["input_ids"]

    ids = prompt_ids(text)
    truncated_source = len(ids) > max_source_length
    if truncated_source:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        keep = len(offsets)
        # Cut the text at a token boundary; retokenising can shift a token or two, so tighten until it fits.
        while len(ids) > max_source_length and keep > 0:
            keep = max(0, keep - (len(ids) - max_source_length))
            ids = prompt_ids(text[: offsets[keep - 1][1]] if keep else "")
        if len(ids) > max_source_length:
            raise ValueError(
                f"the prompt template alone takes {len(ids)} tokens, more than max_source_length={max_source_length}"
            )

    target = tokenizer(summary, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    truncated_target = len(target) > max_target_length
    if truncated_target:
        target = target[:max_target_length]
    return {
        "input_ids": ids + target,
        "attention_mask": [1] * (len(ids) + len(target)),
        "labels": [-100] * len(ids) + target,
        "truncated_source": truncated_source,
        "truncated_target": truncated_target,
    }


def collate_features(features: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad encoded examples into tensors (labels padded with -100); extra keys are dropped."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for f in features:
        pad = width - len(f["input_ids"])
        batch["input_ids"].append(list(f["input_ids"]) + [pad_token_id] * pad)
        batch["attention_mask"].append(list(f["attention_mask"]) + [0] * pad)
        batch["labels"].append(list(f["labels"]) + [-100] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def summary_loss(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    *,
    template: str,
    use_chat_template: bool,
    max_source_length: int,
    max_target_length: int,
    batch_size: int = 16,
) -> float:
    """Mean cross-entropy per summary token (eos included) of the reference summaries, no grad.

    Every summary token weighs the same, whatever its batch, so the figure does not depend on
    `batch_size`. Rows are batched by length to cut padding.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        rows: dicts with `text` and `summary`.
        template: the prompt template (params `data.prompt_template`).
        use_chat_template: as in `encode_example`.
        max_source_length: as in `encode_example`.
        max_target_length: as in `encode_example`.
        batch_size: rows per forward pass.

    Returns:
        The mean loss in nats per token.

    Raises:
        ValueError: no rows.
    """
    import torch

    if not rows:
        raise ValueError("summary_loss needs at least one row")
    features = [
        encode_example(
            tokenizer, r["text"], r["summary"], template, use_chat_template, max_source_length, max_target_length
        )
        for r in rows
    ]
    features.sort(key=lambda f: len(f["input_ids"]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(features), batch_size):
                batch = collate_features(features[start : start + batch_size], pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = batch["labels"][:, 1:]
                losses = torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                    labels.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
                total += losses.item()
                count += int((labels != -100).sum())
    finally:
        model.train(was_training)
    return total / count
