"""The `evaluate` stage: generate a summary for every test row and score it, beside the base model and a
copy-the-lead baseline, with bootstrap intervals.

Inputs: `artifacts/train/model` (fine-tuned), `artifacts/pretrain/model` (base, when
`evaluate.score_base`), `artifacts/split/{val,test}.jsonl`. Outputs under `artifacts/evaluate/`:
`predictions.jsonl` (id, text, reference, prediction and the row's scores), `base_predictions.jsonl`,
`baseline_predictions.jsonl`; `metrics/evaluate.json`; `plots/evaluate/metrics.png`.

Generations are cached by (model content hash, rows hash, generation params) in `evaluate.cache_dir`,
outside DVC's outputs, so an unchanged model is never asked to generate the same rows twice (the base
model across retrains, the fine-tuned model when only scoring code changed). `evaluate_model` is the
entry other stages (quantize, select, promote) use to score any model on any rows.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks.config import Params
from tasks.errors import StageError
from tasks.generation import generate
from tasks.io import (
    dir_sha256,
    file_sha256,
    read_json,
    read_jsonl,
    sha256_bytes,
    write_json,
    write_jsonl,
)
from tasks.scoring import METRICS, paired_bootstrap, score, score_row

log = logging.getLogger(__name__)

CACHE_VERSION = 1


# ----------------------------------------------------------------------------- scoring any model


def generation_settings(params: Params) -> dict[str, Any]:
    """Everything that changes what greedy generation writes (batch size does not: batching is exact)."""
    return {
        "prompt_template": params.data.prompt_template,
        "use_chat_template": params.data.use_chat_template,
        "max_new_tokens": params.evaluate.max_new_tokens,
        "max_source_length": params.train.max_source_length,
    }


def rows_sha256(rows: Sequence[dict[str, Any]]) -> str:
    """Content hash of the rows a model generates for (ids and texts, in order)."""
    payload = json.dumps([[r["id"], r["text"]] for r in rows], ensure_ascii=False)
    return sha256_bytes(payload.encode("utf-8"))


def generation_cache_key(model_sha256: str, rows: Sequence[dict[str, Any]], params: Params) -> str:
    """The cache key of (model content, rows, generation params)."""
    payload = {
        "version": CACHE_VERSION,
        "model": model_sha256,
        "rows": rows_sha256(rows),
        "generation": generation_settings(params),
    }
    return sha256_bytes(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8"))


def _cache_read(params: Params, key: str, rows: Sequence[dict[str, Any]]) -> list[str] | None:
    path = Path(params.evaluate.cache_dir) / f"{key}.json"
    if not path.exists():
        return None
    try:
        cached = read_json(path)
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable generation cache %s: %s", path, e)
        return None
    if cached.get("ids") != [r["id"] for r in rows] or len(cached.get("predictions", [])) != len(rows):
        log.warning("ignoring generation cache %s: it does not match the rows", path)
        return None
    log.info("generation cache hit: %s (%d rows)", path, len(rows))
    return list(cached["predictions"])


def _cache_write(params: Params, key: str, rows: Sequence[dict[str, Any]], predictions: list[str]) -> None:
    path = Path(params.evaluate.cache_dir) / f"{key}.json"
    write_json(path, {"ids": [r["id"] for r in rows], "predictions": predictions})


def place_on_device(model: Any) -> Any:
    """The model on the GPU when there is one (generation is the stage's cost)."""
    import torch

    return model.to("cuda") if torch.cuda.is_available() and model.device.type == "cpu" else model


def predict(
    model: str | Path | Any,
    rows: Sequence[dict[str, Any]],
    params: Params,
    *,
    tokenizer: Any | None = None,
    model_sha256: str | None = None,
    progress: bool = True,
) -> list[str]:
    """Generate a summary for each row, through the cache when the model's content hash is known.

    Args:
        model: a model folder, or an already-loaded model (then `tokenizer` is required).
        rows: dicts with `id` and `text`.
        params: uses `data.prompt_template`, `data.use_chat_template`, `evaluate.*` and
            `train.max_source_length` (texts are cut as in training).
        tokenizer: the tokenizer of a loaded model.
        model_sha256: content hash of a loaded model (e.g. its folder's hash plus the quantization
            method); without it a loaded model is not cached. A folder is hashed here.
        progress: show a progress bar.

    Returns:
        One prediction per row, in order.

    Raises:
        StageError: the folder cannot be loaded, or a loaded model comes without its tokenizer.
    """
    from tasks.modeling import load_model_and_tokenizer

    is_dir = isinstance(model, (str, Path))
    if is_dir and model_sha256 is None:
        if not Path(model).is_dir():
            raise StageError(f"model directory {model} does not exist: run the stage that writes it first")
        model_sha256 = dir_sha256(Path(model))
    key = generation_cache_key(model_sha256, rows, params) if model_sha256 else None
    if key is not None and (cached := _cache_read(params, key, rows)) is not None:
        return cached
    if is_dir:
        model, tokenizer = load_model_and_tokenizer(model, trust_remote_code=params.model.trust_remote_code)
        model = place_on_device(model)
    elif tokenizer is None:
        raise StageError("predict got a loaded model without its tokenizer")
    settings = generation_settings(params)
    predictions = generate(
        model,
        tokenizer,
        [r["text"] for r in rows],
        prompt_template=settings["prompt_template"],
        use_chat_template=settings["use_chat_template"],
        max_new_tokens=settings["max_new_tokens"],
        batch_size=params.evaluate.batch_size,
        progress=progress,
        max_source_length=settings["max_source_length"],
    )
    if key is not None:
        _cache_write(params, key, rows, predictions)
    return predictions


def evaluate_model(
    model: str | Path | Any,
    rows: Sequence[dict[str, Any]],
    params: Params,
    *,
    tokenizer: Any | None = None,
    model_sha256: str | None = None,
    progress: bool = True,
) -> tuple[list[str], dict[str, Any]]:
    """Generate for `rows` and score against their summaries: the one path every stage uses.

    Args:
        model: a model folder, or an already-loaded model (then pass `tokenizer`).
        rows: dicts with `id`, `text`, `summary`.
        params: as in `predict`; scoring uses `data.language`, `evaluate.bootstrap_samples`, `evaluate.seed`.
        tokenizer: the tokenizer of a loaded model.
        model_sha256: content hash of a loaded model, to cache its generations.
        progress: show a progress bar.

    Returns:
        (predictions, scores) where scores is `tasks.scoring.score`'s dict (means, intervals,
        `empty_predictions`, `per_row`).
    """
    predictions = predict(model, rows, params, tokenizer=tokenizer, model_sha256=model_sha256, progress=progress)
    scores = score(
        predictions,
        [r["summary"] for r in rows],
        params.data.language,
        bootstrap_samples=params.evaluate.bootstrap_samples,
        seed=params.evaluate.seed,
    )
    return predictions, scores


# ----------------------------------------------------------------------------- lead-k baseline


def lead(text: str, k: int, language: str) -> str:
    """The first k characters (zh) or words (en) of a text: the copy-the-lead baseline."""
    if language == "en":
        return " ".join(text.split()[:k])
    return text[:k]


def choose_lead_k(rows: Sequence[dict[str, Any]], max_k: int, language: str) -> tuple[int, float]:
    """The k in 1..max_k whose lead-k has the highest mean ROUGE-L on `rows` (ties: smallest k).

    Returns:
        (k, its mean ROUGE-L on the rows).
    """
    if not rows:
        raise StageError("the val split is empty: the lead-k baseline has nothing to choose k on")
    best_k, best = 1, -1.0
    for k in range(1, max_k + 1):
        mean = sum(score_row(lead(r["text"], k, language), r["summary"], language)["rouge-l"] for r in rows) / len(rows)
        if mean > best:
            best_k, best = k, mean
    return best_k, best


# ----------------------------------------------------------------------------- the stage


def _read_split(params: Params, name: str) -> tuple[Path, list[dict[str, Any]]]:
    path = params.paths.stage_dir("split") / f"{name}.jsonl"
    if not path.exists():
        raise StageError(f"{path} does not exist: run `sftflow split` first")
    rows = read_jsonl(path)
    for n, r in enumerate(rows, 1):
        missing = [k for k in ("id", "text", "summary") if k not in r]
        if missing:
            raise StageError(f"{path}:{n}: row lacks {missing}; re-run `sftflow split`")
    return path, rows


def _model_dir(params: Params, stage: str, fix: str) -> Path:
    path = params.paths.stage_dir(stage) / "model"
    if not (path / "config.json").exists():
        raise StageError(f"{path} holds no model (no config.json): {fix}")
    return path


def _summary(scores: dict[str, Any]) -> dict[str, Any]:
    """The aggregate figures of a score dict (no per-row lists)."""
    return {k: v for k, v in scores.items() if k != "per_row"}


def _prediction_rows(rows: Sequence[dict[str, Any]], predictions: Sequence[str], scores: dict[str, Any]) -> list[dict]:
    return [
        {"id": r["id"], "text": r["text"], "reference": r["summary"], "prediction": p, **s}
        for r, p, s in zip(rows, predictions, scores["per_row"])
    ]


def run(params: Params) -> dict[str, Any]:
    """Evaluate the fine-tuned model (and the base and the lead-k baseline) on the test split.

    Returns:
        The metrics written to `metrics/evaluate.json`.

    Raises:
        StageError: a split or model is missing, or the test split is empty.
    """
    cfg = params.evaluate
    language = params.data.language
    test_path, test_rows = _read_split(params, "test")
    if cfg.rows:
        test_rows = test_rows[: cfg.rows]
    if not test_rows:
        raise StageError(f"{test_path} is empty: nothing to evaluate; check the split ratios and the data size")
    _, val_rows = _read_split(params, "val")
    model_dir = _model_dir(params, "train", "run `sftflow train` first")
    base_dir = (
        _model_dir(params, "pretrain", "run `sftflow pretrain` first, or set evaluate.score_base=false")
        if cfg.score_base
        else None
    )
    out_dir = params.paths.stage_dir("evaluate")
    log.info("evaluating %s on %d test rows of %s", model_dir, len(test_rows), test_path)

    model_sha = dir_sha256(model_dir)
    predictions, scores = evaluate_model(model_dir, test_rows, params, model_sha256=model_sha)
    write_jsonl(out_dir / "predictions.jsonl", _prediction_rows(test_rows, predictions, scores))
    metrics: dict[str, Any] = _summary(scores)
    metrics.pop("rows")
    metrics["test_rows"] = len(test_rows)
    metrics["test_sha256"] = file_sha256(test_path)
    metrics["model_sha256"] = model_sha

    references = [r["summary"] for r in test_rows]
    k, val_rouge_l = choose_lead_k(val_rows, cfg.baseline_max_k, language)
    lead_predictions = [lead(r["text"], k, language) for r in test_rows]
    baseline = score(lead_predictions, references, language, bootstrap_samples=cfg.bootstrap_samples, seed=cfg.seed)
    write_jsonl(out_dir / "baseline_predictions.jsonl", _prediction_rows(test_rows, lead_predictions, baseline))
    log.info("lead-%d baseline (k chosen on %d val rows, val ROUGE-L %.2f)", k, len(val_rows), val_rouge_l)
    metrics["baseline"] = {**_summary(baseline), "k": k}
    metrics["baseline"].pop("rows")
    metrics["gain_over_baseline"] = _gain(scores, baseline, cfg)

    systems = {"model": scores, "baseline": baseline}
    if base_dir is not None:
        base_sha = dir_sha256(base_dir)
        base_predictions, base_scores = evaluate_model(base_dir, test_rows, params, model_sha256=base_sha)
        write_jsonl(out_dir / "base_predictions.jsonl", _prediction_rows(test_rows, base_predictions, base_scores))
        metrics["base"] = {**_summary(base_scores), "model_sha256": base_sha}
        metrics["base"].pop("rows")
        metrics["gain_over_base"] = _gain(scores, base_scores, cfg)
        systems = {"model": scores, "base": base_scores, "baseline": baseline}

    write_json(params.paths.metrics_file("evaluate"), metrics)
    plot_metrics(systems, params.paths.plots_dir("evaluate") / "metrics.png", len(test_rows))
    log.info(
        "ROUGE-L %.2f [%.2f, %.2f]%s; lead-%d baseline %.2f; %d empty predictions",
        metrics["rouge-l"], metrics["rouge-l_low"], metrics["rouge-l_high"],
        f"; base {metrics['base']['rouge-l']:.2f}" if "base" in metrics else "",
        k, baseline["rouge-l"], metrics["empty_predictions"],
    )
    return metrics


def _gain(a: dict[str, Any], b: dict[str, Any], cfg: Any) -> dict[str, float]:
    """Paired bootstrap of ROUGE-L, a minus b, on the same rows."""
    result = paired_bootstrap(
        [r["rouge-l"] for r in a["per_row"]], [r["rouge-l"] for r in b["per_row"]], cfg.bootstrap_samples, cfg.seed
    )
    return {f"rouge-l_{k}": v for k, v in result.items() if k != "rows"}


def plot_metrics(systems: dict[str, dict[str, Any]], path: Path, rows: int) -> None:
    """Grouped bars of each metric per system with their 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from tasks.io import save_figure

    x = np.arange(len(METRICS))
    width = 0.8 / len(systems)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for n, (name, s) in enumerate(systems.items()):
        means = np.array([s[m] for m in METRICS])
        err = np.array([[s[m] - s[f"{m}_low"] for m in METRICS], [s[f"{m}_high"] - s[m] for m in METRICS]])
        bars = ax.bar(x + (n - (len(systems) - 1) / 2) * width, means, width, yerr=err, capsize=3, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(x, METRICS)
    ax.set_ylabel("F1 × 100 (BLEU × 100)")
    ax.set_title(f"test split, {rows} rows; bars: 95% bootstrap interval")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
