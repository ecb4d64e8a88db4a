"""`sftflow` as the flow's DVC stages see it: hand the command to the flow's warm stage interpreter.

The flow (flows/warm_stages.py) puts a small `sftflow` script ahead of the real one on the PATH DVC
runs stage commands with; the script runs this file with `python -I -S`, so it starts in milliseconds
and imports nothing but the standard library (and flows/warm_server.py's names, which need no more).

1. Environment: the command gets the one the run pinned when it started its stages (SFTFLOW_STAGE_ENV,
   a JSON file), plus what DVC and the shell set per command (`PER_COMMAND_ENV`). Variables the flow's
   own MLflow calls set later (MLFLOW_EXPERIMENT_ID, ...) do not reach the stages, as under `dvc repro`.
2. Output: its stdout and stderr go to the flow's named pipe for this stage (SFTFLOW_STAGE_OUTPUT),
   which the flow reads into the Prefect log.
3. It sends its arguments, working directory, environment and stdin/stdout/stderr to the warm
   interpreter's socket (SFTFLOW_WARM_STAGES_SOCKET), which forks a child that runs `tasks.cli.main` on
   them, and exits with the stage's exit code. Without a socket (SFTFLOW_WARM_STAGES=0), or when the
   warm interpreter cannot take the command (it says why), it runs the real `sftflow` in a fresh
   interpreter, with the same environment and output.

    python -I -S stage_client.py REAL_SFTFLOW [sftflow arguments ...]
"""

from __future__ import annotations

import json
import os
import socket
import sys

if __package__:  # imported as flows.stage_client
    from flows.warm_server import ENV_FILE_ENV, OUTPUT_ENV, PER_COMMAND_ENV, SOCKET_ENV
else:  # the shim's `python -I -S stage_client.py`: -I leaves this folder off sys.path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from warm_server import ENV_FILE_ENV, OUTPUT_ENV, PER_COMMAND_ENV, SOCKET_ENV


def _fresh(real: str, argv: list[str], why: str | None = None) -> None:
    """Run the real `sftflow` in this process's place (a fresh interpreter), saying why when it is not the setting."""
    if why:
        print(f"sftflow: the flow's warm stage interpreter {why}; running `sftflow {' '.join(argv)}` in a fresh interpreter",
              file=sys.stderr, flush=True)
    os.execv(real, [real, *argv])


def _lines(sock: socket.socket):
    """The server's JSON replies, one per line, until it closes the connection."""
    buf = b""
    while chunk := sock.recv(65536):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield json.loads(line)


def _pin_environment() -> None:
    """This process's environment becomes the run's pinned one plus the per-command variables (when the flow pinned one)."""
    path = os.environ.get(ENV_FILE_ENV)
    if not path:
        return
    with open(path, encoding="utf-8") as f:
        env = json.load(f)
    env.update({k: v for k, v in os.environ.items() if k in PER_COMMAND_ENV})
    os.environ.clear()
    os.environ.update(env)


def main(argv: list[str]) -> int:
    """Send `argv` to the warm interpreter and return the stage's exit code (or exec a fresh `sftflow`)."""
    real, args = argv[0], argv[1:]
    _pin_environment()
    output = os.environ.get(OUTPUT_ENV)
    if output:  # the command's stdout and stderr (and this process's messages) go to the flow's run log
        fd = os.open(output, os.O_WRONLY)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    path = os.environ.get(SOCKET_ENV)
    if not path:  # SFTFLOW_WARM_STAGES=0: the flow said so in its log
        _fresh(real, args)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        request = json.dumps({"argv0": real, "argv": args, "cwd": os.getcwd(), "env": dict(os.environ)}).encode() + b"\n"
        socket.send_fds(sock, [request], [0, 1, 2])
    except OSError as e:
        _fresh(real, args, f"at {path} did not answer ({type(e).__name__}: {e})")
    replies = _lines(sock)
    try:
        first = next(replies)
    except (StopIteration, OSError) as e:
        _fresh(real, args, f"at {path} closed the connection before starting the stage ({e!r})")
    if "refused" in first:
        _fresh(real, args, f"cannot run it: {first['refused']}")
    try:
        last = next(replies)
    except (StopIteration, OSError):
        print(f"sftflow: the warm stage interpreter at {path} went away while `sftflow {' '.join(args)}` ran "
              f"(child pid {first.get('started')}); its exit code is unknown", file=sys.stderr, flush=True)
        return 1
    return int(last["exit"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
