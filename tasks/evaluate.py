"""The `evaluate` stage: generate a summary for every test row and score it, beside the base model and a
copy-the-lead baseline, with bootstrap intervals.

Inputs: `artifacts/align/model` (the final model: aligned, or the fine-tuned one passed through),
`artifacts/pretrain/model` (base, when `evaluate.score_base`), `artifacts/split/{val,test}.jsonl`.
Outputs under `artifacts/evaluate/`: `predictions.jsonl` (id, text, reference, prediction and the row's
scores), `base_predictions.jsonl`, `baseline_predictions.jsonl`, `decoding.json` (the repetition controls used: the params', or with
`evaluate.tune_decoding` the best of `tasks.core.decoding.DECODING_GRID` on the val rows; quantize and
register use the same); `metrics/evaluate.json` (with `decoding`); `plots/evaluate/metrics.png`.

Generation and scoring go through `tasks.core.evaluation.Evaluator` (cached by model content), the
path every stage that scores a model shares: the full model in float32 on the GPU when there is one
(spread over GPUs with `device_map="auto"` when one is too small; refused with the figures before loading
when the memory cannot hold it), recorded as `scored_in` in the metrics.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tasks.core.data import read_split
from tasks.core.decoding import choose_decoding, decoding_file, write_decoding
from tasks.core.errors import StageError
from tasks.core.evaluation import Evaluator, model_placement
from tasks.core.io import dir_sha256, file_sha256, write_json, write_jsonl
from tasks.core.plots import save_figure
from tasks.core.scoring import METRICS, output_stats, paired_bootstrap, score_row
from tasks.core.stage_params import StageParams, stage_entry

log = logging.getLogger(__name__)


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


def _model_dir(path: Path, fix: str) -> Path:
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


@stage_entry("evaluate")
def run(cfg: StageParams) -> dict[str, Any]:
    """Evaluate the final model (and the base and the lead-k baseline) on the test split.

    Returns:
        The metrics written to `metrics/evaluate.json`.

    Raises:
        StageError: a split or model is missing, or the test split is empty.
    """
    layout, language = cfg.layout, cfg.data.language
    test_rows = read_split(layout, "test", limit=cfg.evaluate.rows)
    val_rows = read_split(layout, "val")
    model_dir = _model_dir(layout.final_model, f"run `sftflow {layout.final_model_stage}` first")
    base_dir = (
        _model_dir(layout.base_model, "run `sftflow pretrain` first, or set evaluate.score_base=false")
        if cfg.evaluate.score_base
        else None
    )
    out_dir = layout.stage_dir("evaluate")
    evaluator = Evaluator.of(cfg)
    model_sha = dir_sha256(model_dir)

    # The repetition controls: the params', or the best of the grid on val rows (test is not read).
    start, tuned, grid = evaluator.generation, cfg.evaluate.tune_decoding, []
    tune_rows = val_rows[: cfg.evaluate.tune_rows] if cfg.evaluate.tune_rows else val_rows
    if tuned:
        chosen, grid = choose_decoding(evaluator, model_dir, tune_rows, language, model_sha256=model_sha)
        evaluator = replace(evaluator, generation=replace(start, **chosen))
        log.info("decoding chosen on %d val rows: %s", len(tune_rows), chosen)
    decoding = write_decoding(decoding_file(layout), evaluator.generation, start, model_sha,
                              tuned=tuned, val_rows=len(tune_rows) if tuned else 0, grid=grid)
    log.info("evaluating %s on %d test rows of %s", model_dir, len(test_rows), layout.split("test"))

    predictions, scores = evaluator.evaluate(model_dir, test_rows, model_sha256=model_sha)
    write_jsonl(out_dir / "predictions.jsonl", _prediction_rows(test_rows, predictions, scores))
    metrics: dict[str, Any] = _summary(scores)
    metrics.pop("rows")
    metrics["test_rows"] = len(test_rows)
    metrics["test_sha256"] = file_sha256(layout.split("test"))
    metrics["model_sha256"] = model_sha
    # What the figures were measured in: the full model as `serve.variant_*: full` serves it (a variant is
    # scored by quantize in its own dtype and device class).
    metrics["scored_in"] = model_placement(None)
    references = [r["summary"] for r in test_rows]
    metrics["outputs"] = output_stats(predictions, references, language)
    metrics["decoding"] = {k: v for k, v in decoding.items() if k not in {"model_sha256", "params"}}

    k, val_rouge_l = choose_lead_k(val_rows, cfg.evaluate.baseline_max_k, language)
    lead_predictions = [lead(r["text"], k, language) for r in test_rows]
    baseline = evaluator.score(lead_predictions, references)
    write_jsonl(out_dir / "baseline_predictions.jsonl", _prediction_rows(test_rows, lead_predictions, baseline))
    log.info("lead-%d baseline (k chosen on %d val rows, val ROUGE-L %.2f)", k, len(val_rows), val_rouge_l)
    metrics["baseline"] = {**_summary(baseline), "k": k, "outputs": output_stats(lead_predictions, references, language)}
    metrics["baseline"].pop("rows")
    metrics["gain_over_baseline"] = _gain(scores, baseline, evaluator)

    systems = {"model": scores, "baseline": baseline}
    if base_dir is not None:
        base_sha = dir_sha256(base_dir)
        base_predictions, base_scores = evaluator.evaluate(base_dir, test_rows, model_sha256=base_sha)
        write_jsonl(out_dir / "base_predictions.jsonl", _prediction_rows(test_rows, base_predictions, base_scores))
        metrics["base"] = {**_summary(base_scores), "model_sha256": base_sha,
                           "outputs": output_stats(base_predictions, references, language)}
        metrics["base"].pop("rows")
        metrics["gain_over_base"] = _gain(scores, base_scores, evaluator)
        systems = {"model": scores, "base": base_scores, "baseline": baseline}

    write_json(layout.metrics_file("evaluate"), metrics)
    plot_metrics(systems, layout.plots_dir("evaluate") / "metrics.png", len(test_rows))
    log.info(
        "ROUGE-L %.2f [%.2f, %.2f]%s; lead-%d baseline %.2f; %d empty predictions; %.0f%% distinct, %.0f%% stutter",
        metrics["rouge-l"], metrics["rouge-l_low"], metrics["rouge-l_high"],
        f"; base {metrics['base']['rouge-l']:.2f}" if "base" in metrics else "",
        k, baseline["rouge-l"], metrics["empty_predictions"],
        100 * metrics["outputs"]["distinct_share"], 100 * metrics["outputs"]["repeat_share"],
    )
    return metrics


def _gain(a: dict[str, Any], b: dict[str, Any], evaluator: Evaluator) -> dict[str, float]:
    """Paired bootstrap of ROUGE-L, a minus b, on the same rows."""
    result = paired_bootstrap(
        [r["rouge-l"] for r in a["per_row"]], [r["rouge-l"] for r in b["per_row"]], evaluator.bootstrap_samples, evaluator.seed
    )
    return {f"rouge-l_{k}": v for k, v in result.items() if k != "rows"}


def plot_metrics(systems: dict[str, dict[str, Any]], path: Path, rows: int) -> None:
    """Grouped bars of each metric per system with their 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

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
