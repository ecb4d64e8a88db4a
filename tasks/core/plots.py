"""Plots every stage writes as DVC plots and MLflow artifacts: one PNG writer, and the loss curve
that pretrain and train share."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from tasks.core.io import atomic_write_bytes, atomic_write_text


def save_figure(fig: Any, path: Path, dpi: int = 120) -> None:
    """Render a matplotlib figure to PNG atomically and close it (plots are DVC outputs too)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def write_loss_curve(rows: list[dict[str, Any]], csv_path: Path, png_path: Path, title: str) -> None:
    """Write the loss rows as CSV (step,train_loss,val_loss[,val_rouge_l] for `dvc plots show`) and a PNG
    plot: the losses, and the validation ROUGE-L on a second axis when it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def cell(v: Any) -> str:
        return "" if v is None else f"{v:.6g}"

    columns = list(rows[0]) if rows else ["step", "train_loss", "val_loss"]
    lines = [",".join(columns)] + [",".join(str(r["step"]) if c == "step" else cell(r[c]) for c in columns) for r in rows]
    atomic_write_text(Path(csv_path), "\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        points = [(r["step"], r[key]) for r in rows if r[key] is not None]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "val_loss" else None, markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    rouge = [(r["step"], r["val_rouge_l"]) for r in rows if r.get("val_rouge_l") is not None]
    if rouge:
        right = ax.twinx()
        right.plot(*zip(*rouge), color="tab:green", marker="s", markersize=3, label="validation ROUGE-L")
        right.set_ylabel("validation ROUGE-L (F × 100)")
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels)
    save_figure(fig, Path(png_path), dpi=100)
