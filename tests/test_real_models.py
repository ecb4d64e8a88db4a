"""Real tokenizers and chat templates through every stage: tiny random models of five families built from
a config around the real vocabularies (`tests/real_tokenizers.py`: llama.cpp's GGUF vocabularies and
real models' chat templates from the llama-cpp-python sdist, converted once into a cache).

- qwen2 (Qwen2.5-Instruct template: eos `<|endoftext|>`, turns end with `<|im_end|>`) and gpt2 (no pad
  token, no chat template, Conv1D layers) run the whole chain: pretrain (a real base passes through),
  train (LoRA, default targets) -> evaluate -> quantize -> register -> `mlflow.pyfunc` in a fresh
  process -> the Gradio app through `gradio_client`.
- llama (Llama-3.2 template, no pad), phi3 (Phi-3.5 template, fused layers) and mistral (Llama 2 /
  Mistral vocabulary, [INST] template: turns end with eos) at unit level: the label mask of one row
  written out literally, the stop-token set, LoRA target resolution, int8 quantization.
- `make test-system` (marked `system`): the chain for all five families, up to the fresh-process load.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_RUN_OVERRIDES, sample_rows, write_tiny_splits
from real_tokenizers import FAMILIES, tiny_model
from registry_helpers import sqlite_store

from tasks.core.config import ParamsError, load_params
from tasks.core.generation import GenerationSettings, generate, stop_token_ids
from tasks.core.modeling import load_model_and_tokenizer, resolve_lora_targets, with_lora
from tasks.core.prompt import ChatTemplateError, build_prompt, collate_features, encode_example

TEMPLATE = "Summarize: {text}"
TEXT, SUMMARY = "The cat sat.", "A cat."


@pytest.fixture(scope="session")
def real_model(tmp_path_factory):
    """`real_model(family)`: the folder of a tiny random model of that family with its real tokenizer (built once)."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = tiny_model(family, tmp_path_factory.mktemp(f"real-{family}"))
        return built[family]

    return get


@pytest.fixture(scope="session")
def loaded(real_model):
    """`loaded(family)`: (model, tokenizer) as every stage loads them (`load_model_and_tokenizer`), loaded once
    (a real vocabulary takes a second or two); the model is a fresh copy each time, so a test may change it."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_model_and_tokenizer(real_model(family))
        model, tokenizer = cache[family]
        return copy.deepcopy(model), tokenizer

    return get


def _labelled(tokenizer, features) -> list[str]:
    return tokenizer.convert_ids_to_tokens([t for t in features["labels"] if t != -100])


# --- the label mask, written out ----------------------------------------------------------------------


def test_qwen2_loss_covers_the_answer_and_im_end_not_eos(loaded):
    _, tok = loaded("qwen2")
    f = encode_example(tok, TEXT, SUMMARY, TEMPLATE, True, 256, 48)
    prompt = (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nSummarize: The cat sat.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(f["input_ids"][:-4]) == prompt
    assert f["labels"] == [-100] * (len(f["input_ids"]) - 4) + [32, 8251, 13, 151645]
    assert _labelled(tok, f) == ["A", "Ġcat", ".", "<|im_end|>"]
    assert f["input_ids"][-4:] == [32, 8251, 13, 151645]  # the "\n" the template writes after <|im_end|> is not trained
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 151643


def test_llama_loss_covers_the_answer_and_eot_id_and_has_one_bos(loaded):
    _, tok = loaded("llama")
    assert tok.eos_token == "<|end_of_text|>"
    f = encode_example(tok, TEXT, SUMMARY, TEMPLATE, True, 256, 48)
    prompt = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nSummarize: The cat sat."
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert tok.decode(f["input_ids"][:-4]) == prompt
    assert f["labels"] == [-100] * (len(f["input_ids"]) - 4) + [32, 8415, 13, 128009]
    assert _labelled(tok, f) == ["A", "Ġcat", ".", "<|eot_id|>"]
    assert f["input_ids"].count(128000) == 1  # <|begin_of_text|> once: the template writes it, the tokenizer does not again


@pytest.mark.parametrize(
    ("family", "labels"),
    [
        ("phi3", ["▁A", "▁cat", ".", "<|end|>"]),  # then "\n" and eos, which the model never writes
        ("mistral", ["▁A", "▁cat", ".", "</s>"]),  # [INST]...[/INST] answer, then eos
        ("gpt2", ["A", "Ġcat", ".", "<|endoftext|>"]),  # no template: the summary, then eos
    ],
)
def test_other_families_label_the_answer_and_its_end_token(loaded, family, labels):
    _, tok = loaded(family)
    f = encode_example(tok, TEXT, SUMMARY, TEMPLATE, True, 256, 48)
    assert _labelled(tok, f) == labels
    assert f["labels"][: -len(labels)] == [-100] * (len(f["labels"]) - len(labels))


def test_padding_never_masks_eos_without_a_pad_token(loaded):
    _, tok = loaded("gpt2")  # GPT-2 has no pad token: it pads with eos
    assert tok.pad_token_id == tok.eos_token_id == 50256
    short = encode_example(tok, "Hi.", "Yes.", TEMPLATE, True, 256, 48)
    long = encode_example(tok, TEXT + " It was warm.", SUMMARY, TEMPLATE, True, 256, 48)
    batch = collate_features([short, long], tok.pad_token_id)
    pad = batch["input_ids"].shape[1] - len(short["input_ids"])
    assert pad > 0
    row = batch["labels"][0].tolist()
    assert row[len(short["input_ids"]) - 3 : len(short["input_ids"])] == [5297, 13, 50256]  # "Yes", ".", eos
    assert row[len(short["input_ids"]):] == [-100] * pad  # the pads (also 50256 in input_ids) carry no loss
    assert batch["input_ids"][0].tolist()[-pad:] == [50256] * pad


def test_a_template_whose_answer_cannot_be_located_fails_before_training(tmp_path, real_model, tiny_overrides):
    from tasks import train

    base = tmp_path / "artifacts" / "pretrain" / "model"
    shutil.copytree(real_model("gpt2"), base)
    # Drops the assistant's turn: the conversation with an answer is not the generation prompt continued.
    (base / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m.role == 'user' %}<|endoftext|>{{ m.content }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Answer:{% endif %}",
        encoding="utf-8",
    )
    write_tiny_splits(tmp_path / "artifacts", n=20)
    params = load_params(ROOT / "params.yaml", [*tiny_overrides, "train.method=lora"])
    with pytest.raises(ChatTemplateError, match="assistant turn cannot be located.*data.use_chat_template: false"):
        train.run(params)
    assert not list((tmp_path / "artifacts" / "train" / "checkpoints").glob("checkpoint-*"))
    assert not (tmp_path / "metrics" / "train.json").exists()


# --- stop tokens --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "stops"),
    [
        ("qwen2", ["<|endoftext|>", "<|im_end|>"]),
        ("llama", ["<|end_of_text|>", "<|eot_id|>"]),
        ("phi3", ["<|endoftext|>", "<|end|>"]),
        ("mistral", ["</s>"]),
        ("gpt2", ["<|endoftext|>"]),
    ],
)
def test_stop_tokens_are_eos_and_the_templates_end_of_turn(loaded, family, stops):
    model, tok = loaded(family)
    assert tok.convert_ids_to_tokens(stop_token_ids(model, tok)) == stops
    # a plain prompt (data.use_chat_template: false) never asks for the end-of-turn token, but stops on eos alike
    assert tok.convert_ids_to_tokens(stop_token_ids(model, tok, use_chat_template=False)) == stops[:1]


@contextmanager
def forced_token(model, token_id: int, after: int):
    """Bias the LM head so that the token after `after` new ones is `token_id`, in every row at once.

    A prefill call (more than one input position) starts a generation; each later call adds one token.
    """
    state = {"step": 0}

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        state["step"] = 0 if ids.shape[1] > 1 else state["step"] + 1

    def bias(module, args, output):
        if state["step"] == after:
            output = output.clone()
            output[..., token_id] += 1e4
        return output

    handles = [model.register_forward_pre_hook(count, with_kwargs=True),
               model.get_output_embeddings().register_forward_hook(bias)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", ["qwen2"])
def test_generation_is_cut_exactly_at_a_forced_end_of_turn(loaded, family):
    from tasks.core.generation import greedy_config

    model, tok = loaded(family)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # large random weights, so that every text gets its own continuation
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0, generator=g)
    end = tok.convert_tokens_to_ids({"qwen2": "<|im_end|>", "llama": "<|eot_id|>"}[family])
    assert end not in [model.generation_config.eos_token_id], "the generation config alone would stop there"
    k = 3
    texts = [r["text"][: 20 + 15 * i] for i, r in enumerate(sample_rows(5))]
    settings = GenerationSettings(prompt_template=TEMPLATE, use_chat_template=True, max_new_tokens=k, batch_size=1)
    first_k = generate(model, tok, texts, settings)  # exactly the k tokens before the forced end
    assert all(first_k) and len(set(first_k)) == len(texts)
    with forced_token(model, end, after=k):
        for batch_size in (1, 5):
            longer = replace(settings, max_new_tokens=k + 6, batch_size=batch_size)
            assert generate(model, tok, texts, longer) == first_k
        # Stopping on the generation config's eos only, the answer runs on past the end of the turn.
        ids = tok([build_prompt(texts[0], TEMPLATE, tok)], add_special_tokens=False, return_tensors="pt")
        config = greedy_config(model, tok, k + 6)
        config.eos_token_id = model.generation_config.eos_token_id
        out = model.generate(**ids, generation_config=config)[0, ids["input_ids"].shape[1]:].tolist()
    assert out[k] == end and len(out) == k + 6
    assert tok.decode(out, skip_special_tokens=True).strip() != first_k[0]


# --- LoRA targets --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "targets", "expected"),
    [
        ("gpt2", "all-linear", [f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]),
        ("gpt2", ["c_attn"], ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]),
        ("gpt2", ["attn.c_proj"], ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]),
        ("gpt2", r"transformer\.h\.0\..*c_attn", ["transformer.h.0.attn.c_attn"]),
        ("phi3", "all-linear", [f"model.layers.{i}.{m}" for i in (0, 1) for m in
                                ("self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj")]),
        ("llama", ["q_proj", "v_proj"], [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]),
        ("mistral", ["all-linear"], [f"model.layers.{i}.{m}" for i in (0, 1) for m in
                                     ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]),
    ],
)
def test_lora_targets_resolve_as_peft_adapts_them(loaded, family, targets, expected):
    from peft.tuners.lora import LoraLayer

    from tasks.core.config import LoraConfig

    model, _ = loaded(family)
    assert resolve_lora_targets(model, targets) == expected
    adapted = with_lora(model, LoraConfig(r=2, target_modules=targets))
    wrapped = [n.removeprefix("base_model.model.") for n, m in adapted.named_modules() if isinstance(m, LoraLayer)]
    assert wrapped == expected


@pytest.mark.parametrize(
    ("family", "targets", "message"),
    [
        ("gpt2", ["q_proj", "c_attn"], r"\['q_proj'\] not found in the model \(gpt2\); its Linear and Conv1D layers are "
                                      r"c_attn \(Conv1D\), c_fc \(Conv1D\), c_proj \(Conv1D\), lm_head \(Linear\)"),
        ("gpt2", ["attn"], r"matches modules LoRA cannot adapt: transformer\.h\.0\.attn \(GPT2Attention\)"),
        ("phi3", r".*\.nothing", r"'\.\*\\\\\.nothing' matches no module .*qkv_proj \(Linear\)"),
    ],
)
def test_a_lora_target_the_model_lacks_fails_listing_its_layers(loaded, family, targets, message):
    model, _ = loaded(family)
    with pytest.raises(ParamsError, match=r"train\.lora\.target_modules: " + message):
        resolve_lora_targets(model, targets)


# --- the vocabulary projection at supervised positions only ----------------------------------------------


def _loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch, num_items_in_batch=(batch["labels"][:, 1:] != -100).sum())
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "llama", "phi3", "mistral"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_logits_at_supervised_positions_give_the_full_projections_loss_and_gradients(loaded, family, method):
    """The train collator marks the positions whose next token is a label; the model projects only those onto
    its vocabulary, and the loss and every gradient equal the full projection's."""
    from tasks.core.config import LoraConfig
    from tasks.core.training import supervised_logits, training_collator, with_supervised_positions

    model, tok = loaded(family)
    if method == "lora":
        model = with_lora(model, LoraConfig(r=2, target_modules="all-linear"))
    model.train()
    assert supervised_logits(model)
    features = [encode_example(tok, TEXT, SUMMARY, TEMPLATE, True, 256, 48),
                encode_example(tok, TEXT + " It was warm and the sun was out.", "Warm.", TEMPLATE, True, 256, 48)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch = collate_features(features, pad)
    rounded = training_collator(model, pad)(features)
    exact = with_supervised_positions(batch, multiple=1)
    supervised = sum(sum(1 for t in f["labels"][1:] if t != -100) for f in features)
    assert int(exact["logits_to_keep"].sum()) == supervised < batch["attention_mask"].sum() / 2  # prompts carry no loss
    # As shipped, the projected count is rounded up to 64 (capped at the batch) with positions the loss ignores.
    assert int((rounded["shift_labels"] != -100).sum()) == supervised
    assert int(rounded["logits_to_keep"].sum()) == len(rounded["shift_labels"]) == min(64, batch["input_ids"].numel())

    torch.manual_seed(0)
    full, full_grads = _loss_and_grads(model, batch)
    assert full.logits.shape[:2] == batch["input_ids"].shape
    for marked in (exact, rounded):
        torch.manual_seed(0)
        kept, kept_grads = _loss_and_grads(model, marked)
        assert kept.logits.shape == (len(marked["shift_labels"]), full.logits.shape[-1])  # only those rows projected
        assert torch.allclose(kept.loss, full.loss, rtol=1e-5, atol=1e-6), (kept.loss, full.loss)
        assert kept_grads.keys() == full_grads.keys() and kept_grads
        for name, grad in full_grads.items():
            assert torch.allclose(kept_grads[name], grad, rtol=1e-4, atol=1e-6), name


# --- int8 ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama", "phi3", "mistral"])
def test_int8_quantizes_every_linear_and_conv1d_layer(tmp_path, loaded, family):
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
    from transformers.pytorch_utils import Conv1D

    from tasks.core.variants import load_quantized, save_int8
    from tasks.quantize import quantize_int8

    model, tok = loaded(family)
    ids = tok(["The cat sat on the mat."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        full = model(input_ids=ids).logits
    float_layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    quantized, tensors, layout = quantize_int8(model)
    assert layout["conv1d"] == ([n for n in float_layers if ".h." in n] if family == "gpt2" else [])
    assert not [n for n, m in quantized.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    assert sorted(n for n, m in quantized.named_modules() if isinstance(m, Int8Linear)) == sorted(float_layers)
    with torch.no_grad():
        q = quantized(input_ids=ids).logits
    if family == "gpt2":  # the Conv1D layout read back (the chain tests reload qwen2's and gpt2's through the stages)
        save_int8(tensors, layout, quantized, tok, tmp_path / "int8")
        reloaded, _ = load_quantized(tmp_path / "int8")
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=ids).logits, q)
    cosine = torch.nn.functional.cosine_similarity(q.flatten(), full.flatten(), dim=0)
    assert cosine > 0.99, f"int8 logits drift from full precision: cosine {cosine:.4f}"


# --- the whole chain -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_chain(family: str, root: Path, base: Path, data: Path, name: str | None = None) -> dict:
    """pretrain (pass-through) -> train (LoRA) -> evaluate -> quantize -> register -> promote, as `sftflow run` would."""
    from safetensors.torch import load_file

    from tasks import align, evaluate, pretrain, promote, quantize, register, train

    write_tiny_splits(root / "artifacts", n=30)  # 24 train, 3 val, 3 test rows
    params = load_params(ROOT / "params.yaml", [
        f"data.path={data}",
        f"paths.artifacts={root / 'artifacts'}",
        f"paths.metrics={root / 'metrics'}",
        f"paths.plots={root / 'plots'}",
        f"evaluate.cache_dir={root / 'cache'}",
        *TINY_RUN_OVERRIDES,
        f"model.base={base}",
        "train.method=lora",  # the README's example, with the default targets (all-linear)
        "train.max_steps=2",
        "train.batch_size=2",
        "train.max_source_length=64",
        "train.learning_rate=0.01",
        "train.warmup_ratio=0",
        "evaluate.score_base=false",
        "quantize.methods=[int8]",  # GGUF through the chain: tests/test_gguf.py (these 16-wide models are too narrow for its blocks)
        f"register.model_name={name or f'real-{family}'}",
    ])
    pretrained = pretrain.run(params)
    assert not pretrained["pretrained"], "a real base with default params is not pretrained"
    before, passed = load_file(base / "model.safetensors"), load_file(root / "artifacts" / "pretrain" / "model" / "model.safetensors")
    assert before.keys() == passed.keys() and all(torch.equal(before[k], passed[k]) for k in before)
    trained = train.run(params)
    assert trained["method"] == "lora" and 0 < trained["trainable_params"] < trained["total_params"]
    # DPO through the real chat template and pad token: a fresh LoRA adapter, the reference with it disabled
    aligned = align.run(params)
    assert aligned["pairs_self"] > 0 and aligned["steps"] == 2 and 0 < aligned["trainable_params"] < aligned["total_params"]
    evaluated = evaluate.run(params)
    quantized = quantize.run(params)
    registered = register.run(params)
    promote.run(params)
    predictions = [json.loads(x) for x in (root / "artifacts/evaluate/predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    int8 = [json.loads(x) for x in (root / "artifacts/quantize/predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    return {"params": params, "trained": trained, "evaluated": evaluated, "quantized": quantized,
            "registered": registered, "texts": [p["text"] for p in predictions],
            "predictions": [p["prediction"] for p in predictions], "int8": [p["int8"] for p in int8]}


@pytest.fixture(scope="module")
def chains(tmp_path_factory, real_model):
    """The chain for qwen2 and gpt2 in one sqlite registry."""
    tmp = tmp_path_factory.mktemp("chains")
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sample_rows(30)), encoding="utf-8")
    with sqlite_store(tmp_path_factory), pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # MLflow puts run artifacts under ./mlruns
        yield {family: _run_chain(family, tmp / family, real_model(family), data) for family in ("qwen2", "gpt2")}


def test_chain_trains_lora_on_conv1d_and_quantizes_it(chains):
    gpt2 = chains["gpt2"]
    assert gpt2["quantized"]["int8.size_ratio"] < 0.5  # Conv1D layers quantized, not skipped
    for chain in chains.values():
        assert chain["evaluated"]["test_rows"] == len(chain["texts"]) == 3
        assert chain["registered"]["variants"].keys() == {"int8"}


def _in_fresh_process(tmp_path_factory, asked: dict[str, list[str]]) -> dict[str, list]:
    """{registered name: [predictions of the texts, settings]} of each champion, loaded with `mlflow.pyfunc` in a new interpreter."""
    code = (
        "import json, sys, mlflow, pandas as pd\n"
        "out = {}\n"
        "for name, texts in json.loads(sys.stdin.read()).items():\n"
        "    m = mlflow.pyfunc.load_model(f'models:/{name}@champion')\n"
        "    out[name] = [list(m.predict(pd.DataFrame({'text': texts}))), m.unwrap_python_model().settings]\n"
        "print('RESULT' + json.dumps(out, ensure_ascii=False))\n"
    )
    with sqlite_store(tmp_path_factory):
        out = subprocess.run([sys.executable, "-c", code], input=json.dumps(asked), capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT"))[len("RESULT"):])


@pytest.fixture(scope="module")
def fresh(chains, tmp_path_factory):
    """Each champion loaded with `mlflow.pyfunc` in a fresh process: its predictions of the test texts, its settings."""
    got = _in_fresh_process(tmp_path_factory, {f"real-{f}": c["texts"] for f, c in chains.items()})
    return {family: got[f"real-{family}"] for family in chains}


def test_chain_loads_in_a_fresh_process_and_predicts_as_evaluate_did(chains, fresh):
    for family, chain in chains.items():
        predictions, _settings = fresh[family]
        assert predictions == chain["predictions"], family


def test_chain_renders_the_same_prompt_in_train_and_in_the_registered_model(chains, fresh, loaded):
    from tasks.core.generation import encode_prompts
    from tasks.core.stage_params import stage_params
    from tasks.train import encode_rows

    for family, chain in chains.items():
        _, tok = loaded(family)
        row = {"text": chain["texts"][0], "summary": "x"}
        features, _ = encode_rows(stage_params(chain["params"], "train"), tok, [row])
        prompt = [t for t, label in zip(features[0]["input_ids"], features[0]["labels"]) if label == -100]
        _, settings = fresh[family]
        assert encode_prompts(tok, [row["text"]], GenerationSettings.from_dict(settings))[0] == prompt, family


def test_chain_app_summarises_as_quantize_measured(chains, tmp_path_factory):
    from gradio_client import Client

    from tasks.serve import ChampionServer, build_app

    with sqlite_store(tmp_path_factory):
        for family, chain in chains.items():
            server = ChampionServer(chain["params"])
            server.start()
            app = build_app(chain["params"], server)
            port = _free_port()
            app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                served = [client.predict(t, api_name="/summarize") for t in chain["texts"][:2]]
            finally:
                app.close()
                server.stop()
            # serve.variant_cpu is int8: the app serves the quantized variant as quantize measured it when its
            # gate let it serve (quality, and faster than full precision over the repeats), else full precision
            if chain["quantized"]["int8.served"]:
                assert served == chain["int8"][:2], family
            else:
                assert served == chain["predictions"][:2], family


@pytest.mark.system
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_whole_chain_runs_for_every_family(tmp_path, tmp_path_factory, real_model, family):
    """`make test-system`: the chain of the qwen2 and gpt2 tests above, for every family, up to the fresh-process load."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sample_rows(30)), encoding="utf-8")
    name = f"real-every-{family}"
    with sqlite_store(tmp_path_factory), pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        chain = _run_chain(family, tmp_path / family, real_model(family), data, name=name)
    predictions, settings = _in_fresh_process(tmp_path_factory, {name: chain["texts"]})[name]
    assert predictions == chain["predictions"]
    assert settings["use_chat_template"] and chain["quantized"]["int8.size_ratio"] < 0.5
