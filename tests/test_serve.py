"""The Gradio app against a real sqlite MLflow registry: API, load, bad input, a headless browser, hot reload.

One app serves the whole module (starting it and registering two tiny models is the slow part); the
hot-reload test moves the alias, so it runs last.
"""

from __future__ import annotations

import itertools
import re
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
REVIEW_URL = "http://127.0.0.1:8501/"
INT8_DROP = 0.25


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _evaluate_metrics(rouge_l: float) -> dict[str, float]:
    """What the flow logs from metrics/evaluate.json: ROUGE-1/2/L with their CIs for the model, its base and the
    lead-k baseline (here the model's ROUGE-1 is ROUGE-L + 2, ROUGE-2 its fifth, intervals ±1; the base a quarter
    of the model, the baseline 15 points above)."""
    out = {}
    for prefix, factor, shift in (("evaluate.", 1.0, 0.0), ("evaluate.base.", 0.25, 0.0), ("evaluate.baseline.", 1.0, 15.0)):
        for metric, value in (("rouge-1", rouge_l + 2), ("rouge-2", rouge_l / 5), ("rouge-l", rouge_l)):
            v = value * factor + shift
            out |= {f"{prefix}{metric}": v, f"{prefix}{metric}_low": v - 1, f"{prefix}{metric}_high": v + 1}
    return out


def _register(model_dir: Path, params, rouge_l: float, int8: bool = False) -> tuple[str, str | None]:
    """Register a model folder with a lineage tag and the evaluate metrics in its run, and optionally its
    int8 variant (quantized with the quantize stage's own functions, its quantize metrics logged);
    return (version, variant URI)."""
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
        mlflow.log_metrics(_evaluate_metrics(rouge_l))
        if int8:
            mlflow.log_metrics({"quantize.int8.rouge-l": rouge_l - INT8_DROP, "quantize.int8.rouge-l_drop": INT8_DROP})
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
            f"serve.review_url={REVIEW_URL}",
            f"align.feedback_dir={tmp / 'feedback'}",
            "serve.feedback_per_minute=0",
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


def test_fifty_concurrent_feedback_submissions_store_each_valid_one_once(served):
    from gradio_client.exceptions import AppError

    from tasks.core.feedback import FeedbackStore

    client, text = served["client"], served["texts"][0]
    store = FeedbackStore(served["params"].align.feedback_dir)
    before = len(store.open_records())
    bad = [("", "输出", "bad", "改正", "input text is empty"), (text, "输出", "bad", "输出", "same as the summary"),
           (text, "输出", "so-so", "", "choose a rating"), ("字" * (MAX_CHARS + 1), "输出", "good", "", "more than the 300")]
    jobs = [(text, f"输出 {i}", "bad" if i % 2 else "good", f"改正 {i}" if i % 2 else "", None) for i in range(40)]
    jobs += [bad[i % len(bad)] for i in range(10)]

    def send(job):
        t, output, rating, correction, refusal = job
        try:
            return client.predict(t, output, rating, correction, api_name="/feedback"), refusal
        except AppError as e:
            return str(e), refusal

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(send, jobs))
    for (answer, refusal), job in zip(results, jobs):
        if refusal is None:
            assert answer["saved"] is True and answer["version"] == served["v1"], (job, answer)
        else:
            assert refusal in answer and "feedback not saved" in answer, (job, answer)
    stored = store.open_records()[before:]
    assert sorted(r["output"] for r in stored) == sorted(f"输出 {i}" for i in range(40))  # each valid one, once
    assert {r["id"] for r in stored} == {a["id"] for a, refusal in results if refusal is None}
    assert all(r["model_name"] == "serve-app" and r["user"] == "ip:127.0.0.1" for r in stored)
    assert {r["correction"] for r in stored if r["rating"] == "good"} == {None}


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
        # The side panel: one table row per system, ROUGE-1/2/L as mean [95% CI] (v1: ROUGE-L 12.5, full precision).
        table = page.locator("#model-info table")
        expect(table.locator("th")).to_have_text(["", "ROUGE-1", "ROUGE-2", "ROUGE-L"])
        expect(table.locator("tbody tr")).to_have_count(3)
        expect(table.locator("tbody tr").nth(0)).to_have_text(
            re.compile(rf"fine-tuned \(v{served['v1']}, full, served\)\s*14\.50 \[13\.50, 15\.50\]\s*2\.50 \[1\.50, 3\.50\]"
                       r"\s*12\.50 \[11\.50, 13\.50\]"))
        expect(table.locator("tbody tr").nth(1)).to_have_text(re.compile(r"base\s*3\.62 \[2\.62, 4\.62\]"))
        expect(table.locator("tbody tr").nth(2)).to_have_text(re.compile(r"lead-k baseline\s*29\.50 \[28\.50, 30\.50\]"))
        link = page.locator("#model-info a", has_text="review dashboard")
        expect(link).to_have_attribute("href", REVIEW_URL)
        # Raw tags and every metric are folded away until opened.
        tag = page.locator("#model-info li", has_text="data.sha256")
        expect(tag).to_be_hidden()
        page.locator("#model-info summary", has_text="Lineage tags").click()
        expect(tag).to_be_visible()
        expect(tag).to_contain_text("feed")
        expect(page.get_by_text("Examples from the test split")).to_be_visible()
        page.locator("#input-text textarea").fill(text)
        page.locator("#summarize-button").click()
        expect(page.locator("#summary textarea")).to_have_value(expected, timeout=30_000)
        page.screenshot(path=str(shot), full_page=True)
        # Feedback under the summary: a rating and a correction go to the store with this text and version.
        from tasks.core.feedback import FeedbackStore

        store = FeedbackStore(served["params"].align.feedback_dir)
        before = len(store.open_records())
        page.locator("#feedback-rating").get_by_label("bad").check()
        page.locator("#feedback-correction textarea").fill("人工改正的标题")
        page.locator("#feedback-button").click()
        expect(page.locator("#feedback-status")).to_contain_text("feedback saved", timeout=30_000)
        expect(page.locator("#feedback-correction textarea")).to_have_value("")  # cleared for the next one
        record = store.open_records()[before]
        assert (record["text"], record["output"], record["rating"], record["correction"], record["model_version"]) == (
            text, expected, "bad", "人工改正的标题", served["v1"])
        # A correction identical to the summary is refused with the reason, and nothing is written.
        page.locator("#feedback-rating").get_by_label("good").check()
        page.locator("#feedback-correction textarea").fill(expected)
        page.locator("#feedback-button").click()
        expect(page.get_by_text("the correction is the same as the summary")).to_be_visible(timeout=30_000)
        assert len(store.open_records()) == before + 1
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


def test_the_app_loads_through_the_verified_loader_not_the_pyfunc(served, monkeypatch):
    """No code from the artifact store runs in the app: `mlflow.pyfunc.load_model` is never called."""
    import mlflow

    from tasks.core.loading import MANIFEST_TAG
    from tasks.serve import info_markdown, load_version, summarize

    def never(*args, **kwargs):
        raise AssertionError("the app called mlflow.pyfunc.load_model")

    monkeypatch.setattr(mlflow.pyfunc, "load_model", never)
    params, client = served["params"], served["mlflow"]
    v1 = load_version(params, client, client.get_model_version(params.register.model_name, served["v1"]))
    assert summarize(v1, served["texts"][0]) == served["client"].predict(served["texts"][0], api_name="/summarize")
    assert MANIFEST_TAG not in v1.tags and MANIFEST_TAG not in info_markdown(v1, params.register.model_name)


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
        # The int8 variant serves now: its own row, ROUGE-L and drop from quantize, beside the full-precision scores.
        rows = page.locator("#model-info table tbody tr")
        expect(rows).to_have_count(4)
        expect(rows.nth(0)).to_contain_text(f"fine-tuned (v{served['v2']}, full)")
        expect(rows.nth(0)).to_contain_text("13.50 [12.50, 14.50]")
        expect(rows.nth(1)).to_have_text(re.compile(rf"fine-tuned \(v{served['v2']}, int8, served\)\s*–\s*–\s*13\.25 \(drop 0\.25\)"))
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


def test_info_panel_tables_the_scores_links_the_dashboard_and_folds_the_tags():
    from types import SimpleNamespace

    from tasks.serve import ServedVersion, info_markdown

    metrics = {"evaluate.rouge-1": 14.5, "evaluate.rouge-1_low": 13.0, "evaluate.rouge-1_high": 16.0,
               "evaluate.rouge-l": 12.5, "evaluate.rouge-l_low": 11.25, "evaluate.rouge-l_high": 13.75,
               "evaluate.baseline.rouge-l": 28.0,  # logged without its interval
               "quantize.int8.rouge-l": 12.25, "quantize.int8.rouge-l_drop": 0.25, "quantize.int8.size_mb": 2.0,
               "quantize.bf16.rouge-l": 12.0, "quantize.bf16.rouge-l_drop": 0.5, "quantize.bf16.on_cuda": 1.0}

    def served(variant: str) -> ServedVersion:
        return ServedVersion("7", variant, "models:/m/7", SimpleNamespace(device="cpu"), None, {}, metrics, {"data.sha256": "feed"})

    text = info_markdown(served("full"), "m", "https://review.example.com/")
    lines = text.splitlines()
    assert "### Serving `m` version 7 (`@champion`)" in lines and "- variant: `full` on `cpu`" in lines
    assert "- [review dashboard](https://review.example.com/): every version, why this one serves, outputs side by side" in lines
    table = lines[lines.index("| | ROUGE-1 | ROUGE-2 | ROUGE-L |"):][:5]
    assert table[2:] == [
        "| fine-tuned (v7, full, served) | 14.50 [13.00, 16.00] | – | 12.50 [11.25, 13.75] |",
        "| base | – | – | – |",  # base not evaluated (a real base model)
        "| lead-k baseline | – | – | 28.00 |",
    ]
    # the tags and the full metric list sit in closed sections, after the table
    assert text.index("<summary>Lineage tags (1)</summary>") > text.index("| lead-k baseline")
    assert "<details open" not in text and "- `data.sha256`: `feed`" in text and "<summary>All metrics (13)</summary>" in text
    # a quantized variant served: its ROUGE-L and drop get their own row; the first row is full precision
    quantized = info_markdown(served("int8"), "m")
    assert "| fine-tuned (v7, full) | 14.50 [13.00, 16.00] | – | 12.50 [11.25, 13.75] |" in quantized
    assert "| fine-tuned (v7, int8, served) | – | – | 12.25 (drop 0.25) |" in quantized
    assert "review dashboard" not in quantized  # serve.review_url empty: no link
    assert "| fine-tuned (v7, bnb-nf4, served) | – | – | – |" in info_markdown(served("bnb-nf4"), "m")  # not measured
    # bf16 is a variant like int8, not full precision: its own registered figure (scored in bf16 where it
    # serves), never the float32 evaluate figures under its name
    bf16 = info_markdown(served("bf16"), "m")
    assert "| fine-tuned (v7, full) | 14.50 [13.00, 16.00] | – | 12.50 [11.25, 13.75] |" in bf16
    assert "| fine-tuned (v7, bf16, served) | – | – | 12.00 (drop 0.50) |" in bf16
    assert "| fine-tuned (v7, bf16, served) | 14.50" not in bf16


def test_review_url_must_be_a_link():
    from tasks.core.config import Params, ParamsError, load_params

    assert Params().serve.review_url == ""
    for good in ("http://127.0.0.1:8501", "https://review.example.com/x?y=1", "/review/"):
        assert Params.model_validate({"serve": {"review_url": good}}).serve.review_url == good
    for bad in ("javascript:alert(1)", "review.example.com", "http://a b", "http://x/)[y](z"):
        with pytest.raises(ParamsError, match="serve.review_url"):
            load_params(ROOT / "params.yaml", [f"serve.review_url={bad}"])


def test_variant_comes_from_the_version_tag_or_full_precision_with_a_note(tiny_params):
    from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

    from tasks.serve import resolve_variant

    name = tiny_params.register.model_name
    bare = ModelVersion(name, "3", creation_timestamp=0)
    tagged = ModelVersion(name, "3", creation_timestamp=0, tags=[ModelVersionTag("sftflow.variant.int8", f"models:/{name}-int8/7")])
    assert resolve_variant(tiny_params, tagged, "cpu") == ("int8", f"models:/{name}-int8/7", None)
    variant, uri, note = resolve_variant(tiny_params, bare, "cpu")
    assert (variant, uri) == ("full", f"models:/{name}/3") and "sftflow.variant.int8" in note
    # bf16 on a GPU is served only as a registered variant scored there, never the version cast on load
    variant, uri, note = resolve_variant(tiny_params, bare, "cuda")
    assert (variant, uri) == ("full", f"models:/{name}/3") and "sftflow.variant.bf16" in note


def test_a_variant_quantize_found_slower_is_not_served_and_the_note_says_why(tiny_params):
    from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

    from tasks.core.registry import variant_decision_tags
    from tasks.serve import resolve_variant

    name = tiny_params.register.model_name
    link = ModelVersionTag("sftflow.variant.int8", f"models:/{name}-int8/7")
    reason = "slower than full precision: ratio 0.950–1.040 (variant ÷ full over 3 repeats)"
    slow = variant_decision_tags({"int8.served": False, "int8.reason": reason}, ["int8"])
    fast = variant_decision_tags({"int8.served": True, "int8.reason": "faster than full precision: ratio 0.8–0.9"}, ["int8"])
    assert slow == {"sftflow.variant_served.int8": "false", "sftflow.variant_reason.int8": reason}
    assert variant_decision_tags({"int8.passed": True}, ["int8"]) == {}  # measured before the speed check: no decision

    def version(tags):
        return ModelVersion(name, "3", creation_timestamp=0, tags=[link, *(ModelVersionTag(k, v) for k, v in tags.items())])

    variant, uri, note = resolve_variant(tiny_params, version(slow), "cpu")
    assert (variant, uri) == ("full", f"models:/{name}/3") and reason in note and "int8" in note
    assert resolve_variant(tiny_params, version(fast), "cpu") == ("int8", f"models:/{name}-int8/7", None)


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
    monkeypatch.setenv("SFTFLOW_APP_AUTH", "ann:s3cret")
    serve.run(tiny_params, host="0.0.0.0", port=9000)
    assert (launched["server_name"], launched["server_port"], launched["auth"]) == ("0.0.0.0", 9000, ("ann", "s3cret"))
    monkeypatch.delenv("SFTFLOW_APP_AUTH")
    for loopback in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        serve.run(tiny_params, host=loopback)
        assert (launched["server_name"], launched["auth"]) == (loopback, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "app.example.com"])
def test_run_refuses_a_non_loopback_host_or_share_link_without_auth(monkeypatch, tiny_params, host):
    """Checked before any model loads: the message names the setting that fixes it."""
    from tasks import serve

    def no_server(params):
        raise AssertionError("the champion was loaded before the exposure check")

    monkeypatch.setattr(serve, "ChampionServer", no_server)
    monkeypatch.delenv("SFTFLOW_APP_AUTH", raising=False)
    monkeypatch.delenv("SFTFLOW_SHARE", raising=False)
    with pytest.raises(StageError, match=f"refusing to serve on {host!r} without a login.*Set SFTFLOW_APP_AUTH=user:password"):
        serve.run(tiny_params, host=host)
    monkeypatch.setenv("SFTFLOW_SHARE", "1")
    with pytest.raises(StageError, match="SFTFLOW_SHARE asks for a public share link, but SFTFLOW_APP_AUTH is not set"):
        serve.run(tiny_params, host="127.0.0.1")


def test_examples_come_from_the_test_split(tiny_params):
    from tasks.core.io import write_jsonl
    from tasks.serve import example_texts

    assert example_texts(tiny_params) == []
    rows = [{"id": str(i), "text": f"文本{i}", "summary": "s"} for i in range(8)]
    write_jsonl(tiny_params.layout.stage_dir("split") / "test.jsonl", rows)
    assert example_texts(tiny_params, n=3) == ["文本0", "文本1", "文本2"]
    assert example_texts(tiny_params)[-1] == "文本4"


def test_streamed_output_equals_generate_with_repetition_controls(tiny_model_dir):
    """With non-default repetition controls in a version's settings, the page's stream ends at exactly
    what `generate` (evaluate, the pyfunc's predict, `/summarize`) writes."""
    import torch

    from tasks.core.generation import GenerationSettings, generate
    from tasks.core.modeling import load_model_and_tokenizer
    from tasks.serve import ServedVersion, stream_summary

    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights that loop ("警警警…"), so the controls change the text
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.12, generator=g)
    model.eval()
    template = "为下面的论文摘要拟一个标题。\n摘要：{text}\n标题："
    plain = GenerationSettings(template, True, max_new_tokens=20, batch_size=4)
    tuned = GenerationSettings(template, True, max_new_tokens=20, batch_size=4, no_repeat_ngram_size=2, repetition_penalty=1.3)
    texts = [r["text"][: 40 + 7 * i] for i, r in enumerate(sample_rows(4))]
    expected = generate(model, tokenizer, texts, tuned)
    assert expected != generate(model, tokenizer, texts, plain), "the controls must change the text for the test to mean anything"
    served = ServedVersion("1", "full", "models:/m/1", model, tokenizer, {**tuned.to_dict(), "language": "zh"})
    for text, want in zip(texts, expected):
        assert list(stream_summary(served, text, tuned.max_new_tokens))[-1] == want


def test_feedback_is_keyed_by_the_login_else_the_client_address():
    from types import SimpleNamespace

    from tasks.serve import feedback_user

    assert feedback_user(SimpleNamespace(username="ana", client=SimpleNamespace(host="10.0.0.7"))) == "ana"
    assert feedback_user(SimpleNamespace(username=None, client=SimpleNamespace(host="10.0.0.7"))) == "ip:10.0.0.7"
    assert feedback_user(None) == "anonymous"
