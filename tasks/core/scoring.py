"""ROUGE-1/2/L and BLEU-4 as each language's literature reports them, with bootstrap confidence intervals.

Chinese is segmented into words with jieba and scored with rouge-chinese (F × 100), the method
LLaMA-Factory and ChatGLM report; generic ROUGE tokenizers keep ASCII only and score Chinese as 0.
English is scored with Google's `rouge_score` (`RougeScorer(["rouge1", "rouge2", "rougeL"],
use_stemmer=True)`, F × 100): lower-cased `[a-z0-9]+` tokens, Porter-stemmed, the way the English
summarisation papers (CNN/DailyMail, XSum) report ROUGE; rouge-l is the sentence-level rougeL, not
the newline-split rougeLsum.
BLEU-4 is NLTK's smoothed `sentence_bleu` on the words `tokenize` gives (English unstemmed).

An empty prediction is scored 0 on every metric and counted; nothing is put in its place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from tasks.core.io import read_jsonl

log = logging.getLogger(__name__)

# Bumped whenever a score of the same text changes (tokenisation, the ROUGE implementation): per-row
# scores stored in the registry are keyed by it, so scores of different versions are never compared.
# 2: English ROUGE by rouge_score with the Porter stemmer (was rouge-chinese on NLTK word tokens).
SCORING_VERSION = 2
METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
LANGUAGES = ("zh", "en")
# Our metric names and rouge_score's, for English.
ROUGE_SCORE_TYPES = {"rouge-1": "rouge1", "rouge-2": "rouge2", "rouge-l": "rougeL"}


@lru_cache(maxsize=1)
def _jieba() -> Any:
    """jieba with its dictionary loaded once (about a second) and its chatter silenced."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba


@lru_cache(maxsize=1)
def _rouge() -> Any:
    from rouge_chinese import Rouge

    return Rouge()


@lru_cache(maxsize=1)
def _rouge_en() -> Any:
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(list(ROUGE_SCORE_TYPES.values()), use_stemmer=True)


@lru_cache(maxsize=1)
def _bleu() -> tuple[Any, Any]:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    # method3 (NIST geometric smoothing) is what LLaMA-Factory and ChatGLM use for short outputs.
    return sentence_bleu, SmoothingFunction().method3


def tokenize(text: str, language: str) -> list[str]:
    """Words of a text as scored: jieba words for zh, rouge_score's tokens (unstemmed) for en; no whitespace.

    Args:
        text: any text.
        language: `zh` or `en` (params `data.language`).

    Returns:
        The tokens, whitespace dropped.
    """
    if language == "zh":
        return [w for w in _jieba().lcut(text) if w.strip()]
    if language == "en":
        from rouge_score.tokenize import tokenize as rouge_score_tokenize

        # Lower-cased [a-z0-9]+ runs, what RougeScorer itself scores (before it stems them).
        return rouge_score_tokenize(text, None)
    raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")


def score_row(prediction: str, reference: str, language: str) -> dict[str, float]:
    """ROUGE-1/2/L F and BLEU-4 (× 100) of one prediction against one reference.

    Returns:
        One value per name in `METRICS`; all 0 when the prediction has no tokens.

    Raises:
        ValueError: the reference has no tokens (the data should never hold such a row).
    """
    ref = tokenize(reference, language)
    if not ref:
        raise ValueError(f"reference {reference!r} has no words to score against")
    return _score_pair(prediction, reference, tokenize(prediction, language), ref, language)


def _score_pair(prediction: str, reference: str, hyp: list[str], ref: list[str], language: str) -> dict[str, float]:
    """The four metrics of a hypothesis and its reference (texts and `tokenize`'s words); all 0 for an empty hypothesis."""
    if not hyp:
        return dict.fromkeys(METRICS, 0.0)
    if language == "zh":
        rouge = _rouge().get_scores(" ".join(hyp), " ".join(ref))[0]
        out = {m: 100.0 * rouge[m]["f"] for m in ROUGE_SCORE_TYPES}
    else:
        # rouge_score tokenizes and stems the texts itself: the figures are exactly RougeScorer's.
        rouge = _rouge_en().score(reference, prediction)
        out = {m: 100.0 * rouge[t].fmeasure for m, t in ROUGE_SCORE_TYPES.items()}
    sentence_bleu, smoothing = _bleu()
    out["bleu-4"] = 100.0 * sentence_bleu([ref], hyp, smoothing_function=smoothing)
    return out


def score(
    predictions: Sequence[str],
    references: Sequence[str],
    language: str,
    *,
    bootstrap_samples: int = 1000,
    seed: int = 42,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Score predictions against references, row by row and on average, with bootstrap intervals.

    Args:
        predictions: generated summaries.
        references: reference summaries, same length and order.
        language: `zh` (jieba words, rouge-chinese) or `en` (rouge_score with the Porter stemmer).
        bootstrap_samples: resamples of the rows for each interval.
        seed: seeds the resampling, so intervals are reproducible.
        confidence: the interval's coverage (0.95 = 2.5th to 97.5th percentile).

    Returns:
        `rouge-1`, `rouge-2`, `rouge-l`, `bleu-4` (means of F × 100 over rows), `<metric>_low` and
        `<metric>_high` (the interval), `rows`, `empty_predictions` (rows scored 0 for an empty
        prediction), and `per_row`: one dict of the four metrics per row, in input order.

    Raises:
        ValueError: the lists differ in length or are empty, or a reference has no words (its row is named).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("nothing to score: no predictions")
    per_row = []
    empty = 0
    for i, (p, r) in enumerate(zip(predictions, references)):
        ref = tokenize(r, language)
        if not ref:
            raise ValueError(f"row {i}: reference {r!r} has no words to score against")
        hyp = tokenize(p, language)
        empty += not hyp
        per_row.append(_score_pair(p, r, hyp, ref, language))
    out: dict[str, Any] = {}
    for m in METRICS:
        column = [row[m] for row in per_row]
        low, high = bootstrap_ci(column, bootstrap_samples, seed, confidence)
        out[m] = sum(column) / len(column)
        out[f"{m}_low"] = low
        out[f"{m}_high"] = high
    out["rows"] = len(per_row)
    out["empty_predictions"] = empty
    if empty:
        log.warning("%d of %d predictions are empty; each is scored 0", empty, len(per_row))
    out["per_row"] = per_row
    return out


def bootstrap_ci(values: Sequence[float], samples: int, seed: int, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (rows resampled with replacement).

    Returns:
        (low, high); both equal the value for a single row.
    """
    import numpy as np

    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, size=(samples, arr.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def paired_bootstrap(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    samples: int,
    seed: int,
    confidence: float = 0.95,
) -> dict[str, float]:
    """Paired bootstrap of mean(a) - mean(b) over the same rows (row i of a and b score the same text).

    Args:
        scores_a: per-row scores of system A (e.g. the challenger's rouge-l).
        scores_b: per-row scores of system B on the same rows in the same order.
        samples: resamples of the rows.
        seed: seeds the resampling.
        confidence: the interval's coverage.

    Returns:
        `delta` (mean of a - b), `low`/`high` (its interval), `p_not_better` (share of resamples in
        which A does not beat B: a one-sided bootstrap p-value), `rows`.

    Raises:
        ValueError: the lists differ in length or are empty.
    """
    import numpy as np

    a = np.asarray(scores_a, dtype=np.float64)
    b = np.asarray(scores_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs the same rows: {a.size} scores vs {b.size}")
    if a.size == 0:
        raise ValueError("paired bootstrap needs at least one row")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(samples, diff.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return {
        "delta": float(diff.mean()),
        "low": float(low),
        "high": float(high),
        "p_not_better": float((means <= 0).mean()),
        "rows": int(diff.size),
    }


def compare_prediction_files(
    path_a: Any, path_b: Any, metric: str, samples: int, seed: int
) -> dict[str, float]:
    """Paired bootstrap of two `predictions.jsonl` files (as the evaluate stage writes them) on their shared ids.

    Args:
        path_a: predictions of system A (rows carry `id` and per-row metric values).
        path_b: predictions of system B.
        metric: one of `METRICS`.
        samples: bootstrap resamples.
        seed: seeds the resampling.

    Returns:
        `paired_bootstrap`'s dict for A minus B.

    Raises:
        ValueError: the metric is unknown, or the files share no id (they were scored on different test sets).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    a = {r["id"]: r[metric] for r in read_jsonl(path_a)}
    b = {r["id"]: r[metric] for r in read_jsonl(path_b)}
    shared = sorted(a.keys() & b.keys())
    if not shared:
        raise ValueError(f"{path_a} and {path_b} share no row id: they were scored on different test rows")
    if len(shared) < max(len(a), len(b)):
        log.warning("comparing on the %d ids both files hold (%d and %d rows)", len(shared), len(a), len(b))
    return paired_bootstrap([a[i] for i in shared], [b[i] for i in shared], samples, seed)



def output_stats(predictions: Sequence[str], references: Sequence[str], language: str) -> dict[str, float]:
    """What a reader notices before any ROUGE: are the outputs different from each other, do they stutter,
    are they the right length.

    Units are characters for zh and words (whitespace-separated) for en.

    Args:
        predictions: one output per row (raw, as generated).
        references: the reference summaries, in the same order.
        language: `zh` or `en`.

    Returns:
        `distinct_share` (distinct outputs ÷ rows), `repeat_share` (share of outputs with one unit repeated
        3+ times in a row, e.g. "国国国" or "the the the"), `mean_length`, `reference_mean_length` and
        `length_ratio` (mean output length ÷ mean reference length).

    Raises:
        ValueError: no rows, or the lists differ in length.
    """
    if not predictions or len(predictions) != len(references):
        raise ValueError(f"need the same non-zero number of predictions and references, got {len(predictions)} and {len(references)}")

    def units(text: str) -> list[str]:
        return text.split() if language == "en" else [c for c in text if not c.isspace()]

    def stutters(text: str) -> bool:
        u = units(text)
        return any(u[i] == u[i + 1] == u[i + 2] for i in range(len(u) - 2))

    mean_length = sum(len(units(p)) for p in predictions) / len(predictions)
    reference_length = sum(len(units(r)) for r in references) / len(references)
    return {
        "distinct_share": len(set(predictions)) / len(predictions),
        "repeat_share": sum(stutters(p) for p in predictions) / len(predictions),
        "mean_length": mean_length,
        "reference_mean_length": reference_length,
        "length_ratio": mean_length / reference_length if reference_length else float("nan"),
    }
