"""Greedy, deterministic, batched summary generation: the one generation path for evaluate, quantize,
select and serve.

Rows are sorted by prompt length so each batch holds prompts of similar length (little padding),
padded on the left so every row's next token sits in the last column, and decoded with the KV cache.
Results come back in input order. Batched and one-by-one generation give the same text: every row gets
the positions it would have alone, and padded keys are masked out.

A Hugging Face decoder is decoded by our own greedy loop (`_greedy_batch`), not `model.generate`,
because it does what `generate` cannot:

- on a CPU each prompt goes through the model alone (`prefills_row_by_row`: no padding computed, the
  causal attention kernel, activations that stay in cache), its keys and values written straight into
  its row of the batch's cache; the decoding steps then run on the whole batch;
- on an accelerator the prompts go through at once, and the tokens every row of the batch begins with
  (the template's instruction; with a chat template also its system turn) only once: their keys and
  values are copied to every row, laid out `[shared prefix | padding | rest of its prompt]` with
  explicit position ids, so each row sees exactly the positions it would see alone;
- the keys and values live in one buffer allocated per batch for the prompt plus `max_new_tokens`
  (`_buffer_cache`): a step writes one column in place, where transformers' `DynamicCache` copies the
  whole cache to append it (on the benchmark model at batch 32 a step took 9.3 ms of CPU time instead of 11.6);
- the decoding steps take the padding mask as one additive bias built per batch (`_attention_bias`),
  sliced per step: no 2D mask grown and turned into a 4D one by transformers at every step, and SDPA's
  CPU kernel reads it faster than a boolean one (the generation benchmark took 3% less CPU time);
- rows leave the batch after their stop token (in groups: `LEAVE_SHARE`), so later steps compute only
  the rows still writing.

Other models (a ZeRO-3 partitioned one, which needs `generate`'s `synced_gpus`; a GGUF model; a model
whose cache is not plain full attention, e.g. a sliding window) go through `model.generate` with the
same greedy config and processors.

Repetition controls (`no_repeat_ngram_size`, `repetition_penalty`) are our own logits processors
(`repetition_processors`), which look only at the tokens generated after the prompt. transformers' own
act on the whole sequence, prompt included, in a decoder-only model: they forbid copying an n-gram of
the source and, with pad = eos, penalise eos in left-padded rows, so batched would differ from
one-by-one. With `model.generate` the prompt width is the input width, and left padding puts every
row's first generated token in the same column, so "generated" is `input_ids[:, prompt_width:]` for
every row; our loop hands them the generated tokens alone (`prompt_width` 0).

A row stops at the first of its stop tokens (`stop_token_ids`): every eos the generation config
names, the tokenizer's eos, and the chat template's end-of-turn token. A model trained on a chat
template ends its answer with the latter (Qwen2's `<|im_end|>`), which a base model's generation
config usually does not list.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tasks.core.prompt import ChatTemplateError, chat_format, encode_prompt, uses_chat_template

log = logging.getLogger(__name__)

# Finished rows leave the batch together once they are at least 1/LEAVE_SHARE of it: leaving copies the
# whole cache, which costs about as much as ten rows' decoding steps.
LEAVE_SHARE = 8


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
        model: a Hugging Face causal LM (any device; inputs follow `model.device`), decoded by our own
            loop where `decodes_with_own_loop`, else through its `generate` (as a GGUF model offers it).
        tokenizer: its tokenizer (pad token set; `load_model_and_tokenizer` guarantees it).
        texts: source texts.
        settings: prompt, length limits and batch size.
        progress: show a tqdm bar over batches.

    Returns:
        The generated summaries (new tokens before the first stop token, special tokens skipped,
        whitespace stripped), in the order of `texts`. A row whose first new token is a stop token
        yields "" (the caller counts it).

    Raises:
        ValueError: `batch_size` < 1, no pad token, or a text whose prompt has no tokens.
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
    stops = _as_list(gen_config.eos_token_id)
    own_loop = decodes_with_own_loop(model)
    if own_loop and min(lengths) == 0:
        raise ValueError(
            f"text {lengths.index(0)} gives an empty prompt (no tokens): give the prompt template "
            "(data.prompt_template) an instruction around {text}, or drop empty texts"
        )
    was_training = model.training
    model.eval()
    outputs: list[str] = [""] * len(texts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    prefixes: dict[tuple[int, ...], list[tuple[Any, Any]]] = {}  # shared-prefix keys/values, reused across batches
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress):
                rows = [prompt_ids[i] for i in batch]
                if own_loop:
                    new_tokens = _greedy_batch(model, rows, settings, stops, tokenizer.pad_token_id, prefixes)
                else:
                    input_ids, attention_mask = _left_pad(rows, tokenizer.pad_token_id)
                    out = model.generate(
                        input_ids=input_ids.to(model.device),
                        attention_mask=attention_mask.to(model.device),
                        generation_config=gen_config,
                        logits_processor=repetition_processors(settings, input_ids.shape[1]),
                    )
                    new_tokens = out[:, input_ids.shape[1] :].tolist()
                for i, ids in zip(batch, new_tokens):
                    outputs[i] = _decode_until_eos(tokenizer, ids, set(stops))
    finally:
        model.train(was_training)
    return outputs


def decodes_with_own_loop(model: Any) -> bool:
    """Whether `generate` decodes `model` with its own greedy loop (`_greedy_batch`) rather than `model.generate`.

    True for a Hugging Face decoder (PEFT-wrapped or not) whose forward takes `cache` and `position_ids`
    and whose every layer caches plain full attention (transformers' `DynamicLayer`). False for a
    model that is no torch module (a GGUF model), a ZeRO-3 partitioned one (every rank must run every
    forward: `generate`'s `synced_gpus`), an encoder-decoder, and sliding-window, chunked or
    KV-sharing layers.
    """
    import inspect

    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    from tasks.core.modeling import is_partitioned

    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if is_partitioned(model):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    accepted = inspect.signature(base.forward).parameters
    if "cache" not in accepted or "position_ids" not in accepted:
        return False
    layers = DynamicCache(config=config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every row begins with, leaving each row at least one token of its own
    (its last prompt token gives the first new token's logits); 0 for a single row."""
    if len(rows) < 2:
        return 0
    limit = min(len(r) for r in rows) - 1
    first = rows[0]
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n


def prefills_row_by_row(device: Any) -> bool:
    """Whether `generate` runs each prompt through the model alone (on a CPU) rather than the batch at once.

    On a CPU a batched prefill buys nothing (its matrix products are already large enough) and costs:
    padding is computed, the attention needs an explicit mask (no causal kernel), and activations of
    the whole batch fall out of the cache. On `bench/evaluate.py`'s model and rows (batch 32), row by row
    took 7% less CPU time than the batch at once, and a quarter less wall time with other processes on
    the cores; computing the shared prefix once saved nothing measurable on top (its 18 tokens of ~220
    cost a masked attention instead of the causal kernel). Each prompt's forward is then exactly the
    one-by-one forward. On an accelerator the batch runs at once (one row at a time would leave it idle).
    """
    return getattr(device, "type", str(device)) == "cpu"


def _greedy_batch(
    model: Any,
    rows: list[list[int]],
    settings: GenerationSettings,
    stops: list[int],
    pad_id: int,
    prefixes: dict[tuple[int, ...], list[tuple[Any, Any]]],
) -> list[list[int]]:
    """Greedy-decode one batch of prompts with our own loop; each row's new tokens, up to and including its
    stop token (or `max_new_tokens` of them).

    The prompts go through the model row by row on a CPU (`_prefill_rows`), as one batch elsewhere
    (`_prefill_batch`, which computes the shared prefix once); either fills one cache for the batch,
    and the decoding steps run on the whole batch. Rows that wrote their stop token leave the batch
    (their cache rows, mask and positions are dropped) once they are an eighth of it (`LEAVE_SHARE`), so
    later steps compute only the rows still writing.
    """
    import torch

    device = model.device
    n_rows, max_new = len(rows), settings.max_new_tokens
    keep_logits = _last_logits_only(model)
    prefill = _prefill_rows if prefills_row_by_row(device) else _prefill_batch
    cache, mask, next_position, logits = prefill(model, rows, max_new, pad_id, prefixes, keep_logits)

    bias, prompt_width = _attention_bias(mask, max_new, model.dtype), mask.shape[1]
    processors = repetition_processors(settings, 0)
    stop_ids = torch.tensor(stops, dtype=torch.long, device=device)
    new = torch.full((n_rows, max_new), pad_id, dtype=torch.long, device=device)
    live = torch.arange(n_rows, device=device)  # the batch row of each row still in the batch
    done = torch.zeros(n_rows, dtype=torch.bool, device=device)  # per row in the batch: wrote its stop token
    for step in range(max_new):
        scores = logits[:, -1].to(dtype=torch.float32)
        if processors:
            scores = processors(new[live, :step], scores)
        token = scores.argmax(-1)
        new[live, step] = token  # a row already done writes past its stop token: decoding ends at the first
        if step + 1 == max_new:
            break
        done |= torch.isin(token, stop_ids)
        finished = int(done.sum())
        if finished == len(live):
            break
        if finished * LEAVE_SHARE >= len(live):
            keep = (~done).nonzero().flatten()
            live, token, bias, next_position, done = live[keep], token[keep], bias[keep], next_position[keep], done[keep]
            cache.batch_select_indices(keep)
        columns = prompt_width + step + 1  # the prompt's, the new tokens so far, and the one going in
        logits = model(
            input_ids=token[:, None], attention_mask=bias[..., :columns], position_ids=next_position, cache=cache,
            use_cache=True, **keep_logits,
        ).logits
        next_position = next_position + 1
    return new.tolist()


def _attention_bias(mask: Any, max_new: int, dtype: Any) -> Any:
    """The decoding steps' attention mask as the additive `(rows, 1, 1, columns + max_new)` bias that
    transformers' attention takes as it is: 0 where a row attends, the dtype's minimum on its padding.

    Built once per batch and sliced per step; a 2D mask would be turned into a 4D boolean one by
    transformers at every step. SDPA's CPU kernel reads an additive mask faster: a decoding step's
    attention at `bench/evaluate.py`'s shapes (batch 32, ~300 columns) took 444 us against 564 with
    the boolean mask, 3% of `generate`'s CPU time in all.
    """
    import torch

    bias = torch.zeros((mask.shape[0], 1, 1, mask.shape[1] + max_new), dtype=dtype, device=mask.device)
    bias[:, 0, 0, : mask.shape[1]].masked_fill_(mask == 0, torch.finfo(dtype).min)
    return bias


def _prefill_rows(
    model: Any, rows: list[list[int]], max_new: int, pad_id: int, prefixes: dict, keep_logits: dict[str, int]
) -> tuple[Any, Any, Any, Any]:
    """Each prompt through the model alone, its keys and values written straight into its row of the
    batch's cache, left-padded: row n holds `[padding | prompt_n]`, prompt_n ending at column `W` (the
    longest prompt). Returns (cache, attention mask, next position ids, last-column logits)."""
    import torch

    device = model.device
    width = max(len(r) for r in rows)
    cache = _buffer_cache(model, width + max_new)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    logits = []
    for n, row in enumerate(rows):
        mask[n, width - len(row) :] = 1
        ids = torch.tensor([row], dtype=torch.long, device=device)
        out = model(input_ids=ids, cache=cache.row(n, width - len(row), len(rows)), use_cache=True, **keep_logits)
        logits.append(out.logits[:, -1:])
    cache.filled(width)
    next_position = torch.tensor([[len(r)] for r in rows], dtype=torch.long, device=device)
    return cache, mask.to(device), next_position, torch.cat(logits)


def _prefill_batch(
    model: Any, rows: list[list[int]], max_new: int, pad_id: int, prefixes: dict, keep_logits: dict[str, int]
) -> tuple[Any, Any, Any, Any]:
    """The batch's prompts through the model at once, their shared prefix (`shared_prefix_length`) only once.

    Layout of row n, `P` the shared prefix length and `W` the longest rest: `[prefix (P) | padding |
    rest_n]`, the rest right-aligned at column `P + W`, position ids `0..P-1` then `P..P+len(rest_n)-1`
    (what the row alone has); the attention mask hides the padding. The prefix's keys and values come
    from `prefixes` (computed with batch 1 the first time a prefix is seen) and are copied into every
    row. Returns (cache, attention mask, next position ids, last-column logits).
    """
    import torch

    device = model.device
    n_rows = len(rows)
    prefix_len = shared_prefix_length(rows)
    rests = [r[prefix_len:] for r in rows]
    width = max(len(r) for r in rests)
    cache = _buffer_cache(model, prefix_len + width + max_new)
    if prefix_len:
        key = tuple(rows[0][:prefix_len])
        if key not in prefixes:
            prefix_cache = _buffer_cache(model, prefix_len)
            model(
                input_ids=torch.tensor([key], device=device),
                position_ids=torch.arange(prefix_len, device=device)[None],
                cache=prefix_cache,
                use_cache=True,
                **keep_logits,
            )
            prefixes[key] = [(layer.keys, layer.values) for layer in prefix_cache.layers]
        for layer, (k, v) in zip(cache.layers, prefixes[key]):
            layer.update(k.expand(n_rows, -1, -1, -1), v.expand(n_rows, -1, -1, -1))

    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n_rows, prefix_len + width), dtype=torch.long)
    mask[:, :prefix_len] = 1
    positions = torch.zeros((n_rows, width), dtype=torch.long)
    for n, rest in enumerate(rests):
        start = width - len(rest)
        input_ids[n, start:] = torch.tensor(rest, dtype=torch.long)
        mask[n, prefix_len + start :] = 1
        positions[n, start:] = torch.arange(prefix_len, prefix_len + len(rest))
    input_ids, mask, positions = input_ids.to(device), mask.to(device), positions.to(device)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, **keep_logits).logits
    return cache, mask, positions[:, -1:] + 1, logits[:, -1:]


def _last_logits_only(model: Any) -> dict[str, int]:
    """`logits_to_keep=1` where the model's forward takes it (the vocabulary projection of the last column only)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}


def _buffer_cache(model: Any, capacity: int) -> Any:
    """A transformers `Cache` whose every layer keeps its keys and values in one buffer of `capacity`
    positions, written in place (`_buffer_layer_class`).

    `cache.row(n, start, rows)` is a cache for one prompt alone (batch 1) that writes into row `n` of a
    `rows`-row buffer from column `start` on; `cache.filled(width)` then marks the first `width` columns
    of every row as written (left padding: the columns before a row's start stay zero and are masked).
    """
    from transformers import DynamicCache
    from transformers.cache_utils import Cache

    layer_cls = _buffer_layer_class()
    layers = [layer_cls(capacity) for _ in DynamicCache(config=model.config).layers]
    cache = Cache(layers=layers)

    def row(n: int, start: int, rows: int) -> Any:
        return Cache(layers=[layer.row_view(n, start, rows) for layer in layers])

    def filled(width: int) -> None:
        for layer in layers:
            layer.length = width
            layer._views()

    cache.row, cache.filled = row, filled
    return cache


@functools.cache
def _buffer_layer_class() -> type:
    """transformers' `DynamicLayer` with a preallocated buffer: `update` writes the new columns in place and
    returns views of the filled part, where `DynamicLayer` concatenates (copies the whole cache) every
    step. Built on first use so that importing this module imports no transformers."""
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity, self.length = int(capacity), 0
            self._keys = self._values = None

        def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
            rows, heads, _, dim = key_states.shape
            self._keys = key_states.new_zeros((rows, heads, self.capacity, dim))
            self._values = value_states.new_zeros((rows, value_states.shape[1], self.capacity, value_states.shape[-1]))
            self.device, self.is_initialized = key_states.device, True

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.capacity:
                raise RuntimeError(f"the generation cache holds {self.capacity} positions; {end} were written")
            self._keys[:, :, self.length : end] = key_states
            self._values[:, :, self.length : end] = value_states
            self.length = end
            self._views()
            return self.keys, self.values

        def _views(self) -> None:
            self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: Any) -> None:
            if self.is_initialized:
                self._keys, self._values = self._keys[indices], self._values[indices]
                self._views()

        def row_view(self, row: int, start: int, rows: int) -> Any:
            return RowLayer(self, row, start, rows)

    class RowLayer(DynamicLayer):
        """One row of a `BufferLayer` (batch 1), from column `start` on: a prompt's forward alone writes
        its keys and values there and attends to that row only."""

        def __init__(self, parent: Any, row: int, start: int, rows: int) -> None:
            super().__init__()
            self.parent, self.row, self.start, self.rows, self.length = parent, row, start, rows, 0

        def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
            if not self.parent.is_initialized:
                self.parent.lazy_initialization(
                    key_states.expand(self.rows, -1, -1, -1), value_states.expand(self.rows, -1, -1, -1)
                )
            self.device, self.is_initialized = key_states.device, True

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            begin, end = self.start + self.length, self.start + self.length + key_states.shape[-2]
            if end > self.parent.capacity:
                raise RuntimeError(f"the generation cache holds {self.parent.capacity} positions; {end} were written")
            n = slice(self.row, self.row + 1)
            self.parent._keys[n, :, begin:end] = key_states
            self.parent._values[n, :, begin:end] = value_states
            self.length = end - self.start
            self.keys = self.parent._keys[n, :, self.start : end]
            self.values = self.parent._values[n, :, self.start : end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

    return BufferLayer


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

