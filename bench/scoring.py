"""Scoring speed: time to score 1,000 rows (ROUGE-1/2/L, BLEU-4, bootstrap intervals), jieba warm.

Predictions are the first 48 characters of each text (the longest a default model may write:
`evaluate.max_new_tokens` = 48), against the reference titles: the worst case for rouge-chinese's
quadratic LCS at the shipped settings. The ratio compares against a 60-second budget ("seconds").
"""

from __future__ import annotations

import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = 1000
BUDGET_S = 60.0


def main() -> dict:
    """Score 1,000 demo rows and return the timing."""
    from tasks.core.config import Params
    from tasks.core.scoring import score, tokenize

    params = Params()
    rows = []
    with (ROOT / "data" / "sample" / "zh_summ.jsonl").open(encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == ROWS:
                break
    predictions = [r["text"][: params.evaluate.max_new_tokens] for r in rows]
    references = [r["summary"] for r in rows]

    start = time.perf_counter()
    tokenize("预热", "zh")  # jieba loads its dictionary once per process
    init_s = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), time.process_time()
    result = score(predictions, references, "zh", bootstrap_samples=params.evaluate.bootstrap_samples, seed=0)
    score_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start  # the machine is shared: CPU time shows the work itself
    out = {
        "name": f"scoring: {ROWS} rows vs {BUDGET_S:.0f} s budget",
        "ratio": round(BUDGET_S / score_s, 1),
        "baseline": f"{BUDGET_S:.0f} s budget",
        "target": "seconds",
        "note": (
            f"{score_s:.2f} s wall ({cpu_s:.2f} s CPU) for {ROWS} rows ({ROWS / score_s:.0f} rows/s) incl. "
            f"{params.evaluate.bootstrap_samples} bootstrap samples; jieba init {init_s:.2f} s once; "
            f"ROUGE-L {result['rouge-l']:.2f}"
        ),
        "seconds_1000_rows": score_s,
        "cpu_seconds_1000_rows": cpu_s,
        "jieba_init_seconds": init_s,
    }
    print(json.dumps(out, ensure_ascii=False, indent=2))
    return out


if __name__ == "__main__":
    main()
