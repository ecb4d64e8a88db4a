"""The feedback store: append-only, every valid record stored exactly once under threads and a second
process, bad input and rate-limited submissions refused with nothing written, snapshots closed atomically,
corrupt lines skipped and counted."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT

from tasks.core.feedback import (
    EMPTY_SHA256,
    FeedbackRefused,
    FeedbackStore,
    closed_sha256,
    near_duplicate_flags,
    read_closed,
)

TEXT = "本文研究了深度学习在中文文本摘要中的应用，提出了一种新的方法。"


def submit(store, n, user="u", **kw):
    return store.submit(text=f"{TEXT} {n}", output=f"输出 {n}", rating="bad", correction=f"改正 {n}", user=user, **kw)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"text": "  "}, "input text is empty"),
        ({"text": "字" * 51}, "51 characters, more than the 50"),
        ({"output": ""}, "no summary to rate"),
        ({"rating": "meh"}, "choose a rating: good or bad"),
        ({"rating": None}, "choose a rating"),
        ({"correction": "输出 "}, "same as the summary"),
        ({"correction": "改" * 51}, "correction has 51 characters"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_written(tmp_path, fields, message):
    store = FeedbackStore(tmp_path, max_chars=50)
    good = {"text": TEXT, "output": "输出", "rating": "bad", "correction": "改正"}
    with pytest.raises(FeedbackRefused, match=message):
        store.submit(**{**good, **fields})
    assert not store.open_file.exists() or store.open_file.read_text() == ""


def test_a_record_holds_everything_and_appends(tmp_path):
    store = FeedbackStore(tmp_path)
    a = store.submit(text=TEXT, output="输出", rating="good", model_name="m", model_version="3", variant="int8", user="ana")
    b = store.submit(text=TEXT, output="输出", rating="bad", correction="  更好的标题 ", user="bo")
    lines = [json.loads(x) for x in store.open_file.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in lines] == [a["id"], b["id"]]
    assert lines[0] | {"id": None, "timestamp": None} == {
        "id": None, "text": TEXT, "output": "输出", "rating": "good", "correction": None, "model_name": "m",
        "model_version": "3", "variant": "int8", "user": "ana", "timestamp": None}
    assert lines[1]["correction"] == "更好的标题" and lines[0]["timestamp"].endswith("+00:00")


def test_the_rate_limit_is_per_user_and_slides(tmp_path):
    store = FeedbackStore(tmp_path, per_minute=3)
    for i in range(3):
        submit(store, i, now=1000.0 + i)
    with pytest.raises(FeedbackRefused, match=r"3 submissions a minute is the limit; try again in 58 s"):
        submit(store, 9, now=1002.0)
    submit(store, 10, user="other", now=1002.0)  # another user has their own window
    submit(store, 11, now=1060.5)  # the first submission left the window
    assert len(store.open_records()) == 5
    # The window is shared through the store, not kept in the process: a new store object sees it.
    with pytest.raises(FeedbackRefused, match="limit"):
        submit(FeedbackStore(tmp_path, per_minute=3), 12, now=1060.9)


def test_threads_and_a_second_process_lose_nothing(tmp_path):
    store = FeedbackStore(tmp_path, per_minute=0)
    writer = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from tasks.core.feedback import FeedbackStore\n"
        "s = FeedbackStore(sys.argv[2], per_minute=0)\n"
        "for i in range(200): s.submit(text=f'进程文本 {i}', output='输出', rating='bad', correction=f'改正 {i}', user='p')\n"
    )
    other = subprocess.Popen([sys.executable, "-c", writer, str(ROOT), str(tmp_path)])
    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = list(pool.map(lambda i: submit(store, i, user=f"t{i % 4}")["id"], range(200)))
    assert other.wait(timeout=120) == 0
    records = store.open_records()
    assert len(records) == 400 and len({r["id"] for r in records}) == 400
    assert set(ids) <= {r["id"] for r in records}
    assert sorted(r["correction"] for r in records if r["user"] == "p") == sorted(f"改正 {i}" for i in range(200))


def test_snapshots_close_the_open_file_and_corrupt_lines_are_counted(tmp_path):
    store = FeedbackStore(tmp_path, per_minute=0)
    assert store.snapshot() is None and closed_sha256(tmp_path) == EMPTY_SHA256
    assert store.closed_dir.is_dir()  # align's DVC dependency exists before any feedback
    submit(store, 1)
    submit(store, 2)
    first = store.snapshot()
    assert first is not None and not store.open_file.exists()
    sha = closed_sha256(tmp_path)
    submit(store, 3)  # after the snapshot: waits for the next one
    assert closed_sha256(tmp_path) == sha
    with first.open("a", encoding="utf-8") as f:
        f.write("{not json\n" + json.dumps({"text": "x"}) + "\n")
    closed = read_closed(tmp_path)
    assert [r["output"] for r in closed.records] == ["输出 1", "输出 2"] and closed.corrupt == 2
    assert closed.sha256 != sha  # the hash covers the bytes, corrupt ones too
    store.snapshot()
    assert len(read_closed(tmp_path).records) == 3


def test_near_duplicates_of_held_out_texts_are_flagged():
    held = [TEXT, "完全不同的一段文字，讲的是别的事情。"]
    flags = near_duplicate_flags([TEXT, TEXT + "。", "另一篇关于图像识别的论文摘要，与上面无关。"], held, threshold=0.9)
    assert flags == [True, True, False]
