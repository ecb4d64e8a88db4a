"""Same inputs, same weights (issue 16, item 10): the thread count never comes from the environment,
and metrics/train.json says whether a run was deterministic and, when not, why. The whole-stage check
(flow environment vs a plain `dvc repro train`, fresh processes) is in tests/test_reliability.py."""

from __future__ import annotations

import warnings

import pytest
import torch

from tasks.core.io import configure_threads, read_json, usable_cores
from tasks.core.launch import threads_per_rank
from tasks.core.training import SESSIONS_FILE, determinism, nondeterministic_ops, record_session

CPU1 = {"device": "cpu", "num_processes": 1, "threads_per_process": 2}


def test_thread_count_ignores_omp_num_threads(monkeypatch):
    for env in ("1", "3", "64"):
        monkeypatch.setenv("OMP_NUM_THREADS", env)
        assert threads_per_rank(0, 1) == usable_cores()
        assert threads_per_rank(0, 2) == max(1, usable_cores() // 2)
        assert threads_per_rank(5, 2) == 5  # train.torch_threads wins
    before = torch.get_num_threads()
    try:
        assert configure_threads(0, 1) == usable_cores() == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_one_cpu_session_is_deterministic_and_says_on_what():
    record = determinism([{"start_step": 0, "setup": CPU1}], [], seed=42)
    assert record["deterministic"] is True
    assert "cpu, 1 rank(s) x 2 thread(s), seed 42" in record["deterministic_reason"]
    two_ranks = {**CPU1, "num_processes": 2, "threads_per_process": 1}
    assert determinism([{"start_step": 0, "setup": two_ranks}], [], seed=1)["deterministic"] is True


@pytest.mark.parametrize(
    ("sessions", "alerts", "named"),
    [
        ([{"start_step": 0, "setup": {**CPU1, "device": "cuda"}}], [], "trained on cuda"),
        ([{"start_step": 0, "setup": {**CPU1, "num_processes": 4}}], [], "4 ranks: the gradient all-reduce"),
        ([{"start_step": 0, "setup": CPU1}], ["put_ does not have a deterministic implementation"], "put_ does not"),
        (
            [{"start_step": 0, "setup": CPU1}, {"start_step": 10, "setup": {**CPU1, "threads_per_process": 1}}],
            [],
            "from step 0: cpu, 1 rank(s) x 2 thread(s), from step 10: cpu, 1 rank(s) x 1 thread(s)",
        ),
        ([{"start_step": 0, "setup": None}, {"start_step": 10, "setup": CPU1}], [], "do not record"),
    ],
)
def test_what_makes_a_run_not_deterministic_is_named(sessions, alerts, named):
    record = determinism(sessions, alerts, seed=42)
    assert record["deterministic"] is False
    assert named in record["deterministic_reason"]


def test_sessions_are_recorded_before_training_and_pruned_on_resume(tmp_path):
    other = {**CPU1, "threads_per_process": 1}
    assert record_session(tmp_path, 0, CPU1) == [{"start_step": 0, "setup": CPU1}]
    # killed after checkpoint 4, resumed there with another thread count, killed before checkpoint 8
    record_session(tmp_path, 4, other)
    # resumed at 4 again: the session that started at 4 left nothing behind
    sessions = record_session(tmp_path, 4, CPU1)
    assert sessions == [{"start_step": 0, "setup": CPU1}, {"start_step": 4, "setup": CPU1}]
    assert read_json(tmp_path / SESSIONS_FILE) == sessions
    assert determinism(sessions, [], seed=0)["deterministic"] is True
    # a fresh start forgets every earlier session
    assert record_session(tmp_path, 0, other) == [{"start_step": 0, "setup": other}]
    # checkpoints from before sessions were recorded
    (tmp_path / SESSIONS_FILE).unlink()
    assert record_session(tmp_path, 6, CPU1)[0] == {"start_step": 0, "setup": None}


def test_nondeterministic_ops_are_collected_and_other_warnings_shown():
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with pytest.warns(UserWarning, match="unrelated"), nondeterministic_ops() as alerts:
            torch.zeros(5).put_(torch.tensor([1, 1]), torch.tensor([1.0, 2.0]))
            warnings.warn("unrelated", UserWarning, stacklevel=1)
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    assert alerts == ["put_ does not have a deterministic implementation"]
