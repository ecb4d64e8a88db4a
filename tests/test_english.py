"""The English path: the README's English example runs end to end on CNN/DailyMail-shaped rows made
here, `auto` picks each language's defaults (zh as before), and summary token limits are sized from
the train split with the share of cut references reported."""

from __future__ import annotations

import json
import random
import shlex

import pytest
from conftest import ROOT, TINY_RUN_OVERRIDES

from tasks.core.config import AUTO, LANGUAGE_DEFAULTS, load_params
from tasks.core.stages import STAGES

# A fixed vocabulary: every row is different, nothing is downloaded.
NAMES = ["Mayor Ellen Hart", "Professor Omar Reyes", "Coach Dana Price", "Inspector Lee Grant", "Minister Ruth Cole",
         "Doctor Sam Novak", "Chief Anna Webb", "Senator Paul Dunn"]
PLACES = ["Leeds", "Bristol", "Denver", "Toronto", "Dublin", "Austin", "Glasgow", "Perth", "Boston", "Oxford"]
SUBJECTS = ["the city council", "local residents", "the hospital board", "police officers", "the school district",
            "transport officials", "a group of scientists", "the football club", "farmers in the region"]
ACTIONS = ["approved a plan to rebuild", "raised concerns about", "announced new funding for", "opened an inquiry into",
           "voted against changes to", "celebrated the reopening of", "warned of delays at", "published a report on"]
OBJECTS = ["the old railway station", "the central library", "the river bridge", "the children's hospital",
           "the main stadium", "the harbour wall", "the northern bypass", "the public swimming pool", "the city museum"]
DETAILS = ["after months of debate", "despite strong opposition", "at a meeting on Monday", "following a long review",
           "with support from volunteers", "ahead of the winter season", "in a statement on Friday", "amid rising costs"]


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS).capitalize()} in {rng.choice(PLACES)} {rng.choice(ACTIONS)} {rng.choice(OBJECTS)} {rng.choice(DETAILS)}."


def news_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n article/highlights rows shaped like CNN/DailyMail: articles of ~600 to ~5,000 characters (one in
    eight past the zh limit of 2,000), highlights of three or four lines that restate the article."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        name, place = rng.choice(NAMES), rng.choice(PLACES)
        lead = f"{name} said on day {i} that {rng.choice(SUBJECTS)} in {place} {rng.choice(ACTIONS)} {rng.choice(OBJECTS)}."
        body = [_sentence(rng) for _ in range(rng.randint(40, 60) if i % 8 == 0 else rng.randint(6, 14))]
        highlights = [lead.replace(f" on day {i}", ""), *rng.sample(body, rng.randint(2, 3))]
        rows.append({"id": f"news-{i:03d}", "article": " ".join([lead, *body]), "highlights": "\n".join(highlights)})
    return rows


def readme_english_example() -> list[str]:
    """The `-S` overrides of the README's English example command, word for word."""
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith(".venv/bin/sftflow run") and "data.language=en" in line:
            args = shlex.split(line)[2:]
            assert args[::2] == ["-S"] * (len(args) // 2), line
            return args[1::2]
    raise AssertionError("README.md has no English example `.venv/bin/sftflow run ... -S data.language=en`")


def test_the_readme_english_example_runs_end_to_end(tmp_path):
    from tasks import align, evaluate, pretrain, select, split, train, validate

    rows = news_rows(96)
    assert sum(len(r["article"]) > 2000 for r in rows) >= 10
    data = tmp_path / "my.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    example = readme_english_example()
    assert example[1:] == ["data.text_column=article", "data.summary_column=highlights", "data.language=en"]
    overrides = [
        *(f"data.path={data}" if o.startswith("data.path=") else o for o in example),
        f"paths.artifacts={tmp_path / 'artifacts'}",
        f"paths.metrics={tmp_path / 'metrics'}",
        f"paths.plots={tmp_path / 'plots'}",
        f"evaluate.cache_dir={tmp_path / 'cache'}",
        *TINY_RUN_OVERRIDES,
    ]
    params = load_params(ROOT / "params.yaml", overrides)
    assert params.data.prompt_template == LANGUAGE_DEFAULTS["en"]["data.prompt_template"]
    assert params.model.tokenizer == "bpe" and params.validate.max_text_chars == 20000

    checked = validate.run(params)
    assert checked["success"] and checked["rows_out"] == 96  # default limits keep every long article
    split.run(params)
    select.run(params)
    base = pretrain.run(params)
    assert base["tokenizer"] == "bpe" and base["tokenizer_tokens_per_char"] < 0.5  # subwords, not characters
    trained = train.run(params)
    # 48 tokens (the zh cap) would cut these highlights; sized from the train split, none is cut.
    assert 48 < trained["target_length_limit"] <= 256
    assert trained["train_truncated_target_share"] < 0.05 and trained["val_truncated_target_share"] < 0.05
    assert 0 < trained["train_truncated_source_share"] <= 1  # long articles are cut to train.max_source_length
    aligned = align.run(params)  # rouge_score for the self-generated pairs and the gate
    assert aligned["pairs_self"] > 0 and aligned["final"] in {"aligned", "fine-tuned"}
    scored = evaluate.run(params)
    assert scored["test_rows"] == len((tmp_path / "artifacts/split/test.jsonl").read_text().splitlines()) > 0
    assert 0 < scored["baseline"]["rouge-l"] <= 100  # lead-k words against the highlights, by rouge_score
    predictions = [json.loads(x) for x in (tmp_path / "artifacts/evaluate/predictions.jsonl").read_text().splitlines()]
    assert all("\n" in p["reference"] for p in predictions)  # highlights keep their lines through validate and split
    on_disk = json.loads((tmp_path / "metrics/train.json").read_text(encoding="utf-8"))
    assert on_disk["train_truncated_target_share"] == trained["train_truncated_target_share"]


def test_zh_defaults_are_unchanged():
    params = load_params(ROOT / "params.yaml")
    assert params.data.prompt_template == "为下面的论文摘要拟一个标题。\n摘要：{text}\n标题："
    assert params.model.tokenizer == "char"
    assert (params.validate.max_text_chars, params.validate.max_summary_chars) == (2000, 200)
    assert (params.train.max_target_length, params.train.target_length_percentile) == (48, 100)


def test_explicit_values_win_over_auto():
    params = load_params(
        ROOT / "params.yaml",
        ["data.language=en", "model.tokenizer=char", "data.prompt_template=TL;DR {text} =>", "train.max_target_length=64"],
    )
    assert params.model.tokenizer == "char" and params.data.prompt_template == "TL;DR {text} =>"
    assert params.train.max_target_length == 64 and params.validate.max_summary_chars == 1000


def test_every_stage_reading_an_auto_key_declares_the_language():
    # DVC re-runs a stage when a params key it lists changes; `auto` values change with data.language.
    for spec in STAGES:
        reads_auto = [k for k in LANGUAGE_DEFAULTS["en"] if any(k == r or k.startswith(r + ".") for r in spec.reads)]
        if reads_auto:
            assert "data.language" in spec.reads or "data" in spec.reads, (spec.name, reads_auto)
    assert set(LANGUAGE_DEFAULTS["zh"]) == set(LANGUAGE_DEFAULTS["en"]) and AUTO == "auto"


class _WordTokenizer:
    """One token per word, as a tokenizer is called on a batch."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[0] * len(t.split()) for t in texts]}


@pytest.mark.parametrize(("percentile", "cap", "limit"), [(100, 256, 11), (90, 256, 10), (50, 256, 6), (100, 8, 8), (1, 256, 2)])
def test_target_length_limit_is_a_percentile_of_train_references_under_the_cap(percentile, cap, limit):
    from tasks.core.stage_params import stage_params
    from tasks.train import target_length_limit

    # References of 1..10 words: 2..11 tokens with eos. Nearest rank: 90% of 10 -> the 9th (10 tokens).
    rows = [{"text": "t", "summary": " ".join(["w"] * n)} for n in range(1, 11)]
    params = stage_params(
        load_params(ROOT / "params.yaml", [f"train.target_length_percentile={percentile}", f"train.max_target_length={cap}"]),
        "train",
    )
    assert target_length_limit(params, _WordTokenizer(), rows) == limit
    assert target_length_limit(params, _WordTokenizer(), []) == cap


def test_encode_rows_reports_the_shares_cut(tiny_params, tiny_model_dir):
    from tasks.core.modeling import load_model_and_tokenizer
    from tasks.core.stage_params import stage_params
    from tasks.train import encode_rows

    _, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    rows = [{"text": "控制系统" * 5, "summary": "标题" * n} for n in (1, 2, 10, 30)]  # 3, 5, 21, 61 tokens with eos
    _, cuts = encode_rows(stage_params(tiny_params, "train"), tokenizer, rows, 20)
    assert cuts == {"truncated_source": 0, "truncated_target": 2, "truncated_source_share": 0.0, "truncated_target_share": 0.5}
