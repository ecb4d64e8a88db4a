"""The quantize stage: int8 weights really are int8, a fresh process reloads the saved variant and gets
the outputs it gave before saving, and the gate fails a variant that loses more than `max_drop`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks.core.generation import GenerationSettings
from tests.conftest import ROOT, sample_rows

PROMPT = "为下面的论文摘要拟一个标题。\n摘要：{text}\n标题："
SETTINGS = GenerationSettings(prompt_template=PROMPT, use_chat_template=True, max_new_tokens=8, batch_size=4)
TEXTS = [r["text"] for r in sample_rows(6)]

RELOAD_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from tasks.core.variants import load_quantized
from tasks.core.generation import GenerationSettings, generate
model, tok = load_quantized(sys.argv[1])
texts = json.loads(sys.argv[2])
settings = GenerationSettings(prompt_template=sys.argv[3], use_chat_template=True, max_new_tokens=8, batch_size=4)
print(json.dumps(generate(model, tok, texts, settings), ensure_ascii=False))
"""


def _trained_tiny(tiny_model_dir: Path, out: Path) -> Path:
    """The tiny model with its weights scaled up, so greedy outputs vary by row (not one repeated token)."""
    from tasks.core.io import set_seed
    from tasks.core.modeling import load_model_and_tokenizer, save_model

    set_seed(1)
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    save_model(model, tok, out)
    return out


@pytest.fixture(scope="module")
def quantized(tiny_model_dir, tmp_path_factory):
    """(full model dir, int8 dir, outputs of the int8 model before saving)."""
    from tasks.core.generation import generate
    from tasks.core.modeling import load_model_and_tokenizer
    from tasks.core.variants import save_int8
    from tasks.quantize import quantize_int8

    full_dir = _trained_tiny(tiny_model_dir, tmp_path_factory.mktemp("full"))
    model, tok = load_model_and_tokenizer(full_dir)
    model, tensors, layout = quantize_int8(model)
    before = generate(model, tok, TEXTS, SETTINGS)
    out = tmp_path_factory.mktemp("int8")
    save_int8(tensors, layout, model, tok, out)
    return full_dir, out, before, model


def test_fresh_process_reload_gives_the_same_outputs(quantized):
    _, int8_dir, before, _ = quantized
    assert len(set(before)) > 1, "the tiny model should give different outputs per row for this test to bite"
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(int8_dir), json.dumps(TEXTS, ensure_ascii=False), PROMPT],
        check=False, capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = json.loads(proc.stdout.strip().splitlines()[-1])
    assert after == before


def test_linear_weights_are_int8_on_disk_and_in_memory(quantized):
    from safetensors import safe_open

    from tasks.core.variants import MARKER_FILE, weights_bytes

    full_dir, int8_dir, _, model = quantized
    marker = json.loads((int8_dir / MARKER_FILE).read_text(encoding="utf-8"))
    assert marker["method"] == "int8" and marker["versions"]["torch"] == torch.__version__
    linears = marker["layout"]["linear"]
    assert "lm_head" in linears and "model.layers.0.mlp.down_proj" in linears
    assert marker["layout"]["aliases"] == {"lm_head": "model.embed_tokens"}  # tied: stored once
    for name in linears:
        module = model.get_submodule(name)
        assert module.weight().dtype == torch.qint8, name
        assert module.weight().int_repr().dtype == torch.int8
    with safe_open(str(int8_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        int8_keys = [k for k in keys if k.endswith(".weight_int8")]
        assert all(f.get_tensor(k).dtype == torch.int8 for k in int8_keys)
        float_keys = [k for k in keys if f.get_tensor(k).dtype == torch.float32 and not k.endswith("_scale")]
    assert not any(k.endswith("proj.weight") or k == "lm_head.weight" for k in keys)
    assert float_keys and all("norm" in k or k.endswith(".bias") for k in float_keys)  # norms, biases
    # int8 is a quarter of fp32; scales and norms add a little.
    ratio = weights_bytes(int8_dir) / weights_bytes(full_dir)
    assert 0.25 < ratio < 0.3


def test_quantized_model_stays_close_to_full(tiny_model_dir):
    from tasks.core.modeling import load_model_and_tokenizer
    from tasks.quantize import quantize_int8

    full, tok = load_model_and_tokenizer(tiny_model_dir)
    model, _, _ = quantize_int8(load_model_and_tokenizer(tiny_model_dir)[0])
    ids = tok(TEXTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = full(**ids).logits
        b = model(**ids).logits
    rel = (a - b).norm() / a.norm()
    # int8 rounding shows (rel > 0) but stays small; a wrong scale or transposed weight gives ~1.
    assert 0 < rel < 0.05


def test_gate_fails_beyond_max_drop():
    from tasks.quantize import gate, variant_metrics

    assert gate(30.0, 29.5, 1.0) == {"rouge-l_drop": 0.5, "passed": True}
    assert gate(30.0, 28.5, 1.0)["passed"] is False
    assert gate(30.0, 29.0, 1.0)["passed"] is True  # exactly max_drop still serves
    full = {"size_bytes": 400, "latency_s": 2.0, "cpu_s": 2.0, "rouge-l": 30.0}
    variant = {"size_bytes": 100, "latency_s": 1.5, "cpu_s": 1.0, "rouge-l": 27.0}
    m = variant_metrics("int8", full=full, variant=variant, agreement=0.5, max_drop=2.0)
    assert m["int8.size_ratio"] == 0.25 and m["int8.latency_ratio"] == 0.75 and m["int8.cpu_time_ratio"] == 0.5
    assert m["int8.rouge-l_drop"] == 3.0 and m["int8.passed"] is False


def test_a_cpu_variant_serves_only_when_faster_in_every_repeat():
    from tasks.quantize import serve_decision

    def decide(variant_s, device="cpu", passed=True):
        return serve_decision("int8", full_s=[1.0, 1.0, 1.0], variant_s=variant_s, device=device, passed=passed,
                              drop=0.2 if passed else 2.5, max_drop=1.0)

    faster = decide([0.80, 0.85, 0.90])
    assert faster["int8.served"] is True and faster["int8.latency_ratio_high"] == pytest.approx(0.90)
    assert faster["int8.reason"].startswith("faster than full precision: ratio 0.800–0.900")
    mixed = decide([0.83, 1.04, 0.90])  # faster on average, slower in one repeat: not served
    assert mixed["int8.served"] is False and mixed["int8.latency_ratios"] == pytest.approx([0.83, 1.04, 0.90])
    assert mixed["int8.reason"].startswith("slower than full precision: ratio 0.830–1.040")
    assert decide([1.0, 0.9, 0.9])["int8.served"] is False  # a tie is not a gain
    assert decide([1.2, 1.3, 1.4], device="cuda")["int8.served"] is True  # on a GPU: served for its memory
    failed = decide([0.5, 0.5, 0.5], passed=False)
    assert failed["int8.served"] is False and "ROUGE-L drop 2.50" in failed["int8.reason"]


def test_repeats_time_the_same_rows_with_the_first_model_rotating(monkeypatch):
    from tasks import quantize

    turns = []

    def fake_timed(models, rows, settings, progress=True):
        turns.append((list(models), len(rows), progress))
        return {}, {name: 1.0 + i for i, name in enumerate(models)}, {}

    monkeypatch.setattr(quantize, "timed_generate", fake_timed)
    seconds = quantize.repeated_latency({"full": None, "int8": None}, [{}] * 5, SETTINGS, 3)
    assert turns == [(["full", "int8"], 5, False), (["int8", "full"], 5, False), (["full", "int8"], 5, False)]
    assert seconds == {"full": [1.0, 2.0, 1.0], "int8": [2.0, 1.0, 2.0]}


def test_stage_writes_gated_metrics_plot_and_variant(quantized, tmp_path, tiny_overrides):
    from tasks.core.config import load_params
    from tasks.core.io import read_json, read_jsonl, write_jsonl
    from tasks.core.variants import MARKER_FILE
    from tasks.quantize import run

    full_dir, _, _, _ = quantized
    params = load_params(ROOT / "params.yaml", tiny_overrides + ["quantize.max_drop=0", "evaluate.batch_size=4"])
    shutil.copytree(full_dir, params.layout.final_model)
    rows = [{"id": r["id"], "text": r["text"], "summary": r["summary"]} for r in sample_rows(130)[120:128]]
    write_jsonl(params.layout.stage_dir("split") / "test.jsonl", rows)

    metrics = run(params)

    assert read_json(params.layout.metrics_file("quantize")) == json.loads(json.dumps(metrics))
    for key in ("size_ratio", "latency_ratio", "rouge-l", "rouge-l_drop", "passed"):
        assert f"int8.{key}" in metrics, key
    assert metrics["rows"] == 8 and "full.rouge-l" in metrics
    assert metrics["int8.rouge-l_drop"] == pytest.approx(metrics["full.rouge-l"] - metrics["int8.rouge-l"])
    # max_drop=0: the gate passes only when int8 scores at least as well as full precision.
    assert metrics["int8.passed"] is (metrics["int8.rouge-l_drop"] <= 0)
    assert metrics["int8.size_ratio"] < 0.3
    # The speed check: 3 repeats on the same 8 rows; served only when passed and slower in no repeat.
    assert metrics["latency_repeats"] == 3 and metrics["latency_rows"] == 8 and len(metrics["int8.latency_ratios"]) == 3
    assert metrics["int8.latency_ratio_high"] == max(metrics["int8.latency_ratios"])
    assert metrics["int8.served"] is (metrics["int8.passed"] and metrics["int8.latency_ratio_high"] < 1.0)
    assert metrics["int8.reason"]
    assert (params.layout.stage_dir("quantize") / "int8" / MARKER_FILE).exists()
    preds = read_jsonl(params.layout.stage_dir("quantize") / "predictions.jsonl")
    assert [p["id"] for p in preds] == [r["id"] for r in rows] and {"full", "int8"} <= set(preds[0])
    png = params.layout.plots_dir("quantize") / "comparison.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_method_without_cuda_names_the_key(tmp_path, tiny_overrides, quantized):
    from tasks.core.config import load_params
    from tasks.core.errors import StageError
    from tasks.core.io import write_jsonl
    from tasks.quantize import run

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    params = load_params(ROOT / "params.yaml", tiny_overrides + ["quantize.methods=[int8, bnb-nf4]"])
    shutil.copytree(quantized[0], params.layout.final_model)
    write_jsonl(params.layout.stage_dir("split") / "test.jsonl", [{"id": "a", "text": TEXTS[0], "summary": "标题"}])
    with pytest.raises(StageError, match="quantize.methods"):
        run(params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes needs a CUDA GPU")
@pytest.mark.parametrize("method", ["bnb-int8", "bnb-nf4"])
def test_bnb_variant_saves_and_reloads(quantized, tmp_path, method):
    pytest.importorskip("bitsandbytes")
    from tasks.core.generation import generate
    from tasks.core.variants import load_quantized
    from tasks.quantize import quantize_bnb

    model, tok = quantize_bnb(quantized[0], method, tmp_path / method)
    before = generate(model, tok, TEXTS, SETTINGS)
    again, tok2 = load_quantized(tmp_path / method)
    assert generate(again, tok2, TEXTS, SETTINGS) == before
    assert json.loads((tmp_path / method / "sftflow_quantization.json").read_text())["method"] == method


def test_a_bf16_variant_is_scored_in_bf16_and_registered_with_what_its_pyfunc_model_produces(
    quantized, tmp_path, tmp_path_factory, tiny_overrides, monkeypatch
):
    """Evaluated = served: quantize scores the bf16 variant in bf16 on this CPU (the device class it serves
    on); the figure registered for it is exactly what the registered pyfunc model, loaded in bf16 on the CPU,
    produces on the same test rows; the app serves it on the CPU, not on a GPU.

    int8 pays only when it is faster: its speed check is scripted slower than full precision in one of
    three repeats, so it is registered but not served (the app serves full precision with the reason),
    while bf16, scripted faster in every repeat, is served."""
    import mlflow
    import pandas as pd
    from registry_helpers import build_upstream, sqlite_store

    from tasks import quantize, register
    from tasks.core.config import load_params
    from tasks.core.io import read_jsonl
    from tasks.core.scoring import score
    from tasks.core.variants import read_marker
    from tasks.serve import resolve_variant

    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the bf16 variant is scored on the GPU")
    params = load_params(ROOT / "params.yaml", tiny_overrides + [
        "register.model_name=q-bf16", "quantize.methods=[int8, bf16]", "evaluate.batch_size=4", "serve.variant_cpu=bf16",
        "quantize.max_drop=100",  # a random tiny model: only the scripted speed decides here
    ])
    rows = [{"id": r["id"], "text": r["text"], "summary": r["summary"]} for r in sample_rows(130)[120:130]]
    scripted = {"full": [1.0, 1.0, 1.0], "int8": [0.9, 1.1, 0.95], "bf16": [0.7, 0.8, 0.75]}
    monkeypatch.setattr(quantize, "repeated_latency", lambda models, rows, settings, repeats: {m: scripted[m] for m in models})
    with sqlite_store(tmp_path_factory):
        build_upstream(params, quantized[0], rows, [30.0] * len(rows))
        metrics = quantize.run(params)
        assert metrics["variants"]["bf16"] == {"dtype": "bfloat16", "device": "cpu"} and metrics["bf16.on_cuda"] == 0.0
        assert metrics["bf16.served"] is True and metrics["int8.served"] is False, (metrics["bf16.reason"], metrics["int8.reason"])
        assert metrics["int8.reason"].startswith("slower than full precision: ratio 0.900–1.100")
        marker = read_marker(params.layout.variant_dir("bf16"))
        assert (marker["dtype"], marker["compute_dtype"], marker["device"]) == ("bfloat16", "bfloat16", "cpu")
        assert metrics["bf16.size_ratio"] == pytest.approx(0.5, abs=0.05)

        result = register.run(params)
        assert set(result["variants"]) == {"int8", "bf16"}
        registered = mlflow.MlflowClient().get_run(result["run_id"]).data.metrics["quantize.bf16.rouge-l"]
        loaded = mlflow.pyfunc.load_model(result["variants"]["bf16"])
        model = loaded.unwrap_python_model().model
        assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
        predictions = loaded.predict(pd.DataFrame({"text": [r["text"] for r in rows]}))
        assert score(predictions, [r["summary"] for r in rows], params.data.language)["rouge-l"] == registered
        assert predictions == [p["bf16"] for p in read_jsonl(params.layout.stage_dir("quantize") / "predictions.jsonl")]

        version = mlflow.MlflowClient().get_model_version("q-bf16", str(result["version"]))
        assert resolve_variant(params, version, "cpu") == ("bf16", result["variants"]["bf16"], None)
        variant, _, note = resolve_variant(params, version, "cuda")  # scored on the CPU: not served on a GPU
        assert variant == "full" and "scored on the CPU" in note
        # int8 is registered (its own version, linked) but not served: slower than full precision.
        assert version.tags["sftflow.variant.int8"] == result["variants"]["int8"]
        assert version.tags["sftflow.variant_served.int8"] == "false" and version.tags["sftflow.variant_served.bf16"] == "true"
        with_int8 = load_params(ROOT / "params.yaml", tiny_overrides + ["register.model_name=q-bf16", "serve.variant_cpu=int8", "quantize.max_drop=100"])
        variant, uri, note = resolve_variant(with_int8, version, "cpu")
        assert (variant, uri) == ("full", f"models:/q-bf16/{result['version']}")
        assert "slower than full precision: ratio 0.900–1.100" in note
