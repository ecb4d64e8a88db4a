"""GGUF variants (llama.cpp through llama-cpp-python): converted by llama.cpp's own converter from tiny random
models with real tokenizers (`tests/real_tokenizers.py`), generating what the Hugging Face model generates,
gated like every variant, registered, loaded by the pyfunc model and exported for Ollama.

- The scratch base's character tokenizer does not convert: GGUF is skipped with the reason and the
  quantize stage still passes (no llama.cpp needed for that).
- qwen2: `gguf-f16` gives the Hugging Face model's greedy outputs on >= 95% of 24 rows; `gguf-q8_0`
  passes the gate; batched, one-by-one and streamed GGUF generation agree.
- `make test-system`: a conversion with the wrong chat template is caught by the conversion check; qwen2
  and llama through quantize (f16 agreeing on >= 95% of 24 rows, a variant failing the check neither served
  nor registered) -> register -> the pyfunc model -> `serve.variant_cpu: fastest` -> `sftflow export --ollama`.

The models are 256 wide (4 heads of 64), so every weight row divides into the k-quants' blocks of 256:
llama.cpp quantizes all of them as asked (no fallback type).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import ROOT, sample_rows

from tasks.core.generation import GenerationSettings, generate

pytestmark = pytest.mark.timeout(900)

ROWS = 24
SETTINGS = GenerationSettings(prompt_template="Summarize: {text}\nSummary:", use_chat_template=True, max_new_tokens=12,
                              max_source_length=96, batch_size=8)


def _llama_cpp():
    """llama-cpp-python (the gguf extra), or a skip that says how to get it."""
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed: `make setup` installs the gguf extra (pip install -e '.[gguf]')")
    return llama_cpp


def _converter() -> Path:
    """llama.cpp's converter from the pinned sdist, or a skip when the sdist cannot be had (no network, no cache)."""
    from tasks.core.gguf import GgufUnavailable, converter_dir

    try:
        return converter_dir()
    except GgufUnavailable as e:
        pytest.skip(f"llama.cpp's converter is not available: {e}")


def wide_model(family: str, out_dir: Path, seed: int = 0) -> Path:
    """A random two-layer model of `family`, 256 wide, around its real tokenizer and chat template."""
    import torch
    from real_tokenizers import FAMILIES, real_tokenizer_dir
    from transformers import AutoConfig, AutoModelForCausalLM

    source = real_tokenizer_dir(family)
    meta = json.loads((source / "sftflow_source.json").read_text(encoding="utf-8"))["tokenizer"]
    config = AutoConfig.for_model(
        FAMILIES[family].model_type, vocab_size=meta["vocab_size"], hidden_size=256, intermediate_size=512,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=meta["bos_token_id"], eos_token_id=meta["eos_token_id"],
        pad_token_id=meta["pad_token_id"],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    for f in source.iterdir():
        if f.name != "sftflow_source.json":
            shutil.copy2(f, out_dir / f.name)
    return out_dir


def _rows(n: int = ROWS) -> list[dict]:
    return [{"id": r["id"], "text": r["text"], "summary": r["summary"]} for r in sample_rows(120 + n)[120:]]


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """A wide qwen2 model, its f16 GGUF and its q8_0 GGUF variant folders (llama.cpp's converter and quantizer)."""
    _llama_cpp()
    converter = _converter()
    from tasks.core.gguf import convert, write_variant
    from tasks.core.modeling import load_model_and_tokenizer

    tmp = tmp_path_factory.mktemp("gguf-qwen2")
    model_dir = wide_model("qwen2", tmp / "hf")
    f16 = tmp / "model-f16.gguf"
    convert(model_dir, f16, converter)
    _, tokenizer = load_model_and_tokenizer(model_dir)
    folders = {}
    for method in ("gguf-f16", "gguf-q8_0"):
        folders[method] = tmp / method
        write_variant(model_dir, method, folders[method], tokenizer, f16, threads=1, source_sha256="x")
    return {"hf": model_dir, "f16": f16, "converter": converter, **folders}


# --- without llama.cpp --------------------------------------------------------------------------------------


def test_the_scratch_base_skips_gguf_with_its_reason_and_quantize_still_passes(tiny_model_dir, tiny_overrides):
    from tasks.core.config import load_params
    from tasks.core.gguf import unsupported_reason
    from tasks.core.io import write_jsonl
    from tasks.quantize import run

    assert "WordLevel" in unsupported_reason(tiny_model_dir)
    params = load_params(ROOT / "params.yaml", tiny_overrides + ["evaluate.batch_size=4", "quantize.max_drop=100"])
    assert {"gguf-q8_0", "gguf-q4_k_m"} <= set(params.quantize.methods), "the default methods include GGUF"
    shutil.copytree(tiny_model_dir, params.layout.final_model)
    stale = params.layout.variant_dir("gguf-q8_0")
    stale.mkdir(parents=True)
    (stale / "model.gguf").write_bytes(b"an earlier run's file")
    write_jsonl(params.layout.stage_dir("split") / "test.jsonl", _rows(4))

    metrics = run(params)

    for method in ("gguf-q8_0", "gguf-q4_k_m"):
        assert metrics[f"{method}.skipped"] is True and metrics[f"{method}.served"] is False
        assert "WordLevel" in metrics[f"{method}.reason"] and f"{method}.passed" not in metrics
        assert not params.layout.variant_dir(method).exists()  # nothing stale left for register
    assert metrics["skipped"] == ["gguf-q4_k_m", "gguf-q8_0"]
    assert metrics["passed"] is metrics["int8.passed"] and set(metrics["variants"]) == {"int8"}


def test_the_ollama_template_renders_the_scored_prompt():
    """TEMPLATE with the user's text as .Prompt is the prompt every stage builds (chat template included)."""
    from real_tokenizers import real_tokenizer_dir

    from tasks.core.gguf import ollama_template
    from tasks.core.modeling import load_tokenizer
    from tasks.core.prompt import build_prompt

    tokenizer = load_tokenizer(str(real_tokenizer_dir("qwen2")), trust_remote_code=False)
    template = ollama_template(tokenizer, "Summarize {{x}}: {text}", True)
    assert template.count("{{ .Prompt }}") == 1 and '{{ "{{" }}x{{ "}}" }}' in template
    text = "The cat sat on the mat."
    rendered = template.replace("{{ .Prompt }}", text).replace('{{ "{{" }}', "{{").replace('{{ "}}" }}', "}}")
    assert rendered == build_prompt(text, "Summarize {{x}}: {text}", tokenizer, True)
    assert rendered.startswith("<|im_start|>system") and rendered.endswith("<|im_start|>assistant\n")


def test_fastest_serves_full_precision_with_a_note_when_no_variant_was_worth_serving(tiny_params):
    """`serve.variant_cpu: fastest` with the only registered variant decided against (slower than full precision)."""
    from types import SimpleNamespace

    from tasks.core.registry import resolve_variant

    params = tiny_params.model_copy(update={"serve": tiny_params.serve.model_copy(update={"variant_cpu": "fastest"})})
    version = SimpleNamespace(version="3", run_id=None, tags={
        "sftflow.variant.int8": "models:/m-int8/1", "sftflow.variant_served.int8": "false",
        "sftflow.variant_reason.int8": "slower than full precision: ratio 0.9–1.1"})
    variant, uri, note = resolve_variant(params, version, "cpu")
    assert (variant, uri) == ("full", f"models:/{params.register.model_name}/3")
    assert note.startswith("serve.variant_cpu=fastest: version 3 has no registered variant that quantize decided to serve")


# --- llama.cpp -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_outputs(qwen2):
    """The Hugging Face model's greedy outputs on the 24 rows, and their ROUGE-L."""
    from tasks.core.modeling import load_model_and_tokenizer
    from tasks.core.scoring import score

    rows = _rows()
    model, tokenizer = load_model_and_tokenizer(qwen2["hf"])
    outputs = generate(model, tokenizer, [r["text"] for r in rows], SETTINGS)
    return outputs, score(outputs, [r["summary"] for r in rows], "zh")["rouge-l"]


def test_gguf_f16_generates_what_the_hf_model_generates(qwen2, hf_outputs):
    """The issue's bar: greedy outputs equal on >= 95% of 24 rows, with the same prompt ids and stop tokens."""
    from tasks.core.variants import load_quantized, read_marker

    texts = [r["text"] for r in _rows()]
    expected, _ = hf_outputs
    gguf_model, gguf_tokenizer = load_quantized(qwen2["gguf-f16"])
    got = generate(gguf_model, gguf_tokenizer, texts, SETTINGS)
    same = sum(a == b for a, b in zip(got, expected))
    assert same >= 0.95 * ROWS, f"{same}/{ROWS} equal: {[(a, b) for a, b in zip(got, expected) if a != b][:3]}"
    assert len(set(expected)) > 1, "the rows must not all give the same text (the comparison would be empty)"
    marker = read_marker(qwen2["gguf-f16"])
    assert marker["device"] == "cpu" and marker["weights_file"] == "model.gguf" and marker["versions"]["llama-cpp-python"]


def test_batched_and_streamed_gguf_generation_match_one_by_one(qwen2):
    """The duck-typed generate: batched (left-padded) rows, one-by-one rows and the app's streaming agree."""
    from tasks.core.generation import GenerationSettings
    from tasks.core.variants import load_quantized
    from tasks.serve import ServedVersion, stream_summary

    texts = [r["text"] for r in _rows(4)]
    model, tokenizer = load_quantized(qwen2["gguf-q8_0"])
    settings = GenerationSettings(**{**SETTINGS.to_dict(), "no_repeat_ngram_size": 2, "repetition_penalty": 1.3})
    batched = generate(model, tokenizer, texts, settings)
    alone = [generate(model, tokenizer, [t], GenerationSettings(**{**settings.to_dict(), "batch_size": 1}))[0] for t in texts]
    assert batched == alone
    served = ServedVersion(version="1", variant="gguf-q8_0", uri="models:/x/1", model=model, tokenizer=tokenizer,
                           settings={**settings.to_dict(), "language": "zh", "quantization": "gguf-q8_0"}, metrics={}, tags={}, note=None)
    assert list(stream_summary(served, texts[0], settings.max_new_tokens))[-1] == batched[0]


def test_gguf_q8_0_passes_the_gate(qwen2, hf_outputs):
    """q8_0: the conversion check passes (the file's own template and tokenizer give the scored prompts) and
    its ROUGE-L is within quantize.max_drop of the Hugging Face model's on the same rows."""
    from tasks.core.config import QuantizeConfig
    from tasks.core.gguf import conversion_problems
    from tasks.core.scoring import score
    from tasks.core.variants import load_quantized
    from tasks.quantize import gate

    rows = _rows()
    texts, refs = [r["text"] for r in rows], [r["summary"] for r in rows]
    q8, q8_tokenizer = load_quantized(qwen2["gguf-q8_0"])
    assert conversion_problems(q8, q8_tokenizer, texts, SETTINGS) == []
    predictions = generate(q8, q8_tokenizer, texts, SETTINGS)
    assert gate(hf_outputs[1], score(predictions, refs, "zh")["rouge-l"], QuantizeConfig().max_drop)["passed"]
    assert sum(a == b for a, b in zip(predictions, hf_outputs[0])) >= ROWS // 2, "q8_0 should mostly agree with fp32"


@pytest.mark.system
def test_a_conversion_with_a_wrong_chat_template_is_caught_and_not_served(qwen2, tmp_path):
    """llama.cpp converts a folder whose chat template was changed: what llama.cpp or Ollama would render from
    the file differs from the prompt that was scored, so the conversion check fails it (quantize then marks
    the variant not passed and not served, and register does not register it: the chain test below)."""
    from tasks.core.gguf import conversion_problems, convert, write_variant
    from tasks.core.modeling import load_tokenizer
    from tasks.core.variants import load_quantized

    texts = [r["text"] for r in _rows(4)]
    broken_src = tmp_path / "broken-src"
    shutil.copytree(qwen2["hf"], broken_src)
    template = broken_src / "chat_template.jinja"
    template.write_text(template.read_text(encoding="utf-8").replace("<|im_start|>assistant", "<|im_start|>bot"), encoding="utf-8")
    convert(broken_src, tmp_path / "broken-f16.gguf", qwen2["converter"])
    tokenizer = load_tokenizer(str(qwen2["hf"]), trust_remote_code=False)
    write_variant(qwen2["hf"], "gguf-q8_0", tmp_path / "broken", tokenizer, tmp_path / "broken-f16.gguf", threads=1, source_sha256="x")
    broken, broken_tokenizer = load_quantized(tmp_path / "broken")
    assert conversion_problems(broken, broken_tokenizer, texts, SETTINGS) == ["the GGUF file's chat template differs from the tokenizer's"]


# --- the whole chain (make test-system) ----------------------------------------------------------------------


@pytest.mark.system
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_gguf_variants_go_through_quantize_register_pyfunc_and_ollama_export(family, tmp_path, tmp_path_factory, monkeypatch):
    """quantize scores gguf-f16/q8_0/q4_k_m beside int8 (f16 agreeing with full precision), register registers
    the passing ones, the pyfunc model loads one through llama-cpp-python and predicts what quantize measured,
    `serve.variant_cpu: fastest` picks the quickest served one, and `sftflow export --ollama` writes its file and
    a Modelfile. A variant whose conversion check fails is scored but neither served nor registered."""
    import mlflow
    import pandas as pd
    from registry_helpers import build_upstream, sqlite_store

    from tasks import cli, quantize, register
    from tasks.core import gguf
    from tasks.core.config import load_params
    from tasks.core.io import read_jsonl
    from tasks.core.registry import resolve_variant

    _llama_cpp()
    _converter()
    model_dir = wide_model(family, tmp_path / "hf")
    rows = _rows()
    params = load_params(ROOT / "params.yaml", [
        f"paths.artifacts={tmp_path / 'artifacts'}", f"paths.metrics={tmp_path / 'metrics'}", f"paths.plots={tmp_path / 'plots'}",
        f"register.model_name=gguf-{family}", "quantize.methods=[int8, gguf-f16, gguf-q8_0, gguf-q4_k_m]",
        "quantize.max_drop=100", "evaluate.batch_size=8", "evaluate.max_new_tokens=12", "train.max_source_length=96",
        "serve.variant_cpu=fastest", "data.prompt_template='Summarize: {text} Summary:'",
    ])
    scripted = {"full": [1.0] * 3, "int8": [0.9, 1.1, 0.9], "gguf-f16": [0.8] * 3, "gguf-q8_0": [0.5, 0.6, 0.55], "gguf-q4_k_m": [0.4] * 3}
    monkeypatch.setattr(quantize, "repeated_latency", lambda models, rows, settings, repeats: {m: scripted[m] for m in models})
    original = gguf.conversion_problems
    monkeypatch.setattr(gguf, "conversion_problems",  # q4_k_m's file is scripted to fail the conversion check
                        lambda model, *a: ["scripted"] if model.path.parent.name == "gguf-q4_k_m" else original(model, *a))
    with sqlite_store(tmp_path_factory):
        build_upstream(params, model_dir, rows, [30.0] * len(rows))
        metrics = quantize.run(params)
        assert metrics["skipped"] == []
        assert metrics["gguf-f16.agreement"] >= 0.95, metrics["gguf-f16.agreement"]
        assert metrics["gguf-f16.conversion_check"] == "passed" and metrics["gguf-q8_0.passed"] is True
        assert metrics["gguf-q8_0.served"] is True and metrics["gguf-q8_0.size_ratio"] < 0.35  # 8.5 bits a weight
        assert metrics["gguf-q4_k_m.passed"] is False and metrics["gguf-q4_k_m.served"] is False
        assert metrics["gguf-q4_k_m.reason"] == "conversion check failed: scripted"

        result = register.run(params)
        assert set(result["variants"]) == {"int8", "gguf-f16", "gguf-q8_0"}  # q4_k_m failed: not registered
        loaded = mlflow.pyfunc.load_model(result["variants"]["gguf-q8_0"])
        assert type(loaded.unwrap_python_model().model).__name__ == "GgufModel"
        predictions = loaded.predict(pd.DataFrame({"text": [r["text"] for r in rows]}))
        assert predictions == [p["gguf-q8_0"] for p in read_jsonl(params.layout.stage_dir("quantize") / "predictions.jsonl")]

        version = mlflow.MlflowClient().get_model_version(f"gguf-{family}", str(result["version"]))
        assert resolve_variant(params, version, "cpu") == ("gguf-q8_0", result["variants"]["gguf-q8_0"], None)

        out = tmp_path / "ollama"
        monkeypatch.setattr(sys, "argv", ["sftflow"])
        assert cli.main(["export", "--ollama", str(result["version"]), "--out", str(out), "-S", f"register.model_name=gguf-{family}",
                         "-S", f"paths.artifacts={tmp_path / 'artifacts'}"]) == 0
        modelfile = (out / "Modelfile").read_text(encoding="utf-8")
        assert (out / "model.gguf").read_bytes() == (params.layout.variant_dir("gguf-q8_0") / "model.gguf").read_bytes()
        assert "FROM ./model.gguf" in modelfile and "{{ .Prompt }}" in modelfile and "PARAMETER temperature 0" in modelfile
        end_of_turn = {"qwen2": "<|im_end|>", "llama": "<|eot_id|>"}[family]
        assert f'PARAMETER stop "{end_of_turn}"' in modelfile and "PARAMETER num_predict 12" in modelfile
