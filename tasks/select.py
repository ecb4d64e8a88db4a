"""The `select` stage: score candidate base models on validation rows and hand the best to pretrain/train.

For each of `model.candidates` (local folders, hub ids, or `scratch`), on the first `select.rows`
validation rows: the loss of the reference summaries under the prompt template
(`tasks.core.prompt.summary_loss`, the loss training minimises), reported per token and, as `loss`, per
character, because candidates with different tokenizers cut the same summary into different token
counts; and zero-shot ROUGE through the same generation and scoring as evaluate
(`tasks.core.evaluation.Evaluator`). `scratch` is exactly what pretrain starts from
(`tasks.core.modeling.scratch_base`: a seeded random decoder of the `model:` shape with a tokenizer
trained on the train split and the prompt template), so its (poor) figures are reported as they are. A candidate that cannot load is reported with
the reason and skipped; if none loads the stage fails naming each.

With a single candidate (the default: `model.base`) nothing is loaded or scored: the base passes through.

Outputs: `artifacts/select/choice.json` ({"base", "candidates", ...}), `metrics/select.json` (one
entry per candidate), `plots/select/candidates.png`.
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path
from typing import Any

from tasks.core.data import read_split
from tasks.core.errors import StageError
from tasks.core.evaluation import Evaluator
from tasks.core.io import dir_sha256, file_sha256, sha256_bytes, write_json
from tasks.core.modeling import count_parameters, load_model_and_tokenizer, place_on_device, scratch_base
from tasks.core.plots import save_figure
from tasks.core.prompt import encode_example, summary_loss
from tasks.core.stage_params import StageParams, stage_entry

log = logging.getLogger(__name__)

SCRATCH = "scratch"


@stage_entry("select")
def run(params: StageParams) -> dict[str, Any]:
    """Choose the base model among `model.candidates` by `select.metric`.

    Returns:
        The metrics written to `metrics/select.json`.

    Raises:
        StageError: no candidate loads (each is named with its reason), or the val split is missing.
    """
    candidates = params.model.candidate_list
    if len(candidates) == 1:
        log.info("one candidate base (%s): nothing to compare, passing it through", candidates[0])
        write_json(params.layout.select_choice, {"base": candidates[0], "candidates": candidates, "scored": False})
        metrics = {"chosen": candidates[0], "candidates": {}, "skipped": {}}
        write_json(params.layout.metrics_file("select"), metrics)
        # dvc.yaml declares plots/select as an output: it must exist even with nothing to plot.
        params.layout.plots_dir("select").mkdir(parents=True, exist_ok=True)
        return metrics

    rows = read_split(params.layout, "val", limit=params.select.rows)
    table: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name in candidates:
        try:
            model, tokenizer, sha = _load_candidate(name, params)
        except StageError as e:
            log.warning("skipping candidate %s: %s", name, e)
            skipped[name] = str(e)
            continue
        table[name] = _score_candidate(name, model, tokenizer, sha, rows, params)
        del model
        gc.collect()
    if not table:
        reasons = "\n".join(f"  - {name}: {reason}" for name, reason in skipped.items())
        raise StageError(f"no candidate base model could be loaded (model.candidates):\n{reasons}")

    metric = params.select.metric
    # Lower loss is better, higher ROUGE-L is better; ties keep the order of model.candidates.
    if metric == "loss":
        chosen = min(table, key=lambda n: table[n]["loss"])
    else:
        chosen = max(table, key=lambda n: table[n][metric])
    write_json(
        params.layout.select_choice,
        {"base": chosen, "candidates": candidates, "scored": True, "metric": metric, "skipped": sorted(skipped)},
    )
    metrics = {"chosen": chosen, "metric": metric, "rows": len(rows), "candidates": table, "skipped": skipped}
    write_json(params.layout.metrics_file("select"), metrics)
    plot_candidates(table, chosen, params.layout.plots_dir("select") / "candidates.png", len(rows))
    log.info(
        "chose %s by %s among %d scored candidates (%d skipped): %s",
        chosen, metric, len(table), len(skipped),
        ", ".join(f"{n}: loss {t['loss']:.3f}, ROUGE-L {t['rouge-l']:.2f}" for n, t in table.items()),
    )
    return metrics


def _load_candidate(name: str, params: StageParams) -> tuple[Any, Any, str | None]:
    """(model, tokenizer, content hash or None) of a candidate; StageError when it cannot load."""
    if name == SCRATCH:
        train_path = params.layout.split("train")
        train = read_split(params.layout, "train")
        model, tokenizer = scratch_base(params.model, train, params.data.prompt_template, params.pretrain.seed)
        # Seeded init from the train split, the template and the shape: the same inputs build the same model.
        key = json.dumps(
            {
                "train": file_sha256(train_path),
                "template": params.data.prompt_template,
                "model": params.model.model_dump(mode="json"),
                "seed": params.pretrain.seed,
            },
            sort_keys=True,
        )
        return place_on_device(model), tokenizer, "scratch:" + sha256_bytes(key.encode())
    model, tokenizer = load_model_and_tokenizer(name, trust_remote_code=params.model.trust_remote_code)
    sha = dir_sha256(Path(name)) if Path(name).is_dir() else None
    return place_on_device(model), tokenizer, sha


def _score_candidate(
    name: str, model: Any, tokenizer: Any, sha: str | None, rows: list[dict[str, Any]], params: StageParams
) -> dict[str, Any]:
    """Summary loss and zero-shot ROUGE of one loaded candidate on the rows."""
    loss = summary_loss(
        model,
        tokenizer,
        rows,
        template=params.data.prompt_template,
        use_chat_template=params.data.use_chat_template,
        max_source_length=params.train.max_source_length,
        max_target_length=params.train.max_target_length,
        batch_size=params.evaluate.batch_size,
    )
    tokens, chars = _target_size(tokenizer, rows, params)
    _, scores = Evaluator.of(params).evaluate(model, rows, tokenizer=tokenizer, model_sha256=sha)
    _, total = count_parameters(model)
    entry = {
        "loss": loss * tokens / chars,
        "loss_per_token": loss,
        **{k: v for k, v in scores.items() if k not in ("per_row", "rows")},
        "parameters": total,
    }
    log.info("candidate %s: loss %.3f, ROUGE-L %.2f on %d val rows", name, loss, scores["rouge-l"], len(rows))
    return entry


def _target_size(tokenizer: Any, rows: list[dict[str, Any]], params: StageParams) -> tuple[int, int]:
    """(summary tokens, summary characters) that `summary_loss` averages over; eos counts as one of each.

    Candidates with different tokenizers split the same summary into different numbers of tokens, so
    a loss per token favours the finer tokenizer; per character it compares like with like.
    """
    tokens = chars = 0
    for r in rows:
        f = encode_example(
            tokenizer, r["text"], r["summary"], params.data.prompt_template, params.data.use_chat_template,
            params.train.max_source_length, params.train.max_target_length,
        )
        target = [t for t, label in zip(f["input_ids"], f["labels"]) if label != -100]
        tokens += len(target)
        if f["truncated_target"]:
            chars += len(tokenizer.decode(target, skip_special_tokens=True))
        else:
            chars += len(r["summary"]) + 1
    return tokens, max(chars, 1)


def plot_candidates(table: dict[str, dict[str, Any]], chosen: str, path: Path, rows: int) -> None:
    """Two panels per candidate: summary loss (lower is better) and ROUGE-L with its 95% interval."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    labels = [Path(n).name or n for n in names]
    colors = ["tab:green" if n == chosen else "tab:gray" for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(6, 1.6 * len(names) + 3), 4))
    left.bar(labels, [table[n]["loss"] for n in names], color=colors)
    left.set_title("summary loss (nats/char, lower is better)")
    rouge = [table[n]["rouge-l"] for n in names]
    err = [[r - table[n]["rouge-l_low"] for r, n in zip(rouge, names)], [table[n]["rouge-l_high"] - r for r, n in zip(rouge, names)]]
    right.bar(labels, rouge, yerr=err, capsize=3, color=colors)
    right.set_title("zero-shot ROUGE-L (95% interval)")
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(f"candidate bases on {rows} val rows; chosen: {Path(chosen).name or chosen}")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
