"""The `promote` stage: gate the newest model version to `champion`; forced promotion and rollback.

The newest version of `register.model_name` gets the alias `challenger`. It becomes `champion`
when there is no champion yet, or when on the current test split

- its mean ROUGE-L beats the champion's by at least `promote.min_delta` points,
- the paired bootstrap of the per-row differences has its 95% lower bound above 0, and
- each of its quantized variants loses at most `quantize.max_drop` ROUGE-L points.

Evaluated = served: each version is scored as the app serves it on this machine's device class
(`tasks.core.registry.resolve_variant`: `serve.variant_cpu` without a GPU, `serve.variant_gpu` with
one), in that variant's dtype on that device class, so the number compared is the number served. A
version served in full precision (float32, as evaluate scored it) is compared on the per-row scores
`register` stores in its run, keyed by the test split's sha256, its generation settings and the
scoring version; a version without scores for the current split (the champion after the data grew) is
loaded from the registry and scored again, and those scores are cached the same way. A version served
as a registered variant (`int8`, `bf16`, `bnb-*`) is scored through that variant, loaded as the app
loads it, and cached under the same key plus `<variant>-<device>`. What was scored, and what could not
be here (the other device class's variant; a variant this machine cannot load), is in the decision
(`scored_on`, `challenger_scored_as`, `champion_scored_as`, `scoring_note`).

The decision and its figures become tags on both versions (and metrics of the active run). The
registered model's tag `promote.history` lists the champions in order, for `rollback`. Promotions
are serialised by a file lock beside the store and the champion is re-read before the alias is
moved (compare-and-set), so two promotions racing leave exactly one champion, chosen as if they ran
one after the other.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.errors import StageError
from tasks.core.io import file_sha256, read_jsonl
from tasks.core.registry import (
    CHALLENGER,
    CHAMPION,
    SETTINGS_SHA_TAG,
    SETTINGS_TAG,
    alias_version,
    client,
    load_row_scores,
    newest_version,
    resolve_variant,
    resolve_version,
    row_scores_key,
    save_row_scores,
    variant_scores_key,
    variant_uris,
)
from tasks.core.scoring import SCORING_VERSION, paired_bootstrap, score
from tasks.core.stage_params import StageParams, stage_entry
from tasks.core.tracking import setup_mlflow, tracking_uri

log = logging.getLogger(__name__)

HISTORY_TAG = "promote.history"
HISTORY_LENGTH = 100  # registry tag values are bounded; the newest champions are what rollback needs
LOCK_NAME = "sftflow-promote.lock"


# ----------------------------------------------------------------------------- registry helpers


def _client(params: StageParams) -> Any:
    setup_mlflow(params.register.experiment)
    return client()


def lock_path() -> Path:
    """The promotion lock: beside a sqlite store, else in the project root (the cwd)."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).resolve()
        return db.parent / f".{db.name}.{LOCK_NAME}"
    return Path.cwd() / f".{LOCK_NAME}"


@contextlib.contextmanager
def promotion_lock() -> Iterator[None]:
    """Hold an exclusive lock for one compare-and-set of the aliases (threads and processes alike).

    flock locks belong to an open file description, so each caller opens the file itself and two
    threads of one process exclude each other as two processes do.
    """
    path = lock_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _history(client: Any, name: str) -> list[str]:
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG)
    return [str(v) for v in json.loads(raw)] if raw else []


def _set_champion(client: Any, name: str, version: str, expected: str | None) -> None:
    """Compare-and-set: move `champion` to `version` only if it still points at `expected`."""
    current = alias_version(client, name, CHAMPION)
    if current != expected:
        raise StageError(
            f"champion of {name} moved from {expected} to {current} while version {version} was gated; "
            "run `sftflow promote` again"
        )
    client.set_registered_model_alias(name, CHAMPION, str(version))
    if alias_version(client, name, CHALLENGER) == str(version):  # one alias per meaning
        client.delete_registered_model_alias(name, CHALLENGER)
    history = _history(client, name) + [str(version)]
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-HISTORY_LENGTH:]))
    after = alias_version(client, name, CHAMPION)
    if after != str(version):  # another writer (without the lock, e.g. a second machine) got in
        raise StageError(f"champion of {name} is {after} right after setting it to {version}: re-run promote")


def _describe(mlflow_client: Any, name: str, version: str, line: str) -> None:
    """The version's description: one line on why it is (or is no longer) champion or challenger."""
    mlflow_client.update_model_version(name, str(version), description=line)


def _set_tags(client: Any, name: str, version: str, tags: dict[str, Any]) -> None:
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v))


def _log_to_active_run(decision: dict[str, Any]) -> None:
    """Record the decision in the flow's MLflow run, when there is one."""
    import mlflow

    if mlflow.active_run() is None:
        return
    mlflow.set_tag("promote.decision", decision["decision"])
    mlflow.set_tag("promote.version", decision["version"])
    figures = {f"promote.{k}": v for k, v in decision.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if figures:
        mlflow.log_metrics(figures)


# ----------------------------------------------------------------------------- per-row scores


def _current_test(params: StageParams, fallback_sha: str) -> tuple[str, Path | None]:
    """(sha256, path) of the current test split; the candidate's split when the file is not here."""
    path = params.layout.split("test")
    if path.exists():
        return file_sha256(path), path
    log.info("%s is not here: comparing on the candidate's test split %s", path, fallback_sha[:12])
    return fallback_sha, None


@dataclass(frozen=True)
class ServedAs:
    """How the app on this machine's device class serves a version, so promote scores it that way.

    Attributes:
        variant: `full` or the registered variant (`int8`, `bf16`, `bnb-*`).
        uri: the `models:/` URI to load (the version itself, or its variant's registered model).
        device: the device class (`cpu` or `cuda`) it is loaded on and scored on.
        dtype: the dtype it computes in (`float32` for full).
        note: why it is not the variant `serve:` asks for here, when it is not.
    """

    variant: str
    uri: str
    device: str
    dtype: str
    note: str | None = None

    @property
    def label(self) -> str:
        """`int8 (int8 on cpu)`, `full (float32 on cuda)`: what the decision record says was scored."""
        return f"{self.variant} ({self.dtype} on {self.device})"

    def key(self, base_key: str) -> str:
        """Where its row scores are cached: `register`'s key for full precision, that key plus the variant
        and device class for a variant (scores of another variant or device class are never reused)."""
        return variant_scores_key(base_key, self.variant, self.device)


def this_device() -> str:
    """`cuda` when a GPU is visible, else `cpu`: the device class promote scores for (as the app picks it)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def served_as(params: StageParams, mv: Any, device: str) -> ServedAs:
    """The variant of a version the app serves on `device` (`tasks.core.registry.resolve_variant`), as promote
    can score it here: a bitsandbytes variant on a machine without bitsandbytes falls back to full precision,
    and the note says so."""
    from tasks.core.variants import GPU_METHODS, METHOD_DTYPES

    variant, uri, note = resolve_variant(params, mv, device)
    if variant in GPU_METHODS and importlib.util.find_spec("bitsandbytes") is None:
        note = (f"version {mv.version}'s {variant} variant, which the app serves on this GPU, cannot be scored here "
                "(bitsandbytes is not installed): its full-precision scores were compared instead, NOT the served number")
        variant, uri = "full", f"models:/{params.register.model_name}/{mv.version}"
    dtype = "float32" if variant == "full" else METHOD_DTYPES[variant][1]
    return ServedAs(variant=variant, uri=uri, device=device, dtype=dtype, note=note)


def rescore(
    params: StageParams, name: str, version: str, test_path: Path, ids: list[str] | None = None,
    served: ServedAs | None = None,
) -> dict[str, float]:
    """Load a registered version as it is served, generate for the test rows and score per-row ROUGE-L.

    Args:
        params: `data.language` for scoring, paths.
        name: registered model name.
        version: its version number.
        test_path: the test split file.
        ids: only these row ids (default: every row, or the first `evaluate.rows`).
        served: the variant to score and where (`served_as`); default: the version in full precision
            (float32) on the CPU.

    Returns:
        Row id -> ROUGE-L (F × 100).
    """
    # The installed package's loader: every stored file checked against its registration hashes,
    # nothing from the artifact store executed (a changed version raises StageError here).
    from tasks.core.loading import load_registered

    rows = read_jsonl(test_path)
    if ids is not None:
        wanted = set(ids)
        rows = [r for r in rows if str(r["id"]) in wanted]
        missing = wanted - {str(r["id"]) for r in rows}
        if missing:
            raise StageError(f"{test_path} lacks the rows {sorted(missing)[:5]}: the split changed mid-promotion")
    elif params.evaluate.rows:
        rows = rows[: params.evaluate.rows]
    uri = served.uri if served else f"models:/{name}/{version}"
    what = served.label if served else "full (float32 on cpu)"
    log.info("scoring %s version %s as %s (%s) on %d test rows of %s", name, version, what, uri, len(rows), test_path)
    model = load_registered(uri, device=served.device if served else None)
    predictions = model.predict([r["text"] for r in rows])
    scores = score(predictions, [r["summary"] for r in rows], params.data.language, bootstrap_samples=1)
    return {str(r["id"]): s["rouge-l"] for r, s in zip(rows, scores["per_row"])}


def row_scores(
    params: StageParams, name: str, mv: Any, test_sha: str, test_path: Path | None, ids: list[str] | None = None,
    served: ServedAs | None = None,
) -> tuple[dict[str, float], bool]:
    """Per-row ROUGE-L of a version on the test split `test_sha`, generated with the version's own
    registered settings, as it is served (`served`; default full precision), and scored by this scoring
    version: cached, else scored and cached.

    Returns:
        (scores by row id, whether they were computed now).

    Raises:
        StageError: no cached scores for that split and no test file to score on.
    """
    base_key = row_scores_key(test_sha, (mv.tags or {}).get(SETTINGS_SHA_TAG), SCORING_VERSION)
    key = served.key(base_key) if served else base_key
    cached = load_row_scores(mv.run_id, key)
    if cached is not None and (ids is None or set(ids) <= cached.keys()):
        return cached, False
    if test_path is None:
        raise StageError(
            f"version {mv.version} has no row scores for test split {test_sha[:12]} (scoring version "
            f"{SCORING_VERSION}{f', as {served.label}' if served and served.variant != 'full' else ''}) and "
            f"{params.layout.split('test')} is not here to score it: run `dvc pull` or `sftflow split`"
        )
    log.info("version %s has no row scores under %s: scoring it as registered and served", mv.version, key)
    scores = rescore(params, name, mv.version, test_path, ids, served)
    save_row_scores(mv.run_id, key, {**(cached or {}), **scores})
    return scores, True


# ----------------------------------------------------------------------------- the gate


def variant_drops(tags: dict[str, str], metrics: dict[str, float]) -> dict[str, float | None]:
    """ROUGE-L points each registered quantized variant of a version loses (None: not measured).

    Args:
        tags: the version's tags (which variants it points at).
        metrics: the metrics of the run that registered it (`quantize.<method>.rouge-l_drop`...).
    """
    out: dict[str, float | None] = {}
    full = metrics.get("evaluate.rouge-l")
    for method in variant_uris(tags):
        drop = metrics.get(f"quantize.{method}.rouge-l_drop")
        if drop is not None:
            out[method] = float(drop)
        elif full is not None and f"quantize.{method}.rouge-l" in metrics:
            out[method] = float(full) - float(metrics[f"quantize.{method}.rouge-l"])
        else:
            out[method] = None
    return out


def scoring_note(params: StageParams, device: str, served: dict[str, ServedAs]) -> str:
    """What the compared numbers are, in words: which variant each version was scored as and why, and
    what could not be scored on this machine (the variant the app serves on the other device class)."""
    here, other = ("GPU", "CPU") if device == "cuda" else ("CPU", "GPU")
    parts = [f"scored as the app serves each version on this {here}: "
             + ", ".join(f"{role} {s.label}" for role, s in served.items())]
    parts += [f"{role}: {s.note}" for role, s in served.items() if s.note]
    other_variant = params.serve.variant_cpu if device == "cuda" else params.serve.variant_gpu
    if other_variant != "full":
        parts.append(f"an app on a {other} serves serve.variant_{other.lower()}={other_variant} where registered and "
                     f"scored there; that is not re-scored on this {here}: run promote on a {other} machine to compare it")
    return "; ".join(parts)


def compare(params: StageParams, name: str, candidate: Any, champion: Any) -> dict[str, Any]:
    """The gate's figures and decision for a candidate against the champion (nothing is moved here)."""
    cfg = params.promote
    test_sha, test_path = _current_test(params, candidate.tags.get("split.test_sha256", ""))
    device = this_device()
    cand_served, champ_served = served_as(params, candidate, device), served_as(params, champion, device)
    cand_scores, cand_rescored = row_scores(params, name, candidate, test_sha, test_path, served=cand_served)
    ids = sorted(cand_scores)
    champ_scores, champ_rescored = row_scores(params, name, champion, test_sha, test_path, ids, served=champ_served)
    a = [cand_scores[i] for i in ids]
    b = [champ_scores[i] for i in ids]
    boot = paired_bootstrap(a, b, cfg.bootstrap_samples, cfg.seed)
    figures: dict[str, Any] = {
        "challenger_rouge-l": sum(a) / len(a),
        "champion_rouge-l": sum(b) / len(b),
        "delta": boot["delta"],
        "low": boot["low"],
        "high": boot["high"],
        "rows": len(ids),
        "min_delta": cfg.min_delta,
        "test_sha256": test_sha,
        "champion_rescored": champ_rescored,
        "challenger_rescored": cand_rescored,
        "scoring_version": SCORING_VERSION,
        "challenger_settings": (candidate.tags or {}).get(SETTINGS_TAG, "unknown"),
        "champion_settings": (champion.tags or {}).get(SETTINGS_TAG, "unknown"),
        "scored_on": device,
        "challenger_scored_as": cand_served.label,
        "champion_scored_as": champ_served.label,
        "scoring_note": scoring_note(params, device, {"challenger": cand_served, "champion": champ_served}),
    }
    reasons = []
    if boot["delta"] < cfg.min_delta:
        reasons.append(f"ROUGE-L gain {boot['delta']:.2f} < promote.min_delta {cfg.min_delta:g}")
    if boot["low"] <= 0:
        reasons.append(f"95% lower bound of the gain {boot['low']:.2f} is not above 0 (within noise)")
    run_metrics = client().get_run(candidate.run_id).data.metrics if candidate.run_id else {}
    for method, drop in variant_drops(candidate.tags, run_metrics).items():
        figures[f"{method}_drop"] = drop
        if drop is None:
            reasons.append(f"the {method} variant has no measured ROUGE-L drop (metrics/quantize.json)")
        elif drop > params.quantize.max_drop:
            reasons.append(f"the {method} variant loses {drop:.2f} ROUGE-L > quantize.max_drop {params.quantize.max_drop:g}")
    figures["promote"] = not reasons
    figures["reason"] = "; ".join(reasons) or (
        f"ROUGE-L +{boot['delta']:.2f} [{boot['low']:.2f}, {boot['high']:.2f}] over version {champion.version}"
        f" (each as served on this {device.upper()}: {cand_served.label} vs {champ_served.label})"
    )
    return figures


@stage_entry("promote")
def gate(params: StageParams, candidate: int | str) -> dict[str, Any]:
    """Make `candidate` the challenger and promote it to champion if it passes the gate.

    Args:
        params: parameters (`promote.*`, `quantize.max_drop`, paths, model name).
        candidate: the version number to gate.

    Returns:
        `version`, `decision` (`champion`, `challenger` or `already champion`), `champion` (after),
        `previous_champion`, `reason` and the figures (delta, low, high, rows...).

    Raises:
        StageError: the version does not exist, or scores cannot be had.
    """
    client = _client(params)
    name = params.register.model_name
    with promotion_lock():
        cand = resolve_version(client, name, candidate)
        champ_version = alias_version(client, name, CHAMPION)
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if champ_version != str(cand.version):  # one alias per meaning: the champion is never also challenger
            client.set_registered_model_alias(name, CHALLENGER, cand.version)
        if champ_version == str(cand.version):
            return {"version": int(cand.version), "decision": "already champion", "champion": int(cand.version),
                    "previous_champion": None, "reason": "this version is the champion"}
        if champ_version is None:
            figures = {"promote": True, "reason": "no champion yet"}
            champ = None
        else:
            champ = client.get_model_version(name, champ_version)
            figures = compare(params, name, cand, champ)
        decision = CHAMPION if figures["promote"] else CHALLENGER
        tags = {"promote.decision": decision, "promote.reason": figures["reason"], "promote.at": now,
                "promote.manual": "false", "promote.compared_with": champ_version or "none"}
        tags.update({f"promote.{k}": (f"{v:.4f}" if isinstance(v, float) else v)
                     for k, v in figures.items() if k not in {"promote", "reason"}})
        if figures["promote"]:
            _set_champion(client, name, cand.version, champ_version)
        _set_tags(client, name, cand.version, tags)
        _describe(client, name, cand.version, f"{decision} ({now}): {figures['reason']}"
                  + ("" if figures["promote"] or champ is None else f"; champion stays version {champ.version}"))
        if champ is not None and figures["promote"]:
            _describe(client, name, champ.version, f"replaced as champion by version {cand.version} ({now}): {figures['reason']}")
        if champ is not None:
            _set_tags(client, name, champ.version, {
                "promote.last_challenger": cand.version,
                "promote.last_challenge": json.dumps({k: v for k, v in tags.items() if k != "promote.reason"}
                                                     | {"reason": figures["reason"]}, ensure_ascii=False)[:4900],
                "promote.decision": "replaced" if figures["promote"] else "defended",
            })
    result = {
        "version": int(cand.version),
        "decision": decision,
        "champion": int(cand.version) if figures["promote"] else int(champ_version),
        "previous_champion": int(champ_version) if champ_version else None,
        **{k: v for k, v in figures.items() if k != "promote"},
    }
    log.info("version %s: %s (%s)", cand.version, decision, figures["reason"])
    _log_to_active_run(result)
    return result


@stage_entry("promote")
def run(params: StageParams, version: int | None = None) -> dict[str, Any]:
    """The stage: gate the newest version, or force `version` to champion.

    Args:
        params: parameters.
        version: force this version to champion without the gate (tagged `promote.manual=true`).

    Returns:
        The decision (see `gate`).
    """
    if version is not None:
        return force(params, version)
    client = _client(params)
    return gate(params, newest_version(client, params.register.model_name).version)


@stage_entry("promote")
def force(params: StageParams, version: int | str) -> dict[str, Any]:
    """Make `version` the champion without the gate; tagged manual, recorded in the history."""
    client = _client(params)
    name = params.register.model_name
    with promotion_lock():
        mv = resolve_version(client, name, version)
        previous = alias_version(client, name, CHAMPION)
        if previous != str(mv.version):
            _set_champion(client, name, mv.version, previous)
        _set_tags(client, name, mv.version, {
            "promote.decision": CHAMPION, "promote.manual": "true", "promote.compared_with": previous or "none",
            "promote.reason": "forced with `sftflow promote --version`", "promote.at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        _describe(client, name, mv.version, f"champion (forced with `sftflow promote --version`, {time.strftime('%Y-%m-%dT%H:%M:%S%z')})")
        if previous and previous != str(mv.version):
            _set_tags(client, name, previous, {"promote.decision": "replaced", "promote.last_challenger": mv.version})
            _describe(client, name, previous, f"replaced as champion by version {mv.version} (forced)")
    result = {"version": int(mv.version), "decision": CHAMPION, "manual": True, "champion": int(mv.version),
              "previous_champion": int(previous) if previous else None}
    log.info("forced version %s to champion (was %s)", mv.version, previous)
    _log_to_active_run(result)
    return result


@stage_entry("promote")
def rollback(params: StageParams) -> dict[str, Any]:
    """Move `champion` back to the previous champion in `promote.history`.

    Returns:
        `champion` (now), `rolled_back` (the version that was champion) and the history.

    Raises:
        StageError: there is no champion or no earlier champion to go back to.
    """
    client = _client(params)
    name = params.register.model_name
    with promotion_lock():
        current = alias_version(client, name, CHAMPION)
        if current is None:
            raise StageError(f"{name} has no champion to roll back")
        history = _history(client, name)
        while history and history[-1] == current:
            history.pop()
        if not history:
            raise StageError(f"{name} has no previous champion before version {current}: nothing to roll back to")
        previous = history[-1]
        client.set_registered_model_alias(name, CHAMPION, previous)
        # The history now ends at the restored champion; the rolled-back version is tagged instead.
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-HISTORY_LENGTH:]))
        _set_tags(client, name, current, {"promote.decision": "rolled back", "promote.rolled_back": "true",
                                          "promote.rolled_back_to": previous,
                                          "promote.at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        _set_tags(client, name, previous, {"promote.decision": CHAMPION, "promote.restored_from": current})
        _describe(client, name, current, f"rolled back: champion returned to version {previous}")
        _describe(client, name, previous, f"champion again (rolled back from version {current})")
    log.info("champion of %s rolled back from %s to %s", name, current, previous)
    return {"champion": int(previous), "rolled_back": int(current), "history": [int(v) for v in history]}
