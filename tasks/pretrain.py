"""The `pretrain` stage: build (or load) the base model and pretrain it as a causal LM on the corpus.

The base is `artifacts/select/choice.json`'s `base` when the select stage ran, else `model.base`:

- `scratch`: a tokenizer is trained on the training split (`model.tokenizer`: char or bpe), a small
  decoder is built from `model:` sizes, and it is pretrained on the corpus (the training texts and
  summaries, plus the files of `pretrain.corpus`), packed into `pretrain.block_size` token blocks. A
  random decoder is useless as a base, so a scratch base with `pretrain.enabled: false` is an error
  rather than a silent skip.
- a local directory or hub id: passed through unchanged (`pretrain.enabled: auto` or false: its own
  weights and dtype). Only `pretrain.enabled: true` continues its pretraining on the corpus, at
  `pretrain.continued_learning_rate`, through a LoRA adapter merged afterwards when `train.method` is
  lora (the same `train.lora` targets), or of every weight when it is full, which the log says.

Writes `artifacts/pretrain/model/` (a Hugging Face folder), `metrics/pretrain.json` and the loss log
`plots/pretrain/loss.csv` (+ `loss.png`).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

from tasks.core.config import ParamsError
from tasks.core.data import read_split
from tasks.core.errors import StageError
from tasks.core.io import configure_threads, file_sha256, read_json, set_seed, write_json
from tasks.core.launch import threads_per_rank
from tasks.core.modeling import count_parameters, load_model_and_tokenizer, save_model, scratch_base, with_lora
from tasks.core.plots import write_loss_curve
from tasks.core.prompt import answer_ids, collate_features, encode_prompt
from tasks.core.stage_params import StageParams, stage_entry
from tasks.core.training import (
    loss_rows,
    memory_release_callbacks,
    peak_rss_mb,
    precision_arguments,
    resolve_precision,
    training_arguments,
    use_deterministic_algorithms,
)

log = logging.getLogger(__name__)

STAGE = "pretrain"
SCRATCH = "scratch"


def chosen_base(params: StageParams) -> tuple[str, str]:
    """The base to start from and where that choice came from (`select` or `model.base`)."""
    choice_file = params.layout.select_choice
    if choice_file.exists():
        choice = read_json(choice_file)
        if not isinstance(choice, dict) or not choice.get("base"):
            raise StageError(f"{choice_file} has no `base` key; rerun `sftflow select` or delete the file")
        return str(choice["base"]), str(choice_file)
    return params.model.base, "model.base"


def pretraining(params: StageParams, base: str) -> str | None:
    """How the base is pretrained: `scratch`, continued through `lora`, continued on every weight (`full`),
    or None (passed through). `pretrain.enabled: auto` pretrains a scratch base and nothing else.

    Raises:
        StageError: a scratch base with `pretrain.enabled: false`.
        ParamsError: `pretrain.corpus` is set but the base is not pretrained.
    """
    enabled = params.pretrain.enabled
    if base == SCRATCH:
        if enabled is False:
            raise StageError(
                "pretrain.enabled is false but the base is `scratch`: a randomly initialised decoder is no base "
                "to fine-tune. Set pretrain.enabled: auto (or true), or set model.base to a model directory or hub id"
            )
        return SCRATCH
    if enabled is not True:
        if params.pretrain.corpus:
            raise ParamsError(
                f"pretrain.corpus lists {len(params.pretrain.corpus)} file(s), but pretrain.enabled is "
                f"{enabled} and the base ({base}) is not scratch, so nothing would read them: set "
                "pretrain.enabled: true for continued pretraining, or remove pretrain.corpus"
            )
        return None
    return params.train.method


def corpus_documents(paths: list[Path]) -> list[str]:
    """The documents of the unlabelled corpus files: a `.jsonl` file's `text` fields, a plain file's
    paragraphs (split at blank lines).

    Raises:
        ParamsError: files that do not exist (all named at once), or a `.jsonl` line without `text`.
    """
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise ParamsError(
            f"pretrain.corpus: {', '.join(missing)} does not exist (from {Path.cwd()}); fix the path or remove it"
        )
    documents: list[str] = []
    for path in map(Path, paths):
        if path.suffix in {".jsonl", ".ndjson"}:
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ParamsError(f"pretrain.corpus: {path} line {n} has no string `text` field")
                documents.append(record["text"])
        else:
            documents.extend(d.strip() for d in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if d.strip())
    return documents


def pack_blocks(tokenizer: Any, documents: list[str], block_size: int) -> list[list[int]]:
    """Tokenize documents, join them with eos and cut the stream into `block_size` blocks.

    The tail shorter than a block is kept as a last, shorter block only when nothing else is there,
    so a tiny validation split still yields something to score.
    """
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
    blocks = [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
    if not blocks and len(stream) > 1:
        blocks = [stream]
    return blocks


def tokenizer_stats(tokenizer: Any, texts: list[str]) -> dict[str, float]:
    """Tokens per character and the share of unknown tokens on some texts (e.g. validation rows)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    tokens = sum(len(x) for x in ids)
    chars = sum(len(t) for t in texts)
    unk = tokenizer.unk_token_id
    unknown = sum(1 for x in ids for i in x if unk is not None and i == unk)
    return {
        "vocab_size": len(tokenizer),
        "tokens_per_char": round(tokens / max(1, chars), 4),
        "unk_rate": round(unknown / max(1, tokens), 5),
    }


@stage_entry("pretrain")
def run(params: StageParams) -> dict[str, Any]:
    """Build or load the base, pretrain it on the training split, save it as a HF folder.

    Args:
        params: the stage's slice: `model`, `pretrain`, `data.prompt_template`, `train.method` and
            `train.lora` (how a real base's continued pretraining trains).

    Returns:
        The metrics written to `metrics/pretrain.json`.

    Raises:
        StageError: the split is missing, the base cannot be loaded, or a scratch base would go
            unpretrained (`pretrain.enabled: false`).
        ParamsError: a `pretrain.corpus` file is missing, or corpus files with no pretraining to read them.
    """
    cfg = params.pretrain
    base, base_source = chosen_base(params)
    mode = pretraining(params, base)
    corpus = corpus_documents(cfg.corpus) if mode else []
    train_rows = read_split(params.layout, "train")
    val_rows = read_split(params.layout, "val")
    threads = configure_threads(threads_per_rank(0, 1))
    set_seed(cfg.seed)
    use_deterministic_algorithms()

    if base == SCRATCH:
        model, tokenizer = scratch_base(params.model, train_rows, params.data.prompt_template, cfg.seed)
    else:
        # Training wants fp32 master weights; a base passed through untouched keeps its own dtype (bf16 halves the copy).
        model, tokenizer = load_model_and_tokenizer(
            base, trust_remote_code=params.model.trust_remote_code, dtype=None if mode else "auto"
        )
    _trainable, total = count_parameters(model)
    stats = tokenizer_stats(tokenizer, [r["text"] for r in val_rows] + [r["summary"] for r in val_rows])
    log.info("base %s (from %s): %.2fM parameters; tokenizer %s", base, base_source, total / 1e6, stats)

    metrics: dict[str, Any] = {
        "base": base,
        "base_source": base_source,
        "pretrained": mode is not None,
        "pretrain_method": mode,
        "params": total,
        "tokenizer": params.model.tokenizer if base == "scratch" else "base",
        **{f"tokenizer_{k}": v for k, v in stats.items()},
        "threads": threads,
    }
    if cfg.corpus and mode:
        metrics["corpus_sha256"] = {str(p): file_sha256(Path(p)) for p in cfg.corpus}
        metrics["corpus_documents"] = len(corpus)
    history: list[dict[str, Any]] = []
    if mode is None:
        log.info("pretrain: passing %s through unchanged (pretrain.enabled: %s)", base, cfg.enabled)
    else:
        model, out = _pretrain(params, mode, model, tokenizer, train_rows, val_rows, corpus, history)
        metrics.update(out)

    out_dir = params.layout.model_dir(STAGE)
    tmp_dir = out_dir.with_name(".model.tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    save_model(model, tokenizer, tmp_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)  # readers never see half a model
    metrics["peak_rss_mb"] = peak_rss_mb()
    write_json(params.layout.metrics_file(STAGE), metrics)
    if history:
        plots = params.layout.plots_dir(STAGE)
        write_loss_curve(loss_rows(history), plots / "loss.csv", plots / "loss.png", f"pretrain: {base}")
    log.info("pretrain: wrote %s", out_dir)
    return metrics


def _pretrain(
    params: StageParams,
    mode: str,
    model: Any,
    tokenizer: Any,
    train_rows: list[dict[str, Any]],
    val_rows: list[dict[str, Any]],
    corpus: list[str],
    history: list[dict[str, Any]],
) -> tuple[Any, dict[str, Any]]:
    """Causal-LM training on packed blocks of the corpus; returns the trained model (LoRA merged in) and
    its metrics, and fills `history` with the Trainer's log."""
    from transformers import Trainer

    cfg = params.pretrain
    block_size = min(cfg.block_size, getattr(model.config, "max_position_embeddings", cfg.block_size) or cfg.block_size)
    objective = pretraining_objective(params, mode)
    framed = None if objective == "lm" else _framed_blocks(params, objective, tokenizer, train_rows, corpus, block_size)
    train_blocks, val_blocks = _corpus_blocks(tokenizer, train_rows, val_rows, block_size, corpus, framed)
    if mode != SCRATCH:
        # Continued pretraining of a real base: its own (small) learning rate, and LoRA when train uses it.
        cfg = cfg.model_copy(update={"learning_rate": cfg.continued_learning_rate})
        if mode == "lora":
            model = with_lora(model, params.train.lora)
        trainable, total = count_parameters(model)
        log.warning(
            "continued pretraining of the base through %s: %s of %s parameters trainable, learning rate %g",
            "a LoRA adapter (train.lora)" if mode == "lora" else "every weight (train.method: full)",
            f"{trainable:,}", f"{total:,}", cfg.learning_rate,
        )

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    work_dir = params.layout.stage_dir(STAGE) / "trainer"
    precision = resolve_precision(params.train.precision)
    args = training_arguments(
        work_dir,
        cfg,
        save_strategy="no",
        eval_strategy="no",
        **precision_arguments(precision),
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_features(train_blocks),
        eval_dataset=_features(val_blocks) if val_blocks else None,
        # Every real token is a label here, so projecting only the supervised positions (train's collator,
        # `tasks.core.training.training_collator`) would skip only the padding, and its changing row counts
        # are new matmul shapes: in a fresh `make run` it raised pretrain's peak RSS from 1215 to 1348 MiB.
        data_collator=lambda batch: collate_features(batch, pad_id),
        callbacks=memory_release_callbacks(args.device),
    )
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {}
    if val_blocks:
        out["val_loss"] = round(float(trainer.evaluate()["eval_loss"]), 4)
        out["val_perplexity"] = round(math.exp(out["val_loss"]), 2)
    history.extend(trainer.state.log_history)
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    out.update(
        {
            "train_loss": round(float(logged[-1]), 4) if logged else round(result.training_loss, 4),
            "train_loss_mean": round(result.training_loss, 4),
            "steps": trainer.state.global_step,
            "objective": objective,
            "learning_rate": cfg.learning_rate,
            "blocks": len(train_blocks),
            "block_size": block_size,
            "precision": precision,
            "seconds": round(seconds, 1),
            "tokens_per_second": round(trainer.state.num_input_tokens_seen / seconds, 1),
        }
    )
    shutil.rmtree(work_dir, ignore_errors=True)
    if mode == "lora":
        model = model.merge_and_unload()
    return model, out


def _corpus_blocks(
    tokenizer: Any,
    train_rows: list[dict[str, Any]],
    val_rows: list[dict[str, Any]],
    block_size: int,
    corpus: list[str] | None = None,
    framed: list[list[int]] | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """The texts and summaries of each split packed into blocks, the unlabelled corpus after the train
    split's (or, for a framed objective, its `framed` blocks for training); StageError when training gets none."""
    if framed is not None:
        train_blocks = framed
    else:
        documents = [r["text"] for r in train_rows] + [r["summary"] for r in train_rows] + list(corpus or [])
        train_blocks = pack_blocks(tokenizer, documents, block_size)
    val_blocks = pack_blocks(tokenizer, [r["text"] for r in val_rows] + [r["summary"] for r in val_rows], block_size)
    if not train_blocks:
        raise StageError(
            f"the training split holds fewer than {block_size} tokens; lower pretrain.block_size or add data"
        )
    log.info("pretrain corpus: %d blocks of %d tokens (val %d blocks)", len(train_blocks), block_size, len(val_blocks))
    return train_blocks, val_blocks


def _features(blocks: list[list[int]]) -> list[dict[str, list[int]]]:
    """Causal-LM features of packed blocks: every token is a label."""
    return [{"input_ids": b, "attention_mask": [1] * len(b), "labels": b} for b in blocks]


def pretraining_objective(params: StageParams, mode: str) -> str:
    """`pretrain.objective` resolved: `auto` is `lead` for a scratch base, `lm` for a real base's continued pretraining."""
    objective = params.pretrain.objective
    if objective == "auto":
        return "lead" if mode == SCRATCH else "lm"
    return objective


_CLAUSE_END = {"zh": r"(?<=[，。；！？,;!?.])", "en": r"(?<=[.!?;])\s+"}


def clauses(text: str, language: str) -> list[str]:
    """The text cut after each clause or sentence end (zh: ，。；！？ and their ASCII forms; en: . ! ? ;)."""
    return [c.strip() for c in re.split(_CLAUSE_END[language], text) if c.strip()]


def pseudo_summary(text: str, objective: str, max_chars: int, language: str) -> str:
    """A summary a document writes of itself, for pretraining framed as the task (PEGASUS's pseudo-summaries).

    - `lead`: its opening clauses, as many whole ones as fit `max_chars` (the first one cut if it alone is longer).
    - `gap-sentence`: its principal clause, the one with the highest F1 of character bigrams (zh) or words (en)
      against the rest of the document, cut to `max_chars`.

    Trailing clause punctuation is dropped, as titles have none.
    """
    parts = clauses(text, language) or [text.strip()]
    if objective == "lead":
        out = parts[0]
        for part in parts[1:]:
            joined = out + (" " if language == "en" else "") + part
            if len(joined) > max_chars:
                break
            out = joined
    elif objective == "gap-sentence":
        out = max(parts, key=lambda part: _overlap_f1(part, text.replace(part, " "), language))
    else:
        raise ValueError(f"no pseudo-summary for objective {objective!r}")
    return out[:max_chars].rstrip("，。；！？,;!?. ")


def _overlap_f1(part: str, rest: str, language: str) -> float:
    from collections import Counter

    def units(s: str) -> Counter[str]:
        if language == "en":
            return Counter(re.findall(r"\w+", s.lower()))
        return Counter(s[i : i + 2] for i in range(len(s) - 1))

    mine, theirs = units(part), units(rest)
    hit = sum((mine & theirs).values())
    if not hit:
        return 0.0
    precision, recall = hit / sum(mine.values()), hit / sum(theirs.values())
    return 2 * precision * recall / (precision + recall)


def _framed_blocks(
    params: StageParams,
    objective: str,
    tokenizer: Any,
    train_rows: list[dict[str, Any]],
    corpus: list[str],
    block_size: int,
) -> list[list[int]]:
    """Pretraining examples framed as the task: each document (a train text, a corpus document) in the prompt
    template, answered by its own pseudo-summary; the train split's summaries are packed as plain text beside.

    Every token carries loss (it is still language modelling of the same texts), but the model also learns
    to answer the prompt from its source, which plain packed text never asks of it. A pseudo-summary is at
    most as long as the train split's 90th-percentile summary; no reference summary is framed.
    """
    template, chat = params.data.prompt_template, params.data.use_chat_template
    language = params.data.language
    lengths = sorted(len(r["summary"]) for r in train_rows)
    max_chars = max(4, lengths[math.ceil(0.9 * len(lengths)) - 1])  # the nearest-rank 90th percentile
    documents = [r["text"] for r in train_rows] + list(corpus)
    blocks: list[list[int]] = []
    for text in documents:
        answer = answer_ids(tokenizer, text, pseudo_summary(text, objective, max_chars, language), template, chat)
        answer = answer[: block_size // 4]
        prompt, _cut = encode_prompt(tokenizer, text, template, chat, block_size - len(answer))
        blocks.append(prompt + answer)
    blocks += pack_blocks(tokenizer, [r["summary"] for r in train_rows], block_size)
    log.info(
        "pretrain objective %s: %d documents framed as the task (pseudo-summaries of at most %d characters), "
        "%d blocks in all", objective, len(documents), max_chars, len(blocks),
    )
    return blocks
