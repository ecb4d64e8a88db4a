"""The `train` stage: supervised fine-tuning of the pretrained base with the HF Trainer and DeepSpeed.

Reads `artifacts/pretrain/model/` and the train/val splits; writes

- `artifacts/train/model/`: the fine-tuned model, LoRA merged in, one standalone HF folder;
- `artifacts/train/adapter/`: the LoRA adapter alone (method lora);
- `artifacts/train/checkpoints/`: Trainer checkpoints every `train.save_steps`; a rerun with the same
  params resumes from the newest complete one (a SIGKILLed run loses at most `save_steps` steps);
- `metrics/train.json` (with `deterministic` and `deterministic_reason`: would the same inputs give
  these weights bit for bit, `tasks.core.training.determinism`), `plots/train/loss.csv`
  (step,train_loss,val_loss) and `plots/train/loss.png`.

Only the answer carries loss: the summary and the token that ends it, the chat template's end-of-turn
token or eos (`tasks.core.prompt.encode_example`). `train.num_processes > 1`
relaunches the stage as torchrun ranks (`tasks.core.launch`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from tasks.core.checkpoints import checkpoint_step, finished_state, last_complete_checkpoint, prepare_checkpoints
from tasks.core.config import ParamsError
from tasks.core.data import read_split
from tasks.core.errors import StageError
from tasks.core.generation import GenerationSettings
from tasks.core.io import configure_threads, dir_sha256, file_sha256, read_json, set_seed, write_json
from tasks.core.launch import (
    LAUNCHED_ENV,
    deepspeed_plan,
    ensure_distributed_env,
    init_deepspeed_comm,
    is_rank_zero,
    relaunch,
    release_deepspeed_config,
    threads_per_rank,
)
from tasks.core.modeling import (
    count_parameters,
    gathered_forward,
    gathered_state_dict,
    is_partitioned,
    load_model,
    load_model_and_tokenizer,
    partition_share,
    resolve_lora_targets,
    save_model,
    save_state_dict,
    with_lora,
)
from tasks.core.plots import write_loss_curve
from tasks.core.prompt import check_chat_template, encode_example, summary_loss
from tasks.core.stage_params import StageParams, stage_entry
from tasks.core.training import (
    batch_width_multiple,
    determinism,
    loss_rows,
    memory_release_callbacks,
    nondeterministic_ops,
    peak_rss_mb,
    precision_arguments,
    record_session,
    resolve_precision,
    session_setup,
    training_arguments,
    training_collator,
    use_deterministic_algorithms,
)

log = logging.getLogger(__name__)

STAGE = "train"


def check_params(params: StageParams) -> None:
    """Fail before any model loads on params this machine cannot run; every problem named at once.

    Raises:
        ParamsError: the DeepSpeed config file does not exist or is not JSON, or more processes are
            asked for than there are cores (CPU) or GPUs, or `train.precision` cannot run here (fp16 or
            bf16 without a GPU, bf16 on a GPU without it).
    """
    import torch

    cfg = params.train
    problems = []
    config_readable = False
    if cfg.deepspeed_config is not None:
        path = Path(cfg.deepspeed_config)
        if not path.is_file():
            problems.append(
                f"train.deepspeed_config: {path} does not exist (from {Path.cwd()}); use one of "
                f"configs/deepspeed/zero{{0,2,3}}.json or null for no DeepSpeed"
            )
        else:
            try:
                json.loads(path.read_text(encoding="utf-8"))
                config_readable = True
            except json.JSONDecodeError as e:
                problems.append(f"train.deepspeed_config: {path} is not valid JSON ({e})")
    if torch.cuda.is_available():
        if cfg.num_processes > torch.cuda.device_count():
            problems.append(
                f"train.num_processes={cfg.num_processes} but this machine has {torch.cuda.device_count()} GPU(s); "
                "use at most one process per GPU"
            )
    else:
        cores = os.cpu_count() or 1
        if cfg.num_processes > cores:
            problems.append(
                f"train.num_processes={cfg.num_processes} but this machine has {cores} CPU core(s); "
                f"set train.num_processes to at most {cores}"
            )
    try:
        # A missing or broken DeepSpeed config is reported above; the precision check then assumes none.
        deepspeed = config_readable and deepspeed_plan(cfg.deepspeed_config, cfg.num_processes)[0]
        resolve_precision(cfg.precision, deepspeed=deepspeed)
    except ParamsError as e:
        problems.append(str(e))
    if problems:
        raise ParamsError("cannot train with these params:\n" + "\n".join(f"  - {p}" for p in problems))


def check_lora_targets(model: Any, targets: list[str] | str) -> list[str]:
    """The modules LoRA adapts; ParamsError naming `train.lora.target_modules` and the model's Linear and
    Conv1D layers when a target matches none or a module LoRA cannot adapt (`tasks.core.modeling.resolve_lora_targets`)."""
    return resolve_lora_targets(model, targets)


def target_length_limit(params: StageParams, tokenizer: Any, train_rows: list[dict[str, Any]]) -> int:
    """The summary token limit (eos included) sized from the train split: the length that keeps
    `train.target_length_percentile`% of its references whole (nearest rank), at most `train.max_target_length`."""
    cfg = params.train
    if not train_rows:
        return cfg.max_target_length
    ids = tokenizer([r["summary"] for r in train_rows], add_special_tokens=False)["input_ids"]
    lengths = sorted(len(x) + 1 for x in ids)
    # rounded first, so that 7% of 100 references is rank 7, not 8 (7.000000000000001)
    rank = max(1, math.ceil(round(cfg.target_length_percentile * len(lengths) / 100, 9)))
    return min(cfg.max_target_length, lengths[rank - 1])


def encode_rows(
    params: StageParams, tokenizer: Any, rows: list[dict[str, Any]], max_target_length: int | None = None
) -> tuple[list[dict[str, list[int]]], dict[str, int | float]]:
    """Encode rows as training features (summaries cut at `max_target_length`, default `train.max_target_length`);
    returns them and the truncation counts and shares."""
    cfg, data = params.train, params.data
    limit = cfg.max_target_length if max_target_length is None else max_target_length
    features, counts = [], {"truncated_source": 0, "truncated_target": 0}
    for r in rows:
        f = encode_example(
            tokenizer, r["text"], r["summary"], data.prompt_template, data.use_chat_template,
            cfg.max_source_length, limit,
        )
        counts["truncated_source"] += f["truncated_source"]
        counts["truncated_target"] += f["truncated_target"]
        features.append({k: f[k] for k in ("input_ids", "attention_mask", "labels")})
    shares = {f"{k}_share": round(n / len(rows), 4) if rows else 0.0 for k, n in counts.items()}
    return features, {**counts, **shares}


def _fingerprint(params: StageParams, base_dir: Path) -> dict[str, Any]:
    """What a checkpoint depends on: the train params, the prompt, the data and the base weights."""
    train = params.train.model_dump(mode="json")
    # How many ranks share the work does not change the maths of a resume (same global batch aside).
    train.pop("num_processes")
    train.pop("torch_threads")
    return {
        "train": train,
        "prompt_template": params.data.prompt_template,
        "use_chat_template": params.data.use_chat_template,
        "train_data": file_sha256(params.layout.split("train")),
        "val_data": file_sha256(params.layout.split("val")),
        "base": dir_sha256(base_dir),
    }


@stage_entry("train")
def run(params: StageParams) -> dict[str, Any]:
    """Fine-tune the pretrained base on the training split; write the merged model and metrics.

    Args:
        params: the stage's slice: `train`, `data.prompt_template`, `data.use_chat_template`,
            `model.trust_remote_code`.

    Returns:
        The metrics written to `metrics/train.json` (rank 0; other ranks return {}).

    Raises:
        ParamsError: bad train params (named), checked before training.
        StageError: the pretrained base or the splits are missing, or a rank failed.
    """
    cfg, layout = params.train, params.layout
    check_params(params)
    base_dir = layout.base_model
    if not (base_dir / "config.json").exists():
        raise StageError(f"{base_dir} holds no model; run `sftflow pretrain` first")
    for name in ("train", "val"):
        if not layout.split(name).exists():
            raise StageError(f"{layout.split(name)} does not exist; run `sftflow validate && sftflow split` first")

    ckpt_dir = layout.stage_dir(STAGE) / "checkpoints"
    launched_child = os.environ.get(LAUNCHED_ENV) == "1"
    if not launched_child and is_rank_zero():
        prepare_checkpoints(ckpt_dir, _fingerprint(params, base_dir))

    threads = threads_per_rank(cfg.torch_threads, cfg.num_processes)
    if cfg.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        relaunch(STAGE, params, cfg.num_processes, threads)
        return read_json(layout.metrics_file(STAGE))
    configure_threads(threads)
    return _train(params, base_dir, ckpt_dir, threads)


def _train(params: StageParams, base_dir: Path, ckpt_dir: Path, threads: int) -> dict[str, Any]:
    """The training proper, in every rank: fit (or resume), save the final model, measure it."""
    import torch

    cfg = params.train
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_deepspeed, deepspeed_reason = deepspeed_plan(cfg.deepspeed_config, world_size)
    deepspeed_config = cfg.deepspeed_config if use_deepspeed else None
    if use_deepspeed:
        ensure_distributed_env()  # a single process gets RANK/WORLD_SIZE=0/1, which world_size already assumed
    precision = resolve_precision(cfg.precision, deepspeed=use_deepspeed)
    # The Trainer's arguments exist before the model loads: with a ZeRO-3 config they hold the DeepSpeed
    # config transformers reads in from_pretrained (and from_config), so `deepspeed.zero.Init` builds every
    # parameter already partitioned over the ranks. They stay alive (the Trainer keeps them) until the
    # final model is saved.
    args = _arguments(cfg, ckpt_dir, world_size, precision, deepspeed_config)
    if use_deepspeed:
        args.device  # sets up torch.distributed now, and DeepSpeed's comm on it: zero.Init counts the ranks
        init_deepspeed_comm()
    # Seeded before the model loads, so nothing drawn while loading depends on what ran before it.
    set_seed(cfg.seed)
    use_deterministic_algorithms()
    model, tokenizer = load_model_and_tokenizer(base_dir, trust_remote_code=params.model.trust_remote_code)
    zero3 = is_partitioned(model)
    shares = _partition_shares(model) if zero3 else None
    if cfg.method == "lora":
        targets = check_lora_targets(model, cfg.lora.target_modules)
        log.info("LoRA adapts %d modules (%s ...)", len(targets), ", ".join(targets[:4]))
    # The answer's end token and the chat template's assistant span, checked before any row is encoded.
    chat = check_chat_template(tokenizer, params.data.use_chat_template)
    if chat is not None:
        log.info("chat template: answers end with %s (id %d)", chat.end_of_turn, chat.end_of_turn_id)
    val_rows = read_split(params.layout, "val", allow_empty=True)
    train_rows = read_split(params.layout, "train", allow_empty=True)
    target_limit = target_length_limit(params, tokenizer, train_rows)
    train_features, train_cuts = encode_rows(params, tokenizer, train_rows, target_limit)
    val_features, val_cuts = encode_rows(params, tokenizer, val_rows, target_limit)
    for split, cuts in (("train", train_cuts), ("val", val_cuts)):
        if cuts["truncated_source"] or cuts["truncated_target"]:
            log.warning(
                "%s: %d texts cut to train.max_source_length=%d tokens, %d summaries cut to %d tokens (train.max_target_length, "
                "train.target_length_percentile)",
                split, cuts["truncated_source"], cfg.max_source_length, cuts["truncated_target"], target_limit,
            )
    if not zero3 and torch.cuda.is_available():
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")  # where the Trainer puts it anyway
    # The base's validation loss, from the model in hand (no second copy): every rank under ZeRO-3.
    base_val_loss = _val_loss(params, model, tokenizer, val_rows) if zero3 or is_rank_zero() else None
    set_seed(cfg.seed)
    if cfg.method == "lora":
        model = with_lora(model, cfg.lora)
    trainable, total = count_parameters(model)
    log.info(
        "train: %d rows (%d val), method %s, %s trainable of %s parameters, %d rank(s) x %d thread(s), deepspeed %s",
        len(train_features), len(val_features), cfg.method, f"{trainable:,}", f"{total:,}", world_size, threads,
        deepspeed_config if use_deepspeed else f"not used ({deepspeed_reason})",
    )
    sessions: list[dict[str, Any]] = []
    if is_rank_zero():
        resume = last_complete_checkpoint(ckpt_dir)
        start = checkpoint_step(resume) if resume is not None else 0
        sessions = record_session(ckpt_dir, start or 0, session_setup(world_size, threads))
    callbacks = _callbacks(params, tokenizer, val_rows)
    with nondeterministic_ops() as alerts:
        run = _fit(params, model, tokenizer, train_features, val_features, args, ckpt_dir, callbacks)
    val_generation_seconds = sum(getattr(c, "seconds", 0.0) for c in callbacks)
    trained = run.pop("model")
    # The trained model's validation loss and the final folder, from the weights in memory (gathered
    # module by module under ZeRO-3, every rank taking part); a rebuilt finished run reads its checkpoint.
    val_loss = _val_loss(params, trained, tokenizer, val_rows) if trained is not None and (zero3 or is_rank_zero()) else None
    # From here on rank 0 may load plain models alone: transformers must not wrap them in zero.Init.
    release_deepspeed_config()
    out_dir = _save_final(params, run["weights"], tokenizer, base_dir, trained, zero3)
    del trained, model, run["trainer"]
    if not is_rank_zero():
        return {}
    if val_loss is None:
        tuned, _ = load_model_and_tokenizer(out_dir, trust_remote_code=params.model.trust_remote_code)
        val_loss = _val_loss(params, tuned, tokenizer, val_rows)
        del tuned
    metrics = {
        "method": cfg.method,
        **_measure(params, val_loss, base_val_loss, val_rows, run),
        "steps_run": run["steps_run"],
        "seconds": round(run["seconds"], 1),
        "selected_by": cfg.select_by,
        "selected_step": run["selected_step"],
        # Validation generation runs inside the training time above; this is its share of it.
        "val_generation_seconds": round(val_generation_seconds, 1),
        "val_generation_share": round(val_generation_seconds / run["seconds"], 4) if run["seconds"] else None,
        "tokens_per_second": round(run["tokens"] / run["seconds"], 1) if run["seconds"] else None,
        "samples_per_second": round(run["steps_run"] * cfg.batch_size * cfg.gradient_accumulation_steps * world_size
                                    / run["seconds"], 2) if run["seconds"] else None,
        "trainable_params": trainable,
        "total_params": total,
        "peak_rss_mb": peak_rss_mb(),
        "gpu_peak_memory_mb": _gpu_peak_mb(),
        "target_length_limit": target_limit,
        **{f"{split}_{k}": v for split, cuts in (("train", train_cuts), ("val", val_cuts)) for k, v in cuts.items()},
        "deepspeed_config": str(cfg.deepspeed_config) if cfg.deepspeed_config is not None else None,
        "deepspeed_used": use_deepspeed,
        "deepspeed_reason": deepspeed_reason,
        "num_processes": world_size,
        "threads_per_process": threads,
        "precision": precision,
        "bf16": precision == "bf16",
        "zero_stage": 3 if zero3 else _zero_stage(deepspeed_config),
        **({"partition_params_per_rank": [s["local_params"] for s in shares],
            "partition_share_per_rank": [round(s["local_params"] / s["total_params"], 4) for s in shares]} if shares else {}),
        **determinism(sessions, alerts, cfg.seed),
    }
    write_json(params.layout.metrics_file(STAGE), metrics)
    log.info("train: val loss %.4f (base %.4f) after %d steps; wrote %s",
             metrics["val_loss"], metrics["base_val_loss"], metrics["steps"], out_dir)
    return metrics


def _arguments(cfg: Any, ckpt_dir: Path, world_size: int, precision: str, deepspeed_config: Path | None) -> Any:
    """The Trainer's arguments for params `train` (evaluated and checkpointed every few steps) in the resolved
    `precision` (`tasks.core.training.resolve_precision`), through DeepSpeed when `deepspeed_config` is set
    (`tasks.core.launch.deepspeed_plan` decides)."""
    import torch

    on_gpu = torch.cuda.is_available()
    return training_arguments(
        ckpt_dir,
        cfg,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        eval_strategy="steps",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.keep_checkpoints,
        deepspeed=str(deepspeed_config) if deepspeed_config is not None else None,
        ddp_backend="gloo" if world_size > 1 and not on_gpu else None,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        **precision_arguments(precision),
        **_selection_arguments(cfg),
    )


def _zero_stage(deepspeed_config: Path | None) -> int | None:
    """The ZeRO stage a DeepSpeed config file names (None without DeepSpeed)."""
    if deepspeed_config is None:
        return None
    return int(json.loads(Path(deepspeed_config).read_text(encoding="utf-8")).get("zero_optimization", {}).get("stage", 0))


def _partition_shares(model: Any) -> list[dict[str, int]]:
    """Every rank's ZeRO-3 share of the parameters (`tasks.core.modeling.partition_share`), gathered to each rank."""
    import torch.distributed as dist

    share = partition_share(model)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [share]
    shares: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, share)
    log.info("ZeRO-3: parameters held per rank %s of %s", [s["local_params"] for s in shares], f"{share['total_params']:,}")
    return shares


def _val_loss(params: StageParams, model: Any, tokenizer: Any, val_rows: list[dict[str, Any]]) -> float:
    """Validation summary loss of a model in hand (ZeRO-3 partitioned or not: gathered layer by layer outside the engine)."""
    cfg = params.train
    with gathered_forward(model) if not _engine_hooked(model) else _nothing():
        return summary_loss(
            model, tokenizer, val_rows, template=params.data.prompt_template, use_chat_template=params.data.use_chat_template,
            max_source_length=cfg.max_source_length, max_target_length=cfg.max_target_length, batch_size=cfg.batch_size,
        )


def _engine_hooked(model: Any) -> bool:
    """True once a DeepSpeed ZeRO-3 engine drives the model (its own hooks gather the weights in forward)."""
    return is_partitioned(model) and any(hasattr(m, "ds_recompute_parameters") for m in model.modules())


def _nothing() -> Any:
    import contextlib

    return contextlib.nullcontext()


def _selection_arguments(cfg: Any) -> dict[str, Any]:
    """How the Trainer keeps and reloads the checkpoint `train.select_by` picks (its own best-model machinery)."""
    if cfg.select_by == "last":
        return {}
    return {
        "load_best_model_at_end": True,
        "metric_for_best_model": "rouge-l" if cfg.select_by == "rouge-l" else "loss",
        "greater_is_better": cfg.select_by == "rouge-l",
    }


def _callbacks(params: StageParams, tokenizer: Any, val_rows: list[dict[str, Any]]) -> list[Any]:
    """Validation ROUGE at every evaluation (when asked for) and early stopping (when asked for)."""
    cfg = params.train
    callbacks: list[Any] = []
    if cfg.eval_generate_rows and val_rows:
        from tasks.core.val_rouge import ValRougeCallback  # deferred: it subclasses transformers' TrainerCallback

        settings = GenerationSettings.of(params)
        callbacks.append(ValRougeCallback(tokenizer, val_rows[: cfg.eval_generate_rows], settings, params.data.language))
    elif cfg.select_by == "rouge-l":
        raise StageError("train.select_by=rouge-l needs val rows to generate for, and the val split is empty")
    if cfg.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    return callbacks


def _fit(
    params: StageParams,
    model: Any,
    tokenizer: Any,
    train_features: list[dict[str, list[int]]],
    val_features: list[dict[str, list[int]]],
    args: Any,
    ckpt_dir: Path,
    callbacks: list[Any] = (),
) -> dict[str, Any]:
    """Train from scratch or the newest complete checkpoint; save the trained weights (adapter or full) of
    the checkpoint `train.select_by` picks (the Trainer reloads it at the end).

    Returns:
        `history` (the Trainer's log), `seconds`, `steps_run`, `tokens` (this session's), `start_step`,
        `selected_step` (the step whose weights are kept) and `weights` (the folder holding them).
    """
    stage_dir = params.layout.stage_dir(STAGE)
    resume = last_complete_checkpoint(ckpt_dir)
    finished = finished_state(resume)
    if finished is not None:
        # The Trainer would run one extra step when resumed at its last step; rebuild from the checkpoint.
        best = _selected_checkpoint(finished, ckpt_dir, params.train.select_by) or resume
        log.info("%s already holds the last step (%d): rebuilding the model from %s", resume, finished["global_step"], best)
        return {"history": finished["log_history"], "seconds": 0.0, "steps_run": 0, "tokens": 0,
                "start_step": finished["global_step"], "selected_step": checkpoint_step(best), "weights": best,
                "model": None, "trainer": None}
    trainer, session = _make_trainer(model, tokenizer, train_features, val_features, args, callbacks)
    if resume is not None:
        log.info("resuming from %s", resume)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    seconds = time.perf_counter() - start
    last_evaluated = any("eval_loss" in e and e.get("step") == trainer.state.global_step for e in trainer.state.log_history)
    if not last_evaluated and params.train.select_by == "last":
        trainer.evaluate()  # the curve ends on a validation point (a reloaded best model would mislabel it)
    selected = trainer.state.best_model_checkpoint if params.train.select_by != "last" else None
    lora = params.train.method == "lora"
    weights = stage_dir / ("adapter" if lora else ".model.tmp")
    if is_rank_zero():
        shutil.rmtree(weights, ignore_errors=True)
    if lora and is_partitioned(trainer.model):
        # Only the adapter is gathered (the Trainer's save would gather the whole model to rank 0 first).
        adapter = gathered_state_dict(trainer.model, trainable_only=True)
        if is_rank_zero():
            trainer.model.save_pretrained(str(weights), state_dict=adapter)
    elif lora or not is_partitioned(trainer.model):
        trainer.save_model(str(weights))
    # A full ZeRO-3 model is written by _save_final, gathered module by module.
    return {"history": trainer.state.log_history, "seconds": seconds, "steps_run": len(session["steps"]),
            "tokens": trainer.state.num_input_tokens_seen - session["start_tokens"],
            "start_step": session["start_step"],
            "selected_step": checkpoint_step(Path(selected)) if selected else trainer.state.global_step,
            "weights": weights, "model": _without_autocast(trainer.model), "trainer": trainer}


def _without_autocast(model: Any) -> Any:
    """The trained model with its own forward back: under mixed precision accelerate wraps `forward` in
    autocast, and the val loss measured after training must be the fp32 figure a reload of the saved
    (fp32) weights gives."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_fp32_wrapper=False)


def _selected_checkpoint(state: dict[str, Any], ckpt_dir: Path, select_by: str) -> Path | None:
    """The checkpoint a finished run's Trainer chose (`best_model_checkpoint`), found in `ckpt_dir`."""
    best = state.get("best_model_checkpoint")
    if select_by == "last" or not best:
        return None
    path = ckpt_dir / Path(best).name
    return path if checkpoint_step(path) is not None else None


def _save_final(
    params: StageParams, weights: Path, tokenizer: Any, base_dir: Path, trained: Any = None, zero3: bool = False
) -> Path:
    """Write the final model folder (LoRA merged into the base) and swap it in atomically; returns it.

    With the trained model in hand (`trained`), its weights are written from memory: LoRA merged as PEFT
    merges it, without loading the base again; under ZeRO-3 gathered module by module, every rank taking
    part and rank 0 writing. A finished run rebuilt from its checkpoint (`trained` None) reads the checkpoint.
    """
    trust = params.model.trust_remote_code
    out_dir = params.layout.model_dir(STAGE)
    tmp_dir = out_dir.with_name(".model.tmp")
    if trained is not None and (zero3 or params.train.method == "lora"):
        state = gathered_state_dict(trained, merge_lora=True)
        if not is_rank_zero():
            return out_dir
        shutil.rmtree(tmp_dir, ignore_errors=True)
        save_state_dict(state, trained, tokenizer, tmp_dir)
        del state
    elif not is_rank_zero():
        return out_dir
    elif params.train.method == "lora":
        from peft import PeftModel

        base = load_model(base_dir, trust_remote_code=trust)  # the tokenizer is in hand already
        save_model(PeftModel.from_pretrained(base, str(weights)).merge_and_unload(), tokenizer, tmp_dir)
    elif weights != tmp_dir:
        full, _ = load_model_and_tokenizer(weights, trust_remote_code=trust)
        save_model(full, tokenizer, tmp_dir)
    (tmp_dir / "training_args.bin").unlink(missing_ok=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)  # readers never see half a model
    return out_dir


def _measure(
    params: StageParams, val_loss: float, base_val_loss: float, val_rows: list[dict[str, Any]], run: dict[str, Any]
) -> dict[str, Any]:
    """The validation summary losses of the final model and the base beside the loss curve (CSV + PNG)."""
    cfg = params.train
    rows = loss_rows(run["history"])
    at_selected = [r.get("val_rouge_l") for r in rows if r["step"] == run["selected_step"]]
    plots = params.layout.plots_dir(STAGE)
    write_loss_curve(rows, plots / "loss.csv", plots / "loss.png", f"train ({cfg.method}): summary-token loss")
    # Mean of the last (up to) ten logged losses: one step's loss is too noisy to compare runs.
    last = [r["train_loss"] for r in rows if r["train_loss"] is not None][-10:]
    return {
        "train_loss": round(sum(last) / len(last), 4) if last else None,
        "val_loss": round(val_loss, 4),
        "base_val_loss": round(base_val_loss, 4),
        "val_loss_gain": round(base_val_loss - val_loss, 4),
        "val_rows": len(val_rows),
        "steps": rows[-1]["step"] if rows else run["start_step"],
        "resumed_from_step": run["start_step"],
        "val_rouge_l": at_selected[0] if at_selected else None,
        "best_val_rouge_l": max((r["val_rouge_l"] for r in rows if r.get("val_rouge_l") is not None), default=None),
    }


def _gpu_peak_mb() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None


def _make_trainer(
    model: Any,
    tokenizer: Any,
    train_features: list[dict[str, list[int]]],
    val_features: list[dict[str, list[int]]],
    args: Any,
    callbacks: list[Any] = (),
) -> tuple[Any, dict[str, Any]]:
    """The HF Trainer, and a dict its callback fills with where this session started and which steps it ran."""
    from transformers import Trainer, TrainerCallback

    session: dict[str, Any] = {}

    class SessionRecorder(TrainerCallback):
        """Where this run started (a resume starts mid-way) and which steps it did itself."""

        def on_train_begin(self, args, state, control, **kwargs):
            session["start_step"] = state.global_step
            session["start_tokens"] = state.num_input_tokens_seen
            session["steps"] = []

        def on_step_end(self, args, state, control, **kwargs):
            session["steps"].append(state.global_step)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_features,
        eval_dataset=val_features,
        data_collator=training_collator(model, pad_id, batch_width_multiple(args)),
        processing_class=tokenizer,
        callbacks=[SessionRecorder(), *callbacks, *memory_release_callbacks(args.device)],
    )
    return trainer, session
