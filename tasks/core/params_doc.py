"""The params reference, built from the `Field(description=...)` of every key in `tasks.core.config`.

One walk over `Params` feeds `sftflow params` (a text table), `docs/params.md` (the same as
markdown: `sftflow params --markdown > docs/params.md`, checked by `tests/test_config.py`) and the
"params it reads" list of `sftflow <stage> --help` (`tasks.core.stages` says what each stage reads).
"""

from __future__ import annotations

import json
import textwrap
import types
import typing
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from tasks.core.config import Params
from tasks.core.stages import STAGES, Stage

REGENERATE = "sftflow params --markdown > docs/params.md"
DOC_FILE = Path("docs") / "params.md"


@dataclass(frozen=True)
class ParamDoc:
    """One params key as documented.

    Attributes:
        key: `section.key` (`train.lora.r` for a nested section's key).
        type: the type as a reader writes it, constraints included (`int > 0`, `{zh, en}`).
        default: the default as it would be written in params.yaml or `-S key=value`.
        description: the field's description.
        section: True for a section (a top-level one, or `train.lora`), False for a value.
    """

    key: str
    type: str
    default: str
    description: str
    section: bool = False


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def param_docs(model: type[BaseModel] = Params, prefix: str = "") -> list[ParamDoc]:
    """Every field of `model` in declaration order, nested sections walked (the section itself first).

    Args:
        model: the pydantic model to walk (`Params`, or one section class).
        prefix: prepended to each key, dot included (`"train."`).

    Returns:
        One `ParamDoc` per field, sections included (`ParamDoc.section`).
    """
    out: list[ParamDoc] = []
    for name, field in model.model_fields.items():
        key = prefix + name
        description = " ".join((field.description or "").split())
        if _is_section(field.annotation):
            out.append(ParamDoc(key, "section", "", description, section=True))
            out.extend(param_docs(field.annotation, key + "."))
        else:
            out.append(ParamDoc(key, format_type(field), format_default(field), description))
    return out


def key_docs() -> list[ParamDoc]:
    """The keys that hold values (what params.yaml sets), without the section rows."""
    return [d for d in param_docs() if not d.section]


# ----------------------------------------------------------------------------- types and defaults


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return "{" + ", ".join(str(a) for a in args) + "}"
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]" if args else "list"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation)


_BOUNDS = ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", ">="), (annotated_types.Lt, "lt", "<"), (annotated_types.Le, "le", "<="))


def format_type(field: FieldInfo) -> str:
    """`int > 0`, `float >= 0, <= 1`, `{auto, jsonl, csv, parquet}`, `Path | None`, `list[str]`."""
    text = _type_name(field.annotation)
    bounds = [
        f"{sign} {getattr(m, attr):g}"
        for m in field.metadata
        for kind, attr, sign in _BOUNDS
        if isinstance(m, kind)
    ]
    return f"{text} {', '.join(bounds)}" if bounds else text


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        # Plain when YAML reads it back as this very string, quoted (JSON escapes) otherwise.
        plain = "\n" not in value and value.strip() == value and value != ""
        try:
            plain = plain and yaml.safe_load(value) == value
        except yaml.YAMLError:
            plain = False
        return value if plain else json.dumps(value, ensure_ascii=False)
    return str(value)


def format_default(field: FieldInfo) -> str:
    """The default as params.yaml (or `-S key=value`, parsed as YAML) would spell it."""
    value = field.get_default(call_default_factory=True)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    return _scalar(value)


# ----------------------------------------------------------------------------- who reads what


def _covers(read: str, key: str) -> bool:
    return key == read or key.startswith(read + ".")


def readers(key: str, stages: tuple[Stage, ...] = STAGES) -> list[str]:
    """Names of the stages that read `key` (a whole section they read counts)."""
    return [s.name for s in stages if any(_covers(r, key) for r in s.reads)]


def _read_by(key: str) -> str:
    # Every stage gets `paths:` as its layout (tasks.core.stage_params), without declaring it.
    if key.startswith("paths."):
        return "every stage"
    return ", ".join(readers(key)) or "(none)"


def _docstring_body(cls: type) -> str:
    """A section class's docstring after its summary line, as one paragraph ('' when there is none)."""
    paragraphs = (cls.__doc__ or "").strip().split("\n\n")
    return " ".join(" ".join(paragraphs[1:]).split())


def stage_keys(spec: Stage) -> list[ParamDoc]:
    """The value keys a stage reads, in params.yaml order (its sections expanded to their keys)."""
    return [d for d in key_docs() if any(_covers(r, d.key) for r in spec.reads)]


# ----------------------------------------------------------------------------- renderings


def _width(text: str) -> int:
    """Terminal columns of a text: CJK and other wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - _width(text))


def _wrap(text: str, width: int) -> list[str]:
    """Greedy wrap at spaces by display width; a word wider than a line is cut."""
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if _width(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for c in word:
            if _width(line + c) > width:
                lines.append(line)
                line = ""
            line += c
    lines.append(line)
    return lines


def text_table(width: int | None = None) -> str:
    """Every value key as a plain-text table: KEY, TYPE, DEFAULT, DESCRIPTION.

    Args:
        width: wrap the cells to fit this many columns (a terminal's width); None keeps each key on
            one line, for `grep`.
    """
    docs = key_docs()
    rows = [ParamDoc("KEY", "TYPE", "DEFAULT", "DESCRIPTION"), *docs]
    key_w = max(_width(d.key) for d in rows)
    type_w = max(_width(d.type) for d in rows)
    default_w = max(_width(d.default) for d in rows)
    desc_w = None
    if width is not None:
        budget = width - key_w - 6  # the key never wraps; the other three columns share the rest
        type_w, default_w = min(type_w, max(8, budget // 5)), min(default_w, max(10, budget // 4))
        desc_w = max(20, budget - type_w - default_w)
    lines: list[str] = []
    for d in rows:
        cells = [[d.key], [d.type], [d.default], [d.description]]
        if width is not None:
            cells = [[d.key], _wrap(d.type, type_w), _wrap(d.default, default_w), _wrap(d.description, desc_w)]
        for n in range(max(map(len, cells))):
            parts = [c[n] if n < len(c) else "" for c in cells]
            lines.append(f"{_pad(parts[0], key_w)}  {_pad(parts[1], type_w)}  {_pad(parts[2], default_w)}  {parts[3]}".rstrip())
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{_cell(text)}`" if text else ""


def markdown() -> str:
    """docs/params.md: one table per section, with the stages that read each key."""
    lines = [
        "# Parameters",
        "",
        f"<!-- Generated from the Field descriptions in tasks/core/config.py: `{REGENERATE}`. Do not edit by hand. -->",
        "",
        "Every key of `params.yaml`, with its type, default and meaning. Override one for a run with",
        "`sftflow <stage> -S section.key=value`; `sftflow params` prints this table in the terminal and",
        "`sftflow <stage> --help` lists the keys that stage reads.",
        "",
    ]
    for section, field in Params.model_fields.items():
        lines += [f"## {section}", "", " ".join((field.description or "").split())]
        body = _docstring_body(field.annotation)
        if body:
            lines += ["", body]
        lines += ["", "| key | type | default | read by | description |", "| --- | --- | --- | --- | --- |"]
        for d in param_docs(field.annotation, section + "."):
            if d.section:
                lines.append(f"| {_code(d.key)} | section | | | {_cell(d.description)} |")
                continue
            lines.append(f"| {_code(d.key)} | {_code(d.type)} | {_code(d.default)} | {_read_by(d.key)} | {_cell(d.description)} |")
        lines.append("")
    return "\n".join(lines)


def stage_epilog(spec: Stage, width: int = 88) -> str:
    """The `sftflow <stage> --help` epilog: each key the stage reads, its type, default and description."""
    lines = [f"params {spec.name} reads (change one with -S KEY=VALUE; `sftflow params` lists them all):", ""]
    for d in stage_keys(spec):
        lines.append(f"  {d.key}  ({d.type}, default {d.default})")
        lines += textwrap.wrap(
            d.description, width, initial_indent="      ", subsequent_indent="      ",
            break_long_words=False, break_on_hyphens=False,
        )
    return "\n".join(lines)
