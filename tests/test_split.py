"""split: content-hash assignment, stability as data grows, near-duplicates kept together, leak check."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import ROOT, sample_rows

from tasks.core.config import SplitConfig, load_params
from tasks.core.errors import DataError, StageError


def params_with_clean(tmp_path: Path, rows: list[dict], *extra: str):
    """Params pointing into tmp_path, with `rows` written as validate's clean output."""
    params = load_params(
        ROOT / "params.yaml",
        [f"paths.artifacts={tmp_path / 'artifacts'}", f"paths.metrics={tmp_path / 'metrics'}", *extra],
    )
    clean = params.layout.stage_dir("validate") / "clean.jsonl"
    clean.parent.mkdir(parents=True, exist_ok=True)
    clean.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return params


def read_splits(params) -> dict[str, list[dict]]:
    out = params.layout.stage_dir("split")
    return {s: [json.loads(x) for x in (out / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()] for s in ("train", "val", "test")}


def split_of_ids(params) -> dict[str, str]:
    return {r["id"]: name for name, rows in read_splits(params).items() for r in rows}


def test_split_writes_sorted_disjoint_splits_near_the_ratios_with_hashes(tmp_path):
    from tasks.split import run

    rows = sample_rows(1000)
    params = params_with_clean(tmp_path, rows)
    metrics = run(params)

    splits = read_splits(params)
    ids = [r["id"] for rows_ in splits.values() for r in rows_]
    assert sorted(ids) == sorted(r["id"] for r in rows)  # every row exactly once
    for name, ratio in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        assert metrics[f"{name}_rows"] == len(splits[name])
        assert abs(len(splits[name]) / 1000 - ratio) < 0.04, (name, len(splits[name]))
        assert [r["id"] for r in splits[name]] == sorted(r["id"] for r in splits[name])
        path = params.layout.stage_dir("split") / f"{name}.jsonl"
        assert metrics["sha256"][name] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert set(splits["train"][0]) == {"id", "text", "summary"}
    assert json.loads((tmp_path / "metrics" / "split.json").read_text()) == metrics

    # Same input, same bytes.
    assert run(params)["sha256"] == metrics["sha256"]


def test_a_row_split_is_its_own_text_hash(tmp_path):
    from tasks.split import split_fraction, split_of

    cfg = SplitConfig()
    text = "采用修正的Rodrigues参数建立了飞行器姿态控制系统的数学模型"
    u = int.from_bytes(hashlib.sha256(f"sftflow-v1\0{text}".encode()).digest()[:8], "big") / 2**64
    assert split_fraction(text, "sftflow-v1") == u
    assert split_of(text, cfg) == ("train" if u < 0.8 else "val" if u < 0.9 else "test")


def test_adding_ten_percent_new_rows_moves_no_existing_row(tmp_path):
    from tasks.split import run

    rows = sample_rows(1100)
    before = params_with_clean(tmp_path / "v1", rows[:1000])
    run(before)
    after = params_with_clean(tmp_path / "v2", rows[100:150] + rows[:100] + rows[150:1100])  # order changes too
    run(after)

    old, new = split_of_ids(before), split_of_ids(after)
    assert len(new) == 1100
    moved = [i for i in old if old[i] != new[i]]
    assert moved == []
    assert {new[r["id"]] for r in rows[1000:]} == {"train", "val", "test"}


def test_changing_the_salt_reshuffles(tmp_path):
    from tasks.split import run

    rows = sample_rows(300)
    a = params_with_clean(tmp_path / "a", rows)
    b = params_with_clean(tmp_path / "b", rows, "split.salt=other")
    run(a), run(b)
    sa, sb = split_of_ids(a), split_of_ids(b)
    assert sum(sa[i] != sb[i] for i in sa) > 30


def test_near_duplicates_land_in_one_split(tmp_path):
    from tasks.split import run, split_of

    rows = sample_rows(300)
    twins = []
    for r in rows[:40]:
        t = r["text"]
        twins.append({"id": r["id"] + "-twin", "text": t[:-1] + ("某" if t[-1] != "某" else "甲"), "summary": r["summary"]})
    params = params_with_clean(tmp_path, rows + twins)
    metrics = run(params)

    where = split_of_ids(params)
    for r in rows[:40]:
        assert where[r["id"]] == where[r["id"] + "-twin"], r["id"]
    assert metrics["near_duplicate_groups"] == 40 and metrics["near_duplicate_rows"] == 80
    # Some twins hash to another split on their own: grouping really moved them.
    cfg = params.split
    own = sum(split_of(t["text"], cfg) != split_of(r["text"], cfg) for r, t in zip(rows[:40], twins))
    assert own > 0 and metrics["rows_moved_to_group_split"] == own


def test_jaccard_and_pairs_by_hand():
    from tasks.split import jaccard, near_duplicate_pairs, ngram_hashes

    # 5-grams of abcdef: {abcde, bcdef}; of abcdeg: {abcde, bcdeg}: 1 shared of 3.
    assert jaccard(ngram_hashes("abcdef"), ngram_hashes("abcdeg")) == pytest.approx(1 / 3)
    assert len(ngram_hashes("abc")) == 1 and len(ngram_hashes("a b c d e f")) == 2  # spaces ignored
    texts = ["一二三四五六七八九十甲乙丙丁", "一二三四五六七八九十甲乙丙戊", "完全不同的另一段文字内容"]
    assert [(i, j) for i, j, _ in near_duplicate_pairs(texts, 0.5)] == [(0, 1)]
    sim = jaccard(ngram_hashes(texts[0]), ngram_hashes(texts[1]))
    assert sim == pytest.approx(9 / 11)  # 10 grams each, 9 shared
    assert near_duplicate_pairs(texts, 0.9) == []


def test_leak_check_names_rows_across_splits():
    from tasks.split import find_leaks

    text = sample_rows(1)[0]["text"]
    splits = {
        "train": [{"id": "a", "text": text, "summary": "s"}],
        "val": [],
        "test": [{"id": "b", "text": text[:-1] + "。", "summary": "s"}, {"id": "c", "text": text, "summary": "s"}],
    }
    leaks = find_leaks(splits, 0.9)
    assert any(x.startswith("train:a ~ test:b (jaccard") for x in leaks)
    assert "train:a ~ test:c (identical text)" in leaks
    assert not any("test:b ~ test:c" in x for x in leaks)  # same split is no leak


def test_a_leaky_assignment_fails_loudly_and_writes_no_split(tmp_path, monkeypatch):
    from tasks import split

    rows = sample_rows(50)
    params = params_with_clean(tmp_path, rows)
    real = split.assign

    def leaky(rows_, cfg):
        result = real(rows_, cfg)
        victim = result.splits["train"][0]
        result.splits["test"].append({**victim, "id": victim["id"] + "-copy"})
        return result

    monkeypatch.setattr(split, "assign", leaky)
    with pytest.raises(StageError, match=r"near-identical text pair\(s\) across splits.*-copy \(identical text\)"):
        split.run(params)
    assert not list(params.layout.stage_dir("split").glob("*.jsonl"))


def test_missing_clean_data_and_empty_splits_fail(tmp_path):
    from tasks.split import run

    params = load_params(ROOT / "params.yaml", [f"paths.artifacts={tmp_path / 'none'}", f"paths.metrics={tmp_path / 'm'}"])
    with pytest.raises(StageError, match="run `sftflow validate` first"):
        run(params)
    with pytest.raises(DataError, match=r"leave split\(s\) .* empty"):
        run(params_with_clean(tmp_path, sample_rows(3)))
    rows = sample_rows(20)
    rows[5]["id"] = rows[4]["id"]
    with pytest.raises(DataError, match=f"ids repeat \\({rows[4]['id']}\\)"):
        run(params_with_clean(tmp_path / "dup", rows))

