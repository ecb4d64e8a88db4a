"""tasks/core/stages.py is the one list of stages: stage modules never import each other, dvc.yaml
agrees with the list (names, order, params, code deps), and a stage cannot read params it did not declare."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from tasks.core.config import Params
from tasks.core.stage_params import StageParams, UndeclaredParamError, stage_params
from tasks.core.stages import DVC_STAGES, STAGE_NAMES, STAGES, stage

TASKS = ROOT / "tasks"


def imported_modules(source: str, package: str) -> set[str]:
    """Every module a source file imports anywhere: top level, inside functions, and through importlib."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from tasks import evaluate`
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in {"import_module", "__import__"} and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.add(arg.value)
                elif isinstance(arg, ast.JoinedStr):  # f"tasks.{name}": a dynamic stage import
                    head = "".join(v.value for v in arg.values if isinstance(v, ast.Constant))
                    found.add(head + "*")
    return found


def stage_violations(stage_name: str, source: str) -> list[str]:
    """The other stages a stage module's source imports (a dynamic `tasks.{...}` counts as all of them)."""
    bad = []
    for module in sorted(imported_modules(source, "tasks")):
        parts = module.split(".")
        if parts[0] != "tasks" or len(parts) < 2:
            continue
        if parts[1] == "*" or module.startswith("tasks.*") or (parts[1].endswith("*") and parts[1] != "core*"):
            bad.append(f"{module} (dynamic import of a stage)")
        elif parts[1] in STAGE_NAMES and parts[1] != stage_name:
            bad.append(module)
    return bad


def module_file(module: str) -> Path | None:
    """The file of a `tasks.*` module, or None for anything else (a name imported from a module)."""
    rel = Path(*module.split("."))
    for candidate in (ROOT / rel.with_suffix(".py"), ROOT / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def code_closure(start: Path) -> set[Path]:
    """The `tasks/` files a module runs: its own and, transitively, those it imports."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
        for module in imported_modules(path.read_text(encoding="utf-8"), package):
            if module.split(".")[0] == "tasks" and (f := module_file(module)) is not None:
                todo.append(f)
    return seen


def test_the_check_catches_a_planted_cross_stage_import():
    planted = {
        "from tasks.evaluate import lead": ["tasks.evaluate", "tasks.evaluate.lead"],
        "def f():\n    from tasks import quantize\n": ["tasks.quantize"],
        "import tasks.register as r": ["tasks.register"],
        "def f():\n    import importlib\n    importlib.import_module('tasks.promote')\n": ["tasks.promote"],
        "def f(s):\n    import importlib\n    return importlib.import_module(f'tasks.{s}')\n": ["tasks.* (dynamic import of a stage)"],
    }
    for source, expected in planted.items():
        assert stage_violations("select", source) == expected, source
    assert stage_violations("select", "from tasks.core.evaluation import Evaluator\nfrom tasks.select import x") == []


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_stage_modules_never_import_other_stages(name):
    path = TASKS / f"{name}.py"
    assert path.is_file(), f"stage {name} has no module {path}"
    assert stage_violations(name, path.read_text(encoding="utf-8")) == [], f"{path} imports another stage"


def test_core_never_imports_a_stage():
    for path in sorted((TASKS / "core").glob("*.py")):
        stages = [m for m in imported_modules(path.read_text(encoding="utf-8"), "tasks.core")
                  if m.split(".")[0] == "tasks" and len(m.split(".")) > 1 and m.split(".")[1] in STAGE_NAMES]
        assert stages == [], f"{path} (the shared core) imports stages {stages}"


def _dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def test_dvc_yaml_has_the_stages_in_order():
    assert list(_dvc_stages()) == list(DVC_STAGES)
    for name, spec in _dvc_stages().items():
        assert spec["cmd"] == f"sftflow {name}", f"dvc.yaml stage {name} runs {spec['cmd']!r}"


@pytest.mark.parametrize("name", DVC_STAGES)
def test_dvc_params_are_the_declared_reads(name):
    listed = [p if isinstance(p, str) else next(iter(p)) for p in _dvc_stages()[name].get("params", [])]
    assert sorted(listed) == sorted(stage(name).reads), (
        f"dvc.yaml `{name}.params` must list exactly the `stage_reads` of the stage's config class (tasks/core/config.py)"
    )


@pytest.mark.parametrize("name", DVC_STAGES)
def test_dvc_deps_cover_the_code_the_stage_runs(name):
    deps = [ROOT / d for d in _dvc_stages()[name].get("deps", []) if not str(d).startswith("${")]
    needed = code_closure(TASKS / f"{name}.py")
    missing = sorted(str(f.relative_to(ROOT)) for f in needed if not any(f == d or d in f.parents for d in deps))
    assert missing == [], f"dvc.yaml `{name}.deps` lacks code the stage runs: add {missing}"


def test_every_declared_read_exists():
    params = Params()
    for spec in STAGES:
        for read in spec.reads:
            node = params
            for part in read.split("."):
                assert hasattr(node, part), f"stage {spec.name} declares {read!r}, which is no params key"
                node = getattr(node, part)


def test_reading_outside_the_slice_raises():
    params = Params()
    split = StageParams(params, "split")
    assert split.split.train == params.split.train
    with pytest.raises(UndeclaredParamError, match=r"stage `split` read params `train`.*stage_reads.*tasks/core/config.py.*dvc.yaml"):
        split.train
    evaluate = StageParams(params, "evaluate")
    assert evaluate.data.language == "zh"  # a declared key of a shared section
    with pytest.raises(UndeclaredParamError, match="`data.path`"):
        evaluate.data.path
    assert evaluate.layout.final_model == params.layout.final_model
    assert evaluate.digest() == params.digest()
    with pytest.raises(AttributeError, match="read-only"):
        evaluate.evaluate = None
    with pytest.raises(ValueError, match="params of stage `split`"):
        stage_params(split, "evaluate")


def test_a_stage_entry_hands_the_stage_its_slice(tmp_path):
    from tasks import split

    params = Params.model_validate({"paths": {"artifacts": str(tmp_path / "a"), "metrics": str(tmp_path / "m"), "plots": str(tmp_path / "p")}})
    with pytest.raises(Exception, match="run `sftflow validate` first"):
        split.run(params)  # the wrapper sliced it: the stage ran and failed on its missing input
    assert split.run.stage == "split"
