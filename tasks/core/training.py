"""What pretrain and train share around the HF Trainer: one set of TrainingArguments defaults, the
loss history as rows, the process's peak memory, and whether a training run was deterministic.

Determinism (same inputs, same weights, bit for bit) on CPU rests on three things: every RNG seeded
before the model loads (`tasks.core.io.set_seed`, then the Trainer's own seed), torch's deterministic
algorithms (`use_deterministic_algorithms`), and a thread count that comes from the params or the
machine, never from the environment (`tasks.core.launch.threads_per_rank`). What it does not cover is
recorded, named, in `metrics/train.json` (`deterministic`, `deterministic_reason`): a GPU, more than two
ranks, an op without a deterministic implementation, a resume under another setup.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# In the checkpoints folder: the setup (device, ranks, threads) of each session that trained steps kept there.
SESSIONS_FILE = "sessions.json"
# `train.precision`: what `auto` may resolve to, and what a run trains in.
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_precision(precision: str, key: str = "train.precision") -> str:
    """The one decision of the precision a run trains in: `bf16`, `fp16` or `fp32`.

    `auto`: bf16 on a GPU that supports it, fp16 (with loss scaling) on an older GPU, fp32 on the CPU.
    An explicit value is checked against the machine. Another precision for the CPU (bf16 autocast)
    extends this function, not a second key.

    Raises:
        ParamsError: naming `key`, for a name that is not a precision, fp16 or bf16 without a GPU, or
            bf16 on a GPU without bf16.
    """
    import torch

    from tasks.core.config import ParamsError

    if precision not in PRECISIONS:
        raise ParamsError(f"{key}: {precision!r} is not a precision; use one of {', '.join(PRECISIONS)}")
    on_gpu = torch.cuda.is_available()
    if precision == "auto":
        if not on_gpu:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision in ("bf16", "fp16") and not on_gpu:
        raise ParamsError(
            f"{key}={precision} needs a CUDA GPU (mixed precision{' with loss scaling' if precision == 'fp16' else ''} "
            "is not run on the CPU here); use auto or fp32 on this machine"
        )
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ParamsError(f"{key}=bf16 but {torch.cuda.get_device_name(0)} has no bf16; use fp16 (loss scaling) or auto")
    return precision


def precision_arguments(precision: str) -> dict[str, bool]:
    """The `TrainingArguments` switches of a resolved precision (DeepSpeed's `"auto"` bf16/fp16 blocks follow
    them; fp16 gets DeepSpeed's dynamic loss scaling, or torch's GradScaler without DeepSpeed)."""
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


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
    """One row per logged step from a Trainer's `log_history`: step, train_loss, val_loss (None if absent),
    and val_rouge_l when validation ROUGE was measured (`tasks.core.val_rouge`)."""
    columns = {"loss": "train_loss", "eval_loss": "val_loss"}
    if any("eval_rouge-l" in e for e in log_history):
        columns["eval_rouge-l"] = "val_rouge_l"
    by_step: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        step = int(entry.get("step", 0))
        for key, column in columns.items():
            if key in entry:
                row = by_step.setdefault(step, {"step": step, **dict.fromkeys(columns.values())})
                row[column] = float(entry[key])
    return [by_step[s] for s in sorted(by_step)]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def use_deterministic_algorithms() -> None:
    """Have torch pick deterministic kernels where it has a choice, and warn (recorded by
    `nondeterministic_ops`) where it has none; CPU only: on CUDA it needs CUBLAS_WORKSPACE_CONFIG set
    before CUDA starts and fails on ops without a deterministic kernel, and a GPU run is recorded
    as not deterministic anyway.

    Without torch's fill of every new tensor with NaN (`fill_uninitialized_memory`), which it turns on
    with the switch: a debugging aid against reads of uninitialised memory, which no training op
    does, and it fills DeepSpeed's 0.5 G-element gradient buckets each step (the tiny train took 5-7x
    as long with it, the same weights bit for bit without it).
    """
    import torch

    if not torch.cuda.is_available():
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False


@contextlib.contextmanager
def nondeterministic_ops() -> Iterator[list[str]]:
    """Collect torch's "... does not have a deterministic implementation" warnings raised inside;
    every other warning is shown as usual (after the block)."""
    alerts: list[str] = []
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield alerts
    finally:
        for w in caught:
            text = str(w.message)
            if "deterministic implementation" in text:
                alerts.append(text.split(", but you set")[0].splitlines()[0][:200])
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


def session_setup(world_size: int, threads: int) -> dict[str, Any]:
    """What besides the inputs decides the bits a training session computes: device, ranks, threads per rank."""
    import torch

    return {"device": "cuda" if torch.cuda.is_available() else "cpu", "num_processes": world_size, "threads_per_process": threads}


def record_session(ckpt_dir: Path, start_step: int, setup: dict[str, Any]) -> list[dict[str, Any]]:
    """Add this session to the checkpoints folder's session list before it trains; return the sessions
    whose steps the final model holds (those that started before `start_step`, and this one).

    Written before training, so a session killed after its first checkpoint is on the list when the
    next one resumes from that checkpoint. A resume from checkpoints made before sessions were
    recorded gets a session of unknown setup.
    """
    from tasks.core.io import read_json, write_json

    path = Path(ckpt_dir) / SESSIONS_FILE
    try:
        earlier = read_json(path) if start_step > 0 else []
    except (OSError, ValueError):
        earlier = []
    earlier = [s for s in earlier if isinstance(s, dict) and s.get("start_step", 0) < start_step]
    if start_step > 0 and not earlier:
        earlier = [{"start_step": 0, "setup": None}]
    sessions = [*earlier, {"start_step": start_step, "setup": setup}]
    write_json(path, sessions)
    return sessions


def determinism(sessions: list[dict[str, Any]], alerts: list[str], seed: int) -> dict[str, Any]:
    """`deterministic` (would the same inputs give these weights bit for bit again) and the reason.

    Not deterministic, each named in the reason: a GPU session (CUDA kernels are not forced
    deterministic), more than two ranks (the all-reduce adds the ranks' gradients in an order
    torch.distributed does not fix; with two, a + b == b + a), ops torch flagged as having no
    deterministic implementation, and a resume under another device, rank or thread count than the
    steps before it (or from checkpoints that do not record theirs).
    """
    reasons: list[str] = []
    setups = [s["setup"] for s in sessions]
    current = setups[-1]
    if any(s is None for s in setups):
        reasons.append("resumed from checkpoints that do not record the device, ranks and threads they were trained with")
    elif any(s != current for s in setups):
        steps = ", ".join(f"from step {s['start_step']}: {_describe(s['setup'])}" for s in sessions)
        reasons.append(f"resumed under another setup than the steps before ({steps})")
    if current["device"] != "cpu":
        reasons.append(f"trained on {current['device']}: its kernels (cuBLAS, atomic adds) are not forced deterministic")
    if current["num_processes"] > 2:
        reasons.append(
            f"{current['num_processes']} ranks: the gradient all-reduce sums the ranks' partial gradients in an "
            "order torch.distributed does not guarantee (only two addends commute exactly)"
        )
    if alerts:
        reasons.append("ops without a deterministic implementation: " + "; ".join(sorted(set(alerts))))
    if reasons:
        return {"deterministic": False, "deterministic_reason": "; ".join(reasons)}
    return {
        "deterministic": True,
        "deterministic_reason": f"{_describe(current)}, seed {seed}, torch deterministic algorithms: the same inputs "
        "with the same train.torch_threads (or core count) and num_processes give these weights bit for bit",
    }


def _describe(setup: dict[str, Any] | None) -> str:
    if setup is None:
        return "unknown setup"
    return f"{setup['device']}, {setup['num_processes']} rank(s) x {setup['threads_per_process']} thread(s)"
