"""Padding-free batches vs the stage's length-grouped padded batches, on this machine's attention kernel.

Why `train` does not pack on the CPU, measured. A padding-free batch (transformers'
`DataCollatorWithFlattening`) is one row of every sequence end to end, with `position_ids` that restart
at 0 for each; transformers (`masking_utils.find_packed_sequence_indices`) reads the restarts and builds
a block-diagonal causal mask, so no sequence attends to another. That is contamination-free only when
the forward runs without a KV cache (`use_cache=False`): with a cache (the default of a model whose
config says `use_cache: true`) the packed check is skipped and every token attends to all earlier
sequences of the row. Both are checked here against each sequence run alone.

The cost: without a variable-length kernel (flash-attention's `cu_seq_lens` on a GPU), attention over
the packed row is one dense T x T product for T = all tokens of the batch, where the padded batch does
B products of its longest length. With `group_by_length` the padded batch is about 3% padding
(README Benchmarks), so there is little padding to save and much attention to add.

Same batch for both: 16 demo training rows of neighbouring lengths (what `group_by_length` puts
together), a scratch model of the shipped shape, forward + backward in the shipped precision
(`train.precision: auto`), 1 torch thread (`BENCH_THREADS` to change), best of `REPEATS`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 16
REPEATS = 3


def main() -> dict:
    """Time padded vs padding-free forward + backward on one grouped batch; check contamination both ways."""
    import contextlib
    import json

    import torch
    from transformers import DataCollatorWithFlattening

    from bench.common import random_scratch_model
    from tasks.core.config import load_params
    from tasks.core.prompt import collate_features
    from tasks.core.training import resolve_precision
    from tasks.train import encode_rows

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    params = load_params(ROOT / "params.yaml")
    rows = [json.loads(line) for line in (ROOT / "data" / "sample" / "zh_summ.jsonl").open(encoding="utf-8")][:400]
    model, tokenizer = random_scratch_model(params, rows, std=0.02)
    features, _ = encode_rows(params, tokenizer, rows, 48)
    by_length = sorted(features, key=lambda f: len(f["input_ids"]))
    middle = len(by_length) // 2
    batch = by_length[middle : middle + BATCH]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    padded = collate_features(batch, pad_id)
    flat = DataCollatorWithFlattening(return_tensors="pt")([{k: f[k] for k in ("input_ids", "labels")} for f in batch])
    real = int(padded["attention_mask"].sum())
    precision = resolve_precision(params.train.precision)
    def step(inputs: dict) -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
            out = model(**inputs, use_cache=False)
        out.loss.backward()
        return time.perf_counter() - start

    padded_inputs = {k: padded[k] for k in ("input_ids", "attention_mask", "labels")}
    flat_inputs = {k: flat[k] for k in ("input_ids", "position_ids", "labels")}
    times = {"padded": [], "padding_free": []}
    for _ in range(REPEATS):  # interleaved, so a burst of other load hits both
        times["padded"].append(step(padded_inputs))
        times["padding_free"].append(step(flat_inputs))
    best = {k: min(v) for k, v in times.items()}

    # Contamination: each sequence's logits in the packed row vs the sequence alone.
    model.eval()
    diffs = {}
    with torch.no_grad():
        offsets = [0]
        for f in batch:
            offsets.append(offsets[-1] + len(f["input_ids"]))
        for use_cache in (False, True):
            packed = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], use_cache=use_cache).logits[0]
            worst = 0.0
            for i in (1, len(batch) // 2, len(batch) - 1):
                alone = model(input_ids=torch.tensor([batch[i]["input_ids"]]), use_cache=False).logits[0]
                worst = max(worst, float((packed[offsets[i] : offsets[i + 1]] - alone).abs().max()))
            diffs[use_cache] = worst
    ratio = best["padded"] / best["padding_free"]
    width = padded["input_ids"].shape[1]
    return {
        "name": "train: padding-free / grouped padded",
        "ratio": round(ratio, 2),
        "target": "info",
        "note": (
            f"fwd+bwd of {BATCH} grouped demo rows ({real} real tokens; padded {BATCH}x{width}, "
            f"{1 - real / padded['input_ids'].numel():.0%} pad) in {precision}: padded {best['padded']:.3f} s, "
            f"padding-free 1x{flat['input_ids'].shape[1]} {best['padding_free']:.3f} s (dense block mask, no varlen kernel); "
            f"packed vs alone logits max diff {diffs[False]:.1e} without KV cache, {diffs[True]:.2f} with it (leaks)"
        ),
        "threads": torch.get_num_threads(),
        "times": times,
        "contamination_max_abs_diff": {"use_cache_false": diffs[False], "use_cache_true": diffs[True]},
    }


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=2))
