"""The flow's warm stage interpreter: imports the stages' heavy libraries once, then forks a child per stage.

Every DVC stage command is `sftflow <stage>`, a fresh interpreter; five of them import torch,
transformers, peft, DeepSpeed, datasets, nltk and scikit-learn (10-15 s of imports each on a small
CPU, most of a tiny stage's time). Under the flow this process imports them once (`PRELOAD`) and,
for each `sftflow` command that `dvc repro` runs, forks a child that runs `tasks.cli.main` exactly as
the fresh interpreter would: the command's arguments, working directory, environment and
stdin/stdout/stderr are the ones the command was given (sent by flows/stage_client.py), and its exit
code goes back to it. DVC still runs every stage, hashes its deps and outs, and records it in dvc.lock;
`dvc repro` outside the flow runs the same commands in fresh interpreters.

What keeps a child equal to a fresh interpreter:
- No project module is imported here (only third-party libraries), so each child imports the stage's
  code from disk, as DVC hashed it; the server checks this before every fork.
- The environment the libraries were imported under is the one the command gets: a request whose
  environment differs (other than the variables DVC and the shell set per command) is refused, and the
  client runs a fresh interpreter instead.
- The child reseeds numpy's global generator from the OS (as a fresh import would), and runs the atexit
  handlers before it exits. Python's `random` reseeds itself in a forked child.
- The server runs one Python thread (native ones only from FORK_SAFE_THREADS) and never touches CUDA,
  so forking it is safe; it refuses to fork when either is no longer true.
- Its imports start no thread pool: numpy's and scipy's OpenBLAS start their worker threads when they
  load, and torch starts its OpenMP pool at the first parallel operation (importing transformers runs
  one), and a process with either could not be forked. So OpenBLAS loads with one thread
  (`IMPORT_ONLY_ENV`, never in a child's environment) and torch is set to one thread once imported;
  each child gets back the thread counts a fresh interpreter starts with (`Server.fresh_threads`).

What differs, by design: every child has all of `PRELOAD` in memory (validate and split too, which
never import torch themselves; a stage's peak RSS counts those pages), and the variables those imports
set (e.g. PYTORCH_NVML_BASED_CUDA_CHECK, set by DeepSpeed) are in every child's environment.

Started by flows/warm_stages.py as `python -P warm_server.py FD [WARMUP ...]` (FD: the listening unix
socket; WARMUP: names from `WARMUPS`). SIGTERM, or the end of its stdin (a pipe from the flow), stops it
and the children still running. Imports only the standard library until `PRELOAD`.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

# Imported by several of pretrain, train, align, evaluate and quantize (what `python -X importtime` showed
# them to spend their start-up on). matplotlib without pyplot: the stages choose its backend first.
PRELOAD = (
    "numpy",
    "pandas",
    "torch",
    "transformers",
    "transformers.modeling_utils",
    "transformers.trainer",
    "transformers.generation.utils",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.llama.modeling_llama",
    "accelerate",
    "datasets",
    "peft",
    "deepspeed",
    "nltk.translate.bleu_score",
    "rouge_score.rouge_scorer",
    "sklearn",
    "matplotlib",
    "matplotlib.pyplot",  # picks no backend on import: the stages' matplotlib.use("Agg") still decides
    "safetensors.torch",
)


def _warm_jieba() -> None:
    """jieba's dictionary, which the scorer loads (about 1.5 s) in every stage that scores Chinese text."""
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)  # what tasks.core.scoring sets before it loads the dictionary
    jieba.initialize()


# Optional warm-ups the flow asks for (`warm_server.py FD NAME ...`) when its params need them.
WARMUPS = {"jieba": _warm_jieba}
# How the flow (flows/warm_stages.py) tells the `sftflow` of a stage command (flows/stage_client.py) where
# the server listens, where the command's output goes, and which environment the run pinned for its stages.
SOCKET_ENV = "SFTFLOW_WARM_STAGES_SOCKET"
OUTPUT_ENV = "SFTFLOW_STAGE_OUTPUT"
ENV_FILE_ENV = "SFTFLOW_STAGE_ENV"
# Set per command by DVC (the stage's name and root), the shell it runs the command in, and the flow (the
# named pipe for the command's output).
PER_COMMAND_ENV = frozenset({"DVC_ROOT", "DVC_STAGE", "PWD", "OLDPWD", "SHLVL", "_", OUTPUT_ENV})
MAX_REQUEST_BYTES = 4 << 20
# Native threads that survive a fork safely: pyarrow's jemalloc purges freed memory in the background and
# re-creates the thread in a child (datasets forks its `map(num_proc=...)` workers with it running).
FORK_SAFE_THREADS = frozenset({"jemalloc_bg_thd"})
# Set in the server while it imports, so that OpenBLAS starts no worker thread; a child's environment is the
# command's, without them, and its OpenBLAS gets the fresh count back (`openblas_fresh_threads`).
IMPORT_ONLY_ENV = {"OPENBLAS_NUM_THREADS": "1"}


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} warm stages [{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def _env_differences(env: dict[str, str], base: dict[str, str]) -> list[str]:
    """Variables (names only) that differ between a command's environment and the server's."""
    keys = (set(env) | set(base)) - PER_COMMAND_ENV
    return sorted(k for k in keys if env.get(k) != base.get(k))


def _other_threads() -> list[str]:
    """Threads besides this one, other than FORK_SAFE_THREADS."""
    names = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    me = str(threading.get_native_id())
    for tid in os.listdir("/proc/self/task"):
        if tid != me:
            try:
                comm = (Path("/proc/self/task") / tid / "comm").read_text().strip()
            except OSError:
                continue  # it ended
            if comm not in FORK_SAFE_THREADS:
                names.append(comm)
    return names


def openblas_fresh_threads(env: dict[str, str]) -> int:
    """The threads OpenBLAS starts with in a fresh interpreter under `env` (its own rule: the first positive
    OPENBLAS_NUM_THREADS, GOTO_NUM_THREADS or OMP_NUM_THREADS, at most the cores this process may use)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for key in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"):
        try:
            wanted = int(env.get(key, "").strip().split(",")[0])
        except ValueError:
            continue
        if wanted > 0:
            return min(wanted, cores)
    return cores


def _restore_threads(fresh: dict[str, int]) -> None:
    """In a child: the thread counts a fresh interpreter has (`Server.fresh_threads`), for what the server
    imported with fewer; the pools start in the child when it first needs them."""
    if "openblas" in fresh:
        from threadpoolctl import ThreadpoolController

        ThreadpoolController().select(internal_api="openblas").limit(limits=fresh["openblas"])
    torch = sys.modules.get("torch")
    if torch is not None and "torch" in fresh:
        torch.set_num_threads(fresh["torch"])


def _refusal(env: dict[str, str], base: dict[str, str]) -> str | None:
    """Why this server must not fork a child for a command with `env`, or None."""
    project = sorted(m for m in sys.modules if m == "tasks" or m.startswith(("tasks.", "flows")))
    if project:
        return f"it imported project modules ({', '.join(project[:5])}), which would not be re-read from disk"
    others = _other_threads()
    if others:
        return f"it runs other threads ({', '.join(others[:5])}), and forking it would not be safe"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA was initialised in it, and a forked child could not use the GPU"
    differs = _env_differences(env, base)
    if differs:
        return f"the command's environment differs from the one its libraries were imported under ({', '.join(differs[:10])})"
    return None


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    """A client's request (one JSON line) and the three file descriptors sent with it."""
    data, fds, _flags, _addr = socket.recv_fds(conn, 65536, 3)
    while not data.endswith(b"\n"):
        if len(data) > MAX_REQUEST_BYTES:
            raise ValueError("request too long")
        chunk = conn.recv(65536)
        if not chunk:
            raise ValueError("connection closed mid-request")
        data += chunk
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"expected stdin, stdout and stderr, got {len(fds)} file descriptors")
    return json.loads(data), fds


def _run_child(
    request: dict, fds: list[int], inherited: list[int], import_env: dict[str, str | None], fresh_threads: dict[str, int]
) -> None:
    """In the forked child: become the `sftflow` command of `request`, run it, exit with its code.

    `import_env`: what importing `PRELOAD` changed in the environment (None: removed), applied on top of
    the command's own, as the same imports in a fresh interpreter would. `fresh_threads`: the thread
    counts a fresh interpreter has, restored (`_restore_threads`).
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
    for fd in inherited:
        os.close(fd)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for key, value in import_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    sys.argv = [request.get("argv0", "sftflow"), *request["argv"]]
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()  # a fresh import seeds it from the OS; a fork would share the server's state
    code = 1
    try:
        _restore_threads(fresh_threads)  # in the try: a failure is the command's, never the server loop's
        from tasks.cli import main

        code = main(request["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what an uncaught exception does at the top of a fresh interpreter
        traceback.print_exc()
        code = 1
    # What interpreter exit does before it ends the process: wait for non-daemon threads, run atexit.
    try:
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed pipe must not change the exit code
                pass
        os._exit(code if isinstance(code, int) else 1)


class Server:
    """Accepts `sftflow` commands on a listening socket and runs each in a forked child."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ, ("accept", None))
        self.selector.register(sys.stdin, selectors.EVENT_READ, ("lifeline", None))
        self.base_env = dict(os.environ)
        self.children: dict[int, dict] = {}  # pid -> {"conn", "pidfd"}
        self.stopping = False
        # The thread counts of a fresh interpreter under this environment (which every forked command's is),
        # for the libraries imported here with one thread: OpenBLAS (IMPORT_ONLY_ENV) and torch (`_serve`).
        self.fresh_threads: dict[str, int] = {"openblas": openblas_fresh_threads(self.base_env)}

    def import_env(self) -> dict[str, str | None]:
        """What the imports changed in this process's environment (None: a variable they removed), other
        than IMPORT_ONLY_ENV, which the server sets itself while it imports."""
        changed: dict[str, str | None] = {k: v for k, v in os.environ.items() if self.base_env.get(k) != v}
        changed.update({k: None for k in self.base_env if k not in os.environ})
        return {k: v for k, v in changed.items() if k not in IMPORT_ONLY_ENV}

    def _own_fds(self) -> list[int]:
        fds = [self.listener.fileno(), self.selector.fileno(), sys.stdin.fileno()]
        for child in self.children.values():
            fds += [child["conn"].fileno(), child["pidfd"]]
        return fds

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        try:
            request, fds = _read_request(conn)
        except (OSError, ValueError) as e:
            _log(f"bad request: {e}")
            conn.close()
            return
        why = _refusal(request.get("env", {}), self.base_env)
        if why is not None:
            _log(f"refused `sftflow {' '.join(request.get('argv', []))}`: {why}")
            for fd in fds:
                os.close(fd)
            conn.sendall(json.dumps({"refused": why}).encode() + b"\n")
            conn.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_child(request, fds, [*self._own_fds(), conn.fileno()], self.import_env(), dict(self.fresh_threads))
        for fd in fds:
            os.close(fd)
        try:
            pidfd = os.pidfd_open(pid)
            self.children[pid] = {"conn": conn, "pidfd": pidfd}
            self.selector.register(conn, selectors.EVENT_READ, ("client", pid))
            self.selector.register(pidfd, selectors.EVENT_READ, ("exit", pid))
            conn.sendall(json.dumps({"started": pid}).encode() + b"\n")
        except BaseException:
            # The client will run the command fresh: this child must not run it too.
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            self.children.pop(pid, None)
            raise
        _log(f"started `sftflow {' '.join(request['argv'])}` as pid {pid}")

    def _reap(self, pid: int) -> None:
        child = self.children.pop(pid)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        code = 128 - code if code < 0 else code  # killed by a signal: what a shell reports
        self.selector.unregister(child["pidfd"])
        os.close(child["pidfd"])
        conn = child["conn"]
        if conn.fileno() != -1:
            self.selector.unregister(conn)
            try:
                conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
            except OSError:
                pass
            conn.close()
        _log(f"pid {pid} exited with {code}")

    def _client_gone(self, pid: int) -> None:
        """The command's client died (DVC was stopped): stop its child too."""
        conn = self.children[pid]["conn"]
        if conn.recv(1):
            return  # clients send nothing after the request; ignore stray bytes
        self.selector.unregister(conn)
        conn.close()
        _log(f"the client of pid {pid} went away; stopping it")
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def poll(self, timeout: float | None) -> None:
        """Handle what is ready within `timeout` seconds (None: wait)."""
        for key, _ in self.selector.select(timeout):
            kind, pid = key.data
            if kind == "accept":
                self._accept()
            elif kind == "exit":
                self._reap(pid)
            elif kind == "client":
                self._client_gone(pid)
            elif kind == "lifeline" and not os.read(sys.stdin.fileno(), 4096):
                self.stopping = True

    def stop_children(self) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in list(self.children):
            self._reap(pid)


def main(argv: list[str]) -> int:
    """`warm_server.py FD [WARMUP ...]`: preload, answering commands in between, then serve until stdin closes."""
    listener = socket.socket(fileno=int(argv[0]))
    warmups = [WARMUPS[name] for name in argv[1:]]
    listener.setblocking(True)
    server = Server(listener)
    # The flow stops it with SIGTERM, also in the middle of an import (nothing half-imported is worth finalising).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        _serve(server, warmups)
    except SystemExit as e:
        server.stop_children()
        sys.stderr.flush()
        os._exit(e.code if isinstance(e.code, int) else 1)
    server.stop_children()
    return 0


def _import_single_threaded(server: Server, name: str) -> None:
    """Import `name`; torch is then set to one thread, its fresh count kept for the children (a count read
    before any parallel operation: the one a fresh interpreter with this environment starts with)."""
    module = __import__(name)
    if name == "torch":
        server.fresh_threads["torch"] = module.get_num_threads()
        module.set_num_threads(1)


def _serve(server: Server, warmups: list) -> None:
    """Preload (answering commands between two imports), then serve until the lifeline closes."""
    started = time.monotonic()
    steps = [(name, lambda name=name: _import_single_threaded(server, name)) for name in PRELOAD]
    steps += [(w.__name__, w) for w in warmups]
    os.environ.update(IMPORT_ONLY_ENV)
    for name, step in steps:
        server.poll(0)  # a stage that arrives early gets what is loaded so far and imports the rest itself
        if server.stopping:
            break
        try:
            step()
        except Exception as e:  # noqa: BLE001 - a stage that needs it fails on its own import, with the real error
            _log(f"could not preload {name}: {type(e).__name__}: {e}")
    for key in IMPORT_ONLY_ENV:  # back to the environment it was started with
        if key in server.base_env:
            os.environ[key] = server.base_env[key]
        else:
            os.environ.pop(key, None)
    _log(f"preloaded {len(PRELOAD)} modules in {time.monotonic() - started:.1f} s; they changed the environment's "
         f"{sorted(server.import_env()) or 'nothing'}; children get a fresh interpreter's threads {server.fresh_threads}")
    while not server.stopping:
        server.poll(None)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
