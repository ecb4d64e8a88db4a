"""Reliability (issue 11): faults injected into the whole retrain flow from the outside.

`sftflow run` runs as a subprocess in its own process group against a real Prefect server and a
real `mlflow server` (loopback, sqlite), on one tiny copy of the project shared by the scenarios,
which run in file order: SIGKILL during each stage, tracking server down during register, DVC
remote unreachable, two runs at once, bad data. The last tests are units: atomic writes and
partial checkpoints. No fault hooks live in production code: a stage is recognised by the lines
the flow prints or the files it writes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from flow_helpers import (
    BIN,
    make_tiny_project,
    start_group,
    start_mlflow_server,
    start_prefect_server,
    stop_group,
    wait_http,
)

MODEL = "sftflow-summarizer"
TRAIN_STEPS = 30  # long enough to be killed mid-epoch after a checkpoint (every 5 steps)
# Checkpoints every 5 steps for the kill-and-resume scenarios; `last` because best-checkpoint selection
# would need a checkpoint at every evaluation (save_steps a multiple of eval_steps).
ALIGN_STEPS = 30  # the same for align (DPO): checkpoints every 5 steps
PROJECT_OVERRIDES = [f"train.max_steps={TRAIN_STEPS}", "train.save_steps=5", "train.eval_steps=15", "train.select_by=last",
                     f"align.max_steps={ALIGN_STEPS}", "align.save_steps=5"]
RUN_TIMEOUT = 600.0


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny project, a Prefect server and an MLflow server; the env a flow subprocess runs with."""
    import mlflow

    from flows.dvc_stage import write_overrides

    root = tmp_path_factory.mktemp("reliability")
    project = make_tiny_project(root / "project")
    write_overrides(project / "params.yaml", PROJECT_OVERRIDES)
    prefect_proc, api = start_prefect_server(root / "prefect")
    mlflow_proc, uri = start_mlflow_server(root / "mlflow")
    state = {"mlflow": mlflow_proc}
    try:
        wait_http(api + "/health", prefect_proc, root / "prefect" / "server.log", timeout=180)
        wait_http(uri + "/health", mlflow_proc, root / "mlflow" / "server.log", timeout=180)
        env = dict(os.environ)
        env.update(
            PREFECT_API_URL=api,
            PREFECT_HOME=str(root / "prefect-client"),
            MLFLOW_TRACKING_URI=uri,
            # One HTTP try per call: the flow's Prefect retries are what is under test, not urllib3's
            # (MLflow's default, 7 tries with backoff, makes one attempt against a dead server last minutes).
            MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
            MLFLOW_HTTP_REQUEST_TIMEOUT="20",
            # The retries themselves are under test, not their 2-4-8 s backoff.
            SFTFLOW_IO_RETRY_DELAY_SECONDS="0.2",
            OMP_NUM_THREADS="1",
        )
        # An earlier in-process test (register, the real-model chains) may have set a registry URI, which
        # mlflow also exports as MLFLOW_REGISTRY_URI: this module's client and runs use this server's.
        env["MLFLOW_REGISTRY_URI"] = uri
        with pytest.MonkeyPatch.context() as mp:
            for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
                mp.setenv(key, env[key])
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
            yield {"root": root, "project": project, "env": env, "api": api, "uri": uri, "servers": state}
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        stop_group(state["mlflow"])
        stop_group(prefect_proc)


class FlowRun:
    """`sftflow run` in its own process group, its output in a log file the test polls."""

    def __init__(self, world: dict, name: str, *args: str) -> None:
        self.log = world["root"] / f"{name}.log"
        self.started_ms = int(time.time() * 1000)
        self.proc = start_group(
            [str(BIN / "sftflow"), "run", "-p", str(world["project"] / "params.yaml"), *args],
            self.log, env=world["env"], cwd=world["project"],
        )

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def wait_for(self, what: str, ready: Callable[[], bool], timeout: float = RUN_TIMEOUT, every: float = 0.1) -> None:
        """Poll `ready()` every `every` s; fail with the log's tail when the run ends first."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended (exit {self.proc.returncode}) before {what}:\n{self.text()[-4000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no {what} within {timeout:.0f} s:\n{self.text()[-4000:]}")
            time.sleep(every)

    def wait_for_line(self, line: str) -> None:
        self.wait_for(repr(line), lambda: line in self.text())

    def reached_register(self) -> bool:
        """True once this run's MLflow run carries the model hash: the flow sets it just before register."""
        from mlflow import MlflowClient

        client = MlflowClient()
        experiment = client.get_experiment_by_name("sftflow")
        if experiment is None:
            return False
        runs = client.search_runs([experiment.experiment_id], f"attributes.start_time >= {self.started_ms}")
        return any("sftflow.model_sha256" in r.data.tags for r in runs)

    def kill(self) -> None:
        """SIGKILL the whole group: the flow, its `dvc repro` and the stage process."""
        assert self.proc.poll() is None, "the run had already ended: the kill would prove nothing"
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        time.sleep(0.5)  # let the kernel reap the group's children and release their locks

    def finish(self, timeout: float = RUN_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the run did not end within {timeout:.0f} s:\n{self.text()[-4000:]}")


def _versions(name: str = MODEL) -> list[int]:
    from mlflow import MlflowClient

    return sorted(int(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'"))


def _champion() -> int:
    from mlflow import MlflowClient

    return int(MlflowClient().get_model_version_by_alias(MODEL, "champion").version)


def _last_mlflow_run():
    """The newest run of the flow's experiment, as a pandas row."""
    import mlflow

    return mlflow.search_runs(experiment_names=["sftflow"], order_by=["attributes.start_time DESC"], max_results=1).iloc[0]


def _dvc(project: Path, *args: str) -> str:
    out = subprocess.run([str(BIN / "dvc"), *args], cwd=project, capture_output=True, text=True, check=False)
    return out.stdout + out.stderr


def assert_outputs_whole(project: Path) -> None:
    """Every JSON/JSONL output parses and dvc.lock is YAML: nothing half-written under its real name."""
    for folder in ("artifacts", "metrics", "plots"):
        for path in (project / folder).rglob("*"):
            if not path.is_file() or path.name.endswith(".tmp") or "checkpoints" in path.parts:
                continue  # temp files are not outputs; a checkpoint is checked by its own rule (below)
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".jsonl":
                for line in path.read_text(encoding="utf-8").splitlines():
                    json.loads(line)
    if (project / "dvc.lock").exists():
        assert isinstance(yaml.safe_load((project / "dvc.lock").read_text(encoding="utf-8")), dict)


def assert_registry_clean() -> None:
    """No orphan in any registered model: one champion, every main version judged by promote, every
    variant version referenced by a main version's `sftflow.variant.<method>` tag, one version per content."""
    from mlflow import MlflowClient

    client = MlflowClient()
    champion = _champion()
    everything = client.search_model_versions("")
    main = [v for v in everything if v.name == MODEL]
    variants = [v for v in everything if v.name != MODEL]
    for v in main:
        assert "promote.decision" in v.tags or int(v.version) == champion, f"orphan version {v.version}: {v.tags}"
    referenced = {uri for v in main for k, uri in v.tags.items() if k.startswith("sftflow.variant.")}
    orphans = [f"{v.name}/{v.version}" for v in variants if f"models:/{v.name}/{v.version}" not in referenced]
    assert not orphans, f"variant versions no main version points at: {orphans}"
    assert {v.name for v in variants} <= {f"{MODEL}-int8"}, f"unexpected registered models {sorted({v.name for v in variants})}"
    contents = [(v.name, v.tags.get("sftflow.content_sha256")) for v in everything]
    assert None not in {c for _, c in contents} and len(set(contents)) == len(contents), f"duplicate content: {contents}"
    champion_variant = client.get_model_version(MODEL, str(champion)).tags["sftflow.variant.int8"]
    assert champion_variant in {f"models:/{v.name}/{v.version}" for v in variants}


# ----------------------------------------------------------------------- 1. SIGKILL, stage by stage


@pytest.mark.slow
def test_sigkill_during_each_stage_then_the_next_run_completes(world):
    from tasks.core.checkpoints import checkpoint_step, last_complete_checkpoint

    project = world["project"]
    ckpt_dir = project / "artifacts" / "train" / "checkpoints"

    for stage in ("validate", "split"):
        run = FlowRun(world, f"kill-{stage}")
        run.wait_for_line(f"Running stage '{stage}'")
        run.kill()
        assert_outputs_whole(project)

    # train: killed mid-epoch once a complete checkpoint exists
    run = FlowRun(world, "kill-train")
    run.wait_for_line("Running stage 'train'")
    run.wait_for("a complete checkpoint", lambda: ckpt_dir.is_dir() and last_complete_checkpoint(ckpt_dir) is not None)
    run.kill()
    assert_outputs_whole(project)
    killed_at = checkpoint_step(last_complete_checkpoint(ckpt_dir))
    assert 0 < killed_at < TRAIN_STEPS
    # A partial checkpoint, newest by step (a state file, no weights): resume must pass over it.
    fake = ckpt_dir / f"checkpoint-{TRAIN_STEPS - 1}"
    fake.mkdir()
    state = json.loads((last_complete_checkpoint(ckpt_dir) / "trainer_state.json").read_text(encoding="utf-8"))
    (fake / "trainer_state.json").write_text(json.dumps({**state, "global_step": TRAIN_STEPS - 1}), encoding="utf-8")

    # align: training resumes and finishes in this run; align (DPO) is killed once it has a complete checkpoint
    align_dir = project / "artifacts" / "align" / "checkpoints"
    run = FlowRun(world, "kill-align")
    run.wait_for_line("Running stage 'align'")
    run.wait_for("a complete align checkpoint", lambda: align_dir.is_dir() and last_complete_checkpoint(align_dir) is not None)
    run.kill()
    assert_outputs_whole(project)
    align_killed_at = checkpoint_step(last_complete_checkpoint(align_dir))
    assert 0 < align_killed_at < ALIGN_STEPS
    log = run.text()
    assert "removing incomplete checkpoint" in log and f"checkpoint-{TRAIN_STEPS - 1}" in log
    train = json.loads((project / "metrics" / "train.json").read_text(encoding="utf-8"))
    assert train["resumed_from_step"] >= killed_at > 0  # a later checkpoint may land before the kill
    assert train["resumed_from_step"] < TRAIN_STEPS  # killed mid-training, not after it
    assert f"resuming from artifacts/train/checkpoints/checkpoint-{train['resumed_from_step']}" in log
    # no step done twice: this session ran exactly the steps after the checkpoint
    assert train["steps"] == TRAIN_STEPS and train["steps_run"] == TRAIN_STEPS - train["resumed_from_step"]

    # evaluate: align resumes from its checkpoint and finishes in this run; killed once evaluate starts
    run = FlowRun(world, "kill-evaluate")
    run.wait_for_line("Running stage 'evaluate'")
    run.kill()
    assert_outputs_whole(project)
    align = json.loads((project / "metrics" / "align.json").read_text(encoding="utf-8"))
    assert ALIGN_STEPS > align["resumed_from_step"] >= align_killed_at > 0
    assert f"resuming from artifacts/align/checkpoints/checkpoint-{align['resumed_from_step']}" in run.text()
    assert align["steps"] == ALIGN_STEPS and align["steps_run"] == ALIGN_STEPS - align["resumed_from_step"]

    # register: killed once its int8 variant is registered, most likely before the main version
    # (registered after it): the next run must reuse that variant, not leave it orphaned.
    from mlflow import MlflowClient

    run = FlowRun(world, "kill-register")
    run.wait_for("register to start", run.reached_register, every=0.5)
    run.wait_for("a registered variant", lambda: bool(MlflowClient().search_model_versions(f"name = '{MODEL}-int8'")))
    run.kill()
    assert_outputs_whole(project)

    run = FlowRun(world, "complete")
    assert run.finish() == 0, run.text()[-4000:]
    assert "retrain registered" in run.text()
    assert _versions() == [1] and _champion() == 1
    assert_registry_clean()
    assert_outputs_whole(project)
    leftovers = [p for d in ("artifacts", "metrics", "plots") for p in (project / d).rglob("*.tmp")]
    assert not leftovers, leftovers
    assert "up to date" in _dvc(project, "status")


# ------------------------------------------------------------------ 2. tracking server down


@pytest.mark.slow
def test_tracking_server_down_during_register_fails_then_registers_once(world):
    before, champion = _versions(), _champion()
    # The quantize gate's bound: only quantize re-runs (seconds), and the new params make a new version to register.
    run = FlowRun(world, "server-down", "-S", "quantize.max_drop=1.5")
    run.wait_for("register to start", run.reached_register)  # polled fast: the server must die before register ends
    stop_group(world["servers"]["mlflow"])
    assert run.finish() == 1
    log = run.text()
    assert "Retry 3/3" in log and "Retries are exhausted" in log  # register retried, then gave up
    # The run fails with register's own error, naming the server; marking the MLflow run FAILED on the
    # dead server fails too, and is only logged.
    assert f"sftflow run: register failed talking to the MLflow tracking server at {world['uri']}" in log
    assert "could not mark MLflow run" in log

    proc, uri = start_mlflow_server(world["root"] / "mlflow", port=int(world["uri"].rsplit(":", 1)[1]))
    world["servers"]["mlflow"] = proc
    wait_http(uri + "/health", proc, world["root"] / "mlflow" / "server.log", timeout=180)
    run = FlowRun(world, "server-back")
    assert run.finish() == 0, run.text()[-4000:]
    assert _versions() == [*before, before[-1] + 1]  # exactly one new version
    assert _champion() in (champion, before[-1] + 1)
    assert_registry_clean()


# ------------------------------------------------------------------ 3. DVC remote unreachable


@pytest.mark.slow
def test_unreachable_dvc_remote_fails_clearly_and_keeps_local_results(world):
    project = world["project"]
    blocker = world["root"] / "not-a-folder"
    blocker.write_text("a file where the remote's parent folder should be\n")
    bad_url = str(blocker / "remote")
    _dvc(project, "remote", "modify", "--local", "local", "url", bad_url)
    before, champion = _versions(), _champion()
    try:
        run = FlowRun(world, "remote-down", "-S", "evaluate.bootstrap_samples=30")
        assert run.finish() != 0
    finally:
        (project / ".dvc" / "config.local").unlink()
    log = run.text()
    assert "dvc push failed" in log and bad_url in log.split("dvc push failed", 1)[1]
    assert "Retry 3/3" in log  # push is I/O: retried before failing
    assert _last_mlflow_run()[["status", "tags.sftflow.outcome"]].tolist() == ["FAILED", "failed"]
    # local results kept: the evaluate re-run is committed to dvc.lock and on disk
    lock = yaml.safe_load((project / "dvc.lock").read_text(encoding="utf-8"))
    evaluate_params = lock["stages"]["evaluate"]["params"]["params.yaml"]
    assert evaluate_params["evaluate"]["bootstrap_samples"] == 30
    assert (project / "artifacts" / "train" / "model" / "config.json").exists()
    assert "up to date" in _dvc(project, "status")
    # push runs before register: nothing registered that the remote lacks
    assert _versions() == before and _champion() == champion


# ------------------------------------------------------------------ 5. two runs at once


@pytest.mark.slow
def test_two_runs_at_once_one_fails_on_the_lock(world):
    before = _versions()
    runs = [FlowRun(world, f"concurrent-{i}", "-S", "evaluate.bootstrap_samples=20") for i in range(2)]
    codes = [r.finish() for r in runs]
    assert sorted(codes) == [0, 1], [r.text()[-3000:] for r in runs]
    loser = runs[codes.index(1)]
    assert "another retrain run holds" in loser.text() and "sftflow-retrain.lock" in loser.text()
    assert _versions() == [*before, before[-1] + 1]  # one writer, one registration
    assert_registry_clean()


# ------------------------------------------------------------------ 6. two app processes, one feedback store


@pytest.mark.slow
def test_two_app_processes_appending_feedback_at_once_lose_nothing(world):
    """Two `sftflow serve` processes share the project's feedback store (as app replicas share the compose
    volume); 2 x 40 concurrent /feedback calls, some refused: every valid record is stored exactly once."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from flow_helpers import free_port
    from tasks.core.feedback import FeedbackStore

    project, root = world["project"], world["root"]
    store = FeedbackStore(project / "data" / "feedback")
    before = {r["id"] for r in store.open_records()}
    apps, urls = [], []
    try:
        for i in range(2):
            port = free_port()
            log_file = root / f"app-{i}.log"
            apps.append((start_group([str(BIN / "sftflow"), "serve", "--port", str(port), "-S", "serve.feedback_per_minute=0"],
                                     log_file, env=world["env"], cwd=project), log_file))
            urls.append(f"http://127.0.0.1:{port}/")
        for (proc, log_file), url in zip(apps, urls):
            wait_http(url, proc, log_file, timeout=240)
        clients = [Client(url, verbose=False) for url in urls]

        def send(i: int):
            rating, correction = ("bad", f"改正 {i}") if i % 5 else ("bad", f"输出 {i}")  # every 5th: correction = output
            try:
                return clients[i % 2].predict(f"文本 {i}", f"输出 {i}", rating, correction, api_name="/feedback")["id"]
            except AppError as e:
                assert "same as the summary" in str(e)
                return None

        with ThreadPoolExecutor(max_workers=16) as pool:
            ids = list(pool.map(send, range(80)))
    finally:
        for proc, _ in apps:
            stop_group(proc)
    saved = [i for i in ids if i is not None]
    assert len(saved) == 64 and len(set(saved)) == 64
    stored = [r for r in store.open_records() if r["id"] not in before]
    assert sorted(r["id"] for r in stored) == sorted(saved)  # every valid one, exactly once; no refused one
    assert {r["text"] for r in stored} == {f"文本 {i}" for i in range(80) if i % 5}


# ------------------------------------------------------------------ 4. bad data, scheduled run


@pytest.mark.slow
def test_bad_data_fails_validate_and_the_champion_keeps_serving(world):
    import mlflow
    import pandas as pd
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    project = world["project"]
    before, champion = _versions(), _champion()
    (project / "data" / "tiny.jsonl").write_text('{"id": "1", "text": "broken\n', encoding="utf-8")
    run = FlowRun(world, "bad-data")
    assert run.finish() != 0
    assert "stage `validate` failed" in run.text()
    assert _versions() == before and _champion() == champion

    with temporary_settings({PREFECT_API_URL: world["api"]}), get_client(sync_client=True) as client:
        last = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[last.id])))
    assert last.state.type.value == "FAILED"
    assert {t.name: t.state.type.value for t in tasks}.get("validate") == "FAILED"

    failed = _last_mlflow_run()
    assert failed["status"] == "FAILED"
    assert failed["tags.prefect.flow_run_id"] == str(last.id)

    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    (summary,) = model.predict(pd.DataFrame({"text": ["本文提出一种基于深度学习的中文文本摘要方法。"]}))
    assert isinstance(summary, str)


# ------------------------------------------------------------------ 6. atomic writes, partial checkpoints


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    from tasks.core import io

    target = tmp_path / "metrics.json"
    io.write_json(target, {"v": 1})

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        io.write_json(target, {"v": 2, "pad": "x" * 100_000})
    assert io.read_json(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # the temp file is gone too


def test_sigkill_mid_write_leaves_the_old_or_the_new_file(tmp_path):
    target = tmp_path / "rows.jsonl"
    script = (
        "import sys\n"
        "from tasks.core.io import write_jsonl\n"
        "i = 0\n"
        "while True:\n"
        "    write_jsonl(sys.argv[1], [{'i': i, 'text': 'x' * 1000} for _ in range(2000)])\n"
        "    i += 1\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], cwd=root)
    try:
        deadline = time.monotonic() + 120
        while not target.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # mid-way through a later write
    finally:
        proc.kill()
        proc.wait()
    lines = target.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 2000 and len({r["i"] for r in rows}) == 1  # one whole version of the file


def _checkpoint(ckpt_dir: Path, step: int, *, state: str | None = "ok", weights: bool = True) -> Path:
    path = ckpt_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "training_args.bin").write_bytes(b"args")
    if weights:
        (path / "model.safetensors").write_bytes(b"weights")
    if state == "ok":
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 20}))
    elif state == "truncated":
        (path / "trainer_state.json").write_text('{"global_step": ')
    return path


def test_resume_passes_over_partial_checkpoints(tmp_path):
    from tasks.core.io import write_json
    from tasks.core.checkpoints import FINGERPRINT_FILE, last_complete_checkpoint, prepare_checkpoints

    ckpt_dir = tmp_path / "checkpoints"
    _checkpoint(ckpt_dir, 2)
    good = _checkpoint(ckpt_dir, 4)
    _checkpoint(ckpt_dir, 6, state=None)  # killed before the state file
    _checkpoint(ckpt_dir, 8, state="truncated")  # killed while writing it
    _checkpoint(ckpt_dir, 10, weights=False)  # weights gone (killed while rotated out)
    assert last_complete_checkpoint(ckpt_dir) == good

    fingerprint = {"train": {"max_steps": 20}}
    write_json(ckpt_dir / FINGERPRINT_FILE, fingerprint)
    prepare_checkpoints(ckpt_dir, fingerprint)
    assert sorted(p.name for p in ckpt_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    shutil.rmtree(ckpt_dir)


# ------------------------------------------------------- 7. same inputs, same weights (issue 16, item 10)


@pytest.mark.slow
def test_train_in_fresh_processes_through_the_flow_and_plain_dvc_gives_identical_weights(tmp_path, monkeypatch):
    """The train stage run twice from a clean artifacts/train on the same tiny inputs: once as the flow
    runs it (`run_dvc_stage`: `dvc repro --single-item train` in `_subprocess_env`, with the
    OMP_NUM_THREADS=1 the flow's tests and benchmarks set), once as a plain `dvc repro train` from a
    shell with another OMP_NUM_THREADS, hash seed and tokenizers setting. The defaults that decide the
    bits stay on: the shipped ZeRO-2 config (on one rank the plain Trainer: `deepspeed_plan`), the
    shipped precision and `train.torch_threads: 0` (threads from the machine). Before the
    thread count stopped following OMP_NUM_THREADS, 1 thread and 3 threads trained different weights."""
    from flows.dvc_stage import _subprocess_env, run_dvc_stage, write_overrides
    from tasks.core.io import dir_sha256

    project = make_tiny_project(tmp_path / "project")
    write_overrides(project / "params.yaml", ["train.deepspeed_config=configs/deepspeed/zero2.json", "train.torch_threads=0"])
    upstream = subprocess.run(
        [str(BIN / "dvc"), "repro", "pretrain"], cwd=project, env=_subprocess_env(project), capture_output=True, text=True, check=False
    )
    assert upstream.returncode == 0, (upstream.stdout + upstream.stderr)[-3000:]
    train_dir, metrics_file = project / "artifacts" / "train", project / "metrics" / "train.json"
    loss_csv = project / "plots" / "train" / "loss.csv"

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("PYTHONHASHSEED", "1")
    assert run_dvc_stage("train", str(project))["ran"]
    via_flow = dir_sha256(train_dir / "model"), json.loads(metrics_file.read_text(encoding="utf-8")), loss_csv.read_text()

    shutil.rmtree(train_dir)
    metrics_file.unlink()
    # A shell with the venv activated: its sftflow runs the installed checkout, the one copied above.
    shell = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TOKENIZERS_PARALLELISM")}
    shell.update(OMP_NUM_THREADS="3", PYTHONHASHSEED="2", PATH=str(BIN) + os.pathsep + os.environ.get("PATH", ""))
    done = subprocess.run([str(BIN / "dvc"), "repro", "train"], cwd=project, env=shell, capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "Running stage 'train'" in done.stdout, (done.stdout + done.stderr)[-3000:]
    plain = dir_sha256(train_dir / "model"), json.loads(metrics_file.read_text(encoding="utf-8")), loss_csv.read_text()

    assert plain[2] == via_flow[2], "the per-step losses diverged"
    assert plain[0] == via_flow[0], "same inputs, different weights"
    for metrics in (via_flow[1], plain[1]):
        assert metrics["deterministic"] is True, metrics["deterministic_reason"]
        assert metrics["deepspeed_config"].endswith("zero2.json") and metrics["steps_run"] == metrics["steps"] > 0
    assert via_flow[1]["threads_per_process"] == plain[1]["threads_per_process"]
