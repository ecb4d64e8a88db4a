"""split: content-hash assignment, stability as data grows, near-duplicates kept together, leak check,
and the assignment table that keeps every row in its split forever."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import pytest
from conftest import ROOT, sample_rows
from test_dvc import BIN, _run, project  # noqa: F401  (`project`: the fresh-clone fixture)

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


def read_table(params) -> list[dict]:
    return [json.loads(x) for x in params.layout.split_assignments.read_text(encoding="utf-8").splitlines()]


def row(id_: str, text: str) -> dict:
    return {"id": id_, "text": text, "summary": "摘要"}


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

    # The table remembers each text's split under the salt, sorted by its hash.
    table = read_table(params)
    by_key = {hashlib.sha256(r["text"].encode()).hexdigest(): r["id"] for r in rows}
    assert [t["text_sha256"] for t in table] == sorted(by_key)
    where = {r["id"]: name for name, rows_ in splits.items() for r in rows_}
    assert all(t["split"] == where[by_key[t["text_sha256"]]] and t["salt"] == "sftflow-v1" and t["round"] == 1 for t in table)
    assert metrics["rows_newly_assigned"] == 1000 and metrics["rows_kept_from_earlier_runs"] == 0

    # Same input, same bytes: the splits and the table.
    table_bytes = params.layout.split_assignments.read_bytes()
    again = run(params)
    assert again["sha256"] == metrics["sha256"]
    assert params.layout.split_assignments.read_bytes() == table_bytes
    assert again["rows_kept_from_earlier_runs"] == 1000 and again["rows_newly_assigned"] == 0


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


def test_growth_by_near_duplicates_and_new_rows_moves_no_existing_row(tmp_path):
    """Issue 16: a near-duplicate arriving later must not drag a row the champion trained on into test."""
    from tasks.split import run, split_of

    rows = sample_rows(1100)
    params = params_with_clean(tmp_path, rows[:1000])
    run(params)
    before = split_of_ids(params)
    by_id = {r["id"]: r for r in rows}
    # "!" sorts before any letter or CJK character, so each twin is its group's smallest text: by the
    # canonical-member rule alone, the twin's own hash would decide where its train row goes.
    train_ids = [i for i in sorted(before) if before[i] == "train"][:150]
    test_ids = [i for i in sorted(before) if before[i] == "test"][:20]
    twins = [{**by_id[i], "id": i + "-twin", "text": "!" + by_id[i]["text"]} for i in train_ids + test_ids]
    cfg = params.split
    assert sum(split_of(t["text"], cfg) != "train" for t in twins[:150]) > 10  # the old rule would move these

    params = params_with_clean(tmp_path, twins + rows[1000:1100] + rows[:1000][::-1])  # order changes too
    metrics = run(params)
    after = split_of_ids(params)
    assert len(after) == 1270
    assert [i for i in before if after[i] != before[i]] == []
    assert {i: after[i + "-twin"] for i in train_ids + test_ids} == {i: before[i] for i in train_ids + test_ids}
    assert {after[r["id"]] for r in rows[1000:]} == {"train", "val", "test"}
    assert metrics["rows_kept_from_earlier_runs"] == 1000 and metrics["rows_newly_assigned"] == 270
    assert metrics["bridging_rows"] == 0 and metrics["near_duplicate_pairs_across_splits"] == 0
    assert metrics["rows_moved_to_group_split"] >= sum(split_of(t["text"], cfg) != after[t["id"]] for t in twins)


def bridge_texts(cfg: SplitConfig) -> tuple[str, str, str]:
    """Texts a (own hash: train) and c (own hash: test) that are no near-duplicates, and b, a near-duplicate of both.

    b is a demo text; a drops its first k characters and c its last k, so each shares almost every
    5-gram with b but a and c share fewer with each other.
    """
    from tasks.split import jaccard, ngram_hashes, split_of

    threshold = cfg.near_duplicate_threshold
    for source in sample_rows(600)[300:]:
        b = source["text"]
        grams = ngram_hashes(b)
        for k in range(len(grams) // 18, len(grams) // 11 + 1):
            a, c = b[k:], b[:-k]
            if split_of(a, cfg) != "train" or split_of(c, cfg) != "test":
                continue
            ga, gc = ngram_hashes(a), ngram_hashes(c)
            if jaccard(ga, grams) >= threshold and jaccard(gc, grams) >= threshold and jaccard(ga, gc) < threshold:
                return a, b, c
    raise AssertionError("no demo text gives a bridge; widen the search")


@pytest.mark.parametrize("first", ["train", "test"])
def test_a_bridging_near_duplicate_joins_the_earlier_assignment_and_is_counted(tmp_path, first):
    from tasks.split import run

    a, b, c = bridge_texts(SplitConfig())
    rows = sample_rows(300)
    arrivals = [row("a", a), row("c", c)] if first == "train" else [row("c", c), row("a", a)]
    run(params_with_clean(tmp_path, rows + arrivals[:1]))
    params = params_with_clean(tmp_path, rows + arrivals)
    metrics = run(params)
    before = split_of_ids(params)
    assert (before["a"], before["c"]) == ("train", "test")  # each by its own hash: they are no near-duplicates
    assert metrics["bridging_rows"] == 0 and metrics["near_duplicate_pairs_across_splits"] == 0

    params = params_with_clean(tmp_path, rows + arrivals + [row("b", b)])
    metrics = run(params)
    after = split_of_ids(params)
    assert {i: after[i] for i in before} == before  # a stays in train and c in test, whatever arrives
    assert after["b"] == first  # the earlier of the two assignments
    assert metrics["bridging_rows"] == 1 and metrics["near_duplicate_pairs_across_splits"] == 1
    assert metrics["rows_newly_assigned"] == 1

    # Remembered from now on: a rerun moves nothing and still counts the pair that crosses.
    metrics = run(params)
    assert split_of_ids(params) == after
    assert metrics["bridging_rows"] == 0 and metrics["near_duplicate_pairs_across_splits"] == 1


def test_no_table_is_a_first_run_and_says_so(tmp_path, caplog):
    from tasks.split import run

    params = params_with_clean(tmp_path, sample_rows(300))
    with caplog.at_level(logging.WARNING, logger="tasks.split"):
        metrics = run(params)
    assert "no assignment table" in caplog.text and "dvc pull" in caplog.text
    assert metrics["rows_newly_assigned"] == 300 and metrics["assignment_table_texts"] == len(read_table(params))


def test_changing_the_salt_starts_the_table_anew_and_says_so(tmp_path, caplog):
    from tasks.split import run

    rows = sample_rows(300)
    a = params_with_clean(tmp_path, rows)
    run(a)
    sa = split_of_ids(a)
    b = params_with_clean(tmp_path, rows, "split.salt=other")
    with caplog.at_level(logging.WARNING, logger="tasks.split"):
        metrics = run(b)
    sb = split_of_ids(b)
    assert sum(sa[i] != sb[i] for i in sa) > 30
    assert "split.salt is 'other'" in caplog.text and "salt 'sftflow-v1'" in caplog.text and "starts anew" in caplog.text
    assert {(t["salt"], t["round"]) for t in read_table(b)} == {("other", 1)}
    assert metrics["rows_kept_from_earlier_runs"] == 0 and metrics["rows_newly_assigned"] == 300


def _corrupt(lines: list[str], kind: str) -> list[str]:
    records = [json.loads(x) for x in lines]
    if kind == "bad JSON":
        return lines[:3] + [lines[3][:20]] + lines[4:]
    if kind == "no salt field":
        del records[1]["salt"]
    elif kind == "salt not a string":
        records[1]["salt"] = 7
    elif kind == "mixed salts":
        records[4]["salt"] = "sftflow-v0"
    elif kind == "duplicate key":
        records[6] = {**records[5], "split": "test" if records[5]["split"] != "test" else "train"}
    elif kind == "unknown split":
        records[2]["split"] = "holdout"
    elif kind == "empty":
        return []
    return [json.dumps(r) for r in records]


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("bad JSON", r"line 4 is not JSON"),
        ("no salt field", r"line 2 has fields \['round', 'split', 'text_sha256'\]"),
        ("salt not a string", r"line 2: salt 7 is not a string"),
        ("mixed salts", r"different salts \('sftflow-v0' on 1 line\(s\), 'sftflow-v1' on 49 line\(s\)\)"),
        ("duplicate key", r"line 7 repeats text_sha256"),
        ("unknown split", r"line 3: split 'holdout' is not one of"),
        ("empty", r"it is empty"),
    ],
)
def test_a_corrupt_table_fails_naming_the_file_and_the_fix_and_reshuffles_nothing(tmp_path, kind, message):
    from tasks.split import run

    params = params_with_clean(tmp_path, sample_rows(50))
    run(params)
    table = params.layout.split_assignments
    table.write_text("".join(x + "\n" for x in _corrupt(table.read_text(encoding="utf-8").splitlines(), kind)))
    written = table.read_bytes()
    with pytest.raises(DataError, match=re.escape(f"{table} is corrupt") + ".*" + message + r".*dvc checkout"):
        run(params)
    assert table.read_bytes() == written  # left for the user to restore
    assert not list(params.layout.stage_dir("split").glob("[tv]*.jsonl"))  # no split from a guess


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

    def leaky(*args):
        result = real(*args)
        victim = result.splits["train"][0]
        result.splits["test"].append({**victim, "id": victim["id"] + "-copy"})
        return result

    monkeypatch.setattr(split, "assign", leaky)
    with pytest.raises(StageError, match=r"near-identical text pair\(s\) across splits.*-copy \(identical text\)"):
        split.run(params)
    assert not list(params.layout.stage_dir("split").glob("*.jsonl"))  # the table neither


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



def test_dvc_repro_reads_the_table_back_as_data_grows(project):  # noqa: F811
    """DVC keeps the table (a `persist` out) when it re-runs split, so grown data keeps every old row's split."""
    dest, env = project
    dvc = str(BIN / "dvc")
    _run([dvc, "repro", "split"], dest, env)
    folder = dest / "artifacts" / "split"

    def jsonl(name: str) -> list[dict]:
        return [json.loads(x) for x in (folder / name).read_text(encoding="utf-8").splitlines()]

    def ids() -> dict[str, str]:
        return {r["id"]: s for s in ("train", "val", "test") for r in jsonl(f"{s}.jsonl")}

    before = ids()
    first_table = jsonl("assignments.jsonl")
    assert {t["round"] for t in first_table} == {1} and len(first_table) == len(before)

    data = dest / "data" / "small.jsonl"
    old = [json.loads(x) for x in data.read_text(encoding="utf-8").splitlines()]
    twins = [{**r, "id": r["id"] + "-twin", "text": "!" + r["text"]} for r in old if before.get(r["id"]) == "train"][:30]
    grown = old + twins + sample_rows(150)[120:]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in grown), encoding="utf-8")
    out = _run([dvc, "repro", "split"], dest, env)
    assert "Running stage 'split'" in out
    after = ids()
    assert {i: after[i] for i in before} == before
    assert all(after[t["id"]] == "train" for t in twins)
    table = {t["text_sha256"]: t for t in jsonl("assignments.jsonl")}
    assert all(table[t["text_sha256"]] == t for t in first_table)
    assert {t["round"] for t in table.values()} == {1, 2}  # read back: a recreated table would be all round 1
    metrics = json.loads((dest / "metrics" / "split.json").read_text())
    assert metrics["rows_kept_from_earlier_runs"] == len(before) and metrics["rows_newly_assigned"] == len(after) - len(before)

    assert "Running stage" not in _run([dvc, "repro", "split"], dest, env)
    assert "Data and pipelines are up to date" in _run([dvc, "status", "split"], dest, env)


def test_a_missing_table_that_dvc_lock_records_fails_instead_of_reshuffling(tmp_path, monkeypatch):
    import yaml

    from tasks.split import run

    params = params_with_clean(tmp_path, sample_rows(200))
    run(params)
    table = params.layout.split_assignments
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"stages": {"split": {"outs": [{"path": str(table), "md5": "x"}]}}}))
    table.unlink()
    with pytest.raises(DataError, match=r"assignments.jsonl is missing, but dvc.lock records it.*dvc checkout"):
        run(params)
