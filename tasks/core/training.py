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
import functools
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.core.prompt import collate_features

# In the checkpoints folder: the setup (device, ranks, threads) of each session that trained steps kept there.
SESSIONS_FILE = "sessions.json"
# `train.precision`: what `auto` may resolve to, and what a run trains in.
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def cpu_bf16_units() -> list[str]:
    """The bf16 matrix-multiply units this CPU names (`/proc/cpuinfo` flags: x86 `avx512_bf16`, `amx_bf16`;
    Arm's `bf16` feature), empty when it has none or the platform does not say.

    oneDNN runs bf16 on any AVX-512 CPU, but without these units it converts to fp32 for every
    multiply-add and is slower than fp32: only with them does bf16 autocast pay.
    """
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_precision(precision: str, key: str = "train.precision", deepspeed: bool = False) -> str:
    """The one decision of the precision a run trains in: `bf16`, `fp16` or `fp32`.

    `auto`: bf16 on a GPU that supports it, fp16 (with loss scaling) on an older GPU; on the CPU bf16
    autocast when the CPU has bf16 matrix units (`cpu_bf16_units`) and the run does not go through
    DeepSpeed, else fp32. On the CPU bf16 is mixed precision: the weights, gradients and optimizer
    state stay fp32 (the master copy) and only the matrix multiplies inside the forward and backward
    run in bf16 (torch autocast), so what is saved is fp32 and evaluates as before. DeepSpeed's bf16 is
    not autocast: it casts the model itself to bf16 (fp32 masters only for what trains), so a frozen
    LoRA base and the saved weights would lose their fp32 bits; on the CPU a DeepSpeed run stays fp32.
    An explicit value is checked against the machine.

    Args:
        precision: `train.precision`.
        key: the key named in errors.
        deepspeed: the run goes through DeepSpeed (`tasks.core.launch.deepspeed_plan`).

    Raises:
        ParamsError: naming `key`, for a name that is not a precision, fp16 on the CPU, bf16 on a CPU
            without bf16 units, or bf16 on a GPU without bf16.
    """
    import torch

    from tasks.core.config import ParamsError

    if precision not in PRECISIONS:
        raise ParamsError(f"{key}: {precision!r} is not a precision; use one of {', '.join(PRECISIONS)}")
    on_gpu = torch.cuda.is_available()
    if precision == "auto":
        if not on_gpu:
            return "bf16" if cpu_bf16_units() and not deepspeed else "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and not on_gpu:
        raise ParamsError(f"{key}=fp16 needs a CUDA GPU (mixed precision with loss scaling is not run on the CPU here); "
                          "use auto, bf16 (on a CPU with bf16 units) or fp32 on this machine")
    if precision == "bf16" and not on_gpu and deepspeed:
        raise ParamsError(f"{key}=bf16 with DeepSpeed on the CPU would cast the model itself to bf16 (DeepSpeed's bf16 is "
                          "not autocast); use auto or fp32 with several CPU ranks, or one rank (no DeepSpeed) for bf16 autocast")
    if precision == "bf16" and not on_gpu and not cpu_bf16_units():
        raise ParamsError(f"{key}=bf16 needs a CUDA GPU with bf16 or a CPU with bf16 matrix units (avx512_bf16, amx_bf16 "
                          "or Arm bf16), and this CPU names none; use auto or fp32 on this machine")
    if precision == "bf16" and on_gpu and not torch.cuda.is_bf16_supported():
        raise ParamsError(f"{key}=bf16 but {torch.cuda.get_device_name(0)} has no bf16; use fp16 (loss scaling) or auto")
    return precision


# Batch widths under bf16 autocast on the CPU are rounded up to this (`batch_width_multiple`).
CPU_BF16_WIDTH_MULTIPLE = 16


def batch_width_multiple(args: Any) -> int:
    """What a training batch's width is rounded up to: 16 under bf16 autocast on the CPU, else 1 (no rounding).

    Under bf16 autocast a CPU process grows with every new batch shape (about 4.5 MiB per sequence
    length in a probe of one layer; fp32 far less): oneDNN caches a primitive per shape, and glibc's
    heap fragments (`release_freed_memory`; with oneDNN's cache off the same probe grew about half as much).
    Grouped batches of free length trained the default model to a peak of 3.3 GiB against 1.4 GiB in
    fp32. Rounding widths to 16 bounds the shapes to a few dozen for about 3% more padded tokens.
    """
    import torch

    return CPU_BF16_WIDTH_MULTIPLE if getattr(args, "bf16", False) and not torch.cuda.is_available() else 1


def supervised_logits(model: Any) -> bool:
    """True when the model can project onto its vocabulary only the positions whose next token carries a label.

    That is transformers' own causal LMs (checked with transformers 5.24): their forward slices the final
    hidden states with `slice_logits_to_keep`, which takes a boolean (batch, width) mask, and scores with
    `ForCausalLMLoss`, which reads `shift_labels` as given. A model with its own forward (remote code, another loss) gets the full logits.
    PEFT wrappers are looked through: LoRA changes the layers, not the forward.
    """
    import sys

    from transformers.loss.loss_utils import ForCausalLMLoss

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = sys.modules.get(type(base).__module__)
    return (
        module is not None
        and "slice_logits_to_keep" in vars(module)
        and getattr(base, "loss_function", None) is ForCausalLMLoss
    )


# The number of projected positions is rounded up to this (`with_supervised_positions`).
SUPERVISED_ROWS_MULTIPLE = 64


def with_supervised_positions(batch: dict[str, Any], multiple: int = SUPERVISED_ROWS_MULTIPLE) -> dict[str, Any]:
    """A collated causal-LM batch plus `logits_to_keep` (a boolean mask of the positions whose next token is
    a label) and `shift_labels` (those labels, flat, in the mask's order): the model then projects only those
    positions onto the vocabulary, and the loss is the same sum over the same tokens.

    In SFT the prompt is masked, so most positions carry no loss: on the demo split 9% of tokens are
    labels, and the vocabulary projection with its softmax is the largest layer of a small model. On 12
    grouped batches of the shipped shape (2 threads): fwd+bwd 2.49 s against 3.67 s in bf16 with the same
    loss and gradients bit for bit, 3.26 s against 4.61 s in fp32 (equal to 1e-7), and no (batch, width,
    vocabulary) logits in memory (`bench/train.py` measures it in the stage). Pretraining labels every
    real token, so it would save only the padded positions there, and pretrain does not use it.

    The count of projected positions is rounded up to `multiple` with unsupervised ones (label -100, which
    the loss ignores, and which the Trainer's token count skips): every distinct count is a new matmul shape,
    and under bf16 on the CPU each shape costs memory (oneDNN's primitive cache, the heap). Over the train
    benchmark's 40 steps, free counts took the stage to 1361 MiB, rounded to 64 to 1171 (bare Trainer 1236).
    """
    import torch

    shifted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    keep = shifted != -100
    count = int(keep.sum())
    extra = min(-(-count // multiple) * multiple, keep.numel()) - count
    if extra:
        keep.view(-1)[(~keep).view(-1).nonzero().view(-1)[:extra]] = True
    return {**batch, "logits_to_keep": keep, "shift_labels": shifted[keep]}


def training_collator(model: Any, pad_token_id: int, pad_to_multiple_of: int = 1) -> Any:
    """The Trainer's collator for train: `collate_features` (right padding, widths rounded to
    `pad_to_multiple_of`), with the supervised positions marked where the model can use them (`supervised_logits`)."""
    if not supervised_logits(model):
        return lambda features: collate_features(features, pad_token_id, pad_to_multiple_of)
    return lambda features: with_supervised_positions(collate_features(features, pad_token_id, pad_to_multiple_of))


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


def release_freed_memory() -> bool:
    """Hand the C heap's free pages back to the OS (glibc's `malloc_trim`); False where there is no glibc.

    A CPU training step allocates activations of its batch's shape and frees them; glibc keeps the
    freed blocks in its arenas, and a batch of another width seldom fits the holes the last one left,
    so the process grows step by step (bf16 autocast more than fp32: its casts add blocks of other
    sizes). A probe of the scratch shape over 51 widths: bf16 grew 626 -> 2140 MiB, 1029 MiB trimming.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@functools.cache
def _glibc() -> Any:
    """The C library when it has `malloc_trim` (glibc), else None."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


# Trim every N optimizer steps: each trim returns pages the next steps fault back in. Every step cost
# bench/train.py's shipped arm a fifth of its speed (1.30x vs 1.60x bare); every 8 kept its speed
# (1.62x) and took its peak RSS from 1.03x to 0.97x the bare Trainer's.
RELEASE_EVERY_STEPS = 8


def memory_release_callbacks(device: Any) -> list[Any]:
    """The TrainerCallback that calls `release_freed_memory` every `RELEASE_EVERY_STEPS` optimizer steps
    when training on the CPU; none on an accelerator (whose activations live in its own allocator)."""
    if getattr(device, "type", str(device)) != "cpu":
        return []
    from transformers import TrainerCallback

    class ReleaseFreedMemory(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step % RELEASE_EVERY_STEPS == 0:
                release_freed_memory()

    return [ReleaseFreedMemory()]


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
