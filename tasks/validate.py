"""validate: check the raw data set with a Great Expectations suite; write the clean rows and a report.

The raw file is first checked by hand where `datasets` would give a vague error (missing path, empty
file, a broken JSON line, bytes that are not UTF-8), then loaded with `datasets` (a CSV with or without
the UTF-8 byte-order mark Excel writes, `\n` or `\r\n` line ends, quoted multi-line cells), mapped to the
canonical columns `id`/`text`/`summary`, normalised (line breaks kept, control characters removed and
counted), and validated by a Great Expectations 1.x suite
built from `params.validate`. Rows that fail a row-level expectation are dropped and counted per
reason; the stage fails when the dropped share passes `validate.max_dropped_share` or a table-level
expectation (columns, duplicate share, language share, unique ids) fails.

Outputs: `artifacts/validate/clean.jsonl` (only on success), `artifacts/validate/report.json`,
`artifacts/validate/data_docs.html` and `metrics/validate.json` (always, so a failed run can be logged).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import tempfile
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.core.config import DataConfig, ValidateConfig
from tasks.core.errors import DataError
from tasks.core.expectations import run_suite
from tasks.core.io import atomic_write_text, write_json, write_jsonl
from tasks.core.stage_params import StageParams, stage_entry

logger = logging.getLogger(__name__)

STAGE = "validate"
ALPACA_COLUMNS = ("instruction", "input", "output")
SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
DATASETS_BUILDERS = {"jsonl": "json", "csv": "csv", "parquet": "parquet"}
EXAMPLES = 5  # row ids quoted per failed expectation in the error
REPORT_EXAMPLES = 20  # unexpected values kept per expectation in report.json / data docs

# Row-level expectations: a failing row is dropped and counted under this reason.
REASON_BY_COLUMN = {
    ("expect_column_values_to_not_be_null", "text"): "missing_text",
    ("expect_column_values_to_not_be_null", "summary"): "missing_summary",
    ("expect_column_value_lengths_to_be_between", "text"): "text_length",
    ("expect_column_value_lengths_to_be_between", "summary"): "summary_length",
    ("expect_column_pair_values_a_to_be_greater_than_b", None): "summary_not_shorter",
    ("expect_column_values_to_be_in_set", "is_repeat"): "duplicate",
    ("expect_column_values_to_be_in_set", "in_language"): "language",
}

# Invisible characters that survive NFC and whitespace collapsing but split otherwise equal texts.
_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
# Line ends of every platform, and Unicode's line and paragraph separators, become `\n`.
_LINE_END = re.compile("\r\n?|[\u2028\u2029]")
# Control characters (C0, DEL, C1) but tab and line feed (`\r` is a line end by then): NUL, BEL, ESC...
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Whitespace but the line feed: in Python's Unicode mode `\s` covers U+3000 (ideographic space), NBSP and tabs.
_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
_LETTER_RUN = re.compile(r"[^\W\d_]+")
_ASCII_WORD = re.compile(r"[A-Za-z]+")


def normalize_text(text: str, unicode_form: str) -> str:
    """Normalise one text: Unicode form, control and invisible characters removed, whitespace collapsed
    within each line, line breaks kept (see `clean_text`).

    NFC (the default) only composes equivalent code point sequences, so it never changes what a
    reader sees. NFKC is not safe for Chinese summaries: it rewrites full-width punctuation and
    digits (`，` -> `,`, `１２` -> `12`, `（` -> `(`), circled numbers (`①` -> `1`) and unit signs
    (`㎡` -> `m2`), so the references and the model's vocabulary would drift from real Chinese text.
    It stays available (`validate.unicode_form: NFKC`) for corpora that are already mixed.

    Args:
        text: the raw text.
        unicode_form: `NFC`, `NFKC` or `none`.

    Returns:
        The normalised text (may be empty).
    """
    return clean_text(text, unicode_form)[0]


def clean_text(text: str, unicode_form: str) -> tuple[str, int]:
    """Normalise one text and count the control characters it lost.

    Line breaks carry meaning (dialogue turns `#Person1#: …\n#Person2#: …`, paragraphs, one highlight
    per line), so they stay: line ends become `\n`, each line's whitespace collapses to one space and is
    trimmed, and runs of blank lines shrink to one. Control characters other than tab and line break
    (`\x00`, `\x07`, ESC, DEL, C1) are removed and counted; tabs become spaces.

    Args:
        text: the raw text.
        unicode_form: `NFC`, `NFKC` or `none` (as `normalize_text`).

    Returns:
        The normalised text (may be empty) and the number of control characters removed.
    """
    if unicode_form != "none":
        text = unicodedata.normalize(unicode_form, text)
    text = _LINE_END.sub("\n", text)
    text, controls = _CONTROL.subn("", text)
    text = _INVISIBLE.sub("", text)
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip("\n"), controls


def cjk_ratio(text: str) -> float:
    """Share of CJK ideographs among the non-whitespace characters of `text` (0 for an empty text)."""
    chars = len(text) - sum(c.isspace() for c in text)
    return len(_CJK.findall(text)) / chars if chars else 0.0


def ascii_word_ratio(text: str) -> float:
    """Share of letter runs that are ASCII words (a CJK run counts as one non-ASCII word)."""
    runs = _LETTER_RUN.findall(text)
    return sum(bool(_ASCII_WORD.fullmatch(r)) for r in runs) / len(runs) if runs else 0.0


def in_language(text: str, language: str, cfg: ValidateConfig) -> bool:
    """Whether a row's text is in `language` (`zh`: CJK ratio; `en`: ASCII-word ratio)."""
    if language == "zh":
        return cjk_ratio(text) >= cfg.min_cjk_ratio
    return ascii_word_ratio(text) >= cfg.min_ascii_word_ratio


@dataclass
class RawTable:
    """The loaded raw file: one frame row per record, and where each record sits in the file."""

    frame: pd.DataFrame
    locations: list[str]  # "line 7" (JSONL) or "row 7" (CSV / Parquet), 1-based
    format: str


def detect_format(path: Path, fmt: str) -> str:
    """Resolve `data.format` (`auto` = by file suffix)."""
    if fmt != "auto":
        return fmt
    try:
        return SUFFIX_FORMATS[path.suffix.lower()]
    except KeyError:
        raise DataError(
            f"{path}: cannot tell the format from the suffix {path.suffix!r}; set data.format to one of"
            f" jsonl, csv, parquet (e.g. -S data.format=jsonl)"
        ) from None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _check_utf8(path: Path, data: bytes) -> None:
    """Fail naming the line and byte offset of the first byte sequence that is not UTF-8."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1)
        raise DataError(
            f"{path}: line {line} is not valid UTF-8 (byte 0x{data[e.start]:02x} at byte offset {e.start},"
            f" column {column} of the line: {e.reason}). Re-encode the file as UTF-8,"
            f" e.g. `iconv -f GB18030 -t UTF-8 in > out`"
        ) from e


def check_file(path: Path, fmt: str) -> list[int] | None:
    """Check the raw file before `datasets` reads it, so every error names the file, line and fix.

    Args:
        path: the raw data file.
        fmt: the resolved format (`jsonl`, `csv` or `parquet`).

    Returns:
        For JSON Lines, the 1-based line number of each record (blank lines are skipped, as
        `datasets` does); otherwise None.

    Raises:
        DataError: the path is missing or not a file, the file is empty, has bytes that are not
            UTF-8, or (JSONL) has lines that are not JSON objects.
    """
    if not path.exists():
        raise DataError(f"data file {path} does not exist: set data.path in params.yaml or pass -S data.path=FILE")
    if not path.is_file():
        raise DataError(f"data path {path} is not a file: point data.path at one JSONL, CSV or Parquet file")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty (0 bytes): it needs one row per record")
    if fmt == "parquet":
        return None
    data = path.read_bytes()
    _check_utf8(path, data)
    text = data.decode("utf-8")
    if not text.strip():
        raise DataError(f"data file {path} holds only whitespace: it needs one row per record")
    if fmt != "jsonl":
        return None
    if text.lstrip().startswith("["):
        raise DataError(f"{path} is a JSON array; write one JSON object per line (JSON Lines) instead")
    records: list[int] = []
    bad: list[str] = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append(f"line {lineno} is not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            bad.append(f"line {lineno} is a JSON {type(obj).__name__}, not an object")
            continue
        records.append(lineno)
    if bad:
        shown = "; ".join(bad[:EXAMPLES]) + (f"; and {len(bad) - EXAMPLES} more" if len(bad) > EXAMPLES else "")
        raise DataError(f"{path}: {_plural(len(bad), 'broken line')}: {shown}. Fix or delete these lines")
    return records


def load_table(path: Path, fmt: str) -> RawTable:
    """Check and load the raw file with `datasets` (JSONL, CSV or Parquet) into a pandas frame.

    Args:
        path: the raw data file.
        fmt: `data.format` (`auto` picks by suffix).

    Returns:
        The raw table; every column is kept as read (CSV columns as strings, so ids keep leading zeros).

    Raises:
        DataError: see `check_file`; also when `datasets` cannot parse the file or it has no rows.
    """
    import datasets

    fmt = detect_format(path, fmt)
    lines = check_file(path, fmt)
    kwargs: dict[str, Any] = {}
    if fmt == "csv":
        # utf-8-sig reads a file with or without the byte-order mark Excel writes ("UTF-8 CSV"); plain
        # utf-8 would keep it in the first column's name, which then matches no feature nor data.id_column.
        with path.open(encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), [])
        # All strings: pandas would turn id "007" into 7 and the text "NA" into a missing value.
        kwargs.update(
            features=datasets.Features({c: datasets.Value("string") for c in header}),
            keep_default_na=False,
            na_values=[""],
            encoding="utf-8-sig",
        )
    # A throwaway cache: the raw file is read once per run, and a shared cache would keep every version.
    with tempfile.TemporaryDirectory(prefix="sftflow-validate-") as cache:
        try:
            dataset = datasets.load_dataset(
                DATASETS_BUILDERS[fmt],
                data_files=str(path),
                split="train",
                cache_dir=cache,
                keep_in_memory=True,
                **kwargs,
            )
        except Exception as e:  # datasets wraps pyarrow/pandas errors in several types
            raise DataError(f"{path}: `datasets` cannot read it as {fmt}: {e}") from e
        frame = dataset.to_pandas()
    if len(frame) == 0:
        raise DataError(f"data file {path} has no rows (only a header?): it needs one row per record")
    if lines is not None:
        assert len(lines) == len(frame), (len(lines), len(frame))
        locations = [f"line {n}" for n in lines]
    else:
        locations = [f"row {i}" for i in range(1, len(frame) + 1)]
    logger.info("read %d rows and columns %s from %s (%s)", len(frame), list(frame.columns), path, fmt)
    return RawTable(frame=frame, locations=locations, format=fmt)


def _as_text(value: Any) -> str | None:
    """A cell as text: strings as they are, numbers written out; missing values, lists and objects as None."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def resolve_columns(columns: Iterable[str], data: DataConfig) -> tuple[str, list[str]]:
    """Decide how to read text and summary: `columns` (from `data:`), `alpaca`, or `missing`.

    Returns:
        The mode and the required source columns that are missing (empty unless `missing`).
    """
    columns = set(columns)
    wanted = [data.text_column, data.summary_column]
    if all(c in columns for c in wanted):
        return "columns", []
    if {"instruction", "output"} <= columns:
        return "alpaca", []
    return "missing", [c for c in wanted if c not in columns]


def canonical_frame(raw: RawTable, data: DataConfig, cfg: ValidateConfig, mode: str) -> pd.DataFrame:
    """Map raw columns to `id`/`text`/`summary`, normalise, and add the columns the suite checks.

    Alpaca rows become text = instruction + input, summary = output. Empty texts after
    normalisation become missing values, so `not null` also means `not empty`.
    """
    frame = raw.frame
    if mode == "alpaca":
        inputs = frame["input"] if "input" in frame.columns else pd.Series([None] * len(frame))
        texts = [
            " ".join(p for p in (_as_text(a), _as_text(b)) if p)
            for a, b in zip(frame["instruction"], inputs, strict=True)
        ]
        summaries = [_as_text(v) for v in frame["output"]]
    else:
        texts = [_as_text(v) for v in frame[data.text_column]]
        summaries = [_as_text(v) for v in frame[data.summary_column]]

    controls = [0] * len(frame)

    def clean(values: list[str | None]) -> list[str | None]:
        out: list[str | None] = []
        for i, v in enumerate(values):
            if v is not None:
                v, removed = clean_text(v, cfg.unicode_form)
                controls[i] += removed
            out.append(v or None)
        return out

    if data.id_column and data.id_column in frame.columns:
        ids = [_as_text(v) for v in frame[data.id_column]]
    else:
        if data.id_column:
            logger.warning(
                "column %r (data.id_column) is not in %s: using line/row numbers as ids; set data.id_column=null to"
                " silence this",
                data.id_column,
                list(frame.columns),
            )
        ids = [loc.replace(" ", "-") for loc in raw.locations]
    # pandas 3 stores missing strings as NaN: every check below tests `isinstance(t, str)`.
    out = pd.DataFrame(
        {
            "row": range(len(frame)),
            "location": raw.locations,
            "id": ids,
            "text": clean(texts),
            "summary": clean(summaries),
            "control_chars": controls,
        }
    )
    out["text_len"] = out["text"].map(lambda t: len(t) if isinstance(t, str) else None).astype("Float64")
    out["summary_len"] = out["summary"].map(lambda t: len(t) if isinstance(t, str) else None).astype("Float64")
    # A repeat is a row whose normalised text an earlier row already has: the first one is kept.
    out["is_repeat"] = out["text"].notna() & out["text"].duplicated(keep="first")
    out["in_language"] = out["text"].map(lambda t: isinstance(t, str) and in_language(t, data.language, cfg))
    # Ids key rows downstream (splits, per-row scores): two kept rows must not share one.
    kept = ~out["is_repeat"]
    out["id_clash"] = out["id"].isna() | (kept & out["id"].where(kept).duplicated(keep=False) & out["id"].notna())
    return out


def _expectations(cfg: ValidateConfig, data: DataConfig) -> list[Any]:
    """The suite, from `validate:` params. Row-level ones use `mostly` = 1 - max_dropped_share."""
    import great_expectations.expectations as gxe

    row_mostly = 1.0 - cfg.max_dropped_share
    return [
        gxe.ExpectColumnToExist(column="text", description="text column present"),
        gxe.ExpectColumnToExist(column="summary", description="summary column present"),
        gxe.ExpectColumnValuesToNotBeNull(column="text", mostly=row_mostly, description="text not empty"),
        gxe.ExpectColumnValuesToNotBeNull(column="summary", mostly=row_mostly, description="summary not empty"),
        gxe.ExpectColumnValueLengthsToBeBetween(
            column="text",
            min_value=cfg.min_text_chars,
            max_value=cfg.max_text_chars,
            mostly=row_mostly,
            description=f"text has {cfg.min_text_chars}..{cfg.max_text_chars} characters",
        ),
        gxe.ExpectColumnValueLengthsToBeBetween(
            column="summary",
            min_value=cfg.min_summary_chars,
            max_value=cfg.max_summary_chars,
            mostly=row_mostly,
            description=f"summary has {cfg.min_summary_chars}..{cfg.max_summary_chars} characters",
        ),
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="text_len",
            column_B="summary_len",
            or_equal=False,
            ignore_row_if="either_value_is_missing",
            mostly=row_mostly,
            description="summary shorter than text",
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="is_repeat",
            value_set=[False],
            mostly=1.0 - cfg.max_duplicate_share,
            description=f"at most {cfg.max_duplicate_share:.0%} of rows repeat an earlier row's text",
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="in_language",
            value_set=[True],
            mostly=cfg.min_language_share,
            description=(
                f"at least {cfg.min_language_share:.0%} of rows are in data.language={data.language}"
                + (
                    f" (CJK share >= {cfg.min_cjk_ratio:g})"
                    if data.language == "zh"
                    else f" (ASCII-word share >= {cfg.min_ascii_word_ratio:g})"
                )
            ),
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="id_clash",
            value_set=[False],
            description=f"every row has an id (data.id_column={data.id_column}) no other kept row shares",
        ),
    ]


def check_frame(frame: pd.DataFrame, expectations: list[Any], index_columns: list[str]) -> Any:
    """Validate `frame` with the suite `sftflow_validate` (`tasks.core.expectations.run_suite`).

    Returns:
        The `ExpectationSuiteValidationResult`, with every unexpected row indexed by `index_columns`.
    """
    return run_suite(
        frame,
        expectations,
        suite="sftflow_validate",
        source="raw_data",
        asset="rows",
        result_format={
            "result_format": "COMPLETE",
            "unexpected_index_column_names": index_columns,
            "return_unexpected_index_query": False,
        },
    )


def _json_safe(obj: Any) -> Any:
    """Round-trip through JSON, turning numpy scalars and other odd leaves into plain values."""

    def default(o: Any) -> Any:
        if hasattr(o, "item"):
            return o.item()
        return str(o)

    return json.loads(json.dumps(obj, default=default))


def _unexpected_rows(result: Any) -> list[int]:
    """Frame row numbers an expectation result flags."""
    return [int(entry["row"]) for entry in result.result.get("unexpected_index_list") or []]


def _reason(result: Any) -> str | None:
    cfg = result.expectation_config
    column = cfg.kwargs.get("column")
    return REASON_BY_COLUMN.get((cfg.type, column)) or REASON_BY_COLUMN.get((cfg.type, None))


def _examples(rows: list[int], frame: pd.DataFrame) -> str:
    shown = [f"{frame.at[r, 'id']} ({frame.at[r, 'location']})" for r in rows[:EXAMPLES]]
    more = f", and {len(rows) - EXAMPLES} more" if len(rows) > EXAMPLES else ""
    return ", ".join(shown) + more


def _describe(result: Any, frame: pd.DataFrame | None) -> str:
    """One line for a failed expectation: its type, description, counts and a few rows."""
    cfg = result.expectation_config
    head = f"{cfg.type}"
    if cfg.description:
        head += f" ({cfg.description})"
    if result.exception_info and result.exception_info.get("raised_exception"):
        return f"{head}: raised {result.exception_info.get('exception_message')}"
    r = result.result
    if "unexpected_count" not in r:
        return f"{head}: failed"
    total = r.get("element_count") or 0
    line = f"{head}: {r['unexpected_count']} of {total} rows fail ({r.get('unexpected_percent', 0):.1f}%)"
    if frame is not None and r["unexpected_count"]:
        line += f", e.g. {_examples(_unexpected_rows(result), frame)}"
    return line


def _trim(result: Any) -> None:
    """Keep a few unexpected values per expectation, so the report and data docs stay small."""
    for res in result.results:
        for key in ("unexpected_list", "unexpected_index_list", "partial_unexpected_list", "partial_unexpected_index_list"):
            values = res.result.get(key)
            if isinstance(values, list) and len(values) > REPORT_EXAMPLES:
                res.result[key] = values[:REPORT_EXAMPLES]
        # The full counts table of every unexpected value adds nothing a reader needs here.
        res.result.pop("partial_unexpected_counts", None)


def render_data_docs(result: Any) -> str:
    """GE's own data docs page for a validation result, as one HTML string.

    Uses the renderer and view that GE's data-docs site builder uses for its validation pages
    (`ValidationResultsPageRenderer` + `DefaultJinjaPageView`), without the site's temp folder of
    fonts and images; the page loads Bootstrap from a CDN and stays readable without it.
    """
    from great_expectations.render.renderer import ValidationResultsPageRenderer
    from great_expectations.render.view import DefaultJinjaPageView

    return DefaultJinjaPageView().render(ValidationResultsPageRenderer().render(result))


def _error_page(message: str) -> str:
    import html

    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>sftflow validate: failed</title></head>"
        f"<body><h1>validate failed before the expectation suite ran</h1><pre>{html.escape(message)}</pre></body></html>\n"
    )


def _write_outputs(
    out_dir: Path, metrics_file: Path, report: dict[str, Any], docs_html: str, rows: list[dict[str, str]] | None
) -> None:
    """Write report, docs and metrics; the clean rows only on success (a stale copy is removed otherwise)."""
    clean = out_dir / "clean.jsonl"
    if rows is None:
        clean.unlink(missing_ok=True)
    write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "data_docs.html", docs_html)
    write_json(
        metrics_file,
        {
            "success": report["success"],
            "rows_in": report["rows_in"],
            "rows_out": report["rows_out"],
            "dropped_share": report["dropped_share"],
            "dropped": report["dropped"],
            "control_characters_removed": report["control_characters_removed"],
            "rows_with_control_characters": report["rows_with_control_characters"],
            "expectations_failed": len(report["failures"]),
        },
    )
    if rows is not None:
        write_jsonl(clean, rows)


@stage_entry("validate")
def run(params: StageParams) -> dict[str, Any]:
    """Validate the raw data set and write the clean rows.

    Args:
        params: the stage's slice: `validate` and the `data` keys that say where the data is and
            what it holds.

    Returns:
        The metrics written to `metrics/validate.json`.

    Raises:
        DataError: the file cannot be read, a table-level expectation fails or too many rows are
            dropped. The report, data docs and metrics are written first; clean.jsonl is not.
    """
    data, cfg = params.data, params.validate
    out_dir, metrics_file = params.layout.stage_dir(STAGE), params.layout.metrics_file(STAGE)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "success": False,
        "data_path": str(data.path),
        "rows_in": 0,
        "rows_out": 0,
        "dropped_share": 0.0,
        "dropped": {},
        "control_characters_removed": 0,
        "rows_with_control_characters": 0,
        "failures": [],
    }
    try:
        raw = load_table(Path(data.path), data.format)
    except DataError as e:
        report["failures"] = [str(e)]
        _write_outputs(out_dir, metrics_file, report, _error_page(str(e)), None)
        raise

    report["rows_in"] = n = len(raw.frame)
    report["format"] = raw.format
    mode, missing = resolve_columns(raw.frame.columns, data)
    if mode == "missing":
        _fail_on_missing_columns(raw, data, missing, report, out_dir, metrics_file)
    if mode == "alpaca":
        logger.info("no %r/%r columns: reading alpaca instruction+input -> text, output -> summary", data.text_column, data.summary_column)

    frame = canonical_frame(raw, data, cfg, mode)
    report["control_characters_removed"] = int(frame["control_chars"].sum())
    report["rows_with_control_characters"] = int((frame["control_chars"] > 0).sum())
    if report["control_characters_removed"]:
        logger.warning(
            "removed %d control characters from %d rows (texts and summaries)",
            report["control_characters_removed"], report["rows_with_control_characters"],
        )
    result = check_frame(frame, _expectations(cfg, data), ["row", "id"])
    dropped_rows, outcome = _row_outcome(result, frame, cfg, n)
    kept = frame[~frame["row"].isin(dropped_rows)]
    success = not outcome["failures"]
    report.update(success=success, rows_out=len(kept) if success else 0, **outcome)
    _trim(result)
    report["great_expectations"] = _json_safe(result.to_json_dict())
    docs = render_data_docs(result)
    if not success:
        _write_outputs(out_dir, metrics_file, report, docs, None)
        raise DataError(f"{data.path}: expectation suite failed:\n  - " + "\n  - ".join(outcome["failures"]))

    rows = [{"id": r.id, "text": r.text, "summary": r.summary} for r in kept.itertuples(index=False)]
    _write_outputs(out_dir, metrics_file, report, docs, rows)
    logger.info(
        "validate: %d rows in, %d out, dropped %s -> %s", n, len(rows), outcome["dropped"] or "none", out_dir / "clean.jsonl"
    )
    return json.loads(metrics_file.read_text(encoding="utf-8"))


def _fail_on_missing_columns(
    raw: RawTable, data: Any, missing: list[str], report: dict[str, Any], out_dir: Path, metrics_file: Path
) -> None:
    """Run the column checks on the raw frame (so the report says which expectation failed), write the
    report and raise."""
    import great_expectations.expectations as gxe

    result = check_frame(
        raw.frame,
        [gxe.ExpectColumnToExist(column=c, description="required column present") for c in (data.text_column, data.summary_column)],
        [],
    )
    found = ", ".join(map(str, raw.frame.columns))
    failures = [_describe(r, None) for r in result.results if not r.success]
    failures.append(
        f"{data.path} has columns [{found}] but not {missing}: set data.text_column / data.summary_column"
        f" (e.g. -S data.text_column=content), or give alpaca columns instruction/input/output"
    )
    report.update(failures=failures, great_expectations=_json_safe(result.to_json_dict()))
    _write_outputs(out_dir, metrics_file, report, render_data_docs(result), None)
    raise DataError("expectation suite failed:\n  - " + "\n  - ".join(failures))


def _row_outcome(result: Any, frame: pd.DataFrame, cfg: ValidateConfig, n: int) -> tuple[set[int], dict[str, Any]]:
    """The rows a row-level expectation drops, and the report's figures: drops per reason, the failures."""
    dropped_rows: set[int] = set()
    dropped: dict[str, int] = dict.fromkeys(REASON_BY_COLUMN.values(), 0)
    failures: list[str] = []
    for res in result.results:
        reason = _reason(res)
        if reason is not None:
            rows = _unexpected_rows(res)
            dropped[reason] = len(rows)
            dropped_rows.update(rows)
        if not res.success:
            failures.append(_describe(res, frame))
    share = len(dropped_rows) / n
    if share > cfg.max_dropped_share:
        failures.append(
            f"{len(dropped_rows)} of {n} rows ({share:.1%}) fail a row-level expectation, more than"
            f" validate.max_dropped_share={cfg.max_dropped_share:g}: fix the data or the bounds in validate:"
        )
    return dropped_rows, {
        "dropped_share": round(share, 6),
        "dropped": dropped,
        "dropped_rows": len(dropped_rows),
        "failures": failures,
        "dropped_examples": {
            reason: _examples(_unexpected_rows(res), frame)
            for res in result.results
            if (reason := _reason(res)) is not None and res.result.get("unexpected_count")
        },
    }
