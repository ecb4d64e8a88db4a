"""GGUF (llama.cpp through llama-cpp-python) against torch fp32 and our int8 on the same rows: the speed-up
over fp32, agreement with fp32 and the quality gate, timed exactly as the quantize stage's speed check
times (`tasks.quantize.repeated_latency`: the same rows and batches, the models taking turns batch by
batch, the first one rotating each repeat; the ratio is the slowest repeat's).

Models, each converted by llama.cpp's own converter and quantized by its quantizer (`tasks.core.gguf`):

- `demo`: the pipeline's final model (`$SFTFLOW_BENCH_MODEL`, else `artifacts/align/model`, else
  `artifacts/train/model`) when llama.cpp can convert it; the scratch default's character tokenizer
  cannot be, and the row says so.
- `0.5b` (default shape): a random Qwen2 of Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads / 2 kv
  heads, intermediate 4864, vocabulary 151936) around the real Qwen2 tokenizer and chat template
  (`tests/real_tokenizers.py`), built from a config. `--shape small` (hidden 256, 4 layers) is a smoke run.

Both sides use one thread (torch's and llama.cpp's), on the stage's default settings, `ROWS` test rows.
Timed twice: the `ROWS` rows in the stage's batches (what quantize's speed gate measures), and the
first `ONE_ROWS` one request at a time (batch 1, the app's shape), where decoding reads every weight
once per token for one row and a smaller file saves the most.
The weights are random, so ROUGE-L means little; agreement with fp32 and the ratio do.

    python -m bench.gguf [--shape 0.5b|small]      # or: python -m bench gguf (0.5b)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = 8
ONE_ROWS = 4  # the app's shape: one request at a time (batch 1), on the first ONE_ROWS of the rows
REPEATS = 3
SHAPES = {
    "0.5b": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
             "intermediate_size": 4864},
    "small": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 1024},
}
METHODS = ("gguf-q8_0", "gguf-q4_k_m")


def _test_rows(n: int) -> list[dict]:
    split = ROOT / "artifacts" / "split" / "test.jsonl"
    path = split if split.exists() else ROOT / "data" / "sample" / "zh_summ.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[-n:] if path != split else rows[:n]


def random_qwen2(shape: str, out_dir: Path) -> Path:
    """A random Qwen2 of `shape` with the real Qwen2 tokenizer, saved as a Hugging Face folder."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from real_tokenizers import real_tokenizer_dir

    source = real_tokenizer_dir("qwen2")
    meta = json.loads((source / "sftflow_source.json").read_text(encoding="utf-8"))["tokenizer"]
    config = Qwen2Config(vocab_size=151936 if shape == "0.5b" else meta["vocab_size"], max_position_embeddings=32768,
                         tie_word_embeddings=True, rope_theta=1e6, bos_token_id=meta["bos_token_id"],
                         eos_token_id=meta["eos_token_id"], **SHAPES[shape])
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    for f in source.iterdir():
        if f.name != "sftflow_source.json":
            shutil.copy2(f, out_dir / f.name)
    return out_dir


def measure(model_dir: Path, label: str, tmp: Path, params) -> list[dict]:
    """fp32, int8 and the GGUF methods of one model folder, timed as the quantize stage times them."""
    from tasks.core import gguf
    from tasks.core.generation import GenerationSettings
    from tasks.core.modeling import load_model_and_tokenizer
    from tasks.core.scoring import score
    from tasks.core.variants import load_quantized, save_int8, weights_bytes
    from tasks.quantize import quantize_int8, repeated_latency, timed_generate

    reason = gguf.unsupported_reason(model_dir, gguf.converter_dir())
    if reason:
        return [{"name": f"gguf: {label}", "ratio": "skipped", "target": ">= 2x", "note": f"not convertible: {reason}"}]
    full, tokenizer = load_model_and_tokenizer(model_dir)
    full.eval()
    started = time.perf_counter()
    gguf.convert(model_dir, tmp / "f16.gguf", gguf.converter_dir())
    convert_s = time.perf_counter() - started
    models, sizes, build_s = {"fp32": (full, tokenizer)}, {"fp32": weights_bytes(model_dir)}, {}
    for method in METHODS:
        started = time.perf_counter()
        gguf.write_variant(model_dir, method, tmp / method, tokenizer, tmp / "f16.gguf", threads=1, source_sha256=None)
        build_s[method] = time.perf_counter() - started
        models[method], sizes[method] = load_quantized(tmp / method), weights_bytes(tmp / method)
    int8, tensors, layout = quantize_int8(load_model_and_tokenizer(model_dir)[0])
    save_int8(tensors, layout, int8, tokenizer, tmp / "int8")
    del int8, tensors  # the reloaded copy below is what is timed
    models["int8"], sizes["int8"] = load_quantized(tmp / "int8"), weights_bytes(tmp / "int8")

    rows = _test_rows(ROWS)
    settings = GenerationSettings.of(params)
    preds, _, _ = timed_generate(models, rows, settings, progress=False)  # the quality pass (and warm-up)
    seconds = repeated_latency(models, rows, settings, REPEATS)
    # The app's shape: one request at a time. Decoding then reads every weight once per token for one row,
    # where a batch of 8 shares that read: the bytes a variant saves count for more.
    one = repeated_latency(models, rows[:ONE_ROWS], replace(settings, batch_size=1), REPEATS)
    refs = [r["summary"] for r in rows]
    rouge = {m: score(p, refs, params.data.language)["rouge-l"] for m, p in preds.items()}
    out = []
    for method in ("int8", *METHODS):
        ratios = [f / v for f, v in zip(seconds["fp32"], seconds[method])]  # speed-up: fp32 ÷ variant
        one_ratios = [f / v for f, v in zip(one["fp32"], one[method])]
        agree = sum(a == b for a, b in zip(preds[method], preds["fp32"])) / len(rows)
        drop = rouge["fp32"] - rouge[method]
        passed = drop <= params.quantize.max_drop
        out.append({
            "name": f"gguf: {label} {method}"[:38], "method": method, "ratio": round(min(ratios), 2),
            "speedups": [round(r, 3) for r in ratios], "target": ">= 2x" if method != "int8" else "> 1x",
            "size_ratio": round(sizes[method] / sizes["fp32"], 3), "agreement": agree, "rouge-l_drop": round(drop, 2),
            "gate_passed": passed, "build_s": round(build_s.get(method, 0.0), 1), "convert_f16_s": round(convert_s, 1),
            "fp32_s": [round(s, 2) for s in seconds["fp32"]],
            "one_request_ratio": round(min(one_ratios), 2),
            "one_request_speedups": [round(r, 3) for r in one_ratios],
            "one_request_fp32_s": [round(s, 2) for s in one["fp32"]],
            "note": f"fp32 ÷ variant, slowest of {REPEATS}; size x{sizes[method] / sizes['fp32']:.2f}, {agree:.0%} rows = fp32, "
                    f"ROUGE-L drop {drop:.2f} ({'gate passed' if passed else 'gate FAILED'}); one request at a time "
                    f"(batch 1, {ONE_ROWS} rows, as the app serves): "
                    f"{min(one_ratios):.2f}x",
        })
    return out


def main(shape: str | None = None) -> dict:
    """The demo model's row (or why it is skipped) and the random Qwen2's rows."""
    import torch

    from tasks.core.config import load_params

    shape = shape or os.environ.get("SFTFLOW_BENCH_GGUF_SHAPE", "0.5b")
    torch.set_num_threads(1)
    params = load_params(ROOT / "params.yaml")
    demo = Path(os.environ.get("SFTFLOW_BENCH_MODEL", "")) if os.environ.get("SFTFLOW_BENCH_MODEL") else next(
        (p for p in (ROOT / "artifacts" / "align" / "model", ROOT / "artifacts" / "train" / "model") if (p / "config.json").exists()), None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        tmp = Path(tmp)
        if demo is not None:
            (tmp / "demo").mkdir()
            rows += measure(demo, "demo", tmp / "demo", params)
        else:
            rows.append({"name": "gguf: demo", "ratio": "skipped", "target": ">= 2x", "note": "no trained model in artifacts/"})
        (tmp / shape).mkdir()
        started = time.perf_counter()
        model_dir = random_qwen2(shape, tmp / shape / "hf")
        print(f"[bench] built the random Qwen2 ({shape}) in {time.perf_counter() - started:.0f} s", flush=True)
        rows += measure(model_dir, f"qwen2-{shape}", tmp / shape, params)
    result = {"name": "gguf vs torch fp32/int8", "shape": shape, "rows_measured": ROWS, "threads": 1, "rows": rows}
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    main(parser.parse_args().shape)
