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
    """Write the loss rows as CSV (columns step,train_loss,val_loss for `dvc plots show`) and a PNG plot."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def cell(v: Any) -> str:
        return "" if v is None else f"{v:.6g}"

    lines = ["step,train_loss,val_loss"] + [f"{r['step']},{cell(r['train_loss'])},{cell(r['val_loss'])}" for r in rows]
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
    ax.legend()
    save_figure(fig, Path(png_path), dpi=100)
