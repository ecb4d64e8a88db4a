"""The `align` stage: learning from preferences with DPO (TRL's `DPOTrainer`), gated on val ROUGE-L.

Reads `artifacts/train/model/`, the splits, the closed snapshots of the feedback store
(`align.feedback_dir`/closed, `tasks.core.feedback`) and the preference file `align.data`; writes

- `artifacts/align/model/`: the final model, the one evaluate, quantize, register and serve use: the
  aligned model when the gate passes, else the fine-tuned model passed through (also when
  `align.enabled` is false, or there is no pair);
- `artifacts/align/pairs.jsonl`: the pairs trained and held out (`split`: train | held_out);
- `artifacts/align/feedback.jsonl`: the feedback records of the closed snapshots it read (DVC caches and
  pushes it with the run, so the feedback a version learnt from can be pulled again);
- `artifacts/align/checkpoints/`: Trainer checkpoints every `align.save_steps`; a rerun with the same
  inputs resumes from the newest complete one;
- `metrics/align.json`: pair counts per source (and what was dropped), the DPO figures (`loss`,
  `rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies`, the last logged step;
  `held_out_reward_accuracy` on pairs it never trained on), the gate and its decision (`final`,
  `reason`), the feedback snapshot's and preference file's sha256;
- `plots/align/rewards.csv` and `rewards.png`.

Pairs, in this order, at most `align.max_pairs`: feedback corrections (chosen = the correction,
rejected = the model's output); the preference file; the train split (chosen = the reference,
rejected = the fine-tuned model's greedy output where it scores below `align.max_rouge_l`). No pair
comes from a val or test row: feedback or file prompts that are near-duplicates of one are dropped
and counted. Pairs are encoded exactly as train encodes rows (`tasks.core.prompt`): the same prompt
ids as generation, the answer and its end-of-turn token.

The reference policy is the fine-tuned model: with `train.method: lora` DPO trains a fresh adapter
and TRL computes the reference with the adapter disabled; with `full`, a frozen copy. Precision and
DeepSpeed: precision follows `train.precision`; align runs in one process, where DeepSpeed has nothing to
split (`tasks.core.launch.deepspeed_plan`), so it trains with the plain (TRL) Trainer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from tasks.core.checkpoints import checkpoint_step, finished_state, last_complete_checkpoint, prepare_checkpoints
from tasks.core.data import read_split
from tasks.core.errors import StageError
from tasks.core.evaluation import Evaluator
from tasks.core.feedback import near_duplicate_flags, read_closed
from tasks.core.io import configure_threads, dir_sha256, set_seed, write_json, write_jsonl
from tasks.core.launch import release_deepspeed_config
from tasks.core.modeling import count_parameters, load_model, load_tokenizer, lora_config, save_model
from tasks.core.plots import save_figure
from tasks.core.preferences import Pair, pairs_sha256, preference_file_sha256, read_preference_file
from tasks.core.prompt import answer_ids, check_chat_template, encode_prompt
from tasks.core.scoring import paired_bootstrap, score_row
from tasks.core.stage_params import StageParams, stage_entry
from tasks.core.training import (
    batch_width_multiple,
    memory_release_callbacks,
    precision_arguments,
    resolve_precision,
    training_arguments,
    use_deterministic_algorithms,
)

log = logging.getLogger(__name__)

STAGE = "align"
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
ALIGNED, FINE_TUNED = "aligned", "fine-tuned"


@stage_entry("align")
def run(params: StageParams) -> dict[str, Any]:
    """Build preference pairs, run DPO on the fine-tuned model, keep it only if the val gate passes.

    Args:
        params: the stage's slice (`align`, what generation and scoring read, `train.method` / `lora` /
            `precision` / `deepspeed_config` / `max_target_length`, `split.near_duplicate_threshold`).

    Returns:
        The metrics written to `metrics/align.json`.

    Raises:
        StageError: the fine-tuned model or a split is missing.
        DataError: the preference file is missing or fails its checks.
    """
    cfg, layout = params.align, params.layout
    tuned_dir = layout.fine_tuned_model
    if not (tuned_dir / "config.json").exists():
        raise StageError(f"{tuned_dir} holds no model; run `sftflow train` first")
    start = time.perf_counter()
    feedback = read_closed(cfg.feedback_dir)
    # A missing file is named by the preference-file check below (with the fix), not by a hash's OSError.
    data_sha = preference_file_sha256(cfg.data) if cfg.data is None or Path(cfg.data).is_file() else "missing"
    base = {
        "enabled": cfg.enabled,
        "feedback_sha256": feedback.sha256,
        "feedback_snapshots": len(feedback.files),
        "data_sha256": data_sha,
        "fine_tuned_sha256": dir_sha256(tuned_dir),
    }
    # The records this run read, as a DVC out: cached and pushed with the run, so the feedback a version
    # learnt from can be pulled again (the store itself is git-ignored).
    write_jsonl(layout.stage_dir(STAGE) / "feedback.jsonl", feedback.records if cfg.enabled else [])
    if not cfg.enabled:
        return _finish(params, {**base, **_empty_counts()}, None, "align.enabled is false", start)
    configure_threads(params.train.torch_threads)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(str(tuned_dir), params.model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pairs, counts = build_pairs(params, feedback, tuned_dir)
    base.update(counts)
    if not pairs:
        return _finish(params, base, None, "no preference pairs (no feedback, no preference file, no self-generated pair)", start)
    train_pairs, held_out = hold_out(pairs, cfg.held_out_share, cfg.seed)
    write_jsonl(layout.stage_dir(STAGE) / "pairs.jsonl",
                [{**p.to_dict(), "split": s} for s, part in (("train", train_pairs), ("held_out", held_out)) for p in part])
    chat = check_chat_template(tokenizer, params.data.use_chat_template)
    if chat is not None:
        log.info("chat template: answers end with %s", chat.end_of_turn)
    trained = dpo(params, tuned_dir, tokenizer, train_pairs, held_out)
    gate = val_gate(params, tuned_dir, trained["model_dir"])
    metrics = {**base, "pairs_train": len(train_pairs), "pairs_held_out": len(held_out), **trained["metrics"], "gate": gate}
    if gate["passed"]:
        reason = (f"kept the aligned model: val ROUGE-L {gate['aligned']:.2f} vs {gate['fine_tuned']:.2f} (fine-tuned), "
                  f"paired-bootstrap lower bound {gate['low']:+.2f} > -{cfg.max_drop}")
        return _finish(params, metrics, trained["model_dir"], reason, start)
    reason = (f"kept the fine-tuned model: the aligned one's val ROUGE-L {gate['aligned']:.2f} vs {gate['fine_tuned']:.2f}, "
              f"paired-bootstrap lower bound {gate['low']:+.2f} is not above -{cfg.max_drop} (align.max_drop)")
    return _finish(params, metrics, None, reason, start)


def _empty_counts() -> dict[str, int]:
    keys = ("pairs_feedback", "pairs_file", "pairs_self", "pairs_total", "feedback_records", "feedback_corrupt",
            "feedback_without_correction", "feedback_near_duplicates_dropped", "file_rows", "file_same_answers",
            "file_near_duplicates_dropped", "self_generated_rows", "self_above_max_rouge_l")
    return dict.fromkeys(keys, 0)


def build_pairs(params: StageParams, feedback: Any, tuned_dir: Path) -> tuple[list[Pair], dict[str, int]]:
    """The pairs in source order (feedback corrections, the preference file, self-generated), at most
    `align.max_pairs`, and the counts per source and of what was dropped.

    Raises:
        DataError: the preference file fails its checks.
    """
    cfg, threshold = params.align, params.split.near_duplicate_threshold
    counts = _empty_counts()
    held = [r["text"] for name in ("val", "test") for r in read_split(params.layout, name, allow_empty=True)]
    counts["feedback_records"] = len(feedback.records)
    counts["feedback_corrupt"] = feedback.corrupt
    if feedback.corrupt:
        log.warning("skipped %d corrupt feedback records", feedback.corrupt)
    corrections = [r for r in feedback.records if r["correction"]]
    counts["feedback_without_correction"] = len(feedback.records) - len(corrections)
    near = near_duplicate_flags([r["text"] for r in corrections], held, threshold)
    counts["feedback_near_duplicates_dropped"] = sum(near)
    seen: set[tuple[str, str, str]] = set()
    pairs: list[Pair] = []

    def add(pair: Pair) -> None:
        key = (pair.text, pair.chosen, pair.rejected)
        if key not in seen and len(pairs) < cfg.max_pairs:
            seen.add(key)
            pairs.append(pair)

    for record, dup in zip(corrections, near):
        if not dup:
            add(Pair(record["text"], record["correction"], record["output"], "feedback"))
    if cfg.data is not None:
        from_file, file_counts = read_preference_file(Path(cfg.data))
        counts.update(file_counts)
        near = near_duplicate_flags([p.text for p in from_file], held, threshold)
        counts["file_near_duplicates_dropped"] = sum(near)
        for pair, dup in zip(from_file, near):
            if not dup:
                add(pair)
    if cfg.self_pairs and len(pairs) < cfg.max_pairs:
        for pair in self_generated_pairs(params, tuned_dir, counts):
            add(pair)
    for source in ("feedback", "file", "self"):
        counts[f"pairs_{source}"] = sum(p.source == source for p in pairs)
    counts["pairs_total"] = len(pairs)
    log.info("align: %d pairs (%d feedback, %d file, %d self-generated)", len(pairs), counts["pairs_feedback"],
             counts["pairs_file"], counts["pairs_self"])
    return pairs, counts


def self_generated_pairs(params: StageParams, tuned_dir: Path, counts: dict[str, int]) -> list[Pair]:
    """Train rows (seeded order) where the fine-tuned model's greedy output scores below `align.max_rouge_l`:
    chosen = the reference, rejected = that output. Generations are cached like evaluate's."""
    cfg = params.align
    rows = read_split(params.layout, "train", allow_empty=True)
    random.Random(cfg.seed).shuffle(rows)
    rows = rows[: cfg.generate_rows]
    if not rows:
        return []
    outputs = Evaluator.of(params).predict(tuned_dir, rows, progress=False)
    counts["self_generated_rows"] = len(rows)
    pairs = []
    for row, output in zip(rows, outputs):
        if output.strip() == row["summary"].strip() or score_row(output, row["summary"], params.data.language)["rouge-l"] >= cfg.max_rouge_l:
            counts["self_above_max_rouge_l"] += 1
            continue
        pairs.append(Pair(row["text"], row["summary"], output, "self"))
    return pairs


def hold_out(pairs: list[Pair], share: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Split the pairs (seeded) into those trained on and those held out to measure reward accuracy."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n = int(round(share * len(pairs))) if len(pairs) >= 4 else 0
    held = set(order[:n])
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def encode_pairs(params: StageParams, tokenizer: Any, pairs: list[Pair]) -> list[dict[str, list[int]]]:
    """DPO features: `prompt_ids` as generation feeds the prompt, `chosen_ids` / `rejected_ids` as train
    encodes an answer (its end-of-turn token or eos), cut at `train.max_target_length`."""
    data, limit = params.data, params.train.max_target_length
    features = []
    for p in pairs:
        prompt, _ = encode_prompt(tokenizer, p.text, data.prompt_template, data.use_chat_template, params.train.max_source_length)
        features.append({
            "prompt_ids": prompt,
            "chosen_ids": answer_ids(tokenizer, p.text, p.chosen, data.prompt_template, data.use_chat_template)[:limit],
            "rejected_ids": answer_ids(tokenizer, p.text, p.rejected, data.prompt_template, data.use_chat_template)[:limit],
        })
    return features


def dpo_config(params: StageParams, ckpt_dir: Path) -> Any:
    """TRL's `DPOConfig` with sftflow's Trainer defaults (`tasks.core.training.training_arguments`), train's
    precision (`resolve_precision(train.precision)`, as train decides it) and the align params. TRL's own
    defaults that differ are set back: no gradient checkpointing (small models, 2 cores), and bf16 only
    when the precision is bf16 (TRL turns it on by default, on the CPU too)."""
    from transformers import TrainingArguments
    from trl import DPOConfig

    cfg, train = params.align, params.train
    args = training_arguments(
        ckpt_dir,
        cfg,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.keep_checkpoints,
        eval_strategy="no",
        # One process: DeepSpeed has nothing to split there (tasks.core.launch.deepspeed_plan), so none.
        **precision_arguments(resolve_precision(train.precision)),
    )
    init = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    return DPOConfig(
        **init,
        beta=cfg.beta,
        max_length=None,  # pairs are cut when encoded (train.max_source_length, train.max_target_length)
        disable_dropout=True,
        # bf16 on the CPU grows memory per batch shape: bounded as train bounds it (batch_width_multiple)
        pad_to_multiple_of=multiple if (multiple := batch_width_multiple(args)) > 1 else None,
    )


def _trainer_class() -> Any:
    from trl import DPOTrainer

    class PreEncodedDPOTrainer(DPOTrainer):
        """DPOTrainer on pairs encoded by `encode_pairs`: TRL 1.16 would re-tokenize prompt + answer text
        itself (and append the tokenizer's eos rather than the chat template's end-of-turn token)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # noqa: D102 (TRL's hook)
            return dataset

    return PreEncodedDPOTrainer


def dpo(params: StageParams, tuned_dir: Path, tokenizer: Any, train_pairs: list[Pair], held_out: list[Pair]) -> dict[str, Any]:
    """Train with DPO from the fine-tuned model (resuming from a complete checkpoint); save the aligned model.

    Returns:
        `model_dir` (the aligned model, `artifacts/align/.aligned`) and `metrics`: the last logged loss and
        rewards, `held_out_reward_accuracy` / `held_out_reward_margin`, steps, seconds, trainable parameters.
    """
    from datasets import Dataset

    cfg, train = params.align, params.train
    stage_dir = params.layout.stage_dir(STAGE)
    ckpt_dir = stage_dir / "checkpoints"
    train_features = encode_pairs(params, tokenizer, train_pairs)
    held_features = encode_pairs(params, tokenizer, held_out)
    prepare_checkpoints(ckpt_dir, {
        "align": cfg.model_dump(mode="json"),
        "method": train.method,
        "lora": train.lora.model_dump(mode="json"),
        "pairs": pairs_sha256(train_pairs),
        "fine_tuned": dir_sha256(tuned_dir),
    })
    set_seed(cfg.seed)
    use_deterministic_algorithms()
    trust = params.model.trust_remote_code
    model = load_model(tuned_dir, trust_remote_code=trust)
    ref_model, peft_config = None, None
    if train.method == "lora":
        peft_config = lora_config(model, train.lora)
    else:
        ref_model = load_model(tuned_dir, trust_remote_code=trust).eval()
        ref_model.requires_grad_(False)
    args = dpo_config(params, ckpt_dir)
    trainer = _trainer_class()(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=Dataset.from_list(train_features),
        eval_dataset=Dataset.from_list(held_features) if held_features else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=memory_release_callbacks(args.device),
    )
    trainable, total = count_parameters(trainer.model)
    log.info("align: DPO on %d pairs (%d held out), method %s, %s trainable of %s parameters",
             len(train_features), len(held_features), train.method, f"{trainable:,}", f"{total:,}")
    resume = last_complete_checkpoint(ckpt_dir)
    start_step = checkpoint_step(resume) if resume is not None else 0
    seconds = 0.0
    finished = finished_state(resume)
    if finished is not None:
        log.info("%s already holds the last step (%d): taking its weights", resume, finished["global_step"])
        history = finished["log_history"]
        _load_checkpoint_weights(trainer, resume)
    else:
        if resume is not None:
            log.info("resuming from %s", resume)
        started = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        seconds = time.perf_counter() - started
        history = trainer.state.log_history
    held_metrics = trainer.evaluate() if held_features else {}
    out_dir = stage_dir / ".aligned"
    shutil.rmtree(out_dir, ignore_errors=True)
    # save_model gathers ZeRO-3 partitions; the adapter is merged from disk once DeepSpeed's config is released
    saved = stage_dir / ".adapter" if train.method == "lora" else out_dir
    shutil.rmtree(saved, ignore_errors=True)
    trainer.save_model(str(saved))
    del trainer, model, ref_model
    release_deepspeed_config()  # later loads (the merge, the gate's generation) are plain, whole models
    if train.method == "lora":
        from peft import PeftModel

        merged = PeftModel.from_pretrained(load_model(tuned_dir, trust_remote_code=trust), str(saved)).merge_and_unload()
        save_model(merged, tokenizer, out_dir)
        shutil.rmtree(saved, ignore_errors=True)
    (out_dir / "training_args.bin").unlink(missing_ok=True)
    rows = reward_rows(history)
    plots = params.layout.plots_dir(STAGE)
    write_reward_plot(rows, plots / "rewards.csv", plots / "rewards.png")
    last = rows[-1] if rows else {}
    return {
        "model_dir": out_dir,
        "metrics": {
            "method": train.method,
            "loss": last.get("loss"),
            **{k: last.get(k) for k in REWARD_KEYS},
            "held_out_reward_accuracy": _round(held_metrics.get("eval_rewards/accuracies")),
            "held_out_reward_margin": _round(held_metrics.get("eval_rewards/margins")),
            "steps": int(last.get("step", start_step)),
            "resumed_from_step": start_step,
            "steps_run": max(0, int(last.get("step", start_step)) - start_step),
            "train_seconds": round(seconds, 1),
            "trainable_params": trainable,
            "total_params": total,
        },
    }


def _load_checkpoint_weights(trainer: Any, checkpoint: Path) -> None:
    """Put a finished run's last checkpoint into the trainer's model (the Trainer would train one more step)."""
    from safetensors.torch import load_file

    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise StageError(f"{checkpoint} holds no safetensors weights; delete it to train again")
    state: dict[str, Any] = {}
    for f in files:
        state.update(load_file(str(f)))
    model = trainer.model
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)
    else:
        # strict=False: a checkpoint leaves out weights tied to others (the output head); anything else is wrong
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or len(missing) >= len(state):
            raise StageError(f"{checkpoint} does not hold this model's weights (unexpected {unexpected[:3]}, missing "
                             f"{missing[:3]}); delete {checkpoint.parent} to train again")


def _round(v: Any) -> float | None:
    return None if v is None else round(float(v), 4)


def reward_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per logged training step: step, loss and the four reward figures."""
    rows = []
    for e in history:
        if "loss" in e and "rewards/accuracies" in e:
            rows.append({"step": int(e["step"]), "loss": _round(e["loss"]), **{k: _round(e.get(k)) for k in REWARD_KEYS}})
    return rows


def write_reward_plot(rows: list[dict[str, Any]], csv_path: Path, png_path: Path) -> None:
    """`plots/align/rewards.csv` (for `dvc plots show`) and a PNG: loss, margins and accuracy per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.core.io import atomic_write_text

    columns = ["step", "loss", *REWARD_KEYS]
    lines = [",".join(columns)] + [",".join("" if r[c] is None else str(r[c]) for c in columns) for r in rows]
    atomic_write_text(Path(csv_path), "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("loss", "rewards/margins", "rewards/accuracies"):
        points = [(r["step"], r[key]) for r in rows if r[key] is not None]
        if points:
            ax.plot(*zip(*points), label=key)
    ax.set_xlabel("step")
    ax.set_title("align (DPO): loss, reward margin and accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, Path(png_path), dpi=100)


def val_gate(params: StageParams, tuned_dir: Path, aligned_dir: Path) -> dict[str, Any]:
    """Both models generate greedily for the val rows (the params' decoding settings; evaluate tunes its own on val
    later); paired bootstrap of aligned minus fine-tuned ROUGE-L.

    Returns:
        `fine_tuned`, `aligned` (mean val ROUGE-L), `delta`, `low`, `high` (95% interval of the difference),
        `rows`, `max_drop` and `passed` (low > -max_drop).
    """
    cfg = params.align
    rows = read_split(params.layout, "val", limit=cfg.gate_rows)
    evaluator = Evaluator.of(params)
    _, tuned = evaluator.evaluate(tuned_dir, rows, progress=False)
    _, aligned = evaluator.evaluate(aligned_dir, rows, progress=False)
    diff = paired_bootstrap([r["rouge-l"] for r in aligned["per_row"]], [r["rouge-l"] for r in tuned["per_row"]],
                            params.evaluate.bootstrap_samples, params.evaluate.seed)
    return {
        "fine_tuned": round(tuned["rouge-l"], 4),
        "aligned": round(aligned["rouge-l"], 4),
        "delta": round(diff["delta"], 4),
        "low": round(diff["low"], 4),
        "high": round(diff["high"], 4),
        "rows": diff["rows"],
        "max_drop": cfg.max_drop,
        "passed": diff["low"] > -cfg.max_drop,
    }


def _finish(params: StageParams, metrics: dict[str, Any], aligned_dir: Path | None, reason: str, start: float) -> dict[str, Any]:
    """Write the final model (the aligned one, or the fine-tuned one passed through) and the metrics."""
    layout = params.layout
    out_dir = layout.final_model
    tmp = out_dir.with_name(".model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if aligned_dir is not None:
        aligned_dir.rename(tmp)
    else:
        _link_tree(layout.fine_tuned_model, tmp)
        shutil.rmtree(layout.stage_dir(STAGE) / ".aligned", ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)  # readers never see half a model
    if not layout.plots_dir(STAGE).joinpath("rewards.csv").exists():
        write_reward_plot([], layout.plots_dir(STAGE) / "rewards.csv", layout.plots_dir(STAGE) / "rewards.png")
    if not (layout.stage_dir(STAGE) / "pairs.jsonl").exists():
        write_jsonl(layout.stage_dir(STAGE) / "pairs.jsonl", [])
    metrics = {
        **metrics,
        "final": ALIGNED if aligned_dir is not None else FINE_TUNED,
        "reason": reason,
        "model_sha256": dir_sha256(out_dir),
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_json(layout.metrics_file(STAGE), metrics)
    log.info("align: %s", reason)
    return metrics


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a model folder by hard links where the filesystem allows (nothing rewrites model files in place)."""

    def link_or_copy(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link_or_copy)

