"""The one list of stages: their order, what each does, and the params each may read.

It is built from the stages' config classes (`tasks.core.config`: `stage_help`, `stage_reads`,
`stage_dvc` beside each section's keys, in the order of `Params`' fields), so a stage is declared
once, with its parameters. Everything that needs the stage order reads it from here: the flow, the
CLI, the tests, the benchmarks and the Prefect deployment. `tests/test_stages.py` checks dvc.yaml
against it (stage names, order, and that each stage's `params:` and `deps:` cover what the stage
reads), and a stage that reads a params key it did not declare fails at once
(`tasks.core.stage_params`).

`reads` names whole sections (`train`) or single keys (`data.language`). A stage that lists only
some keys of a shared section is not re-run by DVC when another key of it changes (editing the
prompt does not re-validate the data).
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.core.config import Params


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes:
        name: the one name everywhere: `tasks/<name>.py`, the dvc.yaml stage, the params section,
            the Prefect task, `sftflow <name>`, the MLflow metric prefix.
        help: one line for `sftflow --help`.
        reads: the params sections and keys its code may read.
        dvc: a dvc.yaml stage (it turns files into files); the others talk to MLflow or serve.
    """

    name: str
    help: str
    reads: tuple[str, ...]
    dvc: bool = True


def _stages() -> tuple[Stage, ...]:
    """Every section of `Params` that declares a stage, in field order: that order is the stage order."""
    found = []
    for name, field in Params.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and hasattr(section, "stage_reads"):
            found.append(Stage(name, section.stage_help, tuple(section.stage_reads), section.stage_dvc))
    return tuple(found)


STAGES: tuple[Stage, ...] = _stages()
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
# The stages dvc.yaml holds, in its order; the flow runs each through `dvc repro --single-item`.
DVC_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.dvc)
# The stage whose `model/` is the final model: evaluated, quantized, registered and served. `align` always
# writes one: the aligned model when its gate passes, else the fine-tuned model passed through (also when
# `align.enabled` is false), so every consumer reads one folder whichever way the gate went.
FINAL_MODEL_STAGE = "align"
# The stage whose model align starts from (and passes through).
FINE_TUNED_MODEL_STAGE = "train"


def stage(name: str) -> Stage:
    """The stage called `name`.

    Raises:
        KeyError: no such stage (the message lists them).
    """
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"unknown stage {name!r}; the stages are {STAGE_NAMES}")
