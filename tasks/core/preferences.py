"""Preference pairs: the (prompt, chosen, rejected) rows `align` learns from, and the user's preference file.

A preference file (params `align.data`) is JSONL, CSV or Parquet with the columns `prompt` (the source
text; the prompt template is applied to it as to every text), `chosen` and `rejected`. It is checked
with Great Expectations like the raw data (columns present, no missing or empty value); a row whose
chosen and rejected answers are the same teaches nothing and is dropped and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.errors import DataError
from tasks.core.expectations import run_suite
from tasks.core.io import file_sha256

log = logging.getLogger(__name__)

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
# sha256 recorded for "no preference file" (tags and the trigger compare strings).
NO_FILE = "none"


@dataclass(frozen=True)
class Pair:
    """One preference: for the source `text`, `chosen` is the better answer than `rejected`.

    Attributes:
        text: the source text (the prompt template is applied when it is encoded).
        chosen: the preferred summary.
        rejected: the worse one.
        source: `feedback`, `file` or `self`.
    """

    text: str
    chosen: str
    rejected: str
    source: str

    def to_dict(self) -> dict[str, str]:
        return {"text": self.text, "chosen": self.chosen, "rejected": self.rejected, "source": self.source}


def pairs_sha256(pairs: list[Pair]) -> str:
    """A hash of the pairs, in order (what a DPO checkpoint depends on)."""
    payload = json.dumps([p.to_dict() for p in pairs], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def preference_file_sha256(path: Path | None) -> str:
    """The file's sha256, or `NO_FILE` when no preference file is set."""
    return NO_FILE if path is None else file_sha256(Path(path))


def _read_frame(path: Path) -> Any:
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix in {".jsonl", ".ndjson", ".json"}:
            return pd.read_json(path, lines=True, dtype=False)
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], encoding="utf-8-sig")
        if suffix in {".parquet", ".pq"}:
            return pd.read_parquet(path)
    except (ValueError, OSError) as e:
        raise DataError(f"align.data: cannot read {path} as {suffix[1:]}: {e}") from e
    raise DataError(f"align.data: {path} is neither JSONL, CSV nor Parquet (by its suffix); use .jsonl, .csv or .parquet")


def read_preference_file(path: Path) -> tuple[list[Pair], dict[str, int]]:
    """The pairs of a preference file, checked with Great Expectations.

    Returns:
        The pairs (source `file`) and counts: `file_rows`, `file_same_answers` (dropped).

    Raises:
        DataError: the file is missing or unreadable, or fails a check (each failure named).
    """
    import great_expectations.expectations as gxe

    path = Path(path)
    if not path.is_file():
        raise DataError(f"align.data: {path} does not exist (from {Path.cwd()}); set align.data to a preference file or null")
    frame = _read_frame(path)
    missing = [c for c in PAIR_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"align.data: {path} lacks the columns {missing}; it has {list(frame.columns)} (prompt, chosen, rejected needed)")
    expectations: list[Any] = []
    for column in PAIR_COLUMNS:
        expectations += [
            gxe.ExpectColumnValuesToNotBeNull(column=column),
            gxe.ExpectColumnValueLengthsToBeBetween(column=column, min_value=1),
        ]
    frame = frame[list(PAIR_COLUMNS)].astype(object)
    result = run_suite(frame, expectations, suite="sftflow_align_pairs", source="preferences", asset="pairs")
    failures = []
    for r in result.results:
        if not r.success:
            kind = type(r.expectation_config).__name__ if not hasattr(r.expectation_config, "type") else r.expectation_config.type
            column = r.expectation_config.kwargs.get("column")
            count = (r.result or {}).get("unexpected_count")
            failures.append(f"{kind} on `{column}` ({count} rows)")
    if failures:
        raise DataError(f"align.data: {path} fails its checks: " + "; ".join(failures))
    pairs, same = [], 0
    for row in frame.itertuples(index=False):
        prompt, chosen, rejected = (str(v) for v in row)
        if chosen.strip() == rejected.strip():
            same += 1
            continue
        pairs.append(Pair(prompt, chosen.strip(), rejected.strip(), "file"))
    log.info("align.data: %d pairs from %s (%d dropped: chosen = rejected)", len(pairs), path, same)
    return pairs, {"file_rows": len(frame), "file_same_answers": same}
