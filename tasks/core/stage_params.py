"""What a stage is handed: its slice of the params, and the artifact layout.

`StageParams` wraps the validated `Params` and lets a stage read only the sections and keys it
declared (`stage_reads` of its config class; dvc.yaml's `params:` mirror them, checked by a test). Reading
anything else raises `UndeclaredParamError` naming the key and where to declare it, so a read that
DVC does not know about cannot hide: the stage would otherwise not re-run when that key changes.

A stage's `run` is decorated with `stage_entry("<name>")`: called with the whole `Params` (the CLI,
tests), it is handed the slice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tasks.core.config import Params, save_params
from tasks.core.errors import SftflowError
from tasks.core.layout import Layout
from tasks.core.stages import Stage, stage

F = TypeVar("F", bound=Callable[..., Any])


class UndeclaredParamError(SftflowError, AttributeError):
    """A stage read a params key outside its declared slice."""


class _SectionSlice:
    """Read access to some keys of one params section."""

    def __init__(self, section: Any, name: str, keys: frozenset[str], owner: str) -> None:
        object.__setattr__(self, "_section", section)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_keys", keys)
        object.__setattr__(self, "_owner", owner)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        if key not in self._keys:
            raise UndeclaredParamError(_undeclared(self._owner, f"{self._name}.{key}"))
        return getattr(self._section, key)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"params are read-only inside a stage (tried to set {self._name}.{key})")

    def __repr__(self) -> str:
        return f"<{self._name} keys {sorted(self._keys)} of stage {self._owner}>"


class StageParams:
    """The params one stage may read, plus its `layout`.

    Attributes:
        stage: the `Stage` this slice is for.
        layout: where every stage's files are.
    """

    def __init__(self, params: Params, for_stage: Stage | str) -> None:
        spec = stage(for_stage) if isinstance(for_stage, str) else for_stage
        whole = {r for r in spec.reads if "." not in r}
        partial: dict[str, set[str]] = {}
        for r in spec.reads:
            if "." in r:
                section, key = r.split(".", 1)
                partial.setdefault(section, set()).add(key)
        object.__setattr__(self, "_params", params)
        object.__setattr__(self, "stage", spec)
        object.__setattr__(self, "layout", Layout.of(params.paths))
        object.__setattr__(self, "_whole", frozenset(whole))
        object.__setattr__(self, "_partial", {k: frozenset(v) for k, v in partial.items() if k not in whole})

    def __getattr__(self, section: str) -> Any:
        if section.startswith("__"):
            raise AttributeError(section)
        if section in self._whole:
            return getattr(self._params, section)
        if section in self._partial:
            return _SectionSlice(getattr(self._params, section), section, self._partial[section], self.stage.name)
        raise UndeclaredParamError(_undeclared(self.stage.name, section))

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"params are read-only inside a stage (tried to set {key})")

    def digest(self) -> str:
        """`Params.digest` (the model-changing sections): lineage records it (`params.sha256`); it reads no value."""
        return self._params.digest()

    def save(self, path: Path) -> None:
        """Write *all* resolved params to `path`, for a child process that runs this same stage (a rank)."""
        save_params(self._params, path)

    def __repr__(self) -> str:
        return f"<params of stage {self.stage.name}: {', '.join(self.stage.reads)}>"


def _undeclared(owner: str, key: str) -> str:
    return (
        f"stage `{owner}` read params `{key}`, which it does not declare: add it to `stage_reads` of the stage's "
        f"config class in tasks/core/config.py and to its `params:` in dvc.yaml, so DVC re-runs the stage when it changes"
    )


def stage_params(params: Params | StageParams, name: str) -> StageParams:
    """The slice of `params` for stage `name` (a slice for another stage is refused)."""
    if isinstance(params, StageParams):
        if params.stage.name != name:
            raise ValueError(f"stage `{name}` was handed the params of stage `{params.stage.name}`")
        return params
    return StageParams(params, name)


def stage_entry(name: str) -> Callable[[F], F]:
    """Decorate a stage's `run(cfg, ...)`: called with the whole `Params`, it receives the slice."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def run(params: Params | StageParams, *args: Any, **kwargs: Any) -> Any:
            return fn(stage_params(params, name), *args, **kwargs)

        run.stage = name  # type: ignore[attr-defined]
        return run  # type: ignore[return-value]

    return decorate
