"""validate: the suite on good data, every bad input of issue 2, counted drops, formats and normalisation."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, sample_rows

from tasks.core.config import load_params
from tasks.core.errors import DataError, StageError


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def params_for(tmp_path: Path, data: Path, *extra: str):
    return load_params(
        ROOT / "params.yaml",
        [
            f"data.path={data}",
            f"paths.artifacts={tmp_path / 'artifacts'}",
            f"paths.metrics={tmp_path / 'metrics'}",
            *extra,
        ],
    )


def run_validate(tmp_path: Path, data: Path, *extra: str) -> dict:
    from tasks.validate import run

    return run(params_for(tmp_path, data, *extra))


def test_demo_rows_pass_and_produce_clean_data_report_and_docs(tmp_path, tiny_data):
    metrics = run_validate(tmp_path, tiny_data)

    out = tmp_path / "artifacts" / "validate"
    clean = [json.loads(line) for line in (out / "clean.jsonl").read_text(encoding="utf-8").splitlines()]
    source = sample_rows(120)
    assert metrics["success"] is True and metrics["rows_in"] == 120
    assert metrics["rows_out"] == len(clean) == 120 - sum(metrics["dropped"].values())
    assert len(clean) >= 115
    assert set(clean[0]) == {"id", "text", "summary"}
    assert clean[0]["id"] == source[0]["id"] and clean[0]["summary"] == source[0]["summary"]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    ge = report["great_expectations"]
    assert report["success"] and ge["success"]
    types = {r["expectation_config"]["type"] for r in ge["results"]}
    assert {
        "expect_column_to_exist",
        "expect_column_values_to_not_be_null",
        "expect_column_value_lengths_to_be_between",
        "expect_column_pair_values_a_to_be_greater_than_b",
        "expect_column_values_to_be_in_set",
    } <= types
    html = (out / "data_docs.html").read_text(encoding="utf-8")
    assert "<html" in html and "sftflow_validate" in html
    assert json.loads((tmp_path / "metrics" / "validate.json").read_text())["rows_out"] == len(clean)


def _bad_rows(kind: str, path: Path) -> Path:
    rows = sample_rows(60)
    if kind == "empty file":
        path.write_bytes(b"")
    elif kind == "missing column":
        write_jsonl(path, [{"id": r["id"], "content": r["text"], "summary": r["summary"]} for r in rows])
    elif kind == "broken JSON line":
        lines = [json.dumps(r, ensure_ascii=False) for r in rows]
        lines[2] = lines[2][:-5]  # line 3 loses its closing characters
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif kind == "non-UTF-8 bytes":
        lines = [json.dumps(r, ensure_ascii=False).encode() for r in rows]
        lines[1] = json.dumps({"id": "gbk", "text": "摘要" * 20, "summary": "标题"}, ensure_ascii=False).encode("gbk")
        path.write_bytes(b"\n".join(lines) + b"\n")
    elif kind == "all rows English":
        english = [
            {
                "id": f"en{i}",
                "text": f"We study method number {i} for control of flying vehicles and report faster convergence.",
                "summary": f"Method {i} for flight control",
            }
            for i in range(60)
        ]
        write_jsonl(path, english)
    elif kind == "half the rows duplicated":
        write_jsonl(path, rows[:30] + rows[:30])
    elif kind == "summary longer than text":
        swapped = [{"id": r["id"], "text": (r["summary"] * 3)[:25], "summary": r["text"][:100]} for r in rows[:45]]
        write_jsonl(path, swapped + rows[45:])
    elif kind != "nonexistent path":
        raise AssertionError(kind)
    return path


# Each bad input of issue 2 and the words its error must carry.
BAD_INPUTS = {
    "empty file": ["is empty"],
    "missing column": ["expect_column_to_exist", "['text']", "data.text_column"],
    "broken JSON line": ["line 3", "not valid JSON"],
    "non-UTF-8 bytes": ["line 2", "not valid UTF-8", "byte offset"],
    "all rows English": ["expect_column_values_to_be_in_set", "data.language=zh", "60 of 60 rows", "en0 (line 1)"],
    "half the rows duplicated": ["repeat an earlier row", "30 of 60 rows", "max_dropped_share"],
    "summary longer than text": ["summary shorter than text", "45 of 60 rows", "max_dropped_share"],
    "nonexistent path": ["does not exist", "data.path"],
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_fails_clearly_and_leaves_no_clean_data_or_split(tmp_path, kind):
    from tasks.split import run as split

    data = _bad_rows(kind, tmp_path / "raw.jsonl")
    params = params_for(tmp_path, data)
    out = tmp_path / "artifacts" / "validate"
    out.mkdir(parents=True)
    (out / "clean.jsonl").write_text('{"id": "stale", "text": "old", "summary": "x"}\n')  # from an earlier run

    from tasks.validate import run

    with pytest.raises(DataError) as err:
        run(params)
    for words in BAD_INPUTS[kind]:
        assert words in str(err.value), (words, str(err.value))
    assert not (out / "clean.jsonl").exists()
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["success"] is False and report["failures"]
    assert json.loads((tmp_path / "metrics" / "validate.json").read_text())["success"] is False
    with pytest.raises(StageError, match="sftflow validate"):
        split(params)
    assert not list((tmp_path / "artifacts").glob("split/*.jsonl"))


def test_failed_suite_report_holds_the_ge_result(tmp_path):
    data = _bad_rows("half the rows duplicated", tmp_path / "raw.jsonl")
    with pytest.raises(DataError):
        run_validate(tmp_path, data)
    report = json.loads((tmp_path / "artifacts" / "validate" / "report.json").read_text(encoding="utf-8"))
    failed = [r for r in report["great_expectations"]["results"] if not r["success"]]
    assert [r["expectation_config"]["kwargs"]["column"] for r in failed] == ["is_repeat"]
    assert failed[0]["result"]["unexpected_count"] == 30
    assert report["dropped"]["duplicate"] == 30


def test_every_broken_line_is_named(tmp_path):
    lines = [json.dumps(r, ensure_ascii=False) for r in sample_rows(10)]
    lines[1] = "{not json"
    lines[6] = "[1, 2]"
    (tmp_path / "raw.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"2 broken lines: line 2 is not valid JSON .*line 7 is a JSON list"):
        run_validate(tmp_path, tmp_path / "raw.jsonl")


def test_a_few_bad_rows_are_dropped_and_counted(tmp_path):
    rows = sample_rows(60)
    rows[5] = {**rows[5], "summary": rows[5]["text"] + "。"}  # summary longer than text
    rows[9] = {**rows[9], "text": "短文本"}  # under min_text_chars (and not longer than its summary)
    rows[20] = {**rows[20], "summary": "   "}  # empty after whitespace normalisation
    rows.append(dict(rows[30]))  # an exact repeat
    metrics = run_validate(tmp_path, write_jsonl(tmp_path / "raw.jsonl", rows), "validate.max_summary_chars=2000")

    assert metrics["success"] and metrics["rows_in"] == 61
    dropped = metrics["dropped"]
    assert dropped["summary_not_shorter"] == 2  # rows 5 and 9 (text "短文本" is shorter than its title)
    assert dropped["text_length"] == 1 and dropped["missing_summary"] == 1 and dropped["duplicate"] == 1
    clean = [json.loads(x) for x in (tmp_path / "artifacts/validate/clean.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in clean]
    assert len(clean) == metrics["rows_out"] == 61 - 4
    for i in (5, 9, 20):
        assert rows[i]["id"] not in ids
    assert ids.count(rows[30]["id"]) == 1


def test_dropped_share_over_threshold_fails(tmp_path):
    rows = sample_rows(40)
    # 3 + 3 rows = 15% > the default 10%, while each expectation alone stays within its 10%.
    for r in rows[:3]:
        r["text"] = "短"
    for r in rows[3:6]:
        r["summary"] = ""
    data = write_jsonl(tmp_path / "raw.jsonl", rows)
    with pytest.raises(DataError, match=r"6 of 40 rows \(15.0%\) fail a row-level expectation"):
        run_validate(tmp_path, data)
    assert run_validate(tmp_path, data, "validate.max_dropped_share=0.2")["rows_out"] == 34


def test_alpaca_columns_load(tmp_path):
    rows = [{"instruction": "为下面的论文摘要拟一个标题。", "input": r["text"], "output": r["summary"]} for r in sample_rows(30)]
    run_validate(tmp_path, write_jsonl(tmp_path / "alpaca.jsonl", rows))
    clean = [json.loads(x) for x in (tmp_path / "artifacts/validate/clean.jsonl").read_text().splitlines()]
    assert clean[0]["id"] == "line-1"  # no id column: the line number
    assert clean[0]["text"] == "为下面的论文摘要拟一个标题。 " + rows[0]["input"]
    assert clean[0]["summary"] == rows[0]["output"]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_csv_and_parquet_with_own_column_names(tmp_path, fmt):
    rows = sample_rows(30)
    frame = pd.DataFrame(
        {"key": [f"{i:03d}" for i in range(30)], "body": [r["text"] for r in rows], "title": [r["summary"] for r in rows]}
    )
    path = tmp_path / f"raw.{fmt}"
    frame.to_csv(path, index=False) if fmt == "csv" else frame.to_parquet(path, index=False)
    metrics = run_validate(
        tmp_path, path, "data.text_column=body", "data.summary_column=title", "data.id_column=key"
    )
    clean = [json.loads(x) for x in (tmp_path / "artifacts/validate/clean.jsonl").read_text().splitlines()]
    assert metrics["rows_in"] == 30
    assert clean[0] == {"id": "000", "text": rows[0]["text"], "summary": rows[0]["summary"]}  # "000" stays a string


def test_non_utf8_error_names_line_and_offset(tmp_path):
    from tasks.validate import check_file

    path = tmp_path / "raw.jsonl"
    path.write_bytes(b'{"a": "ok"}\n{"a": "\xff"}\n')
    with pytest.raises(DataError, match=r"line 2 is not valid UTF-8 \(byte 0xff at byte offset 19, column 7"):
        check_file(path, "jsonl")


def test_normalisation_is_nfc_collapses_cjk_whitespace_and_keeps_line_breaks():
    from tasks.validate import clean_text, normalize_text

    text = "控制\u3000系统，\r\n\t１２ cafe\u0301\u200b ①"
    assert normalize_text(text, "NFC") == "控制 系统，\n１２ café ①"  # full-width kept, spaces collapsed, line kept
    assert normalize_text(text, "NFKC") == "控制 系统,\n12 café 1"  # what NFKC would do to Chinese text
    assert normalize_text("  a \u00a0 b  ", "none") == "a b"
    # Line ends of every kind become \n, blank lines shrink to one, lines are trimmed; controls are counted.
    assert clean_text("a\rb\r\n\r\n\r\n c \u2028d\x00\x07\x1b\x7f\x85e\n\n", "NFC") == ("a\nb\n\nc\nde", 5)


def test_language_measures():
    from tasks.validate import ascii_word_ratio, cjk_ratio

    assert cjk_ratio("中文ab") == 0.5
    assert cjk_ratio("  ") == 0.0
    assert ascii_word_ratio("We use 深度学习 here") == 0.75


def test_english_data_under_language_en(tmp_path):
    rows = [
        {"id": f"en{i}", "text": f"We study method {i} for the control of flying vehicles and report results.", "summary": f"Method {i}"}
        for i in range(30)
    ]
    rows[3]["text"] = "我们研究了飞行器姿态控制系统的一种新的镇定控制器设计方法。"  # the one Chinese row is dropped
    metrics = run_validate(tmp_path, write_jsonl(tmp_path / "en.jsonl", rows), "data.language=en")
    assert metrics["rows_out"] == 29 and metrics["dropped"]["language"] == 1



def _clean_rows(tmp_path: Path) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "artifacts/validate/clean.jsonl").read_text(encoding="utf-8").splitlines()]


def _english_rows(n: int) -> list[dict]:
    return [
        {
            "id": f"en{i}",
            "text": f"Officials said on day {i} that the new bridge over the river will open next spring after delays.",
            "summary": f"Bridge opens next spring, day {i}.",
        }
        for i in range(n)
    ]


def test_excel_csv_with_byte_order_mark_loads(tmp_path):
    import csv

    rows = sample_rows(30)
    path = tmp_path / "excel.csv"
    # What Excel writes as "CSV UTF-8": a byte-order mark, then \r\n line ends (csv's default).
    with path.open("w", encoding="utf-8-sig", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text", "summary"])
        writer.writerows([f"{i:03d}", r["text"], r["summary"]] for i, r in enumerate(rows))
    assert path.read_bytes().startswith(b"\xef\xbb\xbfid,text,summary\r\n")

    metrics = run_validate(tmp_path, path)
    clean = _clean_rows(tmp_path)
    assert metrics["success"] and metrics["rows_in"] == 30 and metrics["rows_out"] == 30
    # `id` is the first column, right behind the mark: read as `id`, not `\ufeffid` (else ids would be row numbers).
    assert clean[0] == {"id": "000", "text": rows[0]["text"], "summary": rows[0]["summary"]}
    assert [r["id"] for r in clean] == [f"{i:03d}" for i in range(30)]


def test_crlf_csv_with_quoted_multi_line_cells_keeps_the_lines(tmp_path):
    path = tmp_path / "dialogues.csv"
    path.write_bytes(
        b"id,dialogue,summary\r\n"
        b'd1,"#Person1#: Hello, how are you today?\r\n#Person2#: Fine, thanks. And you?",Person2 is fine.\r\n'
        b'd2,"#Person1#: Where is the station?\r\n#Person2#: Two blocks north, ""near"" the bank.\r\n#Person1#: Thanks!",'
        b"Person2 gives directions.\r\n"
        b"d3,A single line text about trains and stations in the city.,Trains in the city.\r\n"
    )
    metrics = run_validate(tmp_path, path, "data.text_column=dialogue", "data.language=en")
    assert metrics["success"] and metrics["rows_in"] == 3 and metrics["rows_out"] == 3
    assert _clean_rows(tmp_path) == [
        {"id": "d1", "text": "#Person1#: Hello, how are you today?\n#Person2#: Fine, thanks. And you?", "summary": "Person2 is fine."},
        {
            "id": "d2",
            "text": '#Person1#: Where is the station?\n#Person2#: Two blocks north, "near" the bank.\n#Person1#: Thanks!',
            "summary": "Person2 gives directions.",
        },
        {"id": "d3", "text": "A single line text about trains and stations in the city.", "summary": "Trains in the city."},
    ]


def test_csv_header_without_the_columns_names_the_ones_it_has(tmp_path):
    path = tmp_path / "news.csv"
    path.write_bytes(b"\xef\xbb\xbfarticle,highlights\r\n" + b"Some long article text about things.,Short.\r\n" * 3)
    with pytest.raises(DataError) as err:
        run_validate(tmp_path, path, "data.language=en")
    message = str(err.value)
    assert "has columns [article, highlights] but not ['text', 'summary']" in message, message
    assert "-S data.text_column=" in message and "\ufeff" not in message


def test_control_characters_are_removed_and_counted(tmp_path):
    rows = _english_rows(20)
    rows[0]["text"] = "Officials\x00 said the new bridge\x07 over the river will open next spring."  # 2
    rows[1]["summary"] = "Bridge\x1b[0m opens."  # ESC: 1 (the rest, "[0m", is text)
    rows[2]["text"] = "Tabs\tstay as spaces\x7f and lines\nstay, in this text about a bridge.\x0c"  # DEL, form feed: 2
    path = tmp_path / "controls.jsonl"
    write_jsonl(path, rows)
    assert "\\u0000" in path.read_text(encoding="utf-8")  # JSON carries them escaped

    metrics = run_validate(tmp_path, path, "data.language=en")
    clean = _clean_rows(tmp_path)
    assert metrics["success"] and metrics["rows_out"] == 20
    assert metrics["control_characters_removed"] == 5 and metrics["rows_with_control_characters"] == 3
    assert clean[0]["text"] == "Officials said the new bridge over the river will open next spring."
    assert clean[1]["summary"] == "Bridge[0m opens."
    assert clean[2]["text"] == "Tabs stay as spaces and lines\nstay, in this text about a bridge."
    assert clean[3] == rows[3]
    report = json.loads((tmp_path / "artifacts/validate/report.json").read_text(encoding="utf-8"))
    assert report["control_characters_removed"] == 5


def test_dialogue_turns_survive_validate(tmp_path):
    rows = _english_rows(10)
    rows[4] = {
        "id": "dialogue",
        "text": "#Person1#:  Hi,\tMr. Smith.   \r\n\n\n\n#Person2#: Hello!  How can I help?\n#Person1#: I need a room.  ",
        "summary": "Person1 asks\nMr. Smith for a room.",
    }
    metrics = run_validate(tmp_path, write_jsonl(tmp_path / "dialogues.jsonl", rows), "data.language=en")
    assert metrics["rows_out"] == 10 and metrics["control_characters_removed"] == 0
    turn = _clean_rows(tmp_path)[4]
    # Each turn on its line, spaces inside a line collapsed, the run of blank lines shrunk to one.
    assert turn["text"] == "#Person1#: Hi, Mr. Smith.\n\n#Person2#: Hello! How can I help?\n#Person1#: I need a room."
    assert turn["text"].splitlines()[2:] == ["#Person2#: Hello! How can I help?", "#Person1#: I need a room."]
    assert turn["summary"] == "Person1 asks\nMr. Smith for a room."


def test_english_news_lengths_pass_under_language_en(tmp_path):
    # A CNN/DailyMail-sized article (~4,000 characters; the zh limit is 2,000) and a 3-line highlight.
    rows = _english_rows(20)
    rows[0]["text"] = " ".join(["The council met on Monday and voted to rebuild the old stone bridge."] * 60)
    rows[0]["summary"] = "Council votes to rebuild the bridge.\nWork starts in May.\nCost is shared."
    assert len(rows[0]["text"]) > 4000
    metrics = run_validate(tmp_path, write_jsonl(tmp_path / "news.jsonl", rows), "data.language=en")
    assert metrics["rows_out"] == 20 and metrics["dropped"]["text_length"] == 0
    # The zh limit would drop it.
    with pytest.raises(DataError, match=r"1 of 20 rows \(5.0%\) fail a row-level expectation"):
        run_validate(tmp_path, tmp_path / "news.jsonl", "data.language=en", "validate.max_text_chars=2000",
                     "validate.max_dropped_share=0.01")
