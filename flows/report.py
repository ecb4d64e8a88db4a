"""What a retrain run reports: the markdown summary (a Prefect artifact and the CLI's output), its
metrics table read from the stages' metrics files, and where to look next."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from prefect.artifacts import create_markdown_artifact

from flows.dvc_stage import run_logger
from tasks.core.config import Params

SUMMARY_ARTIFACT_KEY = "retrain-summary"
TABLE_METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def _read_metrics(params: Params, stage: str) -> dict[str, Any]:
    path = params.layout.metrics_file(stage)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _lookup(metrics: dict[str, Any], key: str) -> Any:
    """`a.b` as a flat key, else as nested dicts (evaluate writes `base: {rouge-l: ...}`)."""
    if key in metrics:
        return metrics[key]
    node: Any = metrics
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def final_model_label(params: Params) -> str:
    """The final model's row name, from align's `final` (`metrics/align.json`): aligned, or the fine-tuned model
    passed through (kept by the val gate, or no DPO ran: align disabled, no pair)."""
    align = _read_metrics(params, "align")
    if align.get("final") == "aligned":
        return "final model (aligned)"
    if align.get("final") == "fine-tuned":
        return "final model (fine-tuned; align gate kept it)" if align.get("gate") else "final model (fine-tuned)"
    return "final model"


def metrics_table(params: Params) -> str:
    """Markdown table of the scores the stages wrote: model, base, baseline and each quantized variant."""
    evaluate = _read_metrics(params, "evaluate")
    quantize = _read_metrics(params, "quantize")
    rows = [
        (final_model_label(params), {m: _lookup(evaluate, m) for m in TABLE_METRICS}),
        ("base model", {m: _lookup(evaluate, f"base.{m}") for m in TABLE_METRICS}),
        (
            f"lead-k baseline (k={_lookup(evaluate, 'baseline.k') or '?'})",
            {m: _lookup(evaluate, f"baseline.{m}") for m in TABLE_METRICS},
        ),
    ]
    for method in params.quantize.methods:
        rows.append((f"quantized {method}", {m: _lookup(quantize, f"{method}.{m}") for m in TABLE_METRICS}))
    lines = ["| model | " + " | ".join(TABLE_METRICS) + " |", "|---|" + "---:|" * len(TABLE_METRICS)]
    lines += [f"| {name} | " + " | ".join(_fmt(v[m]) for m in TABLE_METRICS) + " |" for name, v in rows]
    return "\n".join(lines)


def outputs_table(params: Params) -> str:
    """Markdown table of what a reader notices in the test outputs: distinct, stuttering, length."""
    evaluate = _read_metrics(params, "evaluate")
    rows = [(final_model_label(params), "outputs"), ("base model", "base.outputs"), ("lead-k baseline", "baseline.outputs")]
    lines = ["| model | distinct outputs | outputs with a 3× repeat | length ÷ reference |", "|---|---:|---:|---:|"]
    for name, key in rows:
        stats = _lookup(evaluate, key) or {}
        lines.append(f"| {name} | {_percent(stats.get('distinct_share'))} | {_percent(stats.get('repeat_share'))} "
                     f"| {_fmt(stats.get('length_ratio'))} |")
    return "\n".join(lines)


def alignment_lines(params: Params) -> list[str]:
    """What align did (`metrics/align.json`): which model is final and why, the pairs per source, its DPO
    reward accuracy on held-out pairs, val ROUGE-L before and after, and its time; [] when it has not run."""
    align = _read_metrics(params, "align")
    if not align:
        return []
    gate = align.get("gate") or {}
    lines = ["## Alignment (DPO)", "", f"Final model: **{align.get('final', '?')}** ({align.get('reason', '')})", ""]
    if align.get("pairs_total"):
        lines.append(
            f"Pairs: {align.get('pairs_feedback', 0)} from feedback, {align.get('pairs_file', 0)} from the preference file, "
            f"{align.get('pairs_self', 0)} self-generated; held-out reward accuracy {_fmt(align.get('held_out_reward_accuracy'))}; "
            f"val ROUGE-L {_fmt(gate.get('fine_tuned'))} → {_fmt(gate.get('aligned'))} "
            f"(difference {_fmt(gate.get('delta'))}, 95% CI [{_fmt(gate.get('low'))}, {_fmt(gate.get('high'))}]); "
            f"{_fmt(align.get('seconds'))} s"
        )
        lines.append("")
    return lines


def _percent(value: Any) -> str:
    return f"{100 * value:.0f}%" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def summary_markdown(result: dict[str, Any], params: Params) -> str:
    """The run's markdown report: outcome, stages, metrics table, promotion decision, MLflow run."""
    lines = [f"# retrain: {result['status']}", ""]
    if result.get("reason"):
        lines += [f"Reason: {result['reason']}", ""]
    if result.get("stages"):
        lines += ["| stage | DVC | seconds |", "|---|---|---:|"]
        lines += [f"| {s['stage']} | {'ran' if s['ran'] else 'up to date'} | {s['seconds']:.1f} |" for s in result["stages"]]
        lines.append("")
    lines += ["## Test-split scores (F1 × 100)", "", metrics_table(params), ""]
    lines += ["## What a reader notices", "", outputs_table(params), ""]
    lines += alignment_lines(params)
    promotion = result.get("promotion")
    if promotion:
        lines += [
            "## Promotion",
            "",
            (
                f"Decision: **{promotion.get('decision', '?')}** for version {promotion.get('version', '?')}; "
                f"champion: version {promotion.get('champion', '?')} ({promotion.get('reason', 'no reason given')})"
            ),
            "",
            "```json",
            json.dumps(promotion, ensure_ascii=False, indent=2, default=str),
            "```",
            "",
        ]
    if result.get("registered_version") is not None:
        lines.append(f"Registered: `{params.register.model_name}` version {result['registered_version']}")
    if result.get("champion") is not None:
        lines.append(f"Champion: `models:/{params.register.model_name}@champion` (version {result['champion']})")
    if result.get("mlflow_run_id"):
        lines.append(f"MLflow run: `{result['mlflow_run_id']}` at `{result.get('mlflow_tracking_uri')}`")
    if result.get("error"):
        lines += ["", "## Error", "", "```", str(result["error"]), "```"]
    return "\n".join(lines) + "\n"


def finish(result: dict[str, Any], params: Params, started: float) -> dict[str, Any]:
    """Add the run's seconds and summary to `result`, publish the summary as a Prefect artifact, log the outcome."""
    result["seconds"] = round(time.monotonic() - started, 1)
    markdown = summary_markdown(result, params)
    result["summary"] = markdown
    try:
        create_markdown_artifact(markdown=markdown, key=SUMMARY_ARTIFACT_KEY, description=f"retrain: {result['status']}")
    except Exception as e:  # noqa: BLE001 - the report is a convenience; its failure must not hide the run's outcome
        run_logger().warning("could not publish the Prefect artifact: %s", e)
    run_logger().info("retrain %s in %.1f s%s", result["status"], result["seconds"], f" ({result['reason']})" if result.get("reason") else "")
    return result


def next_steps(params: Params) -> str:
    """Where to look after a run: MLflow UI, Prefect UI, the app."""
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    prefect_line = (
        f"  Prefect UI:  runs at {api.removesuffix('/api')} (prefect flow-run ls)"
        if api
        else "  Prefect UI:  prefect server start, then PREFECT_API_URL=http://127.0.0.1:4200/api sftflow run (prefect flow-run ls lists runs)"
    )
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow_line = f"  MLflow UI:   mlflow ui --backend-store-uri {uri}" if uri else "  MLflow UI:   mlflow ui --backend-store-uri sqlite:///mlflow.db  (http://127.0.0.1:5000)"
    return "\n".join(
        [
            "Where to look next:",
            mlflow_line,
            prefect_line,
            f"  The app:     sftflow serve   (http://{params.serve.host}:{params.serve.port}, serves models:/{params.register.model_name}@champion)",
            "  Lineage:     sftflow lineage champion",
        ]
    )
