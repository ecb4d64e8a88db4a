"""The Gradio app against a real sqlite MLflow registry: API, load, bad input, a headless browser, hot reload.

One app serves the whole module (starting it and registering two tiny models is the slow part); the
hot-reload test moves the alias, so it runs last.
"""

from __future__ import annotations

import itertools
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ROOT, sample_rows
from registry_helpers import sqlite_store

from tasks.core.errors import StageError

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
POLL_SECONDS = 0.5
MAX_CHARS = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _register(model_dir: Path, params, rouge_l: float, int8: bool = False) -> tuple[str, str | None]:
    """Register a model folder with a lineage tag and an evaluate metric in its run, and optionally its
    int8 variant (quantized with the quantize stage's own functions); return (version, variant URI)."""
    import mlflow

    from tasks.core.modeling import load_model_and_tokenizer
    from tasks.core.variants import save_int8
    from tasks.quantize import quantize_int8
    from tasks.register import log_and_register, variant_uri_tag
    from tasks.core.tracking import setup_mlflow

    setup_mlflow(params.register.experiment)
    tags = {"data.sha256": "feed", "model.base": "scratch"}
    variant_uri = None
    with mlflow.start_run():
        mlflow.log_metric("evaluate.rouge-l", rouge_l)
        if int8:
            model, tokenizer = load_model_and_tokenizer(model_dir)
            _, tensors, layout = quantize_int8(model)
            save_int8(tensors, layout, model, tokenizer, model_dir.parent / "int8")
            mv = log_and_register(model_dir.parent / "int8", params, tags=tags, quantization="int8")
            variant_uri = f"models:/{mv.name}/{mv.version}"
            tags[variant_uri_tag("int8")] = variant_uri
        mv = log_and_register(model_dir, params, tags=tags)
    return str(mv.version), variant_uri


def _second_model(tmp: Path) -> Path:
    """A tiny model shaped like tiny_model_dir, nudged by a few steps on summaries so it writes other text.

    Untrained tied-embedding decoders all echo the prompt's last character, whatever their seed.
    """
    import torch

    from tasks.core.config import ModelConfig
    from tasks.core.io import set_seed
    from tasks.core.modeling import build_scratch_model, save_model, train_tokenizer

    set_seed(1)
    rows = sample_rows(200)
    tok = train_tokenizer([r["text"] for r in rows] + [r["summary"] for r in rows], kind="char", vocab_size=3000)
    model = build_scratch_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64), tok)
    batch = tok([r["summary"] for r in rows[:8]], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(10):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    save_model(model, tok, tmp / "v2" / "model")
    return tmp / "v2" / "model"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    """Two registered versions (champion = 1), a started ChampionServer and the app on a free port."""
    from gradio_client import Client
    from mlflow import MlflowClient

    from tasks.core.config import load_params
    from tasks.core.io import write_jsonl
    from tasks.serve import ChampionServer, build_app

    tmp = tmp_path_factory.mktemp("serve")
    # The session's sqlite store (its tables take seconds to create); this module's own model name.
    with sqlite_store(tmp_path_factory), pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # MLflow puts run artifacts under ./mlruns when the URI is a server/sqlite
        params = load_params(ROOT / "params.yaml", [
            "register.model_name=serve-app",
            f"paths.artifacts={tmp / 'artifacts'}",
            f"paths.metrics={tmp / 'metrics'}",
            f"paths.plots={tmp / 'plots'}",
            "evaluate.max_new_tokens=8",
            f"serve.poll_seconds={POLL_SECONDS}",
            f"serve.max_chars={MAX_CHARS}",
        ])
        test_rows = [{"id": str(i), "text": r["text"][:200], "summary": r["summary"]} for i, r in enumerate(sample_rows(5))]
        write_jsonl(params.layout.stage_dir("split") / "test.jsonl", test_rows)
        v1, _ = _register(tiny_model_dir, params, rouge_l=12.5)
        v2, v2_int8 = _register(_second_model(tmp), params, rouge_l=13.5, int8=True)
        client = MlflowClient()
        client.set_registered_model_alias(params.register.model_name, "champion", v1)

        server = ChampionServer(params)
        server.start()
        app = build_app(params, server)
        port = _free_port()
        app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        url = f"http://127.0.0.1:{port}/"
        try:
            yield {
                "params": params, "server": server, "url": url, "client": Client(url, verbose=False),
                "mlflow": client, "v1": v1, "v2": v2, "v2_int8": v2_int8, "texts": [r["text"] for r in test_rows], "tmp": tmp,
            }
        finally:
            app.close()
            server.stop()


def _predict(uri: str, texts: list[str]) -> list[str]:
    import mlflow
    import pandas as pd

    return list(mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"text": texts})))


def test_summarize_api_matches_pyfunc_predict(served):
    name = served["params"].register.model_name
    expected = _predict(f"models:/{name}@champion", served["texts"][:3])
    got = [served["client"].predict(t, api_name="/summarize") for t in served["texts"][:3]]
    assert got == expected
    assert all(isinstance(s, str) and s for s in got)


def test_model_info_names_the_champion_metrics_and_lineage(served):
    info = served["client"].predict(api_name="/model_info")
    assert info["version"] == served["v1"]
    assert info["metrics"]["evaluate.rouge-l"] == pytest.approx(12.5)
    assert info["tags"]["data.sha256"] == "feed"
    # serve.variant_cpu is int8 and no variant is registered: full precision, and the panel says so
    assert info["variant"] == "full" and "int8" in info["note"]


def test_fifty_concurrent_calls_all_succeed(served):
    client, texts = served["client"], served["texts"]
    expected = {t: client.predict(t, api_name="/summarize") for t in texts}
    with ThreadPoolExecutor(max_workers=16) as pool:
        jobs = [texts[i % len(texts)] for i in range(50)]
        results = list(pool.map(lambda t: client.predict(t, api_name="/summarize"), jobs))
    assert results == [expected[t] for t in jobs]


@pytest.mark.parametrize(
    ("value", "message"),
    [("", "empty"), ("   \n\t", "empty"), ("字" * (MAX_CHARS + 1), "limit is 300"), (12345, "must be text")],
)
def test_bad_input_is_an_api_error_and_the_app_stays_up(served, value, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        served["client"].predict(value, api_name="/summarize")
    assert served["client"].predict(served["texts"][0], api_name="/summarize")


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, driven by playwright (no downloaded browser)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def test_page_in_headless_chromium_shows_the_summary(served, browser):
    from playwright.sync_api import expect

    text = served["texts"][1]
    expected = served["client"].predict(text, api_name="/summarize")
    shot = served["tmp"] / "serve_page.png"
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto(served["url"])
        expect(page.locator("#model-info")).to_contain_text(f"version {served['v1']}", timeout=30_000)
        expect(page.get_by_text("Examples from the test split")).to_be_visible()
        page.locator("#input-text textarea").fill(text)
        page.locator("#summarize-button").click()
        expect(page.locator("#summary textarea")).to_have_value(expected, timeout=30_000)
        page.screenshot(path=str(shot), full_page=True)
        # Bad input from the page: a clear message, and the page still works afterwards.
        page.locator("#input-text textarea").fill("   ")
        page.locator("#summarize-button").click()
        expect(page.get_by_text("the input is empty")).to_be_visible(timeout=30_000)
    finally:
        page.close()
    assert shot.stat().st_size > 10_000


def test_stream_grows_token_by_token_and_ends_at_the_api_result(served):
    from tasks.serve import load_version, stream_summary, summarize

    params, client = served["params"], served["mlflow"]
    v2 = load_version(params, client, client.get_model_version(params.register.model_name, served["v2"]))
    text = served["texts"][0]
    chunks = list(stream_summary(v2, text, max_new_tokens=params.evaluate.max_new_tokens))
    assert len(chunks) > 1 and all(b.startswith(a) for a, b in itertools.pairwise(chunks))
    assert chunks[-1] == summarize(v2, text)
    # the page's "max new tokens" setting bounds the summary (one character per token here)
    assert len(list(stream_summary(v2, text, max_new_tokens=3))[-1]) == 3


def test_requests_in_flight_keep_their_version_across_a_swap(served):
    """The swap replaces the reference: a request holding the old version still finishes on it."""
    from tasks.serve import summarize

    server = served["server"]
    old = server.current
    before = summarize(old, served["texts"][0])
    served["mlflow"].set_registered_model_alias(served["params"].register.model_name, "champion", served["v2"])
    try:
        server.refresh()  # the poll thread may have swapped already; either way v2 serves now
        assert server.current.version == served["v2"] and old.version == served["v1"]
        assert summarize(old, served["texts"][0]) == before
    finally:
        served["mlflow"].set_registered_model_alias(served["params"].register.model_name, "champion", served["v1"])
        server.refresh()
    assert server.current.version == served["v1"]


def test_no_champion_is_a_clear_error(served):
    from tasks.serve import ChampionServer

    params = served["params"].model_copy(deep=True)
    params.register.model_name = "never-registered"
    with pytest.raises(StageError, match="cannot find alias 'champion' of registered model 'never-registered'.*sftflow promote"):
        ChampionServer(params, client=served["mlflow"]).start()


def test_moving_the_alias_hot_reloads_the_app(served, browser):
    """Runs last in the module: it leaves version 2 serving. An open page's panel follows the alias."""
    from playwright.sync_api import expect

    client, text = served["client"], served["texts"][2]
    before = client.predict(text, api_name="/summarize")
    # serve.variant_cpu is int8 and version 2 has one: the app serves that registered variant
    expected = _predict(served["v2_int8"], [text])[0]
    assert expected != before, "the two tiny models must write different summaries for this test to mean anything"
    page = browser.new_page()
    try:
        page.goto(served["url"])
        expect(page.locator("#model-info")).to_contain_text(f"version {served['v1']}", timeout=30_000)
        served["mlflow"].set_registered_model_alias(served["params"].register.model_name, "champion", served["v2"])
        deadline = time.monotonic() + 60
        while client.predict(api_name="/model_info")["version"] != served["v2"]:
            assert time.monotonic() < deadline, "the app did not switch to the new champion"
            time.sleep(POLL_SECONDS / 2)
        info = client.predict(api_name="/model_info")
        assert (info["variant"], info["uri"], info["note"]) == ("int8", served["v2_int8"], None)
        assert client.predict(text, api_name="/summarize") == expected
        expect(page.locator("#model-info")).to_contain_text(f"version {served['v2']}", timeout=30_000)
        expect(page.locator("#model-info")).to_contain_text(served["v2_int8"])
    finally:
        page.close()


# ----------------------------------------------------------------------------- no server needed


def test_check_text_accepts_text_within_the_limit():
    import gradio as gr

    from tasks.serve import check_text

    assert check_text(" 摘要 ", 5) == " 摘要 "
    for bad in ("", " ", "abcdef", None, ["a"]):
        with pytest.raises(gr.Error):
            check_text(bad, 5)


def test_variant_comes_from_the_version_tag_or_full_precision_with_a_note(tiny_params):
    from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

    from tasks.serve import resolve_variant

    name = tiny_params.register.model_name
    bare = ModelVersion(name, "3", creation_timestamp=0)
    tagged = ModelVersion(name, "3", creation_timestamp=0, tags=[ModelVersionTag("sftflow.variant.int8", f"models:/{name}-int8/7")])
    assert resolve_variant(tiny_params, tagged, "cpu") == ("int8", f"models:/{name}-int8/7", None)
    variant, uri, note = resolve_variant(tiny_params, bare, "cpu")
    assert (variant, uri) == ("full", f"models:/{name}/3") and "sftflow.variant.int8" in note
    assert resolve_variant(tiny_params, bare, "cuda") == ("bf16", f"models:/{name}/3", None)


def test_run_binds_localhost_without_share_and_reads_auth(monkeypatch, tiny_params):
    """`run` wiring: 127.0.0.1 by default, --host wins, auth from the env var, never a share link."""
    from tasks import serve

    launched = {}

    class FakeServer:
        def __init__(self, params):
            self.stopped = False

        def start(self):
            pass

        def stop(self):
            launched["stopped"] = True

    class FakeApp:
        def launch(self, **kwargs):
            launched.update(kwargs)

    monkeypatch.setattr(serve, "ChampionServer", FakeServer)
    monkeypatch.setattr(serve, "build_app", lambda params, server: FakeApp())
    monkeypatch.delenv("SFTFLOW_SHARE", raising=False)
    monkeypatch.setenv("SFTFLOW_APP_AUTH", "ann:s3cret:x")
    serve.run(tiny_params)
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == 7860
    assert launched["share"] is False and launched["auth"] == ("ann", "s3cret:x") and launched["stopped"]
    monkeypatch.setenv("SFTFLOW_APP_AUTH", "no-colon")
    with pytest.raises(StageError, match="user:password"):
        serve.run(tiny_params)
    monkeypatch.delenv("SFTFLOW_APP_AUTH")
    serve.run(tiny_params, host="0.0.0.0", port=9000)
    assert (launched["server_name"], launched["server_port"], launched["auth"]) == ("0.0.0.0", 9000, None)


def test_examples_come_from_the_test_split(tiny_params):
    from tasks.core.io import write_jsonl
    from tasks.serve import example_texts

    assert example_texts(tiny_params) == []
    rows = [{"id": str(i), "text": f"文本{i}", "summary": "s"} for i in range(8)]
    write_jsonl(tiny_params.layout.stage_dir("split") / "test.jsonl", rows)
    assert example_texts(tiny_params, n=3) == ["文本0", "文本1", "文本2"]
    assert example_texts(tiny_params)[-1] == "文本4"
