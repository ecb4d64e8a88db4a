"""The flow's DVC side: one Prefect task per dvc.yaml stage (`dvc repro --single-item <stage>`, DVC in this
process, the stage's command in the warm interpreter of flows/warm_stages.py), its output streamed into
the run log, and the `-S` overrides written into the params.yaml DVC reads."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.lock import _chdir
from flows.warm_stages import stage_env, stage_output, stage_runner
from tasks.core.config import Params, ParamsError, apply_overrides, load_params, params_from_dict, parse_override, read_params_file
from tasks.core.errors import StageError
from tasks.core.stages import DVC_STAGES

PROGRESS_LOG_SECONDS = 10.0  # a tqdm bar redraws many times a second; log it this often
_LINE_END = re.compile(rb"\r\n|\r|\n")


def run_logger() -> Any:
    """Prefect's run logger inside a flow/task, the module logger outside (e.g. in `.fn()` tests)."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        import logging

        return logging.getLogger(__name__)


def _tool(name: str) -> str:
    """A console script of this interpreter's environment (the venv's dvc, sftflow), else PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise StageError(f"`{name}` not found next to {sys.executable} or on PATH; install the project (make setup)")
    return found


def _subprocess_env(root: Path) -> dict[str, str]:
    """Env for stage subprocesses: the venv first on PATH (dvc.yaml runs `sftflow <stage>`), unbuffered output.

    The project root goes first on PYTHONPATH so a stage runs the code of the project it belongs to
    (the one DVC hashed as the stage's deps), not whichever checkout the venv was installed from.
    """
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def pump_lines(stream: Any, emit: Callable[[str], None], tail: deque[str]) -> None:
    """Read a binary stream to its end, passing each line (without its ending) to `emit` and keeping the last in `tail`.

    Progress-bar redraws (lines ended by a bare carriage return) are passed on at most every
    PROGRESS_LOG_SECONDS, and the last one always, so a tqdm bar shows in the Prefect UI without
    flooding it.
    """
    read = getattr(stream, "read1", stream.read)
    buf = b""
    pending_progress: str | None = None
    last_progress = 0.0
    while chunk := read(65536):
        buf += chunk
        while match := _LINE_END.search(buf):
            segment, ending, buf = buf[: match.start()], match.group(), buf[match.end() :]
            text = segment.decode("utf-8", errors="replace").rstrip()
            if not text:
                continue
            if ending == b"\r":
                pending_progress = text
                if time.monotonic() - last_progress >= PROGRESS_LOG_SECONDS:
                    emit(text)
                    last_progress, pending_progress = time.monotonic(), None
                continue
            emit(text)
            tail.append(text)
            pending_progress = None
    if pending_progress:
        emit(pending_progress)
    if buf.strip():
        text = buf.decode("utf-8", errors="replace").rstrip()
        emit(text)
        tail.append(text)


def stream_command(cmd: list[str], *, cwd: Path, emit: Callable[[str], None], env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run a command, passing each output line (stdout and stderr) to `emit` as it appears (`pump_lines`).

    Args:
        cmd: the command and its arguments.
        cwd: working directory.
        emit: called with each line (without its line ending).
        env: environment (default: the current one).

    Returns:
        The exit code and the last 40 lines.
    """
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    tail: deque[str] = deque(maxlen=40)
    pump_lines(proc.stdout, emit, tail)
    return proc.wait(), list(tail)


class _EmitHandler(logging.Handler):
    """Passes DVC's log records (what `dvc repro` prints: "Running stage", "Updating lock file") to `emit`."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self._emit = emit

    def emit(self, record: logging.LogRecord) -> None:
        for line in record.getMessage().splitlines():
            if line.strip():
                self._emit(line.rstrip())


@contextlib.contextmanager
def _dvc_log_to(emit: Callable[[str], None]) -> Iterator[None]:
    """While DVC runs in this process, its INFO and higher records go to `emit` only, as `dvc repro` prints them
    (not also to the console handlers `import dvc` installs)."""
    logger = logging.getLogger("dvc")
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers = [_EmitHandler(emit)]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.handlers = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]


def _lock_entry(root: Path, stage: str) -> Any:
    """The stage's entry in dvc.lock (None before its first run)."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return None
    return (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {}).get(stage)


def write_overrides(params_path: Path, overrides: list[str]) -> Params:
    """Validate `-S` overrides against params.yaml, then write them into it (comments kept), like `dvc exp run -S`.

    Args:
        params_path: the project's params.yaml (the file the DVC stages read).
        overrides: `section.key=value` strings.

    Returns:
        The validated parameters as the stages will now read them.

    Raises:
        ParamsError: an override names an unknown key or a bad value; params.yaml is then left as it was.
    """
    params = load_params(params_path, overrides)  # validates everything before touching the file
    if overrides:
        from dvc.utils.serialize import modify_yaml

        sections = dict.fromkeys(parse_override(item)[0][0] for item in overrides)
        with modify_yaml(params_path) as data:
            # The same walk as load_params, on dvc's round-trip YAML: the copy of each section it
            # returns keeps that section's comments, and only the sections overridden are replaced.
            updated = apply_overrides(data, overrides)
            for section in sections:
                data[section] = updated[section]
        # What DVC will read must be what was validated.
        if params_from_dict(read_params_file(params_path), str(params_path)) != params:
            raise ParamsError(f"writing {overrides} into {params_path} did not give the validated parameters")
    return params


def run_dvc_stage(stage: str, root: str, runner: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one DVC stage (`dvc repro --single-item <stage>`), its output and DVC's in the run log.

    DVC runs in this process (`Repo.reproduce`, what the `dvc repro` command calls), so no stage pays
    for a second interpreter importing DVC; DVC still runs the stage's command (`sftflow <stage>`) as a
    subprocess, with the stage's environment (`_subprocess_env`), and `runner`'s `sftflow` starts it in
    the flow's warm interpreter (flows/warm_stages.py) with its output sent to the run log.

    Args:
        stage: a stage of dvc.yaml.
        root: the project root (holds dvc.yaml and params.yaml).
        runner: the flow's `flows.warm_stages.stage_runner`; None: one for this call, without the warm
            interpreter (the command starts fresh).

    Returns:
        {"stage", "ran": whether DVC executed the stage's command, "seconds"}.

    Raises:
        StageError: the stage failed; the message holds the end of its output.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    log = run_logger()
    root_path = Path(root)
    if runner is None:
        with stage_runner(root_path, _subprocess_env(root_path), _tool("sftflow"), log, warm=False) as own:
            return run_dvc_stage(stage, root, own)
    before = _lock_entry(root_path, stage)
    started = time.monotonic()
    log.info("$ dvc repro --single-item %s", stage)
    saw_running = False
    tail: deque[str] = deque(maxlen=40)

    def emit(line: str) -> None:
        nonlocal saw_running
        saw_running = saw_running or line.startswith(f"Running stage '{stage}'")
        log.info("%s", line)

    error: DvcException | None = None
    with stage_output(runner, lambda stream: pump_lines(stream, emit, tail)) as output_env, _dvc_log_to(emit):
        try:
            with _chdir(root_path), Repo(str(root_path)) as repo:  # DVC resolves the target against the cwd
                repo.reproduce(stage, single_item=True, run_env={**stage_env(_subprocess_env(root_path), runner), **output_env})
        except DvcException as e:
            error = e
    seconds = round(time.monotonic() - started, 2)
    if error is not None:
        causes, cause = [str(error)], error.__cause__
        while cause is not None:
            causes.append(str(cause))
            cause = cause.__cause__
        excerpt = "\n".join(list(tail)[-15:])
        raise StageError(f"stage `{stage}` failed ({': '.join(causes)}) after {seconds:.0f} s; its last output:\n{excerpt}") from error
    ran = saw_running or _lock_entry(root_path, stage) != before
    log.info("stage %s: %s in %.1f s", stage, "ran" if ran else "up to date, skipped by DVC", seconds)
    return {"stage": stage, "ran": ran, "seconds": seconds}


def stage_task(stage: str) -> Any:
    """The Prefect task that runs DVC stage `stage`, named like the stage (DESIGN.md); no retries: training is not transient."""
    return task(run_dvc_stage, name=stage, cache_policy=NO_CACHE, retries=0, task_run_name=stage)


STAGE_TASKS = {stage: stage_task(stage) for stage in DVC_STAGES}
