"""`sftflow`: --help for every command, exit codes and messages, and validate + split through argv."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from tasks.cli import main
from tasks.core.config import Params
from tasks.core.params_doc import markdown, stage_keys
from tasks.core.stages import STAGE_NAMES, STAGES

COMMANDS = sorted(set(STAGE_NAMES) | {"run", "deploy", "rollback", "lineage"})
SFTFLOW = Path(sys.executable).parent / "sftflow"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_works_for_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: sftflow {command}" in out
    assert "SECTION.KEY=VALUE" in out  # every command takes -S overrides



def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # the epilog wraps descriptions: compare words


def test_evaluate_help_lists_max_new_tokens_with_its_description(capsys):
    out = _help("evaluate", capsys)
    description = Params.model_fields["evaluate"].annotation.model_fields["max_new_tokens"].description
    assert "evaluate.max_new_tokens" in out
    assert " ".join(description.split()) in out


@pytest.mark.parametrize("spec", STAGES, ids=lambda s: s.name)
def test_stage_help_lists_every_key_the_stage_reads(spec, capsys):
    out = _help(spec.name, capsys)
    keys = stage_keys(spec)
    assert keys, f"{spec.name} reads no params?"
    for doc in keys:
        assert f"{doc.key} (" in out and doc.description in out, doc.key


def test_params_command_prints_every_key_and_the_markdown(capsys):
    assert main(["params"]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0].split() == ["KEY", "TYPE", "DEFAULT", "DESCRIPTION"]
    keys = [line.split()[0] for line in lines[1:]]
    assert keys == list(Params().flat())  # one line per key when not on a terminal
    row = next(line for line in lines if line.startswith("evaluate.batch_size "))
    assert row.split()[1:4] == ["int", ">", "0"] and " 32 " in row and "batch" in row.lower()
    auto = next(line for line in lines if line.startswith("evaluate.max_new_tokens "))
    assert auto.split()[1:4] == ["int", "|", "{auto}"] and " auto " in auto and "new tokens" in auto
    assert main(["params", "--markdown"]) == 0
    assert capsys.readouterr().out == markdown()


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
