"""Build, load and save causal LMs: the scratch base (tokenizer + small decoder) and any HF model.

A scratch model is saved as an ordinary Hugging Face directory (safetensors + tokenizer), so every
later stage loads it exactly like a hub model, through `load_model_and_tokenizer`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tasks.config import ModelConfig
from tasks.errors import StageError

log = logging.getLogger(__name__)

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]


def train_tokenizer(texts: Iterable[str], kind: str = "char", vocab_size: int = 6000) -> Any:
    """Train a tokenizer on the corpus with the `tokenizers` library.

    Args:
        texts: training texts (sources and summaries).
        kind: `char` (one token per character: Chinese needs no merges to be compact) or `bpe`
            (byte-level BPE, for English or mixed corpora).
        vocab_size: upper bound on the vocabulary, special tokens included.

    Returns:
        A `PreTrainedTokenizerFast` with pad/unk/bos/eos set and left padding (for generation).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if kind == "char":
        # Every character is a token: WordLevel over single characters, fused back without spaces.
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:
        raise StageError(f"model.tokenizer must be char or bpe, got {kind!r}")
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    log.info("trained a %s tokenizer: %d tokens from %d texts", kind, len(fast), len(texts))
    return fast


def build_scratch_model(cfg: ModelConfig, tokenizer: Any) -> Any:
    """A randomly initialised decoder (Qwen2 or Llama architecture) sized by `model:` params."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[cfg.architecture]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    n = sum(p.numel() for p in model.parameters())
    log.info("built a scratch %s decoder: %.2fM parameters", cfg.architecture, n / 1e6)
    return model


def is_local_model_dir(name_or_path: str | Path) -> bool:
    """True for a folder that holds a Hugging Face config."""
    p = Path(name_or_path)
    return p.is_dir() and (p / "config.json").exists()


def load_model_and_tokenizer(
    name_or_path: str | Path,
    trust_remote_code: bool = False,
    dtype: Any = None,
    device_map: Any = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a local directory or a hub id.

    The tokenizer gets a pad token (eos when it has none) and left padding, for batched generation.

    Raises:
        StageError: the directory does not exist / has no config, or the hub id cannot be fetched
            (no network and no HF cache), or the architecture is not a causal LM transformers knows.
    """
    import torch
    from transformers import AutoModelForCausalLM

    name = str(name_or_path)
    path = Path(name)
    looks_local = path.is_absolute() or name.startswith((".", "/")) or path.exists()
    if looks_local and not is_local_model_dir(path):
        raise StageError(
            f"model directory {path} does not exist or has no config.json; "
            "point model.base at a Hugging Face model folder (or use `scratch`)"
        )
    try:
        tokenizer = _load_tokenizer(name, trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            name,
            trust_remote_code=trust_remote_code,
            dtype=dtype if dtype is not None else torch.float32,
            device_map=device_map,
        )
    except (OSError, ValueError, KeyError) as e:
        hint = (
            "it is not a local folder, so it is a hub id: that needs network access or a filled HF cache"
            if not looks_local
            else "check that the folder holds a causal LM saved with save_pretrained"
        )
        raise StageError(f"cannot load model {name!r}: {e}. {hint}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _load_tokenizer(name: str, trust_remote_code: bool) -> Any:
    """AutoTokenizer, except for a plain `tokenizers` tokenizer (ours): load that as it was saved.

    transformers 5 picks the tokenizer class from the model's `model_type` (qwen2 -> Qwen2Tokenizer)
    even when tokenizer_config.json names the generic backend, which rebuilds a byte-level BPE
    pipeline around our character vocabulary and silently mangles every Chinese text.
    """
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_file = Path(name) / "tokenizer_config.json"
    if config_file.exists() and (Path(name) / "tokenizer.json").exists():
        declared = json.loads(config_file.read_text(encoding="utf-8")).get("tokenizer_class")
        if declared in {"TokenizersBackend", "PreTrainedTokenizerFast"}:
            return PreTrainedTokenizerFast.from_pretrained(name)
    return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)


def save_model(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """Save as safetensors + tokenizer, the layout every stage and the registry read."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


# --- Training helpers shared by `pretrain` and `train` ------------------------------------------


def linear_module_names(model: Any) -> list[str]:
    """Sorted short names (`q_proj`, `down_proj`, ...) of the Linear layers LoRA can target."""
    import torch

    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    return sorted(names)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def loss_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per logged step from a Trainer's `log_history`: step, train_loss, val_loss (None if absent)."""
    by_step: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        step = int(entry.get("step", 0))
        if "loss" in entry:
            by_step.setdefault(step, {"step": step, "train_loss": None, "val_loss": None})["train_loss"] = float(entry["loss"])
        if "eval_loss" in entry:
            by_step.setdefault(step, {"step": step, "train_loss": None, "val_loss": None})["val_loss"] = float(entry["eval_loss"])
    return [by_step[s] for s in sorted(by_step)]


def write_loss_curve(rows: list[dict[str, Any]], csv_path: Path, png_path: Path, title: str) -> None:
    """Write the loss rows as CSV (columns step,train_loss,val_loss for `dvc plots show`) and a PNG plot."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.io import atomic_write_text, save_figure

    def cell(v: Any) -> str:
        return "" if v is None else f"{v:.6g}"

    lines = ["step,train_loss,val_loss"] + [f"{r['step']},{cell(r['train_loss'])},{cell(r['val_loss'])}" for r in rows]
    atomic_write_text(Path(csv_path), "\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        points = [(r["step"], r[key]) for r in rows if r[key] is not None]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "val_loss" else None, markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, Path(png_path), dpi=100)
