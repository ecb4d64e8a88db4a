"""The feedback store: what people thought of the app's summaries, kept for the next run's `align` pairs.

One folder (`align.feedback_dir`, `data/feedback/` by default), append-only:

- `records.jsonl`: the open file. The app appends one JSON record per line (`FeedbackStore.submit`):
  the input text, the output, the model name, version and variant, the rating (`good` / `bad`), the
  correction (or null), who sent it and when.
- `closed/<UTC time>.jsonl`: snapshots. Before its stages run, the retrain flow closes the open file
  (`FeedbackStore.snapshot`: a rename, so no record is copied or lost); `align` reads only closed
  snapshots, so records that arrive while a run trains wait for the next run. `closed/` is align's
  DVC dependency, and `closed_sha256` (over every snapshot) is the version's `feedback.sha256` tag
  and part of the data-change trigger.

Several app processes share the folder: every append, rate-limit check and snapshot holds an
exclusive `fcntl.flock` on `.lock` (an advisory lock the kernel drops when a process dies), and each
record is one `write` of one line followed by `fsync`. The per-user rate limit lives in `.rate.json`
beside it, under the same lock, so it holds across processes. Both dot files are DVC-ignored.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tasks.core.errors import SftflowError

OPEN_FILE = "records.jsonl"
CLOSED_DIR = "closed"
LOCK_FILE = ".lock"
RATE_FILE = ".rate.json"
RATINGS = ("good", "bad")
RECORD_KEYS = ("id", "text", "output", "rating", "correction", "model_name", "model_version", "variant", "user", "timestamp")
RATE_WINDOW_SECONDS = 60.0
# sha256 of no bytes: the hash of an empty store (a version registered before feedback existed compares as this).
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class FeedbackRefused(SftflowError, ValueError):
    """A submission the store refuses (bad input or over the rate limit); the message is for the person."""


@dataclass
class ClosedFeedback:
    """The records of every closed snapshot, in order, and what was skipped.

    Attributes:
        records: valid records (each with `RECORD_KEYS`).
        corrupt: lines that are not JSON or lack a key / hold a bad value (skipped, never fatal).
        sha256: hash of the snapshots' bytes (`closed_sha256`).
        files: the snapshot files read.
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    corrupt: int = 0
    sha256: str = EMPTY_SHA256
    files: list[str] = field(default_factory=list)


def check_submission(text: str, output: str, rating: str | None, correction: str | None, max_chars: int) -> list[str]:
    """Every problem with a submission, as sentences for the person (empty: it is fine)."""
    problems = []
    if not (text or "").strip():
        problems.append("the input text is empty")
    elif len(text) > max_chars:
        problems.append(f"the input text has {len(text)} characters, more than the {max_chars} the app accepts")
    if not (output or "").strip():
        problems.append("there is no summary to rate: summarise a text first")
    if rating not in RATINGS:
        problems.append(f"choose a rating: {' or '.join(RATINGS)}")
    if correction is not None and correction.strip():
        if len(correction) > max_chars:
            problems.append(f"the correction has {len(correction)} characters, more than {max_chars}")
        if correction.strip() == (output or "").strip():
            problems.append("the correction is the same as the summary: edit it, or leave it empty")
    return problems


class FeedbackStore:
    """Append-only feedback records in one folder, safe for several threads and processes.

    Args:
        root: the store's folder (created on first write).
        max_chars: longest input text or correction accepted (params `serve.max_chars`).
        per_minute: most records one user may submit in any 60 s (0: no limit).
    """

    def __init__(self, root: Path | str, max_chars: int = 2000, per_minute: int = 10) -> None:
        self.root = Path(root)
        self.max_chars = max_chars
        self.per_minute = per_minute

    @property
    def open_file(self) -> Path:
        """The file the app appends to."""
        return self.root / OPEN_FILE

    @property
    def closed_dir(self) -> Path:
        """The folder of closed snapshots (what align reads)."""
        return self.root / CLOSED_DIR

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's exclusive lock (every process that writes or snapshots takes it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def submit(
        self,
        *,
        text: str,
        output: str,
        rating: str | None,
        correction: str | None = None,
        model_name: str = "",
        model_version: str = "",
        variant: str = "",
        user: str = "anonymous",
        now: float | None = None,
    ) -> dict[str, Any]:
        """Validate, rate-limit and append one record; nothing is written when it is refused.

        Returns:
            The stored record.

        Raises:
            FeedbackRefused: bad input (every problem named) or the user's rate limit is reached.
        """
        problems = check_submission(text, output, rating, correction, self.max_chars)
        if problems:
            raise FeedbackRefused("feedback not saved: " + "; ".join(problems))
        now = time.time() if now is None else now
        correction = correction.strip() if correction and correction.strip() else None
        record = {
            "id": uuid.uuid4().hex,
            "text": text,
            "output": output,
            "rating": rating,
            "correction": correction,
            "model_name": model_name,
            "model_version": str(model_version),
            "variant": variant,
            "user": user or "anonymous",
            "timestamp": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds"),
        }
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self.locked():
            self._take_rate_slot(record["user"], now)
            fd = os.open(self.open_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)  # one write of one line: O_APPEND puts it at the end, whole
                os.fsync(fd)
            finally:
                os.close(fd)
        return record

    def _take_rate_slot(self, user: str, now: float) -> None:
        """Count this submission against the user's window (under the lock), or refuse it."""
        if not self.per_minute:
            return
        path = self.root / RATE_FILE
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(state, dict):
                state = {}
        except (OSError, ValueError):
            state = {}  # a lost rate file only forgets recent submissions
        recent = {u: [t for t in ts if now - t < RATE_WINDOW_SECONDS] for u, ts in state.items() if isinstance(ts, list)}
        mine = recent.get(user, [])
        if len(mine) >= self.per_minute:
            wait = RATE_WINDOW_SECONDS - (now - min(mine))
            raise FeedbackRefused(
                f"feedback not saved: {self.per_minute} submissions a minute is the limit; try again in {max(1, round(wait))} s"
            )
        recent[user] = [*mine, now]
        tmp = path.with_name(f"{RATE_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({u: ts for u, ts in recent.items() if ts}), encoding="utf-8")
        tmp.replace(path)

    def snapshot(self) -> Path | None:
        """Close the open file into `closed/<UTC time>.jsonl` (a rename under the lock); None when it is empty."""
        with self.locked():
            self.closed_dir.mkdir(parents=True, exist_ok=True)  # align's DVC dependency exists even when empty
            if not self.open_file.exists() or self.open_file.stat().st_size == 0:
                return None
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
            target = self.closed_dir / f"{stamp}.jsonl"
            n = 0
            while target.exists():  # two snapshots in one microsecond
                n += 1
                target = self.closed_dir / f"{stamp}-{n}.jsonl"
            self.open_file.rename(target)
            return target

    def open_records(self) -> list[dict[str, Any]]:
        """The records not yet closed (what the next snapshot will hold); corrupt lines skipped."""
        if not self.open_file.exists():
            return []
        return [r for r in (_parse(line) for line in self.open_file.read_bytes().splitlines()) if r is not None]


def snapshot_files(root: Path | str) -> list[Path]:
    """The closed snapshots of a store, oldest first."""
    closed = Path(root) / CLOSED_DIR
    return sorted(closed.glob("*.jsonl")) if closed.is_dir() else []


def closed_sha256(root: Path | str) -> str:
    """sha256 over every closed snapshot (name and bytes, oldest first); `EMPTY_SHA256` when there is none."""
    files = snapshot_files(root)
    if not files:
        return EMPTY_SHA256
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


def read_closed(root: Path | str) -> ClosedFeedback:
    """Every record of the closed snapshots; a corrupt line is skipped and counted, never fatal."""
    out = ClosedFeedback(sha256=closed_sha256(root))
    for path in snapshot_files(root):
        out.files.append(path.name)
        for line in path.read_bytes().splitlines():
            if not line.strip():
                continue
            record = _parse(line)
            if record is None:
                out.corrupt += 1
            else:
                out.records.append(record)
    return out


def _parse(line: bytes) -> dict[str, Any] | None:
    """One record line, or None when it is not valid JSON or not a well-formed record."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict) or any(k not in record for k in RECORD_KEYS):
        return None
    if not isinstance(record["text"], str) or not isinstance(record["output"], str) or record["rating"] not in RATINGS:
        return None
    if record["correction"] is not None and not isinstance(record["correction"], str):
        return None
    return record


def char_ngrams(text: str, n: int = 5) -> frozenset[str]:
    """The set of character n-grams of a text with whitespace removed (the whole text when shorter)."""
    s = "".join(text.split())
    return frozenset(s[i : i + n] for i in range(max(1, len(s) - n + 1)))


def near_duplicate_flags(texts: Sequence[str], against: Sequence[str], threshold: float) -> list[bool]:
    """For each text, whether it is identical to or a near-duplicate of one of `against` (character 5-gram
    Jaccard similarity >= threshold, the measure `split` groups near-duplicates by, except that split lower-cases
    the texts first and this compares them as they are)."""
    exact = set(against)
    grams = [char_ngrams(t) for t in against]
    flags = []
    for text in texts:
        if text in exact:
            flags.append(True)
            continue
        g = char_ngrams(text)
        flags.append(any(len(g & o) / len(g | o) >= threshold for o in grams if o))
    return flags
