"""Validation ROUGE while training: what the checkpoint is chosen by.

Loss is what the Trainer minimises, not what a reader sees: a checkpoint with a lower loss can write
worse summaries. Every evaluation, `ValRougeCallback` generates summaries for the first
`train.eval_generate_rows` val rows with the same batched greedy generator evaluate uses, scores
their ROUGE-L, and adds it to the evaluation's metrics as `eval_rouge-l` (and to the log history),
so the Trainer's own best-checkpoint machinery (`metric_for_best_model`, `load_best_model_at_end`,
`EarlyStoppingCallback`) can select by it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback

from tasks.core.generation import GenerationSettings, generate
from tasks.core.scoring import score_row

METRIC = "rouge-l"
EVAL_KEY = f"eval_{METRIC}"


class ValRougeCallback(TrainerCallback):
    """Adds `eval_rouge-l` (mean per-row ROUGE-L F × 100 on the given val rows) to every evaluation.

    Args:
        tokenizer: the model's tokenizer.
        rows: val rows (`text`, `summary`) to generate for.
        settings: how to generate (the settings evaluate uses).
        language: `zh` or `en`, for scoring.

    Attributes:
        seconds: time spent generating and scoring, for the share of train time it cost.
        evaluations: how many evaluations it scored.
    """

    def __init__(self, tokenizer: Any, rows: Sequence[dict[str, Any]], settings: GenerationSettings, language: str) -> None:
        if not rows:
            raise ValueError("ValRougeCallback needs at least one val row")
        self.tokenizer = tokenizer
        self.texts = [r["text"] for r in rows]
        self.references = [r["summary"] for r in rows]
        self.settings = settings
        self.language = language
        self.seconds = 0.0
        self.evaluations = 0

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, metrics: dict | None = None, **kwargs: Any) -> None:
        """Generate, score, and put the figure where the Trainer's best-checkpoint logic and the log read it."""
        start = time.perf_counter()
        predictions = generate(model, self.tokenizer, self.texts, self.settings)
        value = sum(score_row(p, r, self.language)[METRIC] for p, r in zip(predictions, self.references)) / len(predictions)
        if metrics is not None:
            metrics[EVAL_KEY] = value
        # Trainer.log appended this evaluation's entry just before calling back: annotate that entry.
        if state.log_history and "eval_loss" in state.log_history[-1]:
            state.log_history[-1][EVAL_KEY] = value
        self.seconds += time.perf_counter() - start
        self.evaluations += 1
