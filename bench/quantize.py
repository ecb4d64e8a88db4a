"""CPU int8 candidates against fp32 on the same model, rows and batches: weights size, generation CPU time,
agreement with fp32 and ROUGE-L. The figures behind the choice in `tasks/quantize.py`'s docstring.

Candidates: torchao `Int8WeightOnlyConfig` and `Int8DynamicActivationInt8WeightConfig` (`quantize_`),
optimum-quanto `qint8` weights (only when installed; it is not a dependency), and ours (`int8`: torch's
dynamically quantized int8 linears built by `tasks.quantize`, reloaded from its safetensors folder).

The model is `$SFTFLOW_BENCH_MODEL` or `artifacts/train/model` when it exists, else a scratch decoder of the default shape
(params.yaml `model:`) whose weights are drawn with a large std so rows get different outputs (then
ROUGE-L is near 0 for all and only size, time and agreement mean anything; the result says which).
Times are CPU seconds of this process at 1 torch thread, best of REPEATS passes interleaved across the
candidates, so load from other processes on a shared machine falls on all alike.

    python -m bench.quantize            # or: python -m bench quantize
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = 32
BATCH_SIZE = 32
REPEATS = 3


def _test_rows(n: int) -> list[dict]:
    split = ROOT / "artifacts" / "split" / "test.jsonl"
    path = split if split.exists() else ROOT / "data" / "sample" / "zh_summ.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[-n:] if path != split else rows[:n]


def _model(params):
    """(model, tokenizer, description): the trained model, or a default-shaped scratch one."""
    from bench.common import random_scratch_model
    from tasks.core.modeling import load_model_and_tokenizer

    trained = Path(os.environ.get("SFTFLOW_BENCH_MODEL", ROOT / "artifacts" / "train" / "model"))
    if (trained / "config.json").exists():
        model, tok = load_model_and_tokenizer(trained)
        return model, tok, f"model {trained}"
    corpus = [json.loads(line) for line in (ROOT / "data" / "sample" / "zh_summ.jsonl").open(encoding="utf-8")]
    model, tok = random_scratch_model(params, corpus, std=0.05)
    return model, tok, "scratch default-shaped model with random weights (no artifacts/train/model)"


def _state_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def main() -> dict:
    """Build every candidate, time generation interleaved, and return one row per candidate."""
    import torch
    from safetensors.torch import save_file

    from tasks.core.config import Params
    from tasks.core.generation import GenerationSettings, generate
    from tasks.core.modeling import save_model
    from tasks.core.variants import load_quantized, save_int8, weights_bytes
    from tasks.quantize import quantize_int8
    from tasks.core.scoring import score

    torch.set_num_threads(1)
    params = Params()
    full, tok, which = _model(params)
    full.eval()
    rows = _test_rows(ROWS)
    tmp = Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    save_model(full, tok, tmp / "full")
    full_bytes = weights_bytes(tmp / "full")

    candidates: dict[str, tuple] = {"fp32": (full, full_bytes)}
    from torchao.prototype.safetensors.safetensors_support import (
        flatten_tensor_state_dict,
    )
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    for name, config in (("torchao int8 weight-only", Int8WeightOnlyConfig()),
                         ("torchao int8 dyn-act int8 weight", Int8DynamicActivationInt8WeightConfig())):
        m = copy.deepcopy(full)
        quantize_(m, config)  # every nn.Linear, the tied lm_head included (the embedding stays fp32)
        flat, metadata = flatten_tensor_state_dict(m.state_dict())
        save_file(flat, str(tmp / "ao.safetensors"), metadata=metadata)
        candidates[name] = (m, (tmp / "ao.safetensors").stat().st_size)
    try:
        from optimum.quanto import freeze, qint8, quantize

        m = copy.deepcopy(full)
        quantize(m, weights=qint8)
        freeze(m)
        candidates["optimum-quanto int8 weights"] = (m, _state_bytes(m.state_dict()))
    except ImportError:
        print("[bench] optimum-quanto not installed: skipped (pip install optimum-quanto to compare it)")
    m, tensors, layout = quantize_int8(copy.deepcopy(full))
    save_int8(tensors, layout, m, tok, tmp / "int8")
    loaded, _ = load_quantized(tmp / "int8")
    candidates["ours: int8 (torch dynamic int8 linears)"] = (loaded, weights_bytes(tmp / "int8"))

    settings = replace(GenerationSettings.of(params), batch_size=BATCH_SIZE)
    texts = [r["text"] for r in rows]
    outputs, cpu = {}, {name: [] for name in candidates}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (model, _) in candidates.items():
            generate(model, tok, texts[:2], replace(settings, max_new_tokens=2))  # warm-up
        for _ in range(REPEATS):
            for name, (model, _) in candidates.items():
                start = time.process_time()
                outputs[name] = generate(model, tok, texts, settings)
                cpu[name].append(time.process_time() - start)
    references = [r["summary"] for r in rows]
    rouge = {name: score(out, references, params.data.language, bootstrap_samples=10)["rouge-l"] for name, out in outputs.items()}
    result_rows = []
    for name, (_, size) in candidates.items():
        if name == "fp32":
            continue
        time_ratio = min(cpu[name]) / min(cpu["fp32"])
        agree = sum(a == b for a, b in zip(outputs[name], outputs["fp32"])) / len(rows)
        result_rows.append({
            "name": f"quantize: {name}"[:34],
            "method": name,
            "ratio": round(time_ratio, 2),
            "baseline": f"fp32 {min(cpu['fp32']):.2f} CPU s, {full_bytes / 1e6:.1f} MB",
            "target": "< 1 (faster)",
            "size_ratio": round(size / full_bytes, 3),
            "cpu_time_ratio": round(time_ratio, 3),
            "agreement": agree,
            "rouge-l": round(rouge[name], 2),
            "rouge-l_drop": round(rouge["fp32"] - rouge[name], 2),
            "note": f"size x{size / full_bytes:.2f}, {agree:.0%} rows = fp32, ROUGE-L drop {rouge['fp32'] - rouge[name]:.2f}",
        })
    result = {
        "name": "quantize: int8 candidates",
        "model": which,
        "rows_measured": len(rows),
        "batch_size": BATCH_SIZE,
        "max_new_tokens": params.evaluate.max_new_tokens,
        "fp32_rouge-l": round(rouge["fp32"], 2),
        "rows": result_rows,
    }
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return result


if __name__ == "__main__":
    main()
