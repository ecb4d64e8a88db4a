"""How the flow runs the `sftflow <stage>` commands of dvc.yaml: in a forked, already-imported interpreter,
with their output in the Prefect log.

Each dvc.yaml stage runs `sftflow <stage>`, and a fresh interpreter spends most of a small stage's
time importing torch, transformers, peft, DeepSpeed and the scorers. While the flow runs its stages,
`stage_runner` keeps one interpreter that imported them (flows/warm_server.py) and puts a small
`sftflow` script first on the PATH that DVC runs stage commands with: that script
(flows/stage_client.py) hands the command to the warm interpreter, which forks a child to run it with
the command's arguments, directory, environment and stdin, and with its output sent to this run's log.
Nothing else changes: DVC still decides what is stale, runs each stage's command, hashes its outputs
and writes dvc.lock; `dvc repro` alone runs the same commands in fresh interpreters and writes the
same files. Every stage command of a run gets the environment pinned when the run started its stages
(so the flow's own MLflow calls, which set MLFLOW_* variables in this process, do not reach them).

Every dvc.yaml command is `sftflow <stage>` (tests/test_stages.py), so all stage output reaches the run
log this way; DVC's own messages come through its logger (flows/dvc_stage.py).

SFTFLOW_WARM_STAGES=0 turns the warm interpreter off: every stage's `sftflow` starts fresh (its output
still goes to the run log); so does a machine without Linux pidfds (`supported`). The warm
interpreter's own log is `.dvc/tmp/sftflow-warm-stages.log`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flows.warm_server import ENV_FILE_ENV, OUTPUT_ENV, SOCKET_ENV
from tasks.core.errors import StageError

WARM_ENV = "SFTFLOW_WARM_STAGES"
LOG_FILE = Path(".dvc") / "tmp" / "sftflow-warm-stages.log"
_HERE = Path(__file__).resolve().parent
STOP_TIMEOUT_S = 30.0  # for the server to stop the children still running (SIGTERM, then reaped)
# How long the output reader waits for a stage's last writer (a process the stage left running) after DVC returned.
OUTPUT_DRAIN_TIMEOUT_S = 10.0


def enabled() -> bool:
    """Whether the flow runs its stages warm: SFTFLOW_WARM_STAGES unset or 1; 0 turns it off."""
    raw = os.environ.get(WARM_ENV, "1").strip()
    if raw not in {"0", "1"}:
        raise StageError(f"{WARM_ENV}={raw!r}: use 1 (stages start in the flow's warm interpreter, the default) or 0 (a fresh one each)")
    return raw == "1"


def supported() -> str | None:
    """Why this machine cannot run the warm interpreter (it waits on its children through Linux pidfds), or None."""
    if not hasattr(os, "pidfd_open"):
        return f"it needs os.pidfd_open (Linux 5.3+, Python 3.9+), which {sys.platform} lacks"
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError as e:
        return f"os.pidfd_open failed here ({e})"
    return None


def warmups_for(language: str) -> tuple[str, ...]:
    """The server's warm-ups the stages of a project in `language` (params `data.language`) use."""
    return ("jieba",) if language == "zh" else ()


def stage_env(env: dict[str, str], runner: dict[str, str]) -> dict[str, str]:
    """`env` with the runner's `sftflow` first on PATH, its pinned environment's file and, when it has one,
    its warm interpreter's socket."""
    out = {**env, "PATH": runner["bin"] + os.pathsep + env.get("PATH", ""), ENV_FILE_ENV: runner["env_file"]}
    out.pop(SOCKET_ENV, None)
    if runner.get("socket"):
        out[SOCKET_ENV] = runner["socket"]
    return out


def _write_shim(folder: Path, real_sftflow: str) -> None:
    """`folder/sftflow`: runs the stage client with an isolated, site-less interpreter (milliseconds)."""
    shim = folder / "sftflow"
    client = _HERE / "stage_client.py"
    shim.write_text(
        "#!/bin/sh\n# The flow's `sftflow` (flows/warm_stages.py): starts the command in the warm stage interpreter.\n"
        f"exec {shlex.quote(sys.executable)} -I -S {shlex.quote(str(client))} {shlex.quote(real_sftflow)} \"$@\"\n",
        encoding="utf-8",
    )
    shim.chmod(0o755)


@contextlib.contextmanager
def stage_runner(
    root: Path, base_env: dict[str, str], real_sftflow: str, log: Any, warm: bool = True, warmups: tuple[str, ...] = ()
) -> Iterator[dict[str, str]]:
    """The flow's `sftflow` for the stage commands of one run, with the warm interpreter when `warm`.

    Args:
        root: the project root (the server's working directory; its log goes under `.dvc/tmp/`).
        base_env: the environment stage commands get (flows.dvc_stage._subprocess_env), pinned for the run
            (`stage_env` of it); the server imports its libraries under the same one, so a stage's command
            sees no difference.
        real_sftflow: the real console script, which the client runs when there is no warm interpreter
            or it cannot take the command.
        log: the run logger.
        warm: start the warm interpreter (False: every command in a fresh one).
        warmups: what else the server prepares (flows/warm_server.py `WARMUPS`), e.g. ("jieba",) for Chinese data.

    Yields:
        The runner, {"bin": the folder holding the shim, "socket": the server's socket or "", "env_file":
        the pinned environment}, for `stage_env` and `stage_output`.
    """
    unsupported = supported() if warm else None
    if unsupported:
        log.warning("the warm stage interpreter cannot run here: %s; every stage's `sftflow` starts fresh", unsupported)
        warm = False
    folder = Path(tempfile.mkdtemp(prefix="sftflow-warm-"))  # short: a unix socket path has ~100 bytes
    proc = None
    try:
        runner = {"bin": str(folder), "socket": str(folder / "socket") if warm else "", "env_file": str(folder / "env.json")}
        _write_shim(folder, real_sftflow)
        # Every stage command of this run gets this environment (flows/stage_client.py), whatever this
        # process's later MLflow calls set in its own: the warm interpreter imports under the same one.
        pinned = stage_env(base_env, runner)
        fd = os.open(runner["env_file"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it may hold credentials
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(pinned, f)
        if warm:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with listener:
                listener.bind(runner["socket"])
                listener.listen(16)
                log_path = root / LOG_FILE
                log_path.parent.mkdir(parents=True, exist_ok=True)
                with log_path.open("wb") as out:
                    proc = subprocess.Popen(
                        [sys.executable, "-P", str(_HERE / "warm_server.py"), str(listener.fileno()), *warmups],
                        cwd=root, env=pinned, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                        pass_fds=[listener.fileno()],
                    )
            log.info("warm stage interpreter: pid %d imports the stages' libraries once (its log: %s)", proc.pid, log_path)
        yield runner
    finally:
        if proc is not None:
            assert proc.stdin is not None
            proc.stdin.close()  # its lifeline, for a server that outlives this process
            proc.terminate()  # now, also mid-import: it stops the children still running (a stage interrupted), exits
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def stage_output(runner: dict[str, str], pump: Callable[[Any], None]) -> Iterator[dict[str, str]]:
    """A named pipe for one stage command's stdout and stderr, read by `pump` in a thread.

    Yields:
        The environment entry that sends the command's output there (SFTFLOW_STAGE_OUTPUT).
    """
    fifo = Path(runner["bin"]) / f"output-{uuid.uuid4().hex[:8]}"
    os.mkfifo(fifo, 0o600)
    read_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    # Held open until DVC returns: the reader sees end-of-file only once every writer, this one too, closed it.
    hold = os.open(fifo, os.O_WRONLY)
    os.set_blocking(read_fd, True)
    reader = os.fdopen(read_fd, "rb", buffering=0)
    thread = threading.Thread(target=pump, args=(reader,), name="stage-output", daemon=True)
    thread.start()
    try:
        yield {OUTPUT_ENV: str(fifo)}
    finally:
        os.close(hold)
        thread.join(OUTPUT_DRAIN_TIMEOUT_S)
        if not thread.is_alive():
            reader.close()
        fifo.unlink(missing_ok=True)
