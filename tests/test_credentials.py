"""No credential from the environment is ever recorded: a register + promote with every secret of the
stack set leaves none of their values in any MLflow param, tag, metric, logged file or run artifact.

The store's own files are scanned byte by byte (the sqlite database with its journal, and every artifact),
so nothing the stages or MLflow write escapes the check. tests/test_stack.py repeats the scan against
real servers, Prefect's log lines included. User names are not secrets and are not scanned.
"""

from __future__ import annotations

import os
from pathlib import Path

from conftest import ROOT, sample_rows
from registry_helpers import build_upstream, sqlite_store

ROWS = sample_rows(130)[120:130]
# Every secret a pipeline or app process may hold in the compose stack (docker/compose.yaml).
SECRET_VARIABLES = ("MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING", "AWS_SECRET_ACCESS_KEY",
                    "SFTFLOW_APP_AUTH", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD")


def secret_values() -> dict[str, str]:
    """A distinctive value per secret variable (and, for user:password ones, the password alone)."""
    values = {name: f"{name.lower().replace('_', '-')}-{os.urandom(6).hex()}" for name in SECRET_VARIABLES}
    values["PREFECT_API_AUTH_STRING"] = f"ops:{values['PREFECT_API_AUTH_STRING']}"
    values["SFTFLOW_APP_AUTH"] = f"demo:{values['SFTFLOW_APP_AUTH']}"
    return values


def needles(values: dict[str, str]) -> dict[str, bytes]:
    """What to look for: each value, the password part of user:password values, in UTF-8."""
    out = {}
    for name, value in values.items():
        out[name] = value.encode()
        if ":" in value:
            out[f"{name} (password part)"] = value.partition(":")[2].encode()
    return out


def leaks(roots: list[Path], values: dict[str, str]) -> list[str]:
    """`<file>: <variable>` for every file under `roots` holding a secret value."""
    found = []
    wanted = needles(values)
    for root in roots:
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            data = path.read_bytes()
            found += [f"{path}: {name}" for name, needle in wanted.items() if needle in data]
    return found


def test_the_scan_finds_a_planted_secret(tmp_path):
    values = secret_values()
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "params.yaml").write_text(f"x: {values['SFTFLOW_APP_AUTH'].partition(':')[2]}\n")
    assert leaks([tmp_path], values) == [f"{tmp_path / 'a' / 'b' / 'params.yaml'}: SFTFLOW_APP_AUTH (password part)"]


def test_register_and_promote_record_no_credential(tmp_path_factory, tmp_path, tiny_overrides, tiny_model_dir, monkeypatch):
    import mlflow

    from tasks import promote, register
    from tasks.core.config import load_params
    from tasks.core.loading import load_registered
    from tasks.core.tracking import log_params, log_run_files, log_stage, setup_mlflow

    values = secret_values()
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
    monkeypatch.chdir(tmp_path)
    with sqlite_store(tmp_path_factory) as store:
        params = load_params(ROOT / "params.yaml", tiny_overrides + ["register.model_name=credential-scan"])
        build_upstream(params, tiny_model_dir, ROWS, [30.0 + i for i in range(len(ROWS))])
        setup_mlflow(params.register.experiment)
        with mlflow.start_run(run_name="retrain"):  # what the flow logs around the stages
            log_params(params)
            log_run_files(params)
            log_stage(params, "evaluate")
            result = register.run(params, flow_run_id="flow-1")
        decision = promote.run(params)
        assert decision["champion"] == result["version"]
        assert load_registered(f"models:/credential-scan/{result['version']}").predict([ROWS[0]["text"]])
        found = leaks([store, tmp_path], values)
    assert found == [], found
