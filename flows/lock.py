"""Where and how often a retrain runs: inside its project root, one run at a time per project."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from tasks.core.errors import StageError


@contextlib.contextmanager
def _chdir(path: Path) -> Iterator[None]:
    """Run inside the project root (stages use paths relative to it), then go back."""
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def _project_lock(root: Path) -> Iterator[None]:
    """One retrain at a time per project: two runs would write the same DVC outputs and aliases."""
    lock_path = root / ".dvc" / "tmp" / "sftflow-retrain.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise StageError(
                f"another retrain run holds {lock_path}; wait for it to finish (two runs would write the same outputs)"
            ) from e
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

