"""`sftflow`: --help for every command, exit codes and messages, and validate + split through argv."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from tasks.cli import main
from tasks.config import STAGES

COMMANDS = sorted(set(STAGES) | {"run", "deploy", "rollback", "lineage"})
SFTFLOW = Path(sys.executable).parent / "sftflow"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_works_for_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: sftflow {command}" in out
    assert "SECTION.KEY=VALUE" in out  # every command takes -S overrides


def test_console_script_rejects_an_unknown_key_by_name(tmp_path):
    """The README's example mistake, through the installed `sftflow` script."""
    proc = subprocess.run(
        [str(SFTFLOW), "validate", "-p", str(ROOT / "params.yaml"), "-S", "validate.no_such_key=1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "no_such_key" in proc.stderr and "section `validate`" in proc.stderr
    assert not (tmp_path / "artifacts").exists()  # nothing ran


def test_validate_and_split_through_argv(tmp_path, tiny_overrides, capsys):
    args = [a for o in tiny_overrides for a in ("-S", o)]
    assert main(["validate", "-p", str(ROOT / "params.yaml"), *args]) == 0
    validated = json.loads(capsys.readouterr().out)
    assert validated["success"] and validated["rows_in"] == 120
    assert main(["split", "-p", str(ROOT / "params.yaml"), *args]) == 0
    split = json.loads(capsys.readouterr().out)
    assert split["train_rows"] + split["val_rows"] + split["test_rows"] == validated["rows_out"]
    assert (tmp_path / "artifacts" / "split" / "test.jsonl").is_file()


def test_stage_error_exits_1_with_the_message(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    code = main(["validate", "-p", str(ROOT / "params.yaml"), "-S", f"data.path={missing}", "-S", f"paths.artifacts={tmp_path}", "-S", f"paths.metrics={tmp_path}"])
    assert code == 1
    assert f"sftflow validate: data file {missing} does not exist" in capsys.readouterr().err
