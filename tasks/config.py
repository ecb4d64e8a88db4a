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
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tasks.errors import SftflowError

STAGES = (
    "validate",
    "split",
    "select",
    "pretrain",
    "train",
    "evaluate",
    "quantize",
    "register",
    "promote",
    "serve",
)

DEFAULT_PARAMS_FILE = Path("params.yaml")


class ParamsError(SftflowError, ValueError):
    """Raised when params.yaml or a `-S key=value` override is invalid; the message names each key."""


class Section(BaseModel):
    """Base for every section: unknown keys fail, assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    """The raw data set and the task it poses."""

    path: Path = Path("data/sample/zh_summ.jsonl")
    format: Literal["auto", "jsonl", "csv", "parquet"] = "auto"
    text_column: str = "text"
    summary_column: str = "summary"
    id_column: str | None = "id"
    language: Literal["zh", "en"] = "zh"
    prompt_template: str = "为下面的论文摘要拟一个标题。\n摘要：{text}\n标题："
    use_chat_template: bool = Field(
        default=True, description="Wrap the prompt in the tokenizer's chat template when it has one."
    )

    @field_validator("prompt_template")
    @classmethod
    def _template_has_text(cls, v: str) -> str:
        if "{text}" not in v:
            raise ValueError("prompt_template must contain the placeholder {text}")
        return v


class PathsConfig(Section):
    """Where stages write. Stage `s` writes under `artifacts/s/`, its metrics to `metrics/s.json`."""

    artifacts: Path = Path("artifacts")
    metrics: Path = Path("metrics")
    plots: Path = Path("plots")

    def stage_dir(self, stage: str) -> Path:
        """Output folder of a stage (not created here)."""
        assert stage in STAGES, stage
        return self.artifacts / stage

    def metrics_file(self, stage: str) -> Path:
        """The DVC metrics file of a stage."""
        assert stage in STAGES, stage
        return self.metrics / f"{stage}.json"

    def plots_dir(self, stage: str) -> Path:
        """The DVC plots folder of a stage."""
        assert stage in STAGES, stage
        return self.plots / stage


class ModelConfig(Section):
    """The base model: `scratch` (built and pretrained here) or a local directory / hub id."""

    base: str = "scratch"
    candidates: list[str] = Field(
        default_factory=list,
        description="Bases the `select` stage compares; empty means just `base`.",
    )
    trust_remote_code: bool = False
    # Shape of the scratch decoder (Qwen2 architecture). Ignored for a real base model.
    architecture: Literal["qwen2", "llama"] = "qwen2"
    tokenizer: Literal["char", "bpe"] = "char"
    vocab_size: int = Field(default=6000, gt=16)
    hidden_size: int = Field(default=192, gt=0)
    num_layers: int = Field(default=4, gt=0)
    num_heads: int = Field(default=4, gt=0)
    num_kv_heads: int = Field(default=2, gt=0)
    intermediate_size: int = Field(default=512, gt=0)
    max_position_embeddings: int = Field(default=512, gt=0)

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
    """Great Expectations suite and row filters for the raw data."""

    unicode_form: Literal["NFC", "NFKC", "none"] = "NFC"
    min_text_chars: int = Field(default=20, ge=1)
    max_text_chars: int = Field(default=2000, ge=1)
    min_summary_chars: int = Field(default=2, ge=1)
    max_summary_chars: int = Field(default=200, ge=1)
    max_duplicate_share: float = Field(default=0.05, ge=0, le=1)
    min_language_share: float = Field(default=0.9, ge=0, le=1)
    min_cjk_ratio: float = Field(default=0.3, ge=0, le=1, description="Share of CJK chars for a zh row.")
    min_ascii_word_ratio: float = Field(
        default=0.8, ge=0, le=1, description="Share of letter runs that are ASCII words for an en row."
    )
    max_dropped_share: float = Field(default=0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _bounds(self) -> ValidateConfig:
        if self.min_text_chars > self.max_text_chars:
            raise ValueError("validate.min_text_chars must not exceed validate.max_text_chars")
        if self.min_summary_chars > self.max_summary_chars:
            raise ValueError("validate.min_summary_chars must not exceed validate.max_summary_chars")
        return self


class SplitConfig(Section):
    """Content-hash split into train/val/test."""

    train: float = Field(default=0.8, gt=0, lt=1)
    val: float = Field(default=0.1, gt=0, lt=1)
    test: float = Field(default=0.1, gt=0, lt=1)
    salt: str = "sftflow-v1"
    near_duplicate_threshold: float = Field(default=0.9, gt=0, le=1)

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

    rows: int = Field(default=64, gt=0, description="First N val rows each candidate is scored on.")
    metric: Literal["loss", "rouge-l"] = Field(
        default="loss",
        description="loss: summary loss per character (lower wins; fair across tokenizers); rouge-l: zero-shot ROUGE-L.",
    )


class PretrainConfig(Section):
    """Causal-LM pretraining on the training texts (always on for a scratch base)."""

    enabled: bool = True
    epochs: float = Field(default=4.0, gt=0)
    max_steps: int = Field(default=-1, description="Overrides epochs when > 0.")
    learning_rate: float = Field(default=3e-3, gt=0)
    batch_size: int = Field(default=16, gt=0)
    block_size: int = Field(default=256, gt=0)
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    logging_steps: int = Field(default=10, gt=0)
    seed: int = 42


class LoraConfig(Section):
    """PEFT LoRA adapter settings (used when train.method is lora)."""

    r: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class TrainConfig(Section):
    """Supervised fine-tuning through the HF Trainer and DeepSpeed."""

    method: Literal["lora", "full"] = "full"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    deepspeed_config: Path | None = Path("configs/deepspeed/zero2.json")
    num_processes: int = Field(default=1, gt=0)
    torch_threads: int = Field(default=0, ge=0, description="Threads per rank; 0 = cores / ranks.")
    epochs: float = Field(default=2.0, gt=0)
    max_steps: int = Field(default=-1, description="Overrides epochs when > 0.")
    learning_rate: float = Field(default=2e-3, gt=0)
    batch_size: int = Field(default=16, gt=0)
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    max_source_length: int = Field(default=256, gt=0)
    max_target_length: int = Field(default=48, gt=0)
    group_by_length: bool = True
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    save_steps: int = Field(default=50, gt=0)
    keep_checkpoints: int = Field(default=2, gt=0, description="Newest checkpoints kept (2: one survives a kill mid-save).")
    eval_steps: int = Field(default=50, gt=0)
    logging_steps: int = Field(default=1, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto = bf16 on a GPU that supports it, else fp32."
    )
    seed: int = 42


class EvaluateConfig(Section):
    """Greedy generation on the test split and ROUGE / BLEU scoring."""

    # rouge-chinese's LCS is quadratic in length: titles are ~19 chars, so 48 new tokens bound it.
    max_new_tokens: int = Field(default=48, gt=0)
    batch_size: int = Field(default=32, gt=0)
    rows: int = Field(default=0, ge=0, description="Score only the first N test rows; 0 = all.")
    bootstrap_samples: int = Field(default=1000, gt=0)
    seed: int = 42
    baseline_max_k: int = Field(default=60, gt=0, description="Largest k tried for the lead-k baseline.")
    score_base: bool = True
    cache_dir: Path = Field(
        default=Path(".cache/sftflow/generations"),
        description="Generations keyed by (model hash, rows hash, generation params); outside DVC outs.",
    )


class QuantizeConfig(Section):
    """Quantized variants for cheap serving and the quality gate."""

    methods: list[Literal["int8", "bnb-int8", "bnb-nf4"]] = Field(default_factory=lambda: ["int8"])
    max_drop: float = Field(default=1.0, ge=0, description="Largest ROUGE-L drop (points) allowed.")
    rows: int = Field(default=0, ge=0, description="Measure on the first N test rows; 0 = all.")

    @field_validator("methods")
    @classmethod
    def _methods_unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"quantize.methods lists a method twice: {v}")
        return v


class RegisterConfig(Section):
    """MLflow experiment and registered model name."""

    experiment: str = "sftflow"
    model_name: str = "sftflow-summarizer"


class PromoteConfig(Section):
    """When a challenger replaces the champion."""

    min_delta: float = Field(default=0.0, ge=0, description="ROUGE-L points the challenger must gain.")
    bootstrap_samples: int = Field(default=1000, gt=0)
    seed: int = 42


class ServeConfig(Section):
    """The Gradio app."""

    host: str = "127.0.0.1"
    port: int = Field(default=7860, gt=0, lt=65536)
    poll_seconds: float = Field(default=10.0, gt=0)
    max_chars: int = Field(default=2000, gt=0)
    concurrency_limit: int = Field(default=2, gt=0)
    variant_cpu: Literal["full", "int8"] = "int8"
    variant_gpu: Literal["full", "bf16", "bnb-nf4", "bnb-int8"] = "bf16"


# Sections carry the stage names used everywhere. `validate` and `register` shadow pydantic's
# deprecated `BaseModel.validate` and ABCMeta's `register`, which nothing here calls: silence that.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "(validate|register)"', category=UserWarning)

    class Params(Section):
        """The whole params.yaml."""

        data: DataConfig = Field(default_factory=DataConfig)
        paths: PathsConfig = Field(default_factory=PathsConfig)
        model: ModelConfig = Field(default_factory=ModelConfig)
        validate: ValidateConfig = Field(default_factory=ValidateConfig)  # type: ignore[assignment]
        split: SplitConfig = Field(default_factory=SplitConfig)
        select: SelectConfig = Field(default_factory=SelectConfig)
        pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
        train: TrainConfig = Field(default_factory=TrainConfig)
        evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
        quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
        register: RegisterConfig = Field(default_factory=RegisterConfig)
        promote: PromoteConfig = Field(default_factory=PromoteConfig)
        serve: ServeConfig = Field(default_factory=ServeConfig)

        model_config = ConfigDict(extra="forbid", validate_assignment=True)

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
            """sha256 of the resolved parameters (stable key order)."""
            return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join(loc) if loc else "(root)"
        section = loc[0] if loc else "(root)"
        if e["type"] == "extra_forbidden":
            lines.append(
                f"  - unknown key `{key}` in section `{section}`: remove it or fix its spelling"
                f" (see tasks/config.py for the section's keys)"
            )
        else:
            lines.append(f"  - `{key}`: {e['msg']} (got {e.get('input')!r})")
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
    from tasks.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(params.to_dict(), allow_unicode=True, sort_keys=False))


def env_flag(name: str) -> bool:
    """True when an environment variable is set to 1/true/yes."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes"}
