"""Typed parameters: one pydantic model per `params.yaml` section, loaded once and validated.

Every section forbids unknown keys, so a misspelt key fails with its name and section. Defaults
live here and nowhere else; stage code reads `params.<section>.<field>` and never guesses.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tasks.core.errors import SftflowError
from tasks.core.io import atomic_write_text

if TYPE_CHECKING:
    from tasks.core.layout import Layout

DEFAULT_PARAMS_FILE = Path("params.yaml")


# What generation reads (`tasks.core.generation.GenerationSettings.of`): declared by every stage that generates.
GENERATION_KEYS = (
    "data.prompt_template",
    "data.use_chat_template",
    "evaluate.max_new_tokens",
    "evaluate.batch_size",
    "evaluate.no_repeat_ngram_size",
    "evaluate.repetition_penalty",
    "train.max_source_length",
)
# What scoring generations reads (`tasks.core.evaluation.Evaluator.of`): language, bootstrap, the cache.
SCORING_KEYS = ("data.language", "evaluate.bootstrap_samples", "evaluate.seed", "evaluate.cache_dir")


# The sections that change the model or its scores; `Params.digest` hashes these alone. Not here:
# `paths` (where files go), `register` (names), `promote` (the gate), `serve` (the app) and `review` (the dashboard).
MODEL_SECTIONS = ("data", "model", "validate", "split", "select", "pretrain", "train", "align", "evaluate", "quantize")


AUTO = "auto"
# What `auto` stands for under each `data.language`. `Params` resolves it once, when the params are
# validated, so a stage reads the resolved value; a stage that reads one of these keys also declares
# `data.language`, so DVC re-runs it when the language changes (tests/test_english.py checks).
LANGUAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "zh": {
        "data.prompt_template": "为下面的论文摘要拟一个标题。\n摘要：{text}\n标题：",
        "model.tokenizer": "char",
        "validate.max_text_chars": 2000,
        "validate.max_summary_chars": 200,
        "train.max_target_length": 48,
        "evaluate.max_new_tokens": 48,
    },
    "en": {
        "data.prompt_template": "Summarize the text below.\nText: {text}\nSummary:",
        "model.tokenizer": "bpe",
        # CNN/DailyMail articles run to ~4,000 characters on average and past 10,000 at the tail;
        # their highlights to ~300 (DialogSum summaries ~100).
        "validate.max_text_chars": 20000,
        "validate.max_summary_chars": 1000,
        # what the scratch decoder's 512-token context leaves after a 256-token prompt
        "train.max_target_length": 256,
        "evaluate.max_new_tokens": 128,
    },
}


def positive_or_auto(value: int | str) -> int | str:
    """A count of at least 1, or `auto` (resolved per `data.language` by `Params`)."""
    if value != AUTO and value < 1:
        raise ValueError("must be at least 1 (or auto)")
    return value


class ParamsError(SftflowError, ValueError):
    """Raised when params.yaml or a `-S key=value` override is invalid; the message names each key."""


class Section(BaseModel):
    """Base for every section: unknown keys fail, assignments are validated too.

    The section of a stage also says, beside its keys, what the stage is (`tasks.core.stages` builds
    the one stage list from these, in the order of `Params`' fields):

    - `stage_help`: one line for `sftflow --help`;
    - `stage_reads`: the params sections (`train`) and keys (`data.language`) the stage's code may
      read; dvc.yaml's `params:` for the stage list exactly these (a test checks);
    - `stage_dvc`: whether it is a dvc.yaml stage (files in, files out) or talks to MLflow / serves.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    stage_dvc: ClassVar[bool] = True


class DataConfig(Section):
    """The raw data set and the task it poses: which file, which columns, which language, which prompt."""

    path: Path = Field(
        default=Path("data/sample/zh_summ.jsonl"),
        description="The raw data file `validate` reads: JSON Lines, CSV or Parquet, one record per row.",
    )
    format: Literal["auto", "jsonl", "csv", "parquet"] = Field(
        default="auto",
        description="How to read `data.path`; `auto` goes by its suffix (.jsonl/.ndjson/.json, .csv, .parquet/.pq).",
    )
    text_column: str = Field(
        default="text",
        description="Column holding the source text. A file without it and `summary_column` but with alpaca "
        "columns is read as text = instruction + input, summary = output.",
    )
    summary_column: str = Field(default="summary", description="Column holding the reference summary the model learns to write.")
    id_column: str | None = Field(
        default="id",
        description="Column of row ids, unique among kept rows; null (or a column the file lacks, with a warning) "
        "uses line/row numbers instead.",
    )
    language: Literal["zh", "en"] = Field(
        default="zh",
        description="Language of the texts: `zh` scores ROUGE with rouge-chinese on jieba words and checks the CJK "
        "share of a text; `en` scores with rouge_score (Porter stemmer) and checks the ASCII-word share. The lead-k "
        "baseline takes characters (zh) or words (en). It also says what `auto` means for `data.prompt_template`, "
        "`model.tokenizer`, `validate.max_text_chars`, `validate.max_summary_chars` and `train.max_target_length`.",
    )
    prompt_template: str = Field(
        default=AUTO,
        description="The model's input, with `{text}` replaced by the source text; the summary follows it directly. "
        "Used alike in pretraining's vocabulary, training, evaluation and serving. `auto`: zh "
        "\"为下面的论文摘要拟一个标题。\\n摘要：{text}\\n标题：\", en \"Summarize the text below.\\nText: {text}\\nSummary:\".",
    )
    use_chat_template: bool = Field(
        default=True,
        description="Wrap the prompt in the tokenizer's chat template when it has one (the scratch tokenizer has none).",
    )

    @field_validator("prompt_template")
    @classmethod
    def _template_has_text(cls, v: str) -> str:
        if v != AUTO and "{text}" not in v:
            raise ValueError("prompt_template must contain the placeholder {text}")
        return v


class PathsConfig(Section):
    """Where stages write. Stage `s` writes under `artifacts/s/`, its metrics to `metrics/s.json`."""

    artifacts: Path = Field(
        default=Path("artifacts"), description="Root of the stage outputs: stage `s` writes under `<artifacts>/s/`."
    )
    metrics: Path = Field(default=Path("metrics"), description="Folder of the DVC metrics files: `<metrics>/<stage>.json`.")
    plots: Path = Field(default=Path("plots"), description="Folder of the DVC plots: `<plots>/<stage>/`.")


class ModelConfig(Section):
    """The base model: `scratch` (built and pretrained here) or a local directory / hub id.

    The keys from `architecture` on shape the scratch decoder (Qwen2 or Llama architecture) and its
    tokenizer; a real base model ignores them.
    """

    base: str = Field(
        default="scratch",
        description="`scratch` (a tokenizer and a small decoder built from the keys below, then pretrained), a local "
        "Hugging Face model folder, or a hub id (needs network or a filled HF cache). When `select` ran, its choice wins.",
    )
    candidates: list[str] = Field(
        default_factory=list,
        description="Bases `select` scores on validation rows, keeping the best by `select.metric`; "
        "empty means just `base`, and a single entry passes through unscored.",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Let transformers run the model code a hub model ships; only for bases whose code you trust.",
    )
    architecture: Literal["qwen2", "llama"] = Field(
        default="qwen2", description="Scratch decoder architecture (the transformers Qwen2 or Llama config)."
    )
    tokenizer: Literal["auto", "char", "bpe"] = Field(
        default=AUTO,
        description="Scratch tokenizer, trained on the train split: `char` (one token per character, compact for "
        "Chinese) or `bpe` (byte-level BPE, for English or mixed text); `auto`: char for zh, bpe for en.",
    )
    vocab_size: int = Field(
        default=6000, gt=16, description="Most tokens of the scratch tokenizer, its 4 special tokens included."
    )
    hidden_size: int = Field(
        default=192, gt=0, description="Width of the scratch decoder; must be divisible by `model.num_heads`."
    )
    num_layers: int = Field(default=4, gt=0, description="Decoder layers of the scratch model.")
    num_heads: int = Field(
        default=4, gt=0, description="Attention heads of the scratch decoder; must be divisible by `model.num_kv_heads`."
    )
    num_kv_heads: int = Field(
        default=2, gt=0, description="Key/value heads of the scratch decoder (grouped-query attention)."
    )
    intermediate_size: int = Field(default=512, gt=0, description="MLP width of the scratch decoder.")
    max_position_embeddings: int = Field(
        default=512,
        gt=0,
        description="Context length of the scratch decoder in tokens: prompt plus new tokens must fit, and "
        "pretraining blocks are capped at it.",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads ({self.num_heads}) must be divisible by model.num_kv_heads ({self.num_kv_heads})"
            )
        return self

    @property
    def candidate_list(self) -> list[str]:
        """The bases to choose among: `candidates`, or just `base` when none are listed."""
        return list(self.candidates) or [self.base]


class ValidateConfig(Section):
    """Great Expectations suite and row filters for the raw data.

    A row that fails a row check (empty, length, summary not shorter than its text, repeat,
    language) is dropped and counted per reason; the stage fails when too many are dropped or a
    table check fails.
    """

    stage_help: ClassVar[str] = 'check the raw data with Great Expectations; write the clean data and a report'
    stage_reads: ClassVar[tuple[str, ...]] = ("data.path", "data.format", "data.text_column", "data.summary_column", "data.id_column", "data.language", "validate")

    unicode_form: Literal["NFC", "NFKC", "none"] = Field(
        default="NFC",
        description="Unicode normalisation of texts and summaries before the checks. In every case invisible "
        "characters and control characters (but tab and line break) are removed, the latter counted in "
        "metrics/validate.json; line ends become `\\n` and line breaks are kept (dialogue turns, paragraphs; "
        "blank lines collapse to one), while other whitespace collapses to one space.",
    )
    min_text_chars: int = Field(
        default=20, ge=1, description="Shortest text kept, in characters after normalisation; shorter rows are dropped."
    )
    max_text_chars: int | Literal["auto"] = Field(
        default=AUTO,
        description="Longest text kept, in characters; longer rows are dropped. `auto`: 2000 for zh, 20000 for en.",
    )
    min_summary_chars: int = Field(
        default=2, ge=1, description="Shortest summary kept, in characters; shorter rows are dropped."
    )
    max_summary_chars: int | Literal["auto"] = Field(
        default=AUTO,
        description="Longest summary kept, in characters; longer rows are dropped. `auto`: 200 for zh, 1000 for en.",
    )
    max_duplicate_share: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Largest share of rows whose text repeats an earlier row's; repeats are dropped (the first "
        "is kept), and more than this fails the suite.",
    )
    min_language_share: float = Field(
        default=0.9,
        ge=0,
        le=1,
        description="Smallest share of rows in `data.language`; other rows are dropped, and fewer than this fails the suite.",
    )
    min_cjk_ratio: float = Field(
        default=0.3,
        ge=0,
        le=1,
        description="zh: smallest share of CJK ideographs among a text's non-space characters for it to count as Chinese.",
    )
    min_ascii_word_ratio: float = Field(
        default=0.8,
        ge=0,
        le=1,
        description="en: smallest share of a text's letter runs that are ASCII words for it to count as English.",
    )
    max_dropped_share: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Largest share of rows the row checks may drop before the stage fails.",
    )

    @field_validator("max_text_chars", "max_summary_chars")
    @classmethod
    def _positive_or_auto(cls, v: int | str) -> int | str:
        return positive_or_auto(v)

    @model_validator(mode="after")
    def _bounds(self) -> ValidateConfig:
        # `auto` is resolved by `Params` (it depends on data.language); the bound is checked again then.
        if self.max_text_chars != AUTO and self.min_text_chars > self.max_text_chars:
            raise ValueError("validate.min_text_chars must not exceed validate.max_text_chars")
        if self.max_summary_chars != AUTO and self.min_summary_chars > self.max_summary_chars:
            raise ValueError("validate.min_summary_chars must not exceed validate.max_summary_chars")
        return self


class SplitConfig(Section):
    """Content-hash split into train/val/test.

    A new row's split depends only on its text and the salt; near-duplicate texts are kept in one
    split. Once assigned, a row keeps its split forever: `artifacts/split/assignments.jsonl` remembers it.
    """

    stage_help: ClassVar[str] = "split the clean data into train/val/test by a hash of each row's content"
    stage_reads: ClassVar[tuple[str, ...]] = ("split",)

    train: float = Field(
        default=0.8, gt=0, lt=1, description="Share of rows in the train split; train + val + test must sum to 1."
    )
    val: float = Field(
        default=0.1,
        gt=0,
        lt=1,
        description="Share of rows in the val split (training's validation loss, `select`, the lead-k baseline's k).",
    )
    test: float = Field(
        default=0.1, gt=0, lt=1, description="Share of rows in the test split (`evaluate`, `quantize`, `promote`)."
    )
    salt: str = Field(
        default="sftflow-v1",
        description="Mixed into each text's hash; another salt reshuffles every row and starts the assignment "
        "table anew.",
    )
    near_duplicate_threshold: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="Character 5-gram Jaccard similarity from which two texts are near-duplicates: they go to one "
        "split (a new one joins its group's earliest split), and the stage fails if such a pair still crosses "
        "splits other than where earlier assignments keep it apart (counted in metrics/split.json).",
    )

    @model_validator(mode="after")
    def _ratios_sum_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"split.train + split.val + split.test must sum to 1, got {total:g}"
            )
        return self


class SelectConfig(Section):
    """Score candidate bases on validation rows and keep the best."""

    stage_help: ClassVar[str] = 'score candidate base models on validation rows and pick the best'
    stage_reads: ClassVar[tuple[str, ...]] = ("model", "select", "pretrain.seed", "train.max_target_length", *GENERATION_KEYS, *SCORING_KEYS)

    rows: int = Field(default=64, gt=0, description="First N val rows each candidate is scored on.")
    metric: Literal["loss", "rouge-l"] = Field(
        default="loss",
        description="loss: summary loss per character (lower wins; fair across tokenizers); rouge-l: zero-shot ROUGE-L.",
    )


class PretrainConfig(Section):
    """Causal-LM pretraining of the base on the corpus: the training texts and summaries, plus optional unlabelled
    files, packed into blocks. By intent: always for a scratch base, only when asked for a real one."""

    stage_help: ClassVar[str] = 'build the scratch base (tokenizer + decoder) or load a base; pretrain it on the corpus'
    stage_reads: ClassVar[tuple[str, ...]] = (
        "model", "pretrain", "data.language", "data.prompt_template", "data.use_chat_template",
        "train.method", "train.lora", "train.precision",
    )

    enabled: bool | Literal["auto"] = Field(
        default=AUTO,
        description="`auto`: pretrain a scratch base (a random decoder is no base), pass a real base through "
        "unchanged. `true` on a real base is continued pretraining on the corpus at "
        "`pretrain.continued_learning_rate`, through a LoRA adapter (`train.lora`, merged afterwards) when "
        "`train.method` is lora, or of every weight when it is full. `false` with a scratch base is an error.",
    )
    corpus: list[Path] = Field(
        default_factory=list,
        description="Unlabelled text files added to the pretraining corpus: `.jsonl` (a `text` field per line) or "
        "plain text (documents separated by blank lines). Each must exist; a missing one fails the stage, naming it. "
        "Their sha256 are written to metrics/pretrain.json (DVC does not track their content). The scratch "
        "tokenizer is still trained on the train split alone.",
    )
    continued_learning_rate: float = Field(
        default=1e-4,
        gt=0,
        description="Peak learning rate of continued pretraining of a real base (`pretrain.enabled: true`); a "
        "scratch base uses `pretrain.learning_rate`.",
    )
    objective: Literal["auto", "lm", "lead", "gap-sentence"] = Field(
        default=AUTO,
        description="What the base learns. `lm`: causal language modelling of the texts and summaries packed into "
        "blocks. `lead` / `gap-sentence` (PEGASUS's pseudo-summaries): each document (train texts, corpus files) "
        "is framed as the task, in the prompt template, and answered by a summary it writes of itself (its "
        "opening clauses, or its clause most like the rest of it), every token still carrying loss, so the base "
        "learns to answer the prompt from its source before fine-tuning. `auto`: `lead` for a scratch base, `lm` "
        "for a real base's continued pretraining.",
    )
    epochs: float = Field(default=4.0, gt=0, description="Passes over the packed training corpus.")
    max_steps: int = Field(default=-1, description="Overrides epochs when > 0.")
    learning_rate: float = Field(
        default=3e-3,
        gt=0,
        description="Peak learning rate of the cosine schedule (weight decay 0.01) when pretraining a scratch base.",
    )
    batch_size: int = Field(default=16, gt=0, description="Blocks per step (and per validation batch).")
    block_size: int = Field(
        default=256,
        gt=0,
        description="Tokens per packed block (documents joined by eos); capped at the model's context length.",
    )
    warmup_ratio: float = Field(
        default=0.05, ge=0, lt=1, description="Share of the steps over which the learning rate warms up from 0."
    )
    logging_steps: int = Field(
        default=10, gt=0, description="Log the training loss every N steps (`plots/pretrain/loss.csv`)."
    )
    seed: int = Field(
        default=42,
        description="Seeds the scratch model's initialisation and the data order (`select` builds its scratch "
        "candidate with it too).",
    )


class LoraConfig(Section):
    """PEFT LoRA adapter settings (used when train.method is lora)."""

    r: int = Field(default=16, gt=0, description="Rank of the LoRA update matrices.")
    alpha: int = Field(default=32, gt=0, description="LoRA scaling: the update is multiplied by alpha / r.")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA branch's input.")
    target_modules: list[str] | str = Field(
        default="all-linear",
        description="The layers that get an adapter, as PEFT's `target_modules` takes them: `all-linear` (every "
        "Linear and Conv1D layer but the output head, on any causal LM), a list of module names or name suffixes "
        "(`[q_proj, v_proj]`, GPT-2's `[c_attn]`, `[attn.c_proj]`), or one regular expression over full module "
        "names (`.*\\.(q|v)_proj`). Checked against the model before training: a target it lacks fails, listing "
        "its Linear and Conv1D layers.",
    )

    @field_validator("target_modules")
    @classmethod
    def _targets_not_empty(cls, v: list[str] | str) -> list[str] | str:
        if not v:
            raise ValueError("name at least one module, a regular expression, or all-linear")
        return v


class TrainConfig(Section):
    """Supervised fine-tuning through the HF Trainer and DeepSpeed; only summary tokens (and eos) carry loss."""

    stage_help: ClassVar[str] = 'supervised fine-tuning (LoRA or full) through the HF Trainer and DeepSpeed'
    stage_reads: ClassVar[tuple[str, ...]] = (
        "train",
        "data.language",
        "data.prompt_template",
        "data.use_chat_template",
        "model.trust_remote_code",
        "evaluate.max_new_tokens",  # validation ROUGE generates exactly as evaluate does
        "evaluate.batch_size",
        "evaluate.no_repeat_ngram_size",
        "evaluate.repetition_penalty",
    )

    method: Literal["lora", "full"] = Field(
        default="full",
        description="`full` trains every weight; `lora` trains an adapter (`train.lora`) and merges it into the saved model.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="The LoRA adapter, used when `train.method` is lora.")
    deepspeed_config: Path | None = Field(
        default=Path("configs/deepspeed/zero2.json"),
        description="DeepSpeed JSON config (configs/deepspeed/zero{0,2,3}.json); null trains without DeepSpeed.",
    )
    num_processes: int = Field(
        default=1,
        gt=0,
        description="Training processes on this machine; > 1 relaunches the stage as torchrun ranks "
        "(at most one per GPU, or per core on CPU).",
    )
    torch_threads: int = Field(
        default=0,
        ge=0,
        description="Torch threads per rank; 0 = usable cores / ranks. Never read from the environment "
        "(OMP_NUM_THREADS): the thread count changes the weights' last bits, so it must not depend on how the stage was started.",
    )
    epochs: float = Field(default=2.0, gt=0, description="Passes over the train split.")
    max_steps: int = Field(default=-1, description="Overrides epochs when > 0.")
    learning_rate: float = Field(
        default=2e-3, gt=0, description="Peak learning rate of the cosine schedule (weight decay 0.01)."
    )
    batch_size: int = Field(
        default=16, gt=0, description="Examples per rank per step (also the validation batch)."
    )
    gradient_accumulation_steps: int = Field(
        default=1,
        gt=0,
        description="Batches summed into one optimizer step: the global batch is batch_size x this x ranks.",
    )
    max_source_length: int = Field(
        default=256,
        gt=0,
        description="Most prompt tokens; a longer text is cut (instruction and answer cue kept), in training and "
        "in generation alike. Cuts are counted in metrics/train.json.",
    )
    max_target_length: int | Literal["auto"] = Field(
        default=AUTO,
        description="Most summary tokens in training, eos included; a longer summary is cut (and then has no eos). "
        "`auto`: 48 for zh (the character tokenizer makes it 47 characters), 256 for en (what a 512-token scratch "
        "context leaves after the prompt). Training cuts at the limit `train.target_length_percentile` sizes under this cap.",
    )
    target_length_percentile: float = Field(
        default=100.0,
        gt=0,
        le=100,
        description="Sizes the summary token limit from the train split: the limit is the length (eos included) "
        "that keeps this percentage of train references whole, at most `train.max_target_length`. 100 keeps every "
        "reference that fits the cap whole; 95 trims the longest 5% for shorter sequences. metrics/train.json "
        "reports the limit and the share of texts and references cut.",
    )
    group_by_length: bool = Field(
        default=True, description="Batch examples of similar length together (less padding) instead of a random order."
    )
    warmup_ratio: float = Field(
        default=0.05, ge=0, lt=1, description="Share of the steps over which the learning rate warms up from 0."
    )
    save_steps: int = Field(
        default=50,
        gt=0,
        description="Checkpoint every N steps; a rerun with the same params, data and base resumes from the newest "
        "complete checkpoint.",
    )
    keep_checkpoints: int = Field(default=2, gt=0, description="Newest checkpoints kept (2: one survives a kill mid-save).")
    eval_steps: int = Field(
        default=50, gt=0, description="Compute the validation loss every N steps (`plots/train/loss.csv`)."
    )
    eval_generate_rows: int = Field(
        default=32,
        ge=0,
        description="At every evaluation, generate summaries for the first N val rows (greedy, as evaluate does) "
        "and score their ROUGE-L (`val_rouge_l` in metrics/train.json and the loss plot); 0 = loss only.",
    )
    select_by: Literal["rouge-l", "loss", "last"] = Field(
        default="rouge-l",
        description="Which checkpoint becomes the model: the best val ROUGE-L (needs eval_generate_rows > 0), the "
        "lowest val loss, or the last step. Checkpoints are kept for it, so save_steps must be a multiple of eval_steps.",
    )
    early_stopping_patience: int = Field(
        default=0,
        ge=0,
        description="Stop after N evaluations without a better `select_by` figure; 0 = train to the end. Not with `last`.",
    )
    logging_steps: int = Field(default=1, gt=0, description="Log the training loss every N steps.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto",
        description="Training precision (train, pretrain, align). `auto`: bf16 on a GPU that supports it, fp16 (with loss "
        "scaling) on an older GPU; on the CPU bf16 autocast where it has bf16 matrix units (avx512_bf16, AMX, Arm bf16), "
        "else fp32. bf16 keeps fp32 master weights; fp16 needs a CUDA GPU (`tasks.core.training.resolve_precision`).",
    )
    seed: int = Field(default=42, description="Seeds the data order, dropout and the LoRA initialisation.")

    @field_validator("max_target_length")
    @classmethod
    def _positive_or_auto(cls, v: int | str) -> int | str:
        return positive_or_auto(v)

    @model_validator(mode="after")
    def _selection_is_possible(self) -> TrainConfig:
        if self.select_by == "rouge-l" and self.eval_generate_rows == 0:
            raise ValueError("train.select_by=rouge-l needs train.eval_generate_rows > 0 (or select_by: loss | last)")
        if self.select_by != "last" and self.save_steps % self.eval_steps:
            raise ValueError(
                f"train.save_steps ({self.save_steps}) must be a multiple of train.eval_steps ({self.eval_steps}) "
                f"to keep the checkpoint train.select_by={self.select_by} picks (or select_by: last)"
            )
        if self.select_by == "last" and self.early_stopping_patience:
            raise ValueError("train.early_stopping_patience needs train.select_by rouge-l or loss (what would it watch?)")
        return self


class AlignConfig(Section):
    """Learning from preferences: DPO (TRL's `DPOTrainer`) of the fine-tuned model on (prompt, chosen, rejected) pairs.

    Pairs come, in this order, from the app's feedback corrections (chosen = the correction, rejected =
    the model's output), the preference file `align.data`, and the train split (chosen = the reference,
    rejected = the fine-tuned model's own greedy output where it scores below `align.max_rouge_l`), at most
    `align.max_pairs` in all. No pair comes from a val or test row, and feedback on a near-duplicate of one
    (`split.near_duplicate_threshold`) is dropped and counted. The reference model is the fine-tuned model
    (for LoRA: the adapter disabled). The aligned model replaces the fine-tuned one only when it is not
    worse on val rows (`align.max_drop`); otherwise the fine-tuned model is passed through and
    metrics/align.json says why. `artifacts/align/model` is the final model either way. Precision,
    DeepSpeed and LoRA follow `train:`; align runs in one process (`train.num_processes` is train's alone).
    """

    stage_help: ClassVar[str] = "DPO on feedback, preference-file and self-generated pairs; keep it only if not worse on val"
    stage_reads: ClassVar[tuple[str, ...]] = (
        "align",
        "train.method",
        "train.lora",
        "train.precision",
        "train.deepspeed_config",
        "train.torch_threads",
        "train.max_target_length",
        "split.near_duplicate_threshold",
        "model.trust_remote_code",
        *GENERATION_KEYS,
        *SCORING_KEYS,
    )

    enabled: bool = Field(
        default=True,
        description="Run DPO; `false` passes the fine-tuned model through unchanged as the final model.",
    )
    data: Path | None = Field(
        default=None,
        description="A preference file (JSONL, CSV or Parquet) with `prompt` (the source text; the prompt template is "
        "applied), `chosen` and `rejected` columns, checked with Great Expectations; null: none. Its sha256 is recorded "
        "in metrics/align.json and the registered version's tags, and is part of the data-change trigger.",
    )
    feedback_dir: Path = Field(
        default=Path("data/feedback"),
        description="The app's feedback store: `records.jsonl` (open, appended by the app) and `closed/` (snapshots "
        "the retrain flow closes before its stages run; align reads only these).",
    )
    max_pairs: int = Field(
        default=64, ge=0, description="Most pairs trained on, filled in source order (feedback, file, self-generated)."
    )
    self_pairs: bool = Field(
        default=True, description="Build pairs from the train split: the reference beats the model's own greedy output."
    )
    generate_rows: int = Field(
        default=96,
        ge=0,
        description="Train rows (seeded order) the fine-tuned model generates for, to find self-generated pairs.",
    )
    max_rouge_l: float = Field(
        default=30.0,
        ge=0,
        le=100,
        description="A self-generated pair is kept only when the model's output scores below this ROUGE-L against "
        "the reference (a good output is no rejected answer).",
    )
    beta: float = Field(default=0.1, gt=0, description="DPO's beta: higher keeps the model closer to the reference.")
    epochs: float = Field(default=1.0, gt=0, description="Passes over the pairs.")
    max_steps: int = Field(default=-1, description="Overrides epochs when > 0.")
    learning_rate: float = Field(default=1e-4, gt=0, description="Peak learning rate of the cosine schedule.")
    batch_size: int = Field(default=8, gt=0, description="Pairs per step.")
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1, description="Share of the steps the learning rate warms up over.")
    logging_steps: int = Field(default=1, gt=0, description="Log loss and rewards every N steps (`plots/align/rewards.csv`).")
    save_steps: int = Field(
        default=4, gt=0, description="Checkpoint every N steps; a rerun with the same inputs resumes from the newest one."
    )
    keep_checkpoints: int = Field(default=2, gt=0, description="Newest checkpoints kept.")
    held_out_share: float = Field(
        default=0.125,
        ge=0,
        lt=1,
        description="Share of the pairs held out of training: the reward accuracy on them is `held_out_reward_accuracy`.",
    )
    gate_rows: int = Field(
        default=0, ge=0, description="The first N val rows the gate generates for with both models; 0 = every val row."
    )
    max_drop: float = Field(
        default=0.5,
        ge=0,
        description="The aligned model is kept only when the 95% lower bound of the paired-bootstrap difference in val "
        "ROUGE-L (aligned minus fine-tuned) is above -max_drop points.",
    )
    seed: int = Field(default=42, description="Seeds the pair order, the held-out pairs, dropout and the LoRA initialisation.")

    @model_validator(mode="after")
    def _rows_to_generate(self) -> AlignConfig:
        if self.enabled and self.self_pairs and self.max_pairs and not self.generate_rows:
            raise ValueError("align.self_pairs needs align.generate_rows > 0 (or self_pairs: false)")
        return self


class EvaluateConfig(Section):
    """Greedy generation on the test split and ROUGE / BLEU scoring.

    The fine-tuned model is scored beside the pretrained base and a copy-the-lead baseline.
    `max_new_tokens`, `batch_size`, `no_repeat_ngram_size` and `repetition_penalty` hold for every
    stage that generates; `bootstrap_samples`, `seed` and `cache_dir` for `select` too.
    """

    stage_help: ClassVar[str] = 'generate summaries for the test split; score ROUGE/BLEU with bootstrap intervals'
    stage_reads: ClassVar[tuple[str, ...]] = ("evaluate", "model.trust_remote_code", *GENERATION_KEYS, *SCORING_KEYS)

    max_new_tokens: int | Literal["auto"] = Field(
        default="auto",
        description="Generation stops at eos or after this many new tokens (every stage that generates, and the "
        "registered model). It also bounds rouge-chinese's LCS, which is quadratic in length. `auto`: 48 for zh "
        "(titles are ~19 characters), 128 for en (news highlights run to ~80 tokens).",
    )
    batch_size: int = Field(
        default=32,
        gt=0,
        description="Prompts per generation batch (batched and one-by-one generation give the same text).",
    )
    no_repeat_ngram_size: int = Field(
        default=0,
        ge=0,
        description="When > 0, no n-gram of this many tokens is generated twice in one summary (every stage that "
        "generates, and the registered model). Only the generated tokens count: unlike transformers' own option, "
        "an n-gram of the source may be copied. 0: off.",
    )
    repetition_penalty: float = Field(
        default=1.0,
        gt=0,
        description="A token already generated in this summary has its logit divided by this (multiplied when "
        "negative): > 1 discourages loops. Only the generated tokens count, not the prompt (nor its padding), so "
        "batched and one-by-one generation still agree. 1.0: off.",
    )
    tune_decoding: bool = Field(
        default=True,
        description="Choose `no_repeat_ngram_size` and `repetition_penalty` on the val rows (never test) from a small "
        "grid ({0, 3, 2} x {1.0, 1.2}), by mean ROUGE-L; the choice is written to artifacts/evaluate/decoding.json and "
        "metrics/evaluate.json, and quantize, register (the model's sftflow.json) and the app use it. Off: the two "
        "params are used as they are.",
    )
    tune_rows: int = Field(
        default=64,
        ge=0,
        description="The first N val rows `tune_decoding` scores each grid point on (0 = every val row): the grid "
        "generates them once per point.",
    )
    rows: int = Field(default=0, ge=0, description="Score only the first N test rows; 0 = all.")
    bootstrap_samples: int = Field(
        default=1000, gt=0, description="Resamples of the rows for each 95% bootstrap interval and paired gain."
    )
    seed: int = Field(default=42, description="Seeds the bootstrap resampling, so intervals are reproducible.")
    baseline_max_k: int = Field(
        default=60,
        gt=0,
        description="Largest k tried for the lead-k baseline (the first k characters, or words for en; k is chosen "
        "on the val split).",
    )
    score_base: bool = Field(
        default=True,
        description="Also score the pretrained base (`artifacts/pretrain/model`), to report the fine-tuning gain.",
    )
    cache_dir: Path = Field(
        default=Path(".cache/sftflow/generations"),
        description="Generations keyed by (model hash, rows hash, generation params); outside DVC outs.",
    )

    @field_validator("max_new_tokens")
    @classmethod
    def _positive_or_auto(cls, v: int | str) -> int | str:
        return positive_or_auto(v)


class QuantizeConfig(Section):
    """Quantized variants for cheap serving and the quality gate.

    Each variant is measured against the full-precision model on the same test rows: size, latency
    and ROUGE-L.
    """

    stage_help: ClassVar[str] = 'quantize the fine-tuned model; measure size, latency and ROUGE-L against full precision'
    stage_reads: ClassVar[tuple[str, ...]] = ("quantize", "model.trust_remote_code", "data.language", *GENERATION_KEYS)

    methods: list[Literal["int8", "bnb-int8", "bnb-nf4", "bf16", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m"]] = Field(
        default_factory=lambda: ["int8", "gguf-q8_0", "gguf-q4_k_m"],
        description="Variants to build: `int8` (CPU, PyTorch dynamic int8), `bnb-int8` / `bnb-nf4` (bitsandbytes, "
        "need CUDA), `bf16` (the model in bfloat16, scored in bf16 on the GPU when there is one, else the CPU), "
        "`gguf-f16` / `gguf-q8_0` / `gguf-q4_k_m` (CPU: llama.cpp's GGUF run by llama-cpp-python, the `gguf` extra; "
        "skipped with the reason in metrics/quantize.json for a model llama.cpp cannot convert, such as the scratch "
        "base's character tokenizer); `register` registers each beside the full model (a GGUF one only when it "
        "passed). Each is scored in the dtype and on the device class it serves in, and the app serves a variant "
        "only where it was scored.",
    )
    max_drop: float = Field(
        default=1.0,
        ge=0,
        description="Largest ROUGE-L drop (points) allowed against full precision; `promote` refuses a challenger "
        "whose variant loses more.",
    )
    rows: int = Field(default=0, ge=0, description="Measure on the first N test rows; 0 = all.")
    latency_repeats: int = Field(
        default=3,
        ge=3,
        description="Repeats of the speed check: the full model and each variant generate the same "
        "`quantize.latency_rows` rows in the same batches, taking turns, once per repeat. A CPU variant is served "
        "only when its largest latency ratio (variant ÷ full) over the repeats is below 1.0; otherwise the app "
        "serves full precision and the reason is in metrics/quantize.json and the version's tags.",
    )
    latency_rows: int = Field(
        default=16,
        ge=0,
        description="Rows the speed check times (the first N measured test rows); 0 = all. Its cost is "
        "2 x `quantize.latency_repeats` generations of these rows per variant.",
    )

    @field_validator("methods")
    @classmethod
    def _methods_unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"quantize.methods lists a method twice: {v}")
        return v


class RegisterConfig(Section):
    """MLflow experiment and registered model name."""

    stage_help: ClassVar[str] = 'log the fine-tuned model to MLflow and register a new version with lineage tags'
    stage_reads: ClassVar[tuple[str, ...]] = ("register", "data.path", "data.language", "model.base", "quantize.methods", *GENERATION_KEYS)
    stage_dvc: ClassVar[bool] = False

    experiment: str = Field(
        default="sftflow", description="MLflow experiment that runs are logged to; created when missing."
    )
    model_name: str = Field(
        default="sftflow-summarizer",
        description="Registered model name (promote and serve use it too); a quantized variant registers as "
        "`<model_name>-<method>`.",
    )


class PromoteConfig(Section):
    """When a challenger replaces the champion.

    The newest version becomes champion when its mean ROUGE-L beats the champion's by `min_delta`,
    the 95% lower bound of the paired bootstrap of the gain is above 0, and each of its quantized
    variants passes `quantize.max_drop`. Each version is scored as the app serves it on this machine's
    device class (`serve.variant_cpu` / `serve.variant_gpu`).
    """

    stage_help: ClassVar[str] = 'promote the newest challenger if it passes the gate, or force --version'
    stage_reads: ClassVar[tuple[str, ...]] = ("promote", "register.model_name", "register.experiment", "quantize.max_drop", "evaluate.rows",
                                              "data.language", "serve.variant_cpu", "serve.variant_gpu")
    stage_dvc: ClassVar[bool] = False

    min_delta: float = Field(default=0.0, ge=0, description="ROUGE-L points the challenger must gain.")
    bootstrap_samples: int = Field(
        default=1000, gt=0, description="Resamples in the paired bootstrap of challenger minus champion, row by row."
    )
    seed: int = Field(default=42, description="Seeds that bootstrap, so a decision is reproducible.")


class ServeConfig(Section):
    """The Gradio app serving `models:/<register.model_name>@champion`."""

    stage_help: ClassVar[str] = 'serve the champion in a Gradio app'
    stage_reads: ClassVar[tuple[str, ...]] = ("serve", "register.model_name", "register.experiment", "align.feedback_dir")
    stage_dvc: ClassVar[bool] = False

    host: str = Field(
        default="127.0.0.1", description="Bind address; 127.0.0.1 serves only this machine (`--host` overrides)."
    )
    port: int = Field(default=7860, gt=0, lt=65536, description="Port of the app (`--port` overrides).")
    poll_seconds: float = Field(
        default=10.0,
        gt=0,
        description="How often the app checks whether the champion alias moved; a new champion is loaded, then swapped in.",
    )
    max_chars: int = Field(default=2000, gt=0, description="Longest input text the app accepts, in characters.")
    concurrency_limit: int = Field(default=2, gt=0, description="Requests generating at once; the others queue.")
    feedback_per_minute: int = Field(
        default=10,
        ge=0,
        description="Most ratings/corrections one user (the app's login, else the client address) may send in any "
        "60 s, across every app process sharing `align.feedback_dir`; 0 = no limit.",
    )
    variant_cpu: Literal["full", "fastest", "int8", "bf16", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m"] = Field(
        default="int8",
        description="Variant served without a GPU (`bf16`: a bf16 variant quantize scored on the CPU; `gguf-*`: "
        "llama.cpp through llama-cpp-python); `fastest`: of the version's registered CPU variants that quantize "
        "decided to serve, the one with the lowest latency ratio. When the version has no such variant scored on "
        "the CPU, full precision is served and the app says so.",
    )
    variant_gpu: Literal["full", "bf16", "bnb-nf4", "bnb-int8"] = Field(
        default="bf16",
        description="Variant served on a GPU: a registered variant scored on a GPU (`bf16` needs `bf16` in "
        "quantize.methods, run where there is a GPU); without one, full precision is served and the app says so.",
    )
    review_url: str = Field(
        default="",
        description="Address of the review dashboard (`sftflow review`, e.g. `http://127.0.0.1:8501`) that the app's "
        "side panel links to, as the browser reaches it (http(s):// or a path behind the same proxy); empty hides the link.",
    )

    @field_validator("review_url")
    @classmethod
    def _review_url_is_a_link(cls, v: str) -> str:
        v = v.strip()
        if v and (not v.startswith(("http://", "https://", "/")) or any(c.isspace() or c in "<>\"'()" for c in v)):
            raise ValueError(f"serve.review_url must be an http(s):// URL or a /path without spaces or brackets, got {v!r}")
        return v



class ReviewConfig(Section):
    """The reviewer's dashboard (Streamlit) over the registry: which version serves, why, and how it differs."""

    stage_help: ClassVar[str] = (
        "open the review dashboard (Streamlit): versions, why promoted, side-by-side outputs, lineage, variants"
    )
    stage_reads: ClassVar[tuple[str, ...]] = ("review", "register.model_name", "quantize.max_drop")
    stage_dvc: ClassVar[bool] = False

    host: str = Field(
        default="127.0.0.1",
        description="Bind address; 127.0.0.1 serves only this machine. Another address needs "
        "`SFTFLOW_REVIEW_AUTH=user:password` (`--host` overrides).",
    )
    port: int = Field(default=8501, gt=0, lt=65536, description="Port of the dashboard (`--port` overrides).")
    cache_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How long the dashboard reuses what it read from the registry before reading it again "
        "(its Refresh button reads at once); stored predictions are kept until the page is restarted.",
    )
    max_chars: int = Field(default=2000, gt=0, description="Longest text the Try it box summarises, in characters.")

# Sections carry the stage names used everywhere. `validate` and `register` shadow pydantic's
# deprecated `BaseModel.validate` and ABCMeta's `register`, which nothing here calls: silence that.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "(validate|register)"', category=UserWarning)

    class Params(Section):
        """The whole params.yaml."""

        data: DataConfig = Field(
            default_factory=DataConfig,
            description="The raw data set and the task it poses: file, columns, language and prompt.",
        )
        paths: PathsConfig = Field(
            default_factory=PathsConfig,
            description="Where stages write: stage `s` under `artifacts/s/`, its metrics to `metrics/s.json`, "
            "its plots under `plots/s/`.",
        )
        model: ModelConfig = Field(
            default_factory=ModelConfig,
            description="The base model: `scratch` (built and pretrained here) or a local directory / hub id.",
        )
        validate: ValidateConfig = Field(  # type: ignore[assignment]
            default_factory=ValidateConfig,
            description="Great Expectations suite and row filters for the raw data.",
        )
        split: SplitConfig = Field(
            default_factory=SplitConfig,
            description="Content-hash split into train/val/test.",
        )
        select: SelectConfig = Field(
            default_factory=SelectConfig,
            description="Score candidate bases (`model.candidates`) on validation rows and keep the best.",
        )
        pretrain: PretrainConfig = Field(
            default_factory=PretrainConfig,
            description="Causal-LM pretraining of the base on the corpus: always for scratch, for a real base only when asked.",
        )
        train: TrainConfig = Field(
            default_factory=TrainConfig,
            description="Supervised fine-tuning (full or LoRA) through the HF Trainer and DeepSpeed.",
        )
        align: AlignConfig = Field(
            default_factory=AlignConfig,
            description="DPO on preference pairs (feedback, a file, self-generated), kept only if not worse on val.",
        )
        evaluate: EvaluateConfig = Field(
            default_factory=EvaluateConfig,
            description="Greedy generation on the test split and ROUGE / BLEU scoring.",
        )
        quantize: QuantizeConfig = Field(
            default_factory=QuantizeConfig,
            description="Quantized variants for cheap serving, and their quality gate.",
        )
        register: RegisterConfig = Field(
            default_factory=RegisterConfig,
            description="MLflow experiment and registered model name.",
        )
        promote: PromoteConfig = Field(
            default_factory=PromoteConfig,
            description="When a challenger replaces the champion.",
        )
        serve: ServeConfig = Field(
            default_factory=ServeConfig,
            description="The Gradio app that serves the champion.",
        )
        review: ReviewConfig = Field(
            default_factory=ReviewConfig,
            description="The reviewer's Streamlit dashboard over the registry.",
        )

        model_config = ConfigDict(extra="forbid", validate_assignment=True)

        @model_validator(mode="after")
        def _resolve_auto(self) -> Params:
            """Replace each `auto` of `LANGUAGE_DEFAULTS` by its value for `data.language`."""
            for key, value in LANGUAGE_DEFAULTS[self.data.language].items():
                section_name, field = key.split(".")
                section = getattr(self, section_name)
                if getattr(section, field) == AUTO:
                    try:
                        setattr(section, field, value)  # validated (and cross-checked) by the section
                    except ValidationError as e:
                        reason = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
                        raise ValueError(f"{key} is auto, which is {value!r} for data.language={self.data.language}: {reason}") from e
            return self

        @property
        def layout(self) -> Layout:
            """Where every stage's files are (`tasks.core.layout`)."""
            from tasks.core.layout import Layout  # deferred: layout reads the stage list, built from these classes

            return Layout.of(self.paths)

        def to_dict(self) -> dict[str, Any]:
            """Plain, JSON-safe dict with section names as in params.yaml."""
            return json.loads(self.model_dump_json())

        def flat(self) -> dict[str, Any]:
            """`section.key` -> value, for MLflow params."""
            out: dict[str, Any] = {}

            def walk(prefix: str, value: Any) -> None:
                if isinstance(value, dict):
                    for k, v in value.items():
                        walk(f"{prefix}.{k}" if prefix else k, v)
                else:
                    out[prefix] = value

            walk("", self.to_dict())
            return out

        def digest(self) -> str:
            """sha256 of the sections that change the model or its scores (`MODEL_SECTIONS`, stable key order).

            It is a version's `params.sha256`: the data-change trigger and the registry's "already
            registered" check compare it, so changing `serve.port` or `promote.min_delta` makes no new
            version. The whole file is still recorded with each run (`params.yaml` artifact).
            """
            payload = {section: self.to_dict()[section] for section in MODEL_SECTIONS}
            return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join(loc) if loc else "(root)"
        section = loc[0] if loc else "(root)"
        if e["type"] == "extra_forbidden":
            lines.append(
                f"  - unknown key `{key}` in section `{section}`: remove it or fix its spelling"
                f" (see tasks/core/config.py for the section's keys)"
            )
        else:
            # A whole-params check (loc empty) would quote every section as its input.
            got = f" (got {e.get('input')!r})" if loc else ""
            lines.append(f"  - `{key}`: {e['msg']}{got}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse `section.key=value` (value as YAML, like `dvc exp run -S`)."""
    if "=" not in item:
        raise ParamsError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ParamsError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ParamsError(f"override {item!r}: value is not valid YAML: {e}") from e
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Return a copy of raw params with `section.key=value` overrides applied."""
    data = copy.deepcopy(raw)
    for item in overrides or []:
        parts, value = parse_override(item)
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ParamsError(f"override {item!r}: `{p}` is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def read_params_file(path: Path | str = DEFAULT_PARAMS_FILE) -> dict[str, Any]:
    """Read params.yaml as a dict (missing file = all defaults)."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file {path} does not exist; run from the project root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def params_from_dict(raw: dict[str, Any], source: str = "params") -> Params:
    """Validate a dict into Params, raising ParamsError that names each bad key."""
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(_format_errors(e, source)) from e


def load_params(path: Path | str = DEFAULT_PARAMS_FILE, overrides: list[str] | None = None) -> Params:
    """Load params.yaml, apply `-S` overrides, validate once.

    Args:
        path: the params file.
        overrides: `section.key=value` strings, values parsed as YAML.

    Returns:
        The validated Params.

    Raises:
        ParamsError: the file is missing or invalid, or an override names an unknown key.
    """
    raw = apply_overrides(read_params_file(path), overrides)
    source = str(path) + (f" with overrides {overrides}" if overrides else "")
    return params_from_dict(raw, source)


def save_params(params: Params, path: Path | str) -> None:
    """Write params as YAML (used to record the resolved params of a run)."""
    atomic_write_text(Path(path), yaml.safe_dump(params.to_dict(), allow_unicode=True, sort_keys=False))


def env_flag(name: str) -> bool:
    """True when an environment variable is set to 1/true/yes."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes"}
