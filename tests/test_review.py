"""The review dashboard against a real sqlite MLflow registry built here: every section through
Streamlit's AppTest, the empty / missing-artifact / unreachable / 401 cases, the login gate, and
`sftflow review` itself served by `streamlit run` and opened in headless Chromium.

The registry: three registered versions of one tiny model, each with the metrics, test predictions
and per-row scores the flow logs, gated by the real `promote` (v1 champion, then v2 beats it, v3
does not: champion v2, challenger v3).
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, sample_rows
from flow_helpers import stop_group, wait_http
from registry_helpers import sqlite_store, write_test_split

from tasks.core.errors import StageError

MODEL = "review-dash"
ROWS = [{"id": r["id"], "text": r["text"][:120], "summary": r["summary"]} for r in sample_rows(10)]
V1 = [30.0 + i % 3 for i in range(len(ROWS))]
V2 = [s + 6 + i % 4 for i, s in enumerate(V1)]  # clearly better: promoted
# v3 against v2, row by row: distinct differences, mean below 0, so the gate keeps v2
DELTA_3 = [1.5, -2.0, 3.0, -4.5, 0.5, -1.0, 2.5, -3.5, 4.0, -6.0]
V3 = [s + d for s, d in zip(V2, DELTA_3)]
SETTINGS_SHA = "5e771a95" * 8
AUTH = ("reviewer", "correct horse")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _params(tmp: Path, name: str = MODEL):
    from tasks.core.config import load_params

    return load_params(ROOT / "params.yaml", [
        f"register.model_name={name}",
        f"paths.artifacts={tmp / 'artifacts'}",
        f"paths.metrics={tmp / 'metrics'}",
        f"paths.plots={tmp / 'plots'}",
        "evaluate.max_new_tokens=4",
        "promote.bootstrap_samples=50",
    ])


def _log_evaluation(run_id: str, scores: list[float], label: str, test_sha: str, tmp: Path) -> None:
    """What the flow logs into the active run for a version: evaluate/quantize metrics, train.method,
    the test predictions and the per-row scores."""
    import mlflow

    from tasks.core.io import write_jsonl
    from tasks.core.registry import row_scores_key, save_row_scores
    from tasks.core.scoring import SCORING_VERSION

    mean = _mean(scores)
    metrics = {}
    for metric, value in (("rouge-1", mean + 5), ("rouge-2", mean / 2), ("rouge-l", mean)):
        metrics |= {f"evaluate.{metric}": value, f"evaluate.{metric}_low": value - 1.5, f"evaluate.{metric}_high": value + 1.5}
        metrics |= {f"evaluate.base.{metric}": value / 4, f"evaluate.baseline.{metric}": 28.0 + len(metric)}
    metrics |= {"quantize.full.size_mb": 8.0, "quantize.full.latency_s": 2.0, "quantize.full.rouge-l": mean,
                "quantize.int8.size_mb": 2.0, "quantize.int8.size_ratio": 0.25, "quantize.int8.latency_s": 1.6,
                "quantize.int8.latency_ratio": 0.8, "quantize.int8.rouge-l": mean - 0.25, "quantize.int8.rouge-l_drop": 0.25,
                "quantize.int8.passed": 1.0}
    mlflow.log_metrics(metrics)
    mlflow.log_param("train.method", "lora" if label == "v3" else "full")
    folder = tmp / label / "evaluate"
    write_jsonl(folder / "predictions.jsonl", [
        {"id": r["id"], "text": r["text"], "reference": r["summary"], "prediction": f"{label} output {i}", "rouge-l": s}
        for i, (r, s) in enumerate(zip(ROWS, scores))
    ])
    mlflow.log_artifact(str(folder / "predictions.jsonl"), artifact_path="evaluate")
    save_row_scores(run_id, row_scores_key(test_sha, SETTINGS_SHA, SCORING_VERSION), dict(zip([r["id"] for r in ROWS], scores)))


def _register_version(params, model_dir: Path, scores: list[float], label: str, test_sha: str, tmp: Path) -> int:
    import mlflow

    from tasks.core.registry import SETTINGS_SHA_TAG
    from tasks.core.tracking import setup_mlflow
    from tasks.register import log_and_register

    setup_mlflow(params.register.experiment)
    tags = {"data.path": "data/sample/zh_summ.jsonl", "data.sha256": f"{label}da7a" * 8, "validate.success": "true",
            "split.train_sha256": "a" * 64, "split.val_sha256": "b" * 64, "split.test_sha256": test_sha,
            "params.sha256": f"{label}9a" * 8, "model.base": "scratch", "code.commit": f"c0ffee{label}", "code.dirty": "false",
            "prefect.flow_run_id": "none", SETTINGS_SHA_TAG: SETTINGS_SHA}
    with mlflow.start_run() as run:
        _log_evaluation(run.info.run_id, scores, label, test_sha, tmp)
        mv = log_and_register(model_dir, params, tags=tags)
    return int(mv.version)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    """Three versions gated by the real promote: v2 champion, v3 challenger, v1 replaced."""
    from tasks import promote
    from tasks.core.config import save_params
    from tasks.core.io import file_sha256

    tmp = tmp_path_factory.mktemp("review")
    with sqlite_store(tmp_path_factory) as root, pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        params = _params(tmp)
        test_sha = file_sha256(write_test_split(params, ROWS))
        decisions = {}
        for label, scores in (("v1", V1), ("v2", V2), ("v3", V3)):
            version = _register_version(params, tiny_model_dir, scores, label, test_sha, tmp)
            decisions[version] = promote.run(params)["decision"]
        assert decisions == {1: "champion", 2: "champion", 3: "challenger"}
        params_file = tmp / "review-params.yaml"
        save_params(params, params_file)
        yield {"params": params, "params_file": params_file, "tmp": tmp, "store": root, "test_sha": test_sha}


@pytest.fixture
def page(registry, monkeypatch):
    """A function that runs the page in AppTest against the registry (or another model name / store)."""
    from streamlit.testing.v1 import AppTest

    from tasks.core.config import save_params
    from tasks.review import PAGE_SCRIPT

    monkeypatch.delenv("SFTFLOW_REVIEW_AUTH", raising=False)

    def run(name: str = MODEL, **env: str):
        path = registry["params_file"]
        if name != MODEL:
            path = registry["tmp"] / f"{name}.yaml"
            save_params(_params(registry["tmp"], name), path)
        monkeypatch.setenv("SFTFLOW_REVIEW_PARAMS", str(path))
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        at = AppTest.from_string(PAGE_SCRIPT, default_timeout=60)
        at.run()
        return at

    return run


def _frame_with(at, column: str):
    """The first dataframe on the page that has this column."""
    for element in at.dataframe:
        if column in element.value.columns:
            return element.value
    raise AssertionError(f"no dataframe with a {column!r} column; have {[list(d.value.columns) for d in at.dataframe]}")


def _texts(at) -> str:
    return "\n".join([m.value for m in at.markdown] + [c.value for c in at.caption])


def _alerts(at) -> list[str]:
    return [e.value for e in [*at.error, *at.warning, *at.info]]


# ----------------------------------------------------------------------------- the sections


def test_every_section_shows_the_registry(page, registry):
    at = page()
    assert not at.exception, at.exception
    assert [t.label for t in at.tabs] == ["Versions", "Over time", "Side by side", "Lineage", "Variants", "Try it"]
    text = _texts(at)
    assert "3 versions" in text
    assert f"Champion: version 2 · ROUGE-L {_mean(V2):.2f} [{_mean(V2) - 1.5:.2f}, {_mean(V2) + 1.5:.2f}]" in text
    assert "over version 1" in text  # why: the gate's reason
    assert at.sidebar.selectbox[0].value == 3  # the newest version that is not champion

    versions = _frame_with(at, "decision")
    assert list(versions["version"]) == [3, 2, 1]
    assert list(versions["champion"]) == ["", "★", ""]
    assert list(versions["decision"]) == ["challenger", "defended", "replaced"]  # v2 held off v3
    assert list(versions["method"]) == ["lora", "full", "full"]
    assert versions["ROUGE-L"].tolist() == pytest.approx([_mean(V3), _mean(V2), _mean(V1)])
    assert versions.loc[1, "95% CI"] == f"[{_mean(V2) - 1.5:.2f}, {_mean(V2) + 1.5:.2f}]"
    assert versions.loc[0, "aliases"] == "challenger" and versions.loc[1, "aliases"] == "champion"
    assert versions.loc[0, "data"] == ("v3da7a" * 2)[:12]
    assert "within noise" in versions.loc[0, "reason"]

    over_time = _frame_with(at, "system")
    assert len(over_time) == 3 * 3 * 3  # versions × ROUGE-1/2/L × (fine-tuned, base, lead-k baseline)
    l_fine = over_time[(over_time.metric == "ROUGE-L") & (over_time.system == "fine-tuned")]
    assert l_fine["value"].tolist() == pytest.approx([_mean(V1), _mean(V2), _mean(V3)])
    assert set(over_time.system) == {"fine-tuned", "base", "lead-k baseline"}
    charts = [json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]
    assert len(charts) == 2  # over time, variants
    assert charts[0]["facet"]["column"]["sort"] == ["ROUGE-1", "ROUGE-2", "ROUGE-L"]
    assert any(layer["mark"].get("strokeDash") for layer in charts[0]["spec"]["layer"])  # base and baseline: dashed

    # Side by side: champion v2 vs v3 on the test rows, the worst row for v3 first
    rows = _frame_with(at, "Δ ROUGE-L")
    expected = sorted(range(len(ROWS)), key=lambda i: DELTA_3[i])
    assert list(rows["id"]) == [ROWS[i]["id"] for i in expected]
    assert rows["Δ ROUGE-L"].tolist() == pytest.approx(sorted(DELTA_3))
    assert rows.loc[0, "v3 output"] == f"v3 output {expected[0]}" and rows.loc[0, "v2 (champion) output"] == f"v2 output {expected[0]}"
    assert rows.loc[0, "reference"] == ROWS[expected[0]]["summary"]
    assert f"mean Δ ROUGE-L {_mean(DELTA_3):+.2f}" in text and "better on 5 rows, worse on 5" in text

    variants = _frame_with(at, "ROUGE-L drop")
    assert list(variants["variant"]) == ["full", "int8"]
    assert variants["ROUGE-L drop"].tolist() == pytest.approx([0.0, 0.25])


def test_lineage_shows_the_facts_sftflow_lineage_prints(page, registry):
    from tasks import register

    at = page()
    steps = at.table[0].value
    assert list(steps["step"]) == ["data", "validation", "splits", "params", "alignment", "code", "flow run", "metrics", "promotion", "aliases"]
    printed = register.lineage(registry["params"], 3)
    for value in steps["what the registry says"]:
        assert value in printed
    assert printed.startswith(f"{MODEL} version 3  (run ")
    assert "code      commit c0ffeev3" in printed and "aliases   challenger" in printed
    assert at.code[0].value == printed


def test_picking_another_version_changes_the_comparison(page):
    at = page()
    at.sidebar.selectbox[0].select(1).run()
    assert not at.exception
    rows = _frame_with(at, "Δ ROUGE-L")
    deltas = [a - b for a, b in zip(V1, V2)]
    assert rows["Δ ROUGE-L"].tolist() == pytest.approx(sorted(deltas))
    at.sidebar.selectbox[0].select(2).run()  # the champion itself
    assert any("selected version is the champion" in a for a in _alerts(at))


def test_try_it_loads_each_model_only_when_asked(page, registry, monkeypatch):
    from tasks.core import loading

    loads = []
    real = loading.load_registered

    def counted(uri, **kwargs):
        loads.append(uri)
        return real(uri, **kwargs)

    monkeypatch.setattr(loading, "load_registered", counted)
    at = page()
    assert loads == []  # opening the page loads no model
    text = ROWS[0]["text"]
    at.text_area(key="try_text").input(text)
    at.button(key="try_2").click().run()
    assert loads == [f"models:/{MODEL}/2"]  # the champion only
    assert not at.exception
    expected = real(f"models:/{MODEL}/2").predict([text])[0] or "(empty: the model wrote end-of-text first)"
    assert [t.value for t in at.text] == [expected]
    at.button(key="try_3").click().run()
    assert loads == [f"models:/{MODEL}/2", f"models:/{MODEL}/3"]
    assert len(at.text) == 2 and at.text[0].value == expected  # side by side: champion, then version 3
    other = ROWS[1]["text"]  # a new text: the summaries follow it, no model loads again
    at.text_area(key="try_text").input(other)
    at.button(key="try_2").click().run()
    assert [t.value for t in at.text] == [real(f"models:/{MODEL}/2").predict([other])[0] or "(empty: the model wrote end-of-text first)"]
    assert len(loads) == 2


# ----------------------------------------------------------------------------- when there is little or nothing


def test_empty_registry_says_so(page):
    at = page("review-empty")
    assert not at.exception
    assert any("no version of `review-empty` yet" in a and "sftflow run" in a for a in _alerts(at))
    assert not at.tabs


def _bare_version(client, name: str, rouge_l: float | None, predictions: bool) -> tuple[int, str]:
    """A version made without a model (registry entries only): a run with metrics and, maybe, stored predictions."""
    import mlflow

    with mlflow.start_run() as run:
        if rouge_l is not None:
            mlflow.log_metrics({"evaluate.rouge-l": rouge_l, "evaluate.rouge-l_low": rouge_l - 1, "evaluate.rouge-l_high": rouge_l + 1})
        if predictions:
            mlflow.log_text("\n".join(json.dumps({"id": r["id"], "prediction": "p", "reference": r["summary"], "rouge-l": 1.0})
                                      for r in ROWS), "evaluate/predictions.jsonl")
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    mv = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id,
                                     tags={"split.test_sha256": "f" * 64})
    return int(mv.version), run.info.run_id


def test_one_version_renders_every_section(page, registry):
    from mlflow import MlflowClient

    client = MlflowClient()
    version, _ = _bare_version(client, "review-one", 21.5, predictions=False)
    client.set_registered_model_alias("review-one", "champion", str(version))
    at = page("review-one")
    assert not at.exception
    assert "Champion: version 1 · ROUGE-L 21.50 [20.50, 22.50]" in _texts(at)
    alerts = _alerts(at)
    assert any("selected version is the champion" in a for a in alerts)
    assert any("no measured quantized variant" in a for a in alerts)
    assert _frame_with(at, "decision")["decision"].tolist() == ["not yet gated"]


def test_artifacts_that_are_gone_are_a_message(page, registry):
    """v2's run artifacts are deleted from the store: Side by side and Try it say so, no traceback."""
    from mlflow import MlflowClient

    client = MlflowClient()
    name = "review-gone"
    v1, run1 = _bare_version(client, name, 20.0, predictions=True)
    v2, run2 = _bare_version(client, name, 22.0, predictions=True)
    client.set_registered_model_alias(name, "champion", str(v1))
    shutil.rmtree(Path(client.get_run(run2).info.artifact_uri.removeprefix("file://")))
    at = page(name)
    assert not at.exception
    alerts = _alerts(at)
    assert any("holds no evaluate/predictions.jsonl" in a and f"run {run2}" in a for a in alerts), alerts
    at.text_area(key="try_text").input("一段文字")
    at.button(key="try_2").click().run()
    assert not at.exception
    assert any("Cannot load version 2" in e.value and "sftflow.files_sha256" in e.value for e in at.error)


def test_a_store_that_does_not_exist_is_not_created(page, registry, tmp_path):
    missing = tmp_path / "nowhere" / "mlflow.db"
    at = page(MLFLOW_TRACKING_URI=f"sqlite:///{missing}")
    assert not at.exception
    assert any(f"no MLflow store at {missing}" in e.value and "MLFLOW_TRACKING_URI" in e.value for e in at.error)
    assert not missing.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_tracking_server_is_a_message(page):
    port = _free_port()  # nothing listens there
    started = time.monotonic()
    at = page(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    assert not at.exception
    assert any(f"tracking server at http://127.0.0.1:{port} does not answer" in e.value for e in at.error), [e.value for e in at.error]
    assert time.monotonic() - started < 30


def test_a_401_names_the_login_variables(page, monkeypatch):
    class Refuse(http.server.BaseHTTPRequestHandler):
        def _refuse(self):
            body = b'{"error_code": "UNAUTHENTICATED", "message": "You are not authenticated."}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _refuse

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    try:
        at = page(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{server.server_port}", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    finally:
        server.shutdown()
    assert not at.exception
    assert any("refused the request" in e.value and "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in e.value
               for e in at.error), [e.value for e in at.error]


def test_the_registry_is_read_once_per_cache_period(page, monkeypatch):
    from mlflow import MlflowClient

    calls = []
    real = MlflowClient.search_model_versions
    monkeypatch.setattr(MlflowClient, "search_model_versions", lambda self, *a, **k: calls.append(a) or real(self, *a, **k))
    name = f"review-cache-{os.getpid()}-{time.monotonic_ns()}"
    page(name)
    assert len(calls) == 1
    at = page(name)  # a second visit within review.cache_seconds
    assert len(calls) == 1 and not at.exception
    at.sidebar.button[0].click().run()  # "Refresh from the registry"
    assert len(calls) == 2


# ----------------------------------------------------------------------------- the login gate and exposure


def test_login_gate_shows_nothing_before_the_right_password(page, monkeypatch):
    from tasks import review

    monkeypatch.setattr(review, "LOGIN_DELAY_SECONDS", 0)
    at = page(SFTFLOW_REVIEW_AUTH=":".join(AUTH))
    assert not at.exception and not at.tabs and "Champion" not in _texts(at)
    at.text_input(key="login_user").input(AUTH[0])
    at.text_input(key="login_password").input("wrong")
    at.button[0].click().run()
    assert any("Wrong user or password" in e.value for e in at.error) and not at.tabs
    at.text_input(key="login_password").input(AUTH[1])
    at.button[0].click().run()
    assert not at.exception and "Champion: version 2" in _texts(at)


def test_credentials_compare_both_parts():
    from tasks.review import credentials_match

    assert credentials_match(AUTH, *AUTH)
    assert not credentials_match(AUTH, AUTH[0], AUTH[1] + "x")
    assert not credentials_match(AUTH, "other", AUTH[1])
    assert not credentials_match(AUTH, "", "")


def test_run_starts_streamlit_on_loopback_without_usage_statistics(monkeypatch, tiny_params):
    from tasks import review
    from tasks.core.config import load_params

    started = {}

    class FakePopen:
        def __init__(self, command, env):
            started["command"], started["env"] = command, env
            started["params"] = load_params(env["SFTFLOW_REVIEW_PARAMS"])  # the file exists while it runs
            started["script"] = Path(command[4]).read_text(encoding="utf-8")

        def wait(self):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(review.subprocess, "Popen", FakePopen)
    monkeypatch.delenv("SFTFLOW_REVIEW_AUTH", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    review.run(tiny_params)
    command = started["command"]
    flags = dict(zip(command[5::2], command[6::2]))
    assert command[:4] == [sys.executable, "-m", "streamlit", "run"]
    assert flags["--server.address"] == "127.0.0.1" and flags["--server.port"] == "8501"
    assert flags["--browser.gatherUsageStats"] == "false" and flags["--server.headless"] == "true"
    assert started["script"] == review.PAGE_SCRIPT
    assert started["params"].register.model_name == tiny_params.register.model_name
    assert started["env"]["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
    assert not Path(started["env"]["SFTFLOW_REVIEW_PARAMS"]).exists()  # removed when it stops
    monkeypatch.setenv("SFTFLOW_REVIEW_AUTH", ":".join(AUTH))
    review.run(tiny_params, host="0.0.0.0", port=9001)
    flags = dict(zip(started["command"][5::2], started["command"][6::2]))
    assert (flags["--server.address"], flags["--server.port"]) == ("0.0.0.0", "9001")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "review.example.com"])
def test_a_non_loopback_host_without_a_login_is_refused(monkeypatch, tiny_params, host, capsys):
    from tasks import review
    from tasks.cli import main

    def never(*args, **kwargs):
        raise AssertionError("streamlit was started")

    monkeypatch.setattr(review.subprocess, "Popen", never)
    monkeypatch.delenv("SFTFLOW_REVIEW_AUTH", raising=False)
    with pytest.raises(StageError, match=f"on {host!r} without a login.*Set SFTFLOW_REVIEW_AUTH=user:password"):
        review.run(tiny_params, host=host)
    assert main(["review", "-p", str(ROOT / "params.yaml"), "--host", host]) == 1
    assert "Set SFTFLOW_REVIEW_AUTH=user:password" in capsys.readouterr().err
    monkeypatch.setenv("SFTFLOW_REVIEW_AUTH", "no-colon")
    with pytest.raises(StageError, match="user:password"):
        review.run(tiny_params)


def test_safe_uri_hides_a_password():
    from tasks.review import safe_uri

    assert safe_uri("http://ann:s3cret@mlflow:5000/x") == "http://ann@mlflow:5000/x"
    assert safe_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


# ----------------------------------------------------------------------------- the real server, in a browser


@pytest.fixture
def dashboard(registry):
    """`sftflow review` on a free loopback port with a login, stopped (its whole process group) at the end."""
    port = _free_port()
    env = {**os.environ, "SFTFLOW_REVIEW_AUTH": ":".join(AUTH), "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}
    env.pop("SFTFLOW_REVIEW_PARAMS", None)
    log = registry["tmp"] / "review-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "sftflow"), "review", "-p", str(registry["params_file"]), "--port", str(port)],
            cwd=registry["tmp"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/_stcore/health", proc, log, timeout=90)
        yield url
    finally:
        stop_group(proc, timeout=20)


def test_dashboard_in_headless_chromium(dashboard, registry):
    from playwright.sync_api import expect, sync_playwright

    shot = registry["tmp"] / "review_page.png"
    champion = f"Champion: version 2 · ROUGE-L {_mean(V2):.2f}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(dashboard)
            page.get_by_role("textbox", name="User").fill(AUTH[0])
            page.get_by_role("textbox", name="Password").fill(AUTH[1])
            page.get_by_role("button", name="Log in").click()
            expect(page.get_by_text(champion)).to_be_visible(timeout=60_000)
            page.wait_for_timeout(1000)  # let the table draw before the screenshot
            page.screenshot(path=str(shot), full_page=True)
            body = page.inner_text("body")
            assert "Champion: version 2" in body and f"{_mean(V2):.2f}" in body
            # every other section draws in the browser too (charts by Vega, tables by the data grid)
            for tab, shown in (("Over time", "Figures"), ("Side by side", "Version 3 vs champion version 2"),
                               ("Lineage", "what the registry says"), ("Variants", "quantize.max_drop"),
                               ("Try it", "Summarize with version 3")):
                page.get_by_role("tab", name=tab).click()
                expect(page.get_by_text(shown).first).to_be_visible(timeout=30_000)
                if tab in {"Over time", "Variants"}:
                    expect(page.locator("[data-testid='stVegaLiteChart'] canvas, [data-testid='stVegaLiteChart'] svg")
                           .locator("visible=true").first).to_be_visible(timeout=30_000)
            assert page.locator("[data-testid='stException']").count() == 0
            assert page.locator("[data-testid='stAlertContentError']").count() == 0
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
