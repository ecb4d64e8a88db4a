"""`sftflow serve`: a Gradio app for the registry's champion, hot-reloaded when the alias moves.

The app loads `models:/<register.model_name>@champion` (the variant `serve:` names for this device;
`serve.variant_cpu: fastest` the quickest CPU variant quantize decided to serve, a GGUF one included, which
generates in llama.cpp through llama-cpp-python behind the same `generate` call), streams summaries in the page, and exposes `/summarize` (text in, summary out, the same greedy result
as the pyfunc's `predict`) to `gradio_client`. A background thread polls the alias every
`serve.poll_seconds`; when it moves, the new version is loaded first and then swapped in under a lock,
so a request holds the version it started with until it finishes. The side panel names the version
and variant serving, tables its test-split ROUGE-1/2/L with 95% intervals beside its base and the
lead-k baseline (and a served variant's own ROUGE-L and drop, as quantize scored it), and links the
review dashboard when `serve.review_url` is set.

Under each summary a rating (good / bad) and an optional corrected summary go to the feedback store
(`tasks.core.feedback`, `align.feedback_dir`) with the text, the version and variant that wrote it and
who sent it (the login when auth is on, else the client address); `/feedback` does the same for
`gradio_client`. Bad input and more than `serve.feedback_per_minute` a minute from one user are refused
with the reason, nothing written. The next retrain's `align` stage learns from the corrections.

Models load through `tasks.core.loading.load_registered`: every stored file is checked against the
hashes recorded at registration and no code from the artifact store runs, so a version changed in the
store is refused (the app keeps serving the version it has). The app binds 127.0.0.1; another address
(or a share link) needs a login, `SFTFLOW_APP_AUTH=user:password`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tasks.core.access import access_hint, login_from_env, refuse_exposure
from tasks.core.errors import StageError
from tasks.core.feedback import RATINGS, FeedbackRefused, FeedbackStore
from tasks.core.generation import GenerationSettings, encode_prompts, generate, greedy_config, repetition_processors
from tasks.core.io import iter_jsonl
from tasks.core.loading import MANIFEST_TAG, load_registered
from tasks.core.registry import CHAMPION, resolve_variant
from tasks.core.config import Params, env_flag
from tasks.core.stage_params import StageParams, stage_entry, stage_params
from tasks.core.tracking import setup_mlflow

log = logging.getLogger(__name__)

AUTH_ENV = "SFTFLOW_APP_AUTH"
SHARE_ENV = "SFTFLOW_SHARE"
EXAMPLE_ROWS = 5
# Registry bookkeeping, not lineage: kept out of the info panel.
HIDDEN_TAGS = (MANIFEST_TAG,)
# Run metrics shown in the info panel; the flow run also holds training curves nobody needs here.
METRIC_PREFIXES = ("evaluate.", "quantize.")
# The info panel's scores table: columns (metric key -> heading), the reference rows after the
# fine-tuned one (label, metric prefix), and what an unlogged score shows.
SCORE_COLUMNS = {"rouge-1": "ROUGE-1", "rouge-2": "ROUGE-2", "rouge-l": "ROUGE-L"}
SCORE_ROWS = (("base", "evaluate.base."), ("lead-k baseline", "evaluate.baseline."))
MISSING = "–"
# The version's own weights, as evaluate scored them (float32); any other (`int8`, `bf16`, `bnb-*`) is a
# registered variant, served in the dtype and on the device class quantize scored it in.
FULL_PRECISION = ("full",)


@dataclass(frozen=True)
class ServedVersion:
    """One loaded model version: what answers requests, and what the info panel says about it."""

    version: str
    variant: str
    uri: str
    model: Any
    tokenizer: Any
    settings: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    note: str | None = None

    @property
    def generation(self) -> GenerationSettings:
        """The generation settings the version was registered with (its `sftflow.json`)."""
        return GenerationSettings.from_dict(self.settings)

    def info(self) -> dict[str, Any]:
        """JSON-safe description: version, variant, URI, metrics, lineage tags and any note."""
        return {
            "version": self.version,
            "variant": self.variant,
            "uri": self.uri,
            "device": str(self.model.device),
            "metrics": dict(self.metrics),
            "tags": dict(self.tags),
            "note": self.note,
        }


def current_device() -> str:
    """`cuda` when a GPU is visible, else `cpu`: it picks `serve.variant_gpu` or `serve.variant_cpu`."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_version(params: StageParams, client: Any, model_version: Any, device: str | None = None) -> ServedVersion:
    """Load a registered version in the variant `serve:` asks for on this device.

    Which variant: `tasks.core.registry.resolve_variant` (the same decision `promote` scores by): a variant
    is served only when it is registered and was scored on this device class, in the dtype it was scored in.
    The files are verified and loaded by `tasks.core.loading.load_registered` (no code from the
    artifact store runs). When the variant is not registered, or was scored on another device class,
    full precision is served and the returned `note` (shown in the app) and the log say so.

    Args:
        params: the resolved params (`register.model_name`, `serve.variant_cpu/gpu`).
        client: an `MlflowClient` on the tracking store.
        model_version: the `ModelVersion` to load (of `register.model_name`).
        device: `cpu` or `cuda`; default: what `current_device` finds.

    Returns:
        The loaded version.

    Raises:
        StageError: the model cannot be loaded from the registry, or its stored files differ from
            those registered.
    """
    device = device or current_device()
    variant, uri, note = resolve_variant(params, model_version, device)
    if note:
        log.warning(note)
    # full: float32 on this device (on a GPU placed by tasks.core.modeling.inference_placement, checked to fit
    # before loading); a variant: where and in which dtype quantize scored it (its marker).
    loaded = load_registered(uri, client=client, device=device)
    model, tokenizer = loaded.model, loaded.tokenizer
    tags = dict(model_version.tags or {})
    metrics = {k: float(v) for k, v in tags.items() if k.startswith(METRIC_PREFIXES) and _is_number(v)}
    metrics.update(_run_metrics(client, model_version.run_id))
    return ServedVersion(
        version=str(model_version.version),
        variant=variant,
        uri=uri,
        model=model,
        tokenizer=tokenizer,
        settings=dict(loaded.settings),
        metrics=dict(sorted(metrics.items())),
        tags={k: v for k, v in sorted(tags.items()) if not k.startswith(METRIC_PREFIXES) and k not in HIDDEN_TAGS},
        note=note,
    )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def _run_metrics(client: Any, run_id: str | None) -> dict[str, float]:
    """The evaluate/quantize metrics of the run that logged the version ({} when it is gone)."""
    if not run_id:
        return {}
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as e:  # the panel is informative only; a deleted run must not stop serving
        log.warning("cannot read the metrics of run %s: %s", run_id, e)
        return {}
    return {k: v for k, v in sorted(run.data.metrics.items()) if k.startswith(METRIC_PREFIXES)}


class ChampionServer:
    """Holds the champion in memory and swaps it atomically when the registry alias moves.

    Args:
        params: the resolved params.
        client: an `MlflowClient`; default: one on the URI `tasks.core.tracking.setup_mlflow` sets.
    """

    def __init__(self, params: Params | StageParams, client: Any = None) -> None:
        params = stage_params(params, "serve")
        if client is None:
            from mlflow import MlflowClient

            setup_mlflow(params.register.experiment)
            client = MlflowClient()
        self.params = params
        self.client = client
        self._lock = threading.Lock()  # guards the reference only; requests never wait on a load
        self._refresh_lock = threading.Lock()  # one load at a time, so an older alias never lands last
        self._current: ServedVersion | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> ServedVersion:
        """The version serving now (load it first with `refresh` or `start`)."""
        with self._lock:
            if self._current is None:
                raise StageError("no model loaded yet: call ChampionServer.refresh() or start() first")
            return self._current

    def champion_version(self) -> Any:
        """The `ModelVersion` the alias points at now."""
        from mlflow.exceptions import MlflowException

        name = self.params.register.model_name
        try:
            return self.client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException as e:
            store = os.environ.get("MLFLOW_TRACKING_URI") or "unset: the project's mlflow.db"
            fix = access_hint(e) or " If no model is champion yet, run `sftflow register` and `sftflow promote` first"
            raise StageError(
                f"cannot find alias {CHAMPION!r} of registered model {name!r} (MLFLOW_TRACKING_URI={store}): {e}.{fix}"
            ) from e

    def refresh(self) -> bool:
        """Load the champion if it changed since the last look; return True when it was swapped in."""
        with self._refresh_lock:
            target = self.champion_version()
            with self._lock:
                serving = self._current.version if self._current else None
            if serving == str(target.version):
                return False
            new = load_version(self.params, self.client, target)  # outside _lock: requests go on meanwhile
            with self._lock:
                self._current = new
        log.info("serving %s version %s (%s, %s)", self.params.register.model_name, new.version, new.variant, new.uri)
        return True

    def start(self) -> None:
        """Load the champion now and poll the alias every `serve.poll_seconds` in a daemon thread."""
        self.refresh()
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, name="champion-poll", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop polling (the loaded model stays until the object goes)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _poll(self) -> None:
        while not self._stop.wait(self.params.serve.poll_seconds):
            try:
                self.refresh()
            except Exception:  # a registry hiccup or a broken new version must not take the app down
                with self._lock:
                    serving = self._current.version if self._current else None
                log.exception("checking the champion alias failed; still serving version %s", serving)


def check_text(text: Any, max_chars: int) -> str:
    """Return the text if the app can summarise it; raise `gr.Error` with the reason otherwise."""
    import gradio as gr

    if not isinstance(text, str):
        raise gr.Error(f"the input must be text (a string), got {type(text).__name__}")
    if not text.strip():
        raise gr.Error("the input is empty: paste the text to summarise")
    if len(text) > max_chars:
        raise gr.Error(f"the input has {len(text)} characters; the limit is {max_chars} (serve.max_chars): shorten it")
    return text


def summarize(served: ServedVersion, text: str) -> str:
    """The final summary of one text, exactly as the pyfunc's `predict` gives it (the same `generate`)."""
    return generate(served.model, served.tokenizer, [text], served.generation)[0]


def prompt_ids(tokenizer: Any, text: str, settings: dict[str, Any]) -> list[int]:
    """The prompt tokens `tasks.core.generation.generate` feeds the model for this text and these settings."""
    return encode_prompts(tokenizer, [text], GenerationSettings.from_dict(settings))[0]


def stream_summary(served: ServedVersion, text: str, max_new_tokens: int) -> Iterator[str]:
    """Yield the summary as it grows (greedy, the same tokens `tasks.core.generation.generate` picks)."""
    import torch
    from transformers import TextIteratorStreamer

    model, tokenizer, settings = served.model, served.tokenizer, served.generation
    ids = torch.tensor([prompt_ids(tokenizer, text, served.settings)], dtype=torch.long, device=model.device)
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    # The same config, stop tokens and repetition controls as `generate` (one row: no padding).
    config = greedy_config(model, tokenizer, int(max_new_tokens), use_chat_template=settings.use_chat_template)
    processors = repetition_processors(settings, ids.shape[1])
    failure: list[Exception] = []

    def work() -> None:
        try:
            with torch.inference_mode():
                model.generate(**enc, generation_config=config, logits_processor=processors, streamer=streamer)
        except Exception as e:  # noqa: BLE001 - re-raised in the request thread below; end() unblocks its loop
            failure.append(e)
            streamer.end()

    worker = threading.Thread(target=work, name="generate-stream", daemon=True)
    worker.start()
    text_so_far = ""
    shown = None
    for piece in streamer:
        text_so_far += piece
        if text_so_far.strip() != shown:  # the streamer emits "" while it holds back a partial word
            shown = text_so_far.strip()
            yield shown
    worker.join()
    if failure:
        raise StageError(f"generation failed: {failure[0]}") from failure[0]
    if shown is None:  # the first new token was eos: say so with an empty summary, as predict does
        yield ""


def _score_cell(metrics: dict[str, float], key: str) -> str:
    """`mean [low, high]` of a logged metric (`key`, `key_low`, `key_high`), the mean alone without its CI, or "–"."""
    if key not in metrics:
        return MISSING
    low, high = metrics.get(f"{key}_low"), metrics.get(f"{key}_high")
    ci = f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else ""
    return f"{metrics[key]:.2f}{ci}"


def scores_table(served: ServedVersion) -> list[str]:
    """The panel's table: fine-tuned, base and lead-k baseline on the test split, ROUGE-1/2/L as `mean [95% CI]`.

    Read from the version's run metrics (`evaluate.<m>`, `evaluate.base.<m>`, `evaluate.baseline.<m>` and
    their `_low`/`_high`: the full model in float32); a variant served (`int8`, `bf16`, `bnb-*`) adds its own
    row, the figures registered for it: `quantize.<variant>.rouge-l` (scored in its dtype on its device
    class) and its drop from full precision. What was not logged shows "–".
    """
    m = served.metrics
    variant = served.variant not in FULL_PRECISION
    lines = ["| | " + " | ".join(SCORE_COLUMNS.values()) + " |", "|---" + "|---:" * len(SCORE_COLUMNS) + "|"]
    own = "full" if variant else f"{served.variant}, served"
    for label, prefix in ((f"fine-tuned (v{served.version}, {own})", "evaluate."), *SCORE_ROWS):
        lines.append(f"| {label} | " + " | ".join(_score_cell(m, prefix + k) for k in SCORE_COLUMNS) + " |")
    if variant:
        key = f"quantize.{served.variant}.rouge-l"
        drop = m.get(f"{key}_drop")
        cell = MISSING if key not in m else f"{m[key]:.2f}" + (f" (drop {drop:.2f})" if drop is not None else "")
        lines.insert(3, f"| fine-tuned (v{served.version}, {served.variant}, served) | {MISSING} | {MISSING} | {cell} |")
    return lines


def _collapsed(title: str, items: list[str]) -> list[str]:
    """A closed `<details>` section holding a markdown list (blank lines keep the list markdown)."""
    return ["", "<details>", f"<summary>{title}</summary>", "", *items, "", "</details>"]


def info_markdown(served: ServedVersion, model_name: str, review_url: str = "") -> str:
    """The info panel: serving version and variant, the scores table, a link to the review dashboard
    (`serve.review_url`, when set), then every logged metric and the lineage tags, collapsed."""
    info = served.info()
    lines = [f"### Serving `{model_name}` version {info['version']} (`@{CHAMPION}`)"]
    if info["note"]:
        lines.append(f"> **Note:** {info['note']}")
    lines += ["", f"- variant: `{info['variant']}` on `{info['device']}`", f"- model URI: `{info['uri']}`"]
    if review_url:
        lines.append(f"- [review dashboard]({review_url}): every version, why this one serves, outputs side by side")
    lines += ["", "**Test split, F1 × 100, mean [95% CI]**", "", *scores_table(served)]
    metrics = [f"- `{k}`: {v:.4g}" for k, v in info["metrics"].items()] or ["- (none logged)"]
    lines += _collapsed(f"All metrics ({len(info['metrics'])})", metrics)
    tags = [f"- `{k}`: `{v}`" for k, v in sorted(info["tags"].items())] or ["- (no tags)"]
    lines += _collapsed(f"Lineage tags ({len(info['tags'])})", tags)
    return "\n".join(lines)


def feedback_user(request: Any) -> str:
    """Who sent a request: the app's login when auth is on, else the client's address (the rate limit's key)."""
    if request is None:
        return "anonymous"
    if getattr(request, "username", None):
        return str(request.username)
    client = getattr(request, "client", None)
    host = getattr(client, "host", None)
    return f"ip:{host}" if host else "anonymous"


def save_feedback(store: FeedbackStore, model_name: str, served: dict[str, str], text: str, output: str,
                  rating: str | None, correction: str | None, user: str) -> dict[str, Any]:
    """Store one rating (and correction) of a summary; a refusal becomes `gr.Error` with the reason, nothing written."""
    import gradio as gr

    try:
        return store.submit(text=text if isinstance(text, str) else "", output=output if isinstance(output, str) else "",
                            rating=rating, correction=correction if isinstance(correction, str) else None,
                            model_name=model_name, model_version=served.get("version", ""),
                            variant=served.get("variant", ""), user=user)
    except FeedbackRefused as e:
        raise gr.Error(str(e)) from e


def example_texts(params: StageParams, n: int = EXAMPLE_ROWS) -> list[str]:
    """The first `n` texts of the test split, when the split stage has run ([] otherwise)."""
    path = params.layout.split("test")
    if not path.exists():
        return []
    texts = []
    for row in iter_jsonl(path):
        texts.append(row["text"])
        if len(texts) == n:
            break
    return texts


@stage_entry("serve")
def build_app(params: StageParams, server: ChampionServer | None = None) -> Any:
    """Build the Gradio Blocks app (not launched).

    Args:
        params: the resolved params (`serve:`, `register.model_name`, `paths`).
        server: the champion holder; default: a new one, started (loaded and polling).

    Returns:
        The `gr.Blocks`, its queue set to `serve.concurrency_limit` requests at a time.

    Raises:
        StageError: there is no champion to serve (from `ChampionServer.start`).
    """
    import gradio as gr

    if server is None:
        server = ChampionServer(params)
        server.start()
    cfg = params.serve
    model_name = params.register.model_name
    first = server.current
    default_new_tokens = int(first.settings.get("max_new_tokens", 64))
    feedback = FeedbackStore(params.align.feedback_dir, max_chars=cfg.max_chars, per_minute=cfg.feedback_per_minute)

    def ui_summarize(text: Any, max_new_tokens: float) -> Iterator[tuple[str, dict[str, str]]]:
        check_text(text, cfg.max_chars)
        served = server.current  # this request keeps this version even if the alias moves meanwhile
        # What the feedback controls attach a rating to: this text, and the version and variant that wrote it.
        shown = {"text": text, "version": served.version, "variant": served.variant}
        for chunk in stream_summary(served, text, int(max_new_tokens)):
            yield chunk, shown

    def ui_feedback(shown: dict[str, str] | None, output: str, rating: str | None, correction: str,
                    request: gr.Request) -> tuple[str, Any, Any]:
        if not shown:
            raise gr.Error("feedback not saved: summarise a text first")
        save_feedback(feedback, model_name, shown, shown["text"], output, rating, correction, feedback_user(request))
        return "Thank you: feedback saved.", gr.update(value=None), gr.update(value="")

    def api_feedback(text: str, output: str, rating: str, correction: str = "", request: gr.Request = None) -> dict:
        """Rate a summary of the champion (`good` / `bad`), optionally with a corrected summary; returns the stored record's id."""
        served = server.current
        record = save_feedback(feedback, model_name, {"version": served.version, "variant": served.variant},
                               text, output, rating, correction or None, feedback_user(request))
        return {"saved": True, "id": record["id"], "version": record["model_version"]}

    # Gradio finds the request parameter by its type, which `from __future__ import annotations` leaves as the
    # string "gr.Request" (gradio is imported in here, not at module level): give it the class.
    for fn in (ui_feedback, api_feedback):
        fn.__annotations__["request"] = gr.Request

    def api_summarize(text: str) -> str:
        """Summarise one text with the champion (greedy, same as the MLflow pyfunc's predict)."""
        check_text(text, cfg.max_chars)
        return summarize(server.current, text)

    def api_model_info() -> dict:
        """The serving version: number, variant, URI, metrics and lineage tags."""
        return server.current.info()

    with gr.Blocks(title="sftflow summarizer") as demo:
        gr.Markdown("# sftflow summarizer\nPaste a text; the registry's champion writes its summary.")
        with gr.Row():
            with gr.Column(scale=3):
                text_box = gr.Textbox(label="Text", lines=8, placeholder="Text to summarise", elem_id="input-text")
                with gr.Accordion("Generation settings", open=False):
                    new_tokens = gr.Slider(
                        1, max(512, default_new_tokens), value=default_new_tokens, step=1, label="Max new tokens"
                    )
                button = gr.Button("Summarize", variant="primary", elem_id="summarize-button")
                summary_box = gr.Textbox(label="Summary", lines=3, interactive=False, elem_id="summary")
                shown = gr.State(None)
                with gr.Group(elem_id="feedback"):
                    rating = gr.Radio(list(RATINGS), label="Was this summary good?", elem_id="feedback-rating")
                    correction = gr.Textbox(label="Corrected summary (optional)", lines=2, elem_id="feedback-correction",
                                            placeholder="Write the summary it should have written")
                    send = gr.Button("Send feedback", elem_id="feedback-button")
                    feedback_status = gr.Markdown(elem_id="feedback-status")
                texts = example_texts(params)
                if texts:
                    gr.Examples([[t] for t in texts], inputs=[text_box], label="Examples from the test split")
            with gr.Column(scale=2):
                info_panel = gr.Markdown(info_markdown(first, model_name, cfg.review_url), elem_id="model-info")
        for trigger in (button.click, text_box.submit):
            trigger(ui_summarize, [text_box, new_tokens], [summary_box, shown], api_visibility="private")
        # Appending a line under a lock is cheap: feedback does not wait behind generations.
        send.click(ui_feedback, [shown, summary_box, rating, correction], [feedback_status, rating, correction],
                   api_visibility="private", concurrency_limit=None)
        gr.api(api_summarize, api_name="summarize")
        gr.api(api_feedback, api_name="feedback", concurrency_limit=None)
        gr.api(api_model_info, api_name="model_info", concurrency_limit=None)
        # The panel follows the alias: read on page load and as often as the server polls. Cheap, so
        # outside the concurrency limit (a tick must not wait behind generations).
        refresh = {"fn": lambda: info_markdown(server.current, model_name, cfg.review_url), "inputs": None, "outputs": info_panel,
                   "api_visibility": "private", "concurrency_limit": None, "show_progress": "hidden"}
        demo.load(**refresh)
        gr.Timer(cfg.poll_seconds).tick(**refresh)
    demo.queue(default_concurrency_limit=cfg.concurrency_limit)
    return demo


def check_exposure(host: str, auth: tuple[str, str] | None, share: bool) -> None:
    """Refuse to serve beyond this machine (another address, or a share link) without a login.

    Raises:
        StageError: naming `SFTFLOW_APP_AUTH`, when `host` is not loopback or `share` is on and auth is off.
    """
    if auth is None and share:
        raise StageError(f"{SHARE_ENV} asks for a public share link, but {AUTH_ENV} is not set: "
                         f"set {AUTH_ENV}=user:password so the link needs a login")
    refuse_exposure(host, auth, variable=AUTH_ENV, action="serve",
                    risk="any machine that reaches it could use the app", setting="serve.host")


def auth_from_env() -> tuple[str, str] | None:
    """Basic-auth credentials from `SFTFLOW_APP_AUTH=user:password`, or None when unset."""
    return login_from_env(AUTH_ENV, "serve without a login on 127.0.0.1")


@stage_entry("serve")
def run(params: StageParams, host: str | None = None, port: int | None = None) -> None:
    """Serve the champion until interrupted.

    Args:
        params: the resolved params.
        host: bind address; default `serve.host` (127.0.0.1: only this machine).
        port: port; default `serve.port`.

    Raises:
        StageError: no champion, a model that cannot load, a malformed `SFTFLOW_APP_AUTH`, or a
            non-loopback host (or share link) without `SFTFLOW_APP_AUTH`.
    """
    auth = auth_from_env()
    share = env_flag(SHARE_ENV)
    host = host or params.serve.host
    port = port or params.serve.port
    check_exposure(host, auth, share)  # before loading anything: a refused setting fails in a second
    server = ChampionServer(params)
    server.start()
    try:
        demo = build_app(params, server)
        log.info(
            "serving on http://%s:%d (auth %s, public share link %s)",
            host, port, "on" if auth else "off", "on" if share else "off",
        )
        demo.launch(server_name=host, server_port=port, auth=auth, share=share, show_error=True)
    finally:
        server.stop()
