"""The decoding choice: which repetition controls a version generates with.

With `evaluate.tune_decoding` on, evaluate scores every point of `DECODING_GRID` on the **val** rows
(never test) and keeps the one with the best mean ROUGE-L (ties: the earlier point, so the plain
settings win unless a control really helps). Either way evaluate writes what it used to
`artifacts/evaluate/decoding.json`; quantize and register read that file (`apply_decoding`), so the
quantized variants, the registered model's `sftflow.json`, the pyfunc model and the app all generate
exactly as the test split was scored.

The file names the weights it was chosen for and the params it started from: a file from other
weights or other `evaluate.no_repeat_ngram_size` / `evaluate.repetition_penalty` is refused (re-run
evaluate), never silently applied.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tasks.core.errors import StageError
from tasks.core.generation import GenerationSettings
from tasks.core.io import read_json, write_json
from tasks.core.scoring import score_row

log = logging.getLogger(__name__)

DECODING_FILE = "decoding.json"
CONTROLS = ("no_repeat_ngram_size", "repetition_penalty")
# The points tried, in order of preference on a tie: off first.
DECODING_GRID: tuple[dict[str, Any], ...] = (
    {"no_repeat_ngram_size": 0, "repetition_penalty": 1.0},
    {"no_repeat_ngram_size": 3, "repetition_penalty": 1.0},
    {"no_repeat_ngram_size": 0, "repetition_penalty": 1.2},
    {"no_repeat_ngram_size": 3, "repetition_penalty": 1.2},
    {"no_repeat_ngram_size": 2, "repetition_penalty": 1.0},
    {"no_repeat_ngram_size": 2, "repetition_penalty": 1.2},
)


def decoding_file(layout: Any) -> Path:
    """Where evaluate writes the decoding it used: `artifacts/evaluate/decoding.json`."""
    return layout.stage_dir("evaluate") / DECODING_FILE


def controls(settings: GenerationSettings) -> dict[str, Any]:
    """The repetition controls of some settings, as a dict."""
    return {k: getattr(settings, k) for k in CONTROLS}


def choose_decoding(
    evaluator: Any,
    model: Any,
    val_rows: Sequence[dict[str, Any]],
    language: str,
    *,
    model_sha256: str | None = None,
    grid: Sequence[dict[str, Any]] = DECODING_GRID,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The grid point with the best mean val ROUGE-L (ties: the earlier point).

    Args:
        evaluator: a `tasks.core.evaluation.Evaluator` (its generation settings give everything but
            the controls; its cache serves points already generated).
        model: a model folder (or a loaded model, with `model_sha256`) as `Evaluator.predict` takes.
        val_rows: the val rows (`text`, `summary`): the only rows read.
        language: for scoring.
        model_sha256: the model's content hash (the cache key).
        grid: the points tried.

    Returns:
        (the chosen controls, every point with its `rouge-l`).

    Raises:
        StageError: no val rows, or an empty grid.
    """
    if not val_rows:
        raise StageError("evaluate.tune_decoding needs val rows to choose on, and the val split is empty")
    if not grid:
        raise StageError("the decoding grid is empty: nothing to choose from")
    tried = []
    for point in grid:
        candidate = replace(evaluator, generation=replace(evaluator.generation, **point))
        predictions = candidate.predict(model, val_rows, model_sha256=model_sha256, progress=False)
        mean = sum(score_row(p, r["summary"], language)["rouge-l"] for p, r in zip(predictions, val_rows)) / len(val_rows)
        tried.append({**point, "rouge-l": mean})
        log.info("decoding %s: val ROUGE-L %.2f on %d rows", point, mean, len(val_rows))
    best = max(range(len(tried)), key=lambda i: (tried[i]["rouge-l"], -i))
    return dict(grid[best]), tried


def write_decoding(
    path: Path,
    chosen: GenerationSettings,
    start: GenerationSettings,
    model_sha256: str,
    *,
    tuned: bool,
    val_rows: int = 0,
    grid: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Write the decoding evaluate used (`chosen`), what it started from (the params) and for which weights."""
    record = {
        **controls(chosen),
        "tuned": tuned,
        "params": controls(start),
        "model_sha256": model_sha256,
        "val_rows": val_rows,
        "grid": list(grid),
    }
    write_json(path, record)
    return record


def apply_decoding(settings: GenerationSettings, path: Path, model_sha256: str | None = None) -> GenerationSettings:
    """`settings` (from the params) with the controls evaluate used, from its `decoding.json`.

    Without the file (evaluate has not run) the params' settings are returned as they are.

    Raises:
        StageError: the file was written for other weights (`model_sha256`, when given) or from other
            params: re-run evaluate.
    """
    if not path.exists():
        log.info("no %s (evaluate has not run): generating with the params' repetition controls", path)
        return settings
    record = read_json(path)
    if model_sha256 is not None and record.get("model_sha256") != model_sha256:
        raise StageError(f"{path} was chosen for other weights than the model's: re-run `sftflow evaluate`")
    if record.get("params") != controls(settings):
        raise StageError(
            f"{path} was written with evaluate's repetition controls {record.get('params')}, the params now say "
            f"{controls(settings)}: re-run `sftflow evaluate`"
        )
    return replace(settings, **{k: record[k] for k in CONTROLS})
