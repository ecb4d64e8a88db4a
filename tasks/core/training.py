"""What pretrain and train share around the HF Trainer: one set of TrainingArguments defaults, the
loss history as rows, and the process's peak memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def training_arguments(output_dir: Path, cfg: Any, **extra: Any) -> Any:
    """`TrainingArguments` with sftflow's defaults: cosine schedule with warmup, weight decay 0.01, a loss
    logged from the first step, seeded data order, no reporting integrations (the flow logs to MLflow
    from the stage's files), no dataloader workers (2-core machines), the CPU unless a GPU is visible.

    Args:
        output_dir: where the Trainer writes checkpoints.
        cfg: params `pretrain` or `train`: `batch_size` (per device, training and evaluation), `epochs`,
            `max_steps`, `learning_rate`, `warmup_ratio`, `logging_steps`, `seed`.
        **extra: further `TrainingArguments` keywords (evaluation, saving, DeepSpeed, precision...).
    """
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        # transformers 5 reads a float below 1 as a share of the steps.
        warmup_steps=cfg.warmup_ratio,
        weight_decay=0.01,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        **extra,
    )


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


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)
