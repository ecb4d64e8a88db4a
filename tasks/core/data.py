"""Reading what the split stage wrote: every stage that needs a split asks here, so a missing,
empty or malformed split fails the same way, naming the file and the fix."""

from __future__ import annotations

from typing import Any

from tasks.core.errors import StageError
from tasks.core.io import read_jsonl
from tasks.core.layout import Layout

ROW_KEYS = ("id", "text", "summary")


def read_split(layout: Layout, name: str, *, limit: int = 0, allow_empty: bool = False) -> list[dict[str, Any]]:
    """The rows of split `name` (train, val or test), each with `id`, `text` and `summary`.

    Args:
        layout: the project's artifact layout.
        name: the split.
        limit: keep only the first `limit` rows (0: all).
        allow_empty: return [] for an empty split instead of failing.

    Raises:
        StageError: the file is missing, a line is not JSON, a row lacks a key, or the split is empty.
    """
    path = layout.split(name)
    if not path.exists():
        raise StageError(f"{path} does not exist: run `sftflow validate && sftflow split` first")
    try:
        rows = read_jsonl(path)
    except ValueError as e:
        raise StageError(f"{e}; re-run `sftflow split`") from e
    for n, row in enumerate(rows, 1):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise StageError(f"{path}:{n}: row lacks {missing}; re-run `sftflow split`")
    if limit:
        rows = rows[:limit]
    if not rows and not allow_empty:
        raise StageError(f"{path} is empty: the split stage gave the {name} split no rows; check the split ratios and the data size")
    return rows
