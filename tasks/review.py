"""`sftflow review`: the reviewer's dashboard (Streamlit) over the MLflow registry.

It answers "which model serves, why, and how do its outputs differ from another version's" in six
sections: **Versions** (one row per version, the champion marked), **Over time** (ROUGE-1/2/L with
their 95% intervals per version, the base model and the lead-k baseline as reference lines),
**Side by side** (the champion and the selected version on the same test rows, sorted by the per-row
ROUGE-L difference, with the reference), **Lineage** (the facts `sftflow lineage` prints),
**Variants** (the quantization trade-off) and **Try it** (one text, summarised by both).

Where each fact comes from, read only through the registry:

- a version's metrics: the run that registered it (`evaluate.rouge-l`, `_low`, `_high`, `evaluate.base.*`,
  `evaluate.baseline.*`, `quantize.<method>.*`), read for every version in a few searches
  (`tasks.core.registry.runs_by_id`); its lineage and why it is champion or challenger: its tags
  (`promote.decision`, `promote.reason`) and description;
- test-row outputs: its run's `evaluate/predictions.jsonl` (the flow logs `artifacts/evaluate/` with
  `tasks.core.tracking.log_stage`), and the per-row ROUGE-L `promote` compared (`row_scores/<key>.json`).

What the page reads is cached: the registry for `review.cache_seconds` (`st.cache_data`), a run's
stored predictions and scores until the page restarts (they never change), and at most two models
for Try it (`st.cache_resource`), each loaded only when its button is pressed, through
`tasks.core.loading.load_registered` (every file checked against its registration hashes; no code
from the artifact store runs).

The dashboard binds 127.0.0.1. `SFTFLOW_REVIEW_AUTH=user:password` turns on its own login page
(Streamlit has none); another address without it is refused. Streamlit's usage statistics are off.
A registry it cannot read (no store, a server that does not answer, a 401), no version, or a run
whose artifacts are gone shows a message that says so and what to do, not a traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tasks.core.access import access_hint, credentials_match, login_from_env, refuse_exposure, safe_uri
from tasks.core.config import DEFAULT_PARAMS_FILE, ParamsError, load_params
from tasks.core.errors import StageError
from tasks.core.io import read_jsonl
from tasks.core.registry import (
    CHAMPION,
    DECISION_TAG,
    SETTINGS_SHA_TAG,
    lineage_of,
    read_row_scores,
    row_scores_key,
    runs_by_id,
)
from tasks.core.scoring import SCORING_VERSION
from tasks.core.stage_params import StageParams, stage_entry, stage_params
from tasks.core.tracking import tracking_uri

log = logging.getLogger(__name__)

AUTH_ENV = "SFTFLOW_REVIEW_AUTH"
# The resolved params `run` hands the page (a file it writes); unset, the page reads ./params.yaml.
PARAMS_ENV = "SFTFLOW_REVIEW_PARAMS"
# `artifacts/evaluate/predictions.jsonl`, logged into the flow's run by `tasks.core.tracking.log_stage`.
PREDICTIONS_ARTIFACT = "evaluate/predictions.jsonl"
# What `streamlit run` executes. A script inside tasks/ would put tasks/ on sys.path, where
# tasks/select.py shadows the standard library's `select`; this one lives in a temporary folder.
PAGE_SCRIPT = "from tasks.review import page\n\npage()\n"
# MLflow's client retries a server that does not answer for minutes; the page says so in seconds.
# A value set in the environment wins.
CLIENT_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                       "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
SECTIONS = ("Versions", "Over time", "Side by side", "Lineage", "Variants", "Try it")
METRIC_LABELS = {"rouge-1": "ROUGE-1", "rouge-2": "ROUGE-2", "rouge-l": "ROUGE-L"}
# The three systems evaluate scores on the same test rows, and the prefix of their run metrics.
SYSTEMS = {"fine-tuned": "evaluate.", "base": "evaluate.base.", "lead-k baseline": "evaluate.baseline."}
LOGIN_DELAY_SECONDS = 1.0  # after a wrong password: slows guessing
_LOGGED_IN = "sftflow_review_logged_in"
_TRY_RESULTS = "sftflow_review_try"


# ----------------------------------------------------------------------------- what the registry holds


@dataclass(frozen=True)
class VersionRecord:
    """One version of the registered model, with the metrics and params of the run that registered it.

    Attributes:
        version: version number.
        created: when it was registered (UTC, minutes).
        run_id: the run that registered it (None for a version made outside a run).
        tags: its tags (lineage, promotion decision).
        description: its description (why it is champion or challenger).
        aliases: the aliases pointing at it.
        metrics: the metrics of its run ({} when the run is gone).
        params: the params of its run (`train.method`...).
        run_found: whether its run still exists.
    """

    version: int
    created: str
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""
    aliases: tuple[str, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    run_found: bool = True

    @property
    def is_champion(self) -> bool:
        """Whether `champion` points at this version."""
        return CHAMPION in self.aliases

    def score(self, metric: str = "rouge-l", system: str = "fine-tuned") -> tuple[float, float | None, float | None] | None:
        """(mean, 95% low, 95% high) of a metric for a system on this version's test rows, or None."""
        prefix = SYSTEMS[system] + metric
        if prefix not in self.metrics:
            return None
        return self.metrics[prefix], self.metrics.get(f"{prefix}_low"), self.metrics.get(f"{prefix}_high")

    def reason(self) -> str:
        """Why it is what it is: the gate's reason, else its description."""
        return self.tags.get("promote.reason") or self.description or ""


@dataclass(frozen=True)
class Snapshot:
    """The registered model as read at one moment.

    Attributes:
        model_name: the registered model.
        store: the tracking URI, without any password.
        versions: newest first.
        read_at: when it was read (UTC).
    """

    model_name: str
    store: str
    versions: tuple[VersionRecord, ...]
    read_at: str

    @property
    def champion(self) -> VersionRecord | None:
        """The version `champion` points at, or None."""
        return next((v for v in self.versions if v.is_champion), None)

    def get(self, version: int) -> VersionRecord:
        """The record of a version number (KeyError when there is none)."""
        for v in self.versions:
            if v.version == int(version):
                return v
        raise KeyError(f"{self.model_name} has no version {version}")


def store_problem(error: Exception, store: str) -> str:
    """What to tell the reviewer when the registry cannot be read: the cause and the fix."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = text if len(text) <= 300 else text[:300] + "…"
    where = safe_uri(store)
    hint = access_hint(error)
    if hint:
        return f"The tracking server at {where} refused the request ({text}).{hint}"
    unreachable = ("Connection refused", "Max retries exceeded", "Failed to establish", "timed out", "Name or service not known")
    if any(s in str(error) for s in unreachable):
        return (f"The tracking server at {where} does not answer: start it, or point MLFLOW_TRACKING_URI at one "
                f"that runs ({text}).")
    return f"Cannot read the registry at {where}: {text}"


def _client(store: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store, registry_uri=store)


def _check_store(store: str) -> None:
    """Refuse a sqlite store that does not exist (MLflow would create an empty one)."""
    if store.startswith("sqlite:///"):
        path = Path(store[len("sqlite:///"):])
        if not path.is_file():
            raise StageError(
                f"There is no MLflow store at {path}: run `sftflow run` in this folder first, or set "
                "MLFLOW_TRACKING_URI to the tracking server that holds the registry."
            )


def _created(ms: int | None) -> str:
    if not ms:
        return "?"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")


def read_registry(store: str, model_name: str) -> Snapshot:
    """Every version of `model_name` with its aliases, tags, description and its run's metrics.

    A few calls whatever the number of versions: one search of versions, one of the registered
    model, and the runs in batches (`runs_by_id`).

    Args:
        store: the tracking URI.
        model_name: the registered model (`register.model_name`).

    Returns:
        The snapshot; no versions when the model is not registered yet.

    Raises:
        StageError: the store does not exist or cannot be read (with the reason and the fix).
    """
    from mlflow.exceptions import MlflowException

    _check_store(store)
    client = _client(store)
    try:
        found = client.search_model_versions(f"name = '{model_name}'")
        aliases = client.get_registered_model(model_name).aliases if found else {}
        runs = runs_by_id(client, [v.run_id for v in found])
    except (MlflowException, OSError) as e:
        raise StageError(store_problem(e, store)) from e
    by_version: dict[str, list[str]] = {}
    for alias, version in (aliases or {}).items():
        by_version.setdefault(str(version), []).append(alias)
    versions = []
    for mv in sorted(found, key=lambda v: int(v.version), reverse=True):
        run = runs.get(mv.run_id) if mv.run_id else None
        versions.append(VersionRecord(
            version=int(mv.version),
            created=_created(mv.creation_timestamp),
            run_id=mv.run_id or None,
            tags=dict(mv.tags or {}),
            description=mv.description or "",
            aliases=tuple(sorted(by_version.get(str(mv.version), []))),
            metrics=dict(run.data.metrics) if run else {},
            params=dict(run.data.params) if run else {},
            run_found=run is not None,
        ))
    return Snapshot(model_name, safe_uri(store), tuple(versions), datetime.now(timezone.utc).strftime("%H:%M:%S UTC"))


def read_predictions(store: str, run_id: str) -> list[dict[str, Any]]:
    """The test-row predictions a run stored (`evaluate/predictions.jsonl`: id, text, reference, prediction, scores).

    Raises:
        StageError: the run has none (artifacts gone, or the version was registered outside the flow).
    """
    from mlflow.exceptions import MlflowException

    client = _client(store)
    try:
        names = {f.path for f in client.list_artifacts(run_id, PREDICTIONS_ARTIFACT.rsplit("/", 1)[0])}
        if PREDICTIONS_ARTIFACT not in names:
            raise StageError(
                f"run {run_id} holds no {PREDICTIONS_ARTIFACT}: its artifacts are gone, or the version was "
                "registered outside the flow (`sftflow run` logs the test predictions)."
            )
        with tempfile.TemporaryDirectory(prefix="sftflow-review-") as tmp:
            return read_jsonl(Path(client.download_artifacts(run_id, PREDICTIONS_ARTIFACT, tmp)))
    except (MlflowException, OSError) as e:
        raise StageError(f"cannot read {PREDICTIONS_ARTIFACT} of run {run_id}: {store_problem(e, store)}") from e
    except ValueError as e:  # a malformed line
        raise StageError(f"{PREDICTIONS_ARTIFACT} of run {run_id} is not valid JSON Lines: {e}") from e


def read_scores(store: str, run_id: str, key: str) -> dict[str, float] | None:
    """The per-row ROUGE-L a run stored under `key`, or None (a store error is a StageError)."""
    from mlflow.exceptions import MlflowException

    try:
        return read_row_scores(_client(store), run_id, key)
    except (MlflowException, OSError) as e:
        raise StageError(f"cannot read the row scores of run {run_id}: {store_problem(e, store)}") from e


# ----------------------------------------------------------------------------- what the sections show


def _ci(low: float | None, high: float | None) -> str:
    return f"[{low:.2f}, {high:.2f}]" if low is not None and high is not None else ""


def versions_table(snapshot: Snapshot) -> Any:
    """One row per version, newest first: champion mark, aliases, created, data hash, base, method, ROUGE-L
    and its CI, the promotion decision and its reason."""
    import pandas as pd

    rows = []
    for v in snapshot.versions:
        score = v.score()
        rows.append({
            "version": v.version,
            "champion": "★" if v.is_champion else "",
            "aliases": ", ".join(v.aliases),
            "created (UTC)": v.created,
            "data": (v.tags.get("data.sha256") or v.tags.get("data.dvc_md5") or "?")[:12],
            "base": v.tags.get("model.base", "?"),
            "method": v.params.get("train.method", "?"),
            "ROUGE-L": score[0] if score else None,
            "95% CI": _ci(*score[1:]) if score else "",
            "decision": v.tags.get(DECISION_TAG, "not yet gated"),
            "reason": v.reason(),
        })
    return pd.DataFrame(rows)


def over_time_frame(snapshot: Snapshot) -> Any:
    """Long table, oldest version first: version, metric, system, value, low, high (only what was measured)."""
    import pandas as pd

    rows = []
    for v in sorted(snapshot.versions, key=lambda r: r.version):
        for metric, label in METRIC_LABELS.items():
            for system in SYSTEMS:
                score = v.score(metric, system)
                if score is not None:
                    rows.append({"version": v.version, "metric": label, "system": system,
                                 "value": score[0], "low": score[1], "high": score[2]})
    return pd.DataFrame(rows, columns=["version", "metric", "system", "value", "low", "high"])


def over_time_chart(frame: Any) -> Any:
    """ROUGE per version with its interval; base and lead-k baseline as dashed reference lines; one panel per metric."""
    import altair as alt

    systems = list(SYSTEMS)
    color = alt.Color("system:N", scale=alt.Scale(domain=systems, range=["#1f77b4", "#7f7f7f", "#ff7f0e"]), title=None)
    base = alt.Chart().encode(x=alt.X("version:O", title="version"))
    fine = base.transform_filter(alt.datum.system == "fine-tuned")
    tooltip = ["version:O", "system:N", alt.Tooltip("value:Q", format=".2f"), alt.Tooltip("low:Q", format=".2f"),
               alt.Tooltip("high:Q", format=".2f")]
    layers = alt.layer(
        fine.mark_errorbar(ticks=True).encode(y=alt.Y("low:Q", title="F1 × 100"), y2="high:Q", color=color),
        fine.mark_line(point=True).encode(y="value:Q", color=color, tooltip=tooltip),
        base.transform_filter(alt.datum.system != "fine-tuned")
        .mark_line(strokeDash=[5, 4], point=alt.OverlayMarkDef(size=20))
        .encode(y="value:Q", color=color, tooltip=tooltip),
        data=frame,
    ).properties(width=240, height=280)
    return layers.facet(column=alt.Column("metric:N", sort=list(METRIC_LABELS.values()), title=None)).resolve_scale(y="independent")


@dataclass(frozen=True)
class SideBySide:
    """The champion and another version on the same test rows.

    Attributes:
        rows: DataFrame sorted by `Δ ROUGE-L` (version − champion), most negative first.
        test_sha256: the test split compared on (the other version's).
        sources: where each side's per-row scores came from.
        notes: rows left out and why.
    """

    rows: Any
    test_sha256: str
    sources: dict[str, str]
    notes: tuple[str, ...] = ()


def row_scores_of(
    store: str, record: VersionRecord, test_sha: str, predictions: list[dict[str, Any]] | None, scores_reader: Any = read_scores
) -> tuple[dict[str, float], str | None]:
    """Per-row ROUGE-L of a version on test split `test_sha`, and where they came from.

    First the scores promote compares (`row_scores/<key>.json`, keyed by test split, the version's
    settings and the scoring version), else the `rouge-l` of its stored predictions when they were
    made on that split; ({}, None) when neither exists.
    """
    if record.run_id:
        key = row_scores_key(test_sha, record.tags.get(SETTINGS_SHA_TAG), SCORING_VERSION)
        stored = scores_reader(store, record.run_id, key)
        if stored is not None:
            return stored, f"row_scores/{key}.json"
    if predictions and record.tags.get("split.test_sha256") == test_sha:
        return {str(p["id"]): float(p["rouge-l"]) for p in predictions if isinstance(p.get("rouge-l"), (int, float))}, PREDICTIONS_ARTIFACT
    return {}, None


def side_by_side(
    champion: VersionRecord,
    other: VersionRecord,
    champion_predictions: list[dict[str, Any]],
    other_predictions: list[dict[str, Any]],
    champion_scores: dict[str, float],
    other_scores: dict[str, float],
    sources: dict[str, str],
) -> SideBySide:
    """Pair the two versions' outputs row by row on the other version's test rows, sorted by the ROUGE-L difference.

    Only rows both have a score for are kept (ties keep the test split's order); the champion's
    output is blank for a row its stored predictions lack (it was scored on them later, by promote).
    """
    import pandas as pd

    theirs = {str(p["id"]): p for p in champion_predictions}
    rows, unscored = [], 0
    for p in other_predictions:
        row_id = str(p["id"])
        if row_id not in other_scores or row_id not in champion_scores:
            unscored += 1
            continue
        mine, base = other_scores[row_id], champion_scores[row_id]
        rows.append({
            "id": row_id,
            "Δ ROUGE-L": mine - base,
            f"v{champion.version} ROUGE-L": base,
            f"v{other.version} ROUGE-L": mine,
            f"v{champion.version} (champion) output": theirs.get(row_id, {}).get("prediction", ""),
            f"v{other.version} output": p.get("prediction", ""),
            "reference": p.get("reference", ""),
            "text": p.get("text", ""),
        })
    frame = pd.DataFrame(rows)
    if len(frame):
        frame = frame.sort_values("Δ ROUGE-L", kind="stable").reset_index(drop=True)
    notes = (f"{unscored} rows left out: no per-row score for both versions",) if unscored else ()
    return SideBySide(frame, other.tags.get("split.test_sha256", "?"), sources, notes)


def variants_frame(record: VersionRecord) -> Any:
    """The version's quantized variants beside full precision: size, latency, ROUGE-L and its drop, passed."""
    import pandas as pd

    m = record.metrics
    names = sorted({k.split(".")[1] for k in m if k.startswith("quantize.") and k.endswith(".rouge-l") and k.count(".") == 2})
    full = next((n for n in ("full", "full-cuda") if n in names), None)
    rows = []
    for name in ([full] if full else []) + [n for n in names if n != full]:
        get = lambda key: m.get(f"quantize.{name}.{key}")  # noqa: E731
        drop = 0.0 if name == full else get("rouge-l_drop")
        passed = get("passed")
        rows.append({
            "variant": name, "size (MB)": get("size_mb"), "latency (s)": get("latency_s"), "ROUGE-L": get("rouge-l"),
            "ROUGE-L drop": drop, "size ratio": 1.0 if name == full else get("size_ratio"),
            "latency ratio": 1.0 if name == full else get("latency_ratio"),
            "passed": "" if name == full or passed is None else ("yes" if passed else "no"),
        })
    return pd.DataFrame(rows)


def variants_chart(frame: Any, max_drop: float) -> Any:
    """Size, latency and ROUGE-L drop of each variant side by side; the drop panel marks `quantize.max_drop`."""
    import altair as alt

    def bars(column: str, title: str) -> Any:
        return alt.Chart(frame).mark_bar().encode(
            x=alt.X("variant:N", title=None, sort=list(frame["variant"])),
            y=alt.Y(f"{column}:Q", title=title),
            color=alt.Color("variant:N", legend=None),
            tooltip=["variant:N", alt.Tooltip(f"{column}:Q", format=".3f")],
        ).properties(width=180, height=220)

    limit = alt.Chart({"values": [{"max_drop": max_drop}]}).mark_rule(color="red", strokeDash=[4, 3]).encode(y="max_drop:Q")
    return alt.hconcat(bars("size (MB)", "size (MB)"), bars("latency (s)", "latency (s)"),
                       alt.layer(bars("ROUGE-L drop", "ROUGE-L drop (points)"), limit))


# ----------------------------------------------------------------------------- exposure


def auth_from_env() -> tuple[str, str] | None:
    """The dashboard's login from `SFTFLOW_REVIEW_AUTH=user:password`, or None when unset.

    Raises:
        StageError: the variable is set but not `user:password` with both parts non-empty.
    """
    return login_from_env(AUTH_ENV, "review without a login on 127.0.0.1")


def check_exposure(host: str, auth: tuple[str, str] | None) -> None:
    """Refuse to bind beyond this machine without a login.

    Raises:
        StageError: naming `SFTFLOW_REVIEW_AUTH`, when `host` is not loopback and no login is set.
    """
    refuse_exposure(host, auth, variable=AUTH_ENV, action="open the review dashboard",
                    risk="anyone who reaches it could read the registry", setting="review.host")


# ----------------------------------------------------------------------------- the page


@functools.cache
def _cached(ttl: float) -> SimpleNamespace:
    """The page's readers, cached by Streamlit: the registry for `ttl` seconds, run artifacts and models longer."""
    import streamlit as st

    return SimpleNamespace(
        registry=st.cache_data(ttl=ttl, max_entries=16, show_spinner="Reading the registry…")(read_registry),
        predictions=st.cache_data(max_entries=64, show_spinner="Reading stored predictions…")(read_predictions),
        scores=st.cache_data(max_entries=128, show_spinner=False)(read_scores),
        model=st.cache_resource(max_entries=2, show_spinner="Loading the model (files verified first)…")(load_version),
    )


def load_version(store: str, model_name: str, version: int) -> Any:
    """A registered version loaded by the verified loader (`tasks.core.loading.load_registered`).

    Raises:
        StageError: it cannot be read, or its stored files differ from those registered.
    """
    from tasks.core import loading

    return loading.load_registered(f"models:/{model_name}/{version}", client=_client(store))


def page_params() -> StageParams:
    """The params `run` wrote for the page (`SFTFLOW_REVIEW_PARAMS`), else ./params.yaml: the review slice."""
    return stage_params(load_params(os.environ.get(PARAMS_ENV) or DEFAULT_PARAMS_FILE), "review")


def _login(st: Any, auth: tuple[str, str] | None) -> bool:
    """The page's own login when `SFTFLOW_REVIEW_AUTH` is set; True once this browser session has logged in."""
    if auth is None or st.session_state.get(_LOGGED_IN):
        return True
    st.title("sftflow review")
    with st.form("login"):
        user = st.text_input("User", key="login_user")
        password = st.text_input("Password", type="password", key="login_password")
        submitted = st.form_submit_button("Log in")
    if submitted:
        if credentials_match(auth, user, password):
            st.session_state[_LOGGED_IN] = True
            st.rerun()
        time.sleep(LOGIN_DELAY_SECONDS)
        st.error("Wrong user or password.")
    return False


def page() -> None:
    """The Streamlit page (`streamlit run` executes it on every interaction; what it reads is cached)."""
    import streamlit as st

    st.set_page_config(page_title="sftflow review", layout="wide")
    try:
        params = page_params()
        auth = auth_from_env()
    except (ParamsError, StageError) as e:
        st.error(str(e))
        st.stop()
    if not _login(st, auth):
        st.stop()
    cache = _cached(float(params.review.cache_seconds))
    store, name = tracking_uri(), params.register.model_name
    st.title("sftflow review")
    if st.sidebar.button("Refresh from the registry", help=f"otherwise read again every {params.review.cache_seconds:g} s"):
        cache.registry.clear()
    try:
        snap = cache.registry(store, name)
    except StageError as e:
        st.error(str(e))
        st.stop()
    st.caption(f"`{name}` in {snap.store} · {len(snap.versions)} versions · read {snap.read_at}")
    if not snap.versions:
        st.info(f"The registry has no version of `{name}` yet: `sftflow run` trains, registers and promotes one "
                "(`register.model_name` names the model this dashboard reads).")
        st.stop()
    champion = snap.champion
    _champion_line(st, champion)
    choices = [v.version for v in snap.versions]
    default = next((i for i, v in enumerate(snap.versions) if not v.is_champion), 0)
    selected = snap.get(st.sidebar.selectbox(
        "Version to review", choices, index=default, key="review_version",
        format_func=lambda n: f"version {n}" + (f" ({', '.join(snap.get(n).aliases)})" if snap.get(n).aliases else ""),
    ))
    gone = [str(v.version) for v in snap.versions if v.run_id and not v.run_found]
    if gone:
        st.warning(f"The runs of versions {', '.join(gone)} are gone from the tracking store: their metrics are not shown.")
    tabs = dict(zip(SECTIONS, st.tabs(list(SECTIONS))))
    with tabs["Versions"]:
        _versions(st, snap)
    with tabs["Over time"]:
        _over_time(st, snap)
    with tabs["Side by side"]:
        _side_by_side(st, cache, store, champion, selected)
    with tabs["Lineage"]:
        _lineage(st, snap, selected)
    with tabs["Variants"]:
        _variants(st, selected, params.quantize.max_drop)
    with tabs["Try it"]:
        _try_it(st, cache, store, name, champion, selected, params.review.max_chars)


def _champion_line(st: Any, champion: VersionRecord | None) -> None:
    if champion is None:
        st.warning("No version is champion yet: `sftflow promote` gates the newest version (or `--version N` forces one).")
        return
    score = champion.score()
    figure = f"ROUGE-L {score[0]:.2f} {_ci(*score[1:])}".rstrip() if score else "ROUGE-L not recorded (its run is gone)"
    st.markdown(f"### Champion: version {champion.version} · {figure}")
    if champion.reason():
        st.markdown(f"Why: {champion.reason()}")


def _versions(st: Any, snap: Snapshot) -> None:
    st.dataframe(
        versions_table(snap), hide_index=True, key="versions_table",
        column_config={"ROUGE-L": st.column_config.NumberColumn(format="%.2f"),
                       "reason": st.column_config.TextColumn(width="large")},
    )


def _over_time(st: Any, snap: Snapshot) -> None:
    frame = over_time_frame(snap)
    if frame.empty:
        st.info("No version has ROUGE metrics on its run (`evaluate.rouge-l`...): nothing to chart.")
        return
    st.altair_chart(over_time_chart(frame), width="content")
    st.caption("Dots and bars: the fine-tuned version's mean and 95% bootstrap interval on its test rows. Dashed: its "
               "pretrained base and the lead-k baseline on the same rows.")
    with st.expander("Figures"):
        st.dataframe(frame, hide_index=True, key="over_time_table")


def _side_by_side(st: Any, cache: SimpleNamespace, store: str, champion: VersionRecord | None, other: VersionRecord) -> None:
    if champion is None:
        st.info("No champion to compare with yet.")
        return
    if other.version == champion.version:
        st.info("The selected version is the champion: pick another version in the sidebar to compare it with the champion.")
        return
    problems = [f"version {v.version} was registered without a run" for v in (champion, other) if not v.run_id]
    if problems:
        st.warning("; ".join(problems) + ": no stored predictions to compare.")
        return
    try:
        predictions = {v.version: cache.predictions(store, v.run_id) for v in (champion, other)}
        test_sha = other.tags.get("split.test_sha256", "")
        found = {v.version: row_scores_of(store, v, test_sha, predictions[v.version], cache.scores) for v in (champion, other)}
    except StageError as e:
        st.warning(f"Side by side needs the stored test predictions of both versions. {e}")
        return
    missing = [f"version {v}" for v, (scores, _) in found.items() if not scores]
    if missing:
        st.warning(f"No per-row ROUGE-L on the test split {test_sha[:12]} for {' and '.join(missing)}: `sftflow promote` "
                   "scores a champion on the current test split and stores them.")
        return
    result = side_by_side(champion, other, predictions[champion.version], predictions[other.version],
                          found[champion.version][0], found[other.version][0],
                          {f"v{v}": source for v, (_, source) in found.items()})
    rows = result.rows
    better, worse = int((rows["Δ ROUGE-L"] > 0).sum()), int((rows["Δ ROUGE-L"] < 0).sum())
    st.markdown(f"**Version {other.version} vs champion version {champion.version}** on {len(rows)} test rows of split "
                f"`{result.test_sha256[:12]}`: mean Δ ROUGE-L {rows['Δ ROUGE-L'].mean():+.2f}; better on {better} rows, "
                f"worse on {worse}, equal on {len(rows) - better - worse}. Rows sorted by Δ (version − champion), worst first.")
    st.caption("Per-row scores from " + "; ".join(f"{k}: `{v}`" for k, v in result.sources.items()) + ". "
               + " ".join(result.notes))
    st.dataframe(rows, hide_index=True, key="side_by_side_table",
                 column_config={c: st.column_config.NumberColumn(format="%.2f") for c in rows.columns if "ROUGE-L" in c})
    row_id = st.selectbox("Row", list(rows["id"]), key="side_by_side_row", help="the full texts of one row")
    row = rows[rows["id"] == row_id].iloc[0]
    left, right, ref = st.columns(3)
    left.markdown(f"**Champion v{champion.version}** ({row[f'v{champion.version} ROUGE-L']:.2f})")
    left.write(row[f"v{champion.version} (champion) output"] or "(not in its stored predictions)")
    right.markdown(f"**Version {other.version}** ({row[f'v{other.version} ROUGE-L']:.2f})")
    right.write(row[f"v{other.version} output"])
    ref.markdown("**Reference**")
    ref.write(row["reference"])
    with st.expander("Text"):
        st.write(row["text"])


def _lineage(st: Any, snap: Snapshot, selected: VersionRecord) -> None:
    facts = lineage_of(snap.model_name, selected.version, selected.run_id, selected.tags, list(selected.aliases), selected.metrics)
    st.markdown(f"**{snap.model_name} version {selected.version}** (run `{selected.run_id}`)")
    st.table({"step": [s for s, _ in facts.steps], "what the registry says": [v for _, v in facts.steps]})
    with st.expander("As `sftflow lineage` prints it"):
        st.code(facts.text(), language=None)


def _variants(st: Any, selected: VersionRecord, max_drop: float) -> None:
    frame = variants_frame(selected)
    if len(frame) < 2:
        st.info(f"Version {selected.version} has no measured quantized variant on its run (`quantize.<method>.*`, "
                "written by `sftflow quantize` for `quantize.methods`).")
        return
    st.altair_chart(variants_chart(frame, max_drop), width="content")
    st.caption(f"Each variant against full precision on the same test rows. Red: `quantize.max_drop` now ({max_drop:g} points).")
    st.dataframe(frame, hide_index=True, key="variants_table",
                 column_config={c: st.column_config.NumberColumn(format="%.3f") for c in frame.columns if c not in {"variant", "passed"}})


def _try_it(st: Any, cache: SimpleNamespace, store: str, name: str, champion: VersionRecord | None,
            selected: VersionRecord, max_chars: int) -> None:
    text = st.text_area("Text to summarise", key="try_text", max_chars=max_chars, height=150,
                        placeholder="Paste a text; each model loads only when you press its button.")
    results = st.session_state.setdefault(_TRY_RESULTS, {})
    who = [(champion, f"Champion (version {champion.version})")] if champion else []
    if not champion or selected.version != champion.version:
        who.append((selected, f"Version {selected.version}"))
    for column, (record, title) in zip(st.columns(len(who)), who):
        with column:
            st.markdown(f"**{title}**")
            if st.button(f"Summarize with version {record.version}", key=f"try_{record.version}"):
                if not text.strip():
                    st.warning("Paste a text to summarise first.")
                else:
                    try:
                        model = cache.model(store, name, record.version)
                        results[(record.version, text)] = model.predict([text])[0]
                    except StageError as e:
                        st.error(f"Cannot load version {record.version}: {e}")
            if (record.version, text) in results:
                st.caption("Summary")
                st.text(results[(record.version, text)] or "(empty: the model wrote end-of-text first)")


# ----------------------------------------------------------------------------- the stage


def streamlit_command(script: Path, host: str, port: int) -> list[str]:
    """`streamlit run` of the page on `host:port`: headless, no usage statistics, no file watching."""
    return [
        sys.executable, "-m", "streamlit", "run", str(script),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",
        "--server.fileWatcherType", "none",
        "--server.runOnSave", "false",
        "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "minimal",
    ]


def _run_until_stopped(command: list[str], env: dict[str, str]) -> int:
    """Run the server; SIGINT/SIGTERM to this process reach it too (`docker stop`, Ctrl-C). Its exit code."""
    proc = subprocess.Popen(command, env=env)

    def forward(signum: int, frame: Any) -> None:
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


@stage_entry("review")
def run(params: StageParams, host: str | None = None, port: int | None = None) -> None:
    """Open the review dashboard until interrupted.

    Args:
        params: the resolved params (`review:`, `register.model_name`, `quantize.max_drop`).
        host: bind address; default `review.host` (127.0.0.1: only this machine).
        port: port; default `review.port`.

    Raises:
        StageError: a malformed `SFTFLOW_REVIEW_AUTH`, a non-loopback host without it (checked before
            anything starts), or a server that exits with an error (the port is taken).
    """
    auth = auth_from_env()
    host = host or params.review.host
    port = port or params.review.port
    check_exposure(host, auth)
    with tempfile.TemporaryDirectory(prefix="sftflow-review-") as tmp:
        params_file, script = Path(tmp) / "params.yaml", Path(tmp) / "review_page.py"
        params.save(params_file)
        script.write_text(PAGE_SCRIPT, encoding="utf-8")
        env = {**CLIENT_ENV_DEFAULTS, **os.environ, PARAMS_ENV: str(params_file)}
        log.info("review dashboard of %s on http://%s:%d (login %s, registry %s)", params.register.model_name, host, port,
                 "on" if auth else "off", safe_uri(tracking_uri()))
        code = _run_until_stopped(streamlit_command(script, host, port), env)
    if code not in (0, -signal.SIGINT, -signal.SIGTERM):
        raise StageError(f"the dashboard (streamlit) exited with code {code}: see its messages above (is port {port} taken? "
                         "pass --port)")
