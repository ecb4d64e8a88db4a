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
