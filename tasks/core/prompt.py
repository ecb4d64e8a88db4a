"""The conversation a model sees: one function turns a text into the model's prompt, one turns a (text,
summary) pair into training features, for train, evaluate, quantize, select and serve alike.

Without a chat template the prompt is `data.prompt_template` filled with the text, and the answer is
the summary followed by the tokenizer's eos. With one (the tokenizer's `chat_template`, when
`data.use_chat_template`), the prompt is the user turn rendered with the generation prompt, and the
answer is exactly what the template writes as the assistant's turn: its content, then the template's
end-of-turn token (`<|im_end|>` for Qwen2, `<|eot_id|>` for Llama 3, `<|end|>` for Phi-3, eos for
Mistral). Those are the tokens that carry loss, and the end-of-turn token is one of those generation
stops on (`tasks.core.generation.stop_token_ids`). `chat_format` finds the assistant's span by rendering
the template once with and once without an answer; a template where it cannot be found fails with
`ChatTemplateError` before any training step.

Templates that write today's date (Llama 3's "Today Date: …") get a fixed `date_string`, so the same
conversation is rendered in training and in serving, whatever the day.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from tasks.core.errors import StageError

# Llama 3.x templates read `date_string` (falling back to today's date); this is their own default.
TEMPLATE_DATE = "26 Jul 2024"
_PROBE_QUESTION = "sftflow-probe-question"
_PROBE_ANSWER = "sftflow-probe-answer"
_FIX = "fix the tokenizer's chat template (chat_template.jinja / tokenizer_config.json) or set data.use_chat_template: false"


class ChatTemplateError(StageError, ValueError):
    """The tokenizer's chat template cannot frame a summary: its assistant turn cannot be located."""


@dataclass(frozen=True)
class ChatFormat:
    """How a chat template frames the assistant's answer.

    Attributes:
        end_of_turn: the token that closes an assistant turn (`<|im_end|>`, `<|eot_id|>`, eos...).
        end_of_turn_id: its id.
        suffix: everything the template writes after the answer (starts with `end_of_turn` when not empty).
    """

    end_of_turn: str
    end_of_turn_id: int
    suffix: str


_FORMATS: weakref.WeakKeyDictionary[Any, tuple[str, ChatFormat]] = weakref.WeakKeyDictionary()


def uses_chat_template(tokenizer: Any, use_chat_template: bool) -> bool:
    """True when prompts go through the tokenizer's chat template (`data.use_chat_template` and it has one)."""
    return bool(use_chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None))


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, date_string=TEMPLATE_DATE
        )
    except Exception as e:  # jinja's TemplateError, raise_exception() in the template, a missing variable
        raise ChatTemplateError(f"the chat template fails to render a user/assistant conversation: {e}; {_FIX}") from e


def _conversation(content: str, answer: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def _is_special(tokenizer: Any, token_id: int) -> bool:
    added = tokenizer.added_tokens_decoder.get(token_id)
    return token_id in tokenizer.all_special_ids or bool(added is not None and added.special)


def chat_format(tokenizer: Any) -> ChatFormat:
    """Where the tokenizer's chat template puts the assistant's answer, and which token ends it.

    The template is rendered for one user turn with the generation prompt, and for the same turn plus an
    answer; the second must continue the first with the answer itself, then the end of the turn. That
    ending must be empty (the answer then ends with eos) or start with a special token: the token the
    model learns to write last and generation stops on. Computed once per tokenizer and template.

    Raises:
        ChatTemplateError: the tokenizer has no chat template, the template fails to render, the
            conversation with an answer does not start with the generation prompt, the answer does
            not follow it directly, or the turn ends without a special token.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ChatTemplateError("the tokenizer has no chat template")
    cached = _FORMATS.get(tokenizer)
    if cached is not None and cached[0] == template:
        return cached[1]
    prompt = _render(tokenizer, _conversation(_PROBE_QUESTION), add_generation_prompt=True)
    full = _render(tokenizer, _conversation(_PROBE_QUESTION, _PROBE_ANSWER), add_generation_prompt=False)
    if not full.startswith(prompt):
        common = next((n for n, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
        raise ChatTemplateError(
            "the chat template's assistant turn cannot be located: with an answer it renders "
            f"{full[common:common + 60]!r} where the generation prompt has {prompt[common:common + 60]!r} "
            f"(after {prompt[max(0, common - 40):common]!r}), so the prompt a model is trained on would differ "
            f"from the one it is served; {_FIX}"
        )
    rest = full[len(prompt):]
    at = rest.find(_PROBE_ANSWER)
    if at != 0:
        where = "drops the answer" if at < 0 else f"writes {rest[:at]!r} between the generation prompt and the answer"
        raise ChatTemplateError(f"the chat template's assistant turn cannot be located: it {where}; {_FIX}")
    suffix = rest[len(_PROBE_ANSWER):]
    if not suffix.strip():
        if tokenizer.eos_token_id is None:
            raise ChatTemplateError(f"the chat template ends the assistant's turn with nothing and the tokenizer has no eos; {_FIX}")
        fmt = ChatFormat(tokenizer.eos_token, tokenizer.eos_token_id, suffix)
    else:
        first = tokenizer(suffix, add_special_tokens=False)["input_ids"][0]
        if not _is_special(tokenizer, first):
            raise ChatTemplateError(
                f"the chat template ends the assistant's turn with {suffix!r}, which does not start with a special "
                f"token, so there is no token that says an answer is over; {_FIX}"
            )
        fmt = ChatFormat(tokenizer.convert_ids_to_tokens(first), first, suffix)
    _FORMATS[tokenizer] = (template, fmt)
    return fmt


def check_chat_template(tokenizer: Any, use_chat_template: bool) -> ChatFormat | None:
    """The chat format the features will use (None: plain prompt, answers end with eos); raises early when unusable.

    Raises:
        ChatTemplateError: the template's assistant turn cannot be located (see `chat_format`).
        ValueError: no chat template and the tokenizer has no eos token.
    """
    if uses_chat_template(tokenizer, use_chat_template):
        return chat_format(tokenizer)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; set one so the model learns where a summary ends")
    return None


def build_prompt(text: str, template: str, tokenizer: Any | None = None, use_chat_template: bool = True) -> str:
    """Fill the template with the text; wrap it in the tokenizer's chat template when it has one.

    Args:
        text: the source text.
        template: a string with the `{text}` placeholder (params `data.prompt_template`).
        tokenizer: a Hugging Face tokenizer, or None.
        use_chat_template: use `tokenizer.chat_template` when the tokenizer defines one.

    Returns:
        The prompt string; the answer follows it directly.
    """
    content = template.replace("{text}", text)
    if uses_chat_template(tokenizer, use_chat_template):
        return _render(tokenizer, _conversation(content), add_generation_prompt=True)
    return content


def encode_prompt(
    tokenizer: Any, text: str, template: str, use_chat_template: bool, max_source_length: int | None = None
) -> tuple[list[int], bool]:
    """The prompt's token ids, exactly as training and generation feed them, and whether the text was cut.

    When the prompt is longer than `max_source_length` tokens the *text* is cut at a token boundary
    (the template's instruction and answer cue are kept).

    Raises:
        ValueError: the template alone does not fit `max_source_length`.
    """
    chat = uses_chat_template(tokenizer, use_chat_template)

    def ids_of(source: str) -> list[int]:
        prompt = build_prompt(source, template, tokenizer, use_chat_template)
        # A chat template already spells out its special tokens (BOS...); a plain prompt gets the usual ones.
        return tokenizer(prompt, add_special_tokens=not chat)["input_ids"]

    ids = ids_of(text)
    if max_source_length is None or len(ids) <= max_source_length:
        return ids, False
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    keep = len(offsets)
    # Cut the text at a token boundary; retokenising can shift a token or two, so tighten until it fits.
    while len(ids) > max_source_length and keep > 0:
        keep = max(0, keep - (len(ids) - max_source_length))
        ids = ids_of(text[: offsets[keep - 1][1]] if keep else "")
    if len(ids) > max_source_length:
        raise ValueError(
            f"the prompt template alone takes {len(ids)} tokens, more than max_source_length={max_source_length}"
        )
    return ids, True


def answer_ids(tokenizer: Any, text: str, summary: str, template: str, use_chat_template: bool) -> list[int]:
    """The tokens the model learns to write for a summary: the answer as the chat template writes it, then its
    end-of-turn token; without a chat template the summary, then eos.

    Raises:
        ChatTemplateError: the template frames this row's answer unlike `chat_format` found.
        ValueError: no chat template and the tokenizer has no eos token.
    """
    fmt = check_chat_template(tokenizer, use_chat_template)
    if fmt is None:
        return tokenizer(summary, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    content = template.replace("{text}", text)
    prompt = _render(tokenizer, _conversation(content), add_generation_prompt=True)
    full = _render(tokenizer, _conversation(content, summary), add_generation_prompt=False)
    if not (full.startswith(prompt) and full.endswith(fmt.suffix)):
        raise ChatTemplateError(
            f"the chat template frames the answer {summary[:40]!r} unlike its probe answer (it should follow the "
            f"generation prompt and end with {fmt.suffix!r}); {_FIX}"
        )
    # The template's own rendering of the answer (some trim it), tokenized as the model writes it after the prompt.
    answer = full[len(prompt): len(full) - len(fmt.suffix)]
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [fmt.end_of_turn_id]


def encode_example(
    tokenizer: Any,
    text: str,
    summary: str,
    template: str,
    use_chat_template: bool,
    max_source_length: int,
    max_target_length: int,
) -> dict[str, Any]:
    """Turn one (text, summary) pair into training features: the loss falls on the answer only.

    The prompt (`encode_prompt`: template + text, chat-wrapped when the tokenizer has a chat template)
    is tokenized exactly as generation tokenizes it, then the answer follows (`answer_ids`: the summary
    and the token that ends it, the chat template's end-of-turn token or eos). A prompt longer than
    `max_source_length` tokens has its *text* cut. An answer longer than `max_target_length` tokens is
    cut too, and then carries no end token (the model must not learn to stop there); both cuts are
    flagged so callers count them. Padding never masks the end token: `collate_features` pads by length.

    Args:
        tokenizer: a Hugging Face tokenizer (an eos token, or a chat template that ends its turns).
        text: the source text.
        summary: the reference summary.
        template: the prompt template with `{text}` (params `data.prompt_template`).
        use_chat_template: wrap the prompt in the tokenizer's chat template when it has one.
        max_source_length: most prompt tokens.
        max_target_length: most answer tokens, the end token included.

    Returns:
        `input_ids`, `attention_mask`, `labels` (-100 on prompt tokens), `truncated_source`,
        `truncated_target`.

    Raises:
        ChatTemplateError: the chat template's assistant turn cannot be located.
        ValueError: no chat template and no eos token, or the template alone does not fit
            `max_source_length`.
    """
    target = answer_ids(tokenizer, text, summary, template, use_chat_template)
    ids, truncated_source = encode_prompt(tokenizer, text, template, use_chat_template, max_source_length)
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


def collate_features(features: list[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """Right-pad encoded examples into tensors (labels padded with -100) as wide as the longest, rounded up
    to a multiple of `pad_to_multiple_of`; extra keys are dropped."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
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
    """Mean cross-entropy per answer token (the end token included) of the reference summaries, no grad.

    Every answer token weighs the same, whatever its batch, so the figure does not depend on
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
