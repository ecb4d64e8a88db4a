"""GPU check of the bitsandbytes variants (`bnb-int8`, `bnb-nf4`): a few minutes on one CUDA GPU.

Builds a default-shaped scratch model (or uses `$SFTFLOW_BENCH_MODEL` / `artifacts/train/model`), runs
the quantize stage's GPU path on it in a temporary folder (quantize while loading, save as safetensors,
reload through `load_quantized` with `device_map="auto"`), checks that the reloaded variant generates
what it generated before saving and that its weights really are 8-bit / 4-bit, then runs the whole
stage with `quantize.methods=[int8, bnb-int8, bnb-nf4]` on 32 rows and prints its metrics.

    pip install 'bitsandbytes>=0.45'     # not a CPU dependency of the project
    python -m bench.gpu_quantize_check   # exits non-zero on the first failed check
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    """Run the checks; return 0 when all pass."""
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    import bitsandbytes as bnb

    from bench.quantize import _model
    from tasks.core.config import Params, load_params
    from tasks.core.generation import GenerationSettings, generate
    from tasks.core.io import write_jsonl
    from tasks.core.modeling import save_model
    from tasks.quantize import load_quantized, quantize_bnb, run

    tmp = Path(tempfile.mkdtemp(prefix="gpu-quantize-"))
    params = Params()
    model, tok, which = _model(params)
    save_model(model, tok, tmp / "artifacts" / "train" / "model")
    rows = [json.loads(line) for line in (ROOT / "data" / "sample" / "zh_summ.jsonl").open(encoding="utf-8")][-32:]
    texts = [r["text"] for r in rows]
    settings = GenerationSettings(params.data.prompt_template, use_chat_template=True, max_new_tokens=24, batch_size=16)
    print(f"model: {which}; GPU: {torch.cuda.get_device_name(0)}; bitsandbytes {bnb.__version__}")

    failures = []
    for method, layer_type in (("bnb-int8", bnb.nn.Linear8bitLt), ("bnb-nf4", bnb.nn.Linear4bit)):
        q, qtok = quantize_bnb(tmp / "artifacts" / "train" / "model", method, tmp / method)
        before = generate(q, qtok, texts, settings)
        del q
        torch.cuda.empty_cache()
        again, again_tok = load_quantized(tmp / method)
        after = generate(again, again_tok, texts, settings)
        n_quantized = sum(isinstance(m, layer_type) for m in again.modules())
        ok = after == before and n_quantized > 0
        print(f"{method}: {n_quantized} {layer_type.__name__} layers; reload gives the same outputs: {after == before}")
        if not ok:
            failures.append(method)
        del again
        torch.cuda.empty_cache()

    write_jsonl(tmp / "artifacts" / "split" / "test.jsonl", [{"id": r["id"], "text": r["text"], "summary": r["summary"]} for r in rows])
    stage_params = load_params(ROOT / "params.yaml", [
        f"paths.artifacts={tmp / 'artifacts'}", f"paths.metrics={tmp / 'metrics'}", f"paths.plots={tmp / 'plots'}",
        "quantize.methods=[int8, bnb-int8, bnb-nf4]", "evaluate.batch_size=16",
    ])
    metrics = run(stage_params)
    print(json.dumps(metrics, indent=2))
    for key in ("bnb-int8.size_ratio", "bnb-nf4.size_ratio", "bnb-int8.latency_ratio", "bnb-nf4.rouge-l_drop"):
        if key not in metrics:
            failures.append(key)
    shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"FAILED: {failures}", file=sys.stderr)
        return 1
    print("all GPU quantization checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
