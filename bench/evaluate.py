"""Batched vs one-by-one generation: rows/s of `tasks.core.generation.generate` on the same model and rows.

The model is a scratch decoder of the default shape (params.yaml `model:`) with a character tokenizer
trained on the demo data; its weights are drawn with a large std so that each row gets a different
summary (a freshly initialised model writes the same character everywhere, and the equality check
below would then prove nothing). Generation settings are the shipped defaults. torch runs one thread:
on a shared machine two OpenMP threads spin against other processes and one-by-one decoding (many
tiny steps) slowed 100-fold in one run, which measured the neighbours, not the code. `BENCH_THREADS=N`
measures with N threads on a quiet machine.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = 64


def _rows(n: int) -> list[dict]:
    rows = []
    with (ROOT / "data" / "sample" / "zh_summ.jsonl").open(encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
    return rows[:n], rows


def main() -> dict:
    """Time batched and one-by-one generation on the same rows; assert identical text; return the ratio."""
    import torch

    from bench.common import random_scratch_model
    from tasks.core.config import Params
    from tasks.core.generation import GenerationSettings, generate
    from tasks.core.io import set_seed

    params = Params()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    set_seed(0)
    rows, corpus = _rows(ROWS)
    model, tokenizer = random_scratch_model(params, corpus, std=0.1)
    texts = [r["text"] for r in rows]
    settings = GenerationSettings.of(params)
    one = replace(settings, batch_size=1)
    generate(model, tokenizer, texts[:2], replace(settings, batch_size=2))  # warm-up: first-call allocations

    start = time.perf_counter()
    batched = generate(model, tokenizer, texts, settings)
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    single = generate(model, tokenizer, texts, one)
    single_s = time.perf_counter() - start

    # Prefill alone (one new token): its compute is the same batched or not, which bounds the ratio.
    start = time.perf_counter()
    generate(model, tokenizer, texts, replace(settings, max_new_tokens=1))
    batched_prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    generate(model, tokenizer, texts, replace(one, max_new_tokens=1))
    single_prefill_s = time.perf_counter() - start
    decode_ratio = (single_s - single_prefill_s) / max(batched_s - batched_prefill_s, 1e-9)

    assert batched == single, "batched generation must give the same text as one-by-one"
    distinct = len(set(batched))
    new_tokens = sum(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in batched)
    ratio = single_s / batched_s
    result = {
        "name": "evaluate: batched / one-by-one rows/s",
        "ratio": round(ratio, 2),
        "baseline": f"one-by-one: {ROWS / single_s:.2f} rows/s",
        "target": ">= 5x",
        "note": (
            f"batched (batch {params.evaluate.batch_size}): {ROWS / batched_s:.2f} rows/s; {ROWS} rows, "
            f"{new_tokens} new tokens, {distinct} distinct outputs, identical text; "
            f"{torch.get_num_threads()} torch thread(s); prompt prefill takes {single_prefill_s / single_s:.0%} of "
            f"one-by-one time and {batched_prefill_s / batched_s:.0%} of batched; decoding alone {decode_ratio:.1f}x"
        ),
        "decode_ratio": decode_ratio,
        "prefill_share_single": single_prefill_s / single_s,
        "prefill_share_batched": batched_prefill_s / batched_s,
        "rows_per_s_batched": ROWS / batched_s,
        "rows_per_s_single": ROWS / single_s,
    }
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return result


if __name__ == "__main__":
    main()
