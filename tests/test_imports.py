"""Cheap stages stay cheap: importing the CLI or a stage module pulls in no heavy library, and the
stages that need no model (validate, split) run through `sftflow <stage>` without torch.

Each check runs in a fresh interpreter (as `dvc repro` starts one per stage), because this test
process has long imported torch.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from tasks.core.stages import STAGE_NAMES

# Imported inside the functions that use them (tasks/__init__.py): seconds each at start-up.
HEAVY = ("torch", "transformers", "deepspeed", "peft", "mlflow", "gradio", "streamlit", "great_expectations", "matplotlib")
# What a stage that never touches a model or the registry may not import while it runs.
MODEL_LIBRARIES = ("torch", "transformers", "deepspeed", "peft", "mlflow", "accelerate", "safetensors")
TORCH_FREE_STAGES = ("validate", "split")  # every other DVC stage loads a model; register/promote talk to MLflow

_REPORT = "import json, sys; print(json.dumps(sorted(m for m in {names!r} if m in sys.modules)))"


def _loaded(code: str, names: tuple[str, ...], *args: str, cwd=ROOT) -> list[str]:
    """The modules of `names` loaded after `code` ran in a fresh interpreter (its last stdout line)."""
    proc = subprocess.run(
        [sys.executable, "-c", f"{code}\n{_REPORT.format(names=names)}", *args],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["tasks.cli", *(f"tasks.{name}" for name in STAGE_NAMES)])
def test_importing_a_module_loads_no_heavy_library(module):
    assert _loaded(f"import {module}", HEAVY) == [], f"`import {module}` imports these at module level"


def test_the_check_sees_a_heavy_import():
    assert _loaded("import json, torch", HEAVY) == ["torch"]


def test_validate_and_split_run_without_torch(tmp_path, tiny_overrides):
    args = [a for o in tiny_overrides for a in ("-S", o)]
    for name in TORCH_FREE_STAGES:
        code = "import sys\nfrom tasks.cli import main\nrc = main(sys.argv[1:])\nassert rc == 0, rc"
        loaded = _loaded(code, MODEL_LIBRARIES, name, "-p", str(ROOT / "params.yaml"), *args, cwd=tmp_path)
        assert loaded == [], f"`sftflow {name}` imported {loaded} while it ran"
    assert (tmp_path / "artifacts" / "split" / "test.jsonl").is_file()
