"""tasks/core/scoring.py: Chinese ROUGE by hand and against rouge-chinese, English against rouge_score,
empty predictions, bootstrap."""

from __future__ import annotations

import random

import pytest
from conftest import sample_rows

from tasks.core.scoring import METRICS, SCORING_VERSION, bootstrap_ci, paired_bootstrap, score, score_row, tokenize


def test_chinese_rouge_worked_by_hand():
    # jieba: 我爱北京天安门 -> 我 / 爱 / 北京 / 天安门 (4 words)
    #        天安门我爱北京 -> 天安门 / 我 / 爱 / 北京 (4 words)
    #        我们爱北京     -> 我们 / 爱 / 北京      (3 words)
    assert tokenize("我爱北京天安门", "zh") == ["我", "爱", "北京", "天安门"]
    assert tokenize("天安门我爱北京", "zh") == ["天安门", "我", "爱", "北京"]
    assert tokenize("我们爱北京", "zh") == ["我们", "爱", "北京"]
    ref = "我爱北京天安门"
    # Row 1, prediction 天安门我爱北京 (same words, another order):
    #   ROUGE-1: 4 shared words of 4 / 4          -> P = R = 1, F = 100
    #   ROUGE-2: bigrams {天安门我, 我爱, 爱北京} vs {我爱, 爱北京, 北京天安门}: 2 shared of 3 / 3 -> F = 66.67
    #   ROUGE-L: LCS 我 爱 北京 = 3 of 4 / 4        -> F = 75
    # Row 2, prediction 我们爱北京:
    #   ROUGE-1: shared 爱, 北京 = 2; P = 2/3, R = 2/4 -> F = 2·(1/3)/(7/6) = 4/7 = 57.14
    #   ROUGE-2: {我们爱, 爱北京} vs 3 bigrams: 1 shared; P = 1/2, R = 1/3 -> F = 2·(1/6)/(5/6) = 40
    #   ROUGE-L: LCS 爱 北京 = 2; P = 2/3, R = 2/4 -> F = 57.14
    result = score(["天安门我爱北京", "我们爱北京"], [ref, ref], "zh", bootstrap_samples=10)
    row1, row2 = result["per_row"]
    assert row1["rouge-1"] == pytest.approx(100.0, abs=1e-4)
    assert row1["rouge-2"] == pytest.approx(200 / 3, abs=1e-4)
    assert row1["rouge-l"] == pytest.approx(75.0, abs=1e-4)
    assert row2["rouge-1"] == pytest.approx(400 / 7, abs=1e-4)
    assert row2["rouge-2"] == pytest.approx(40.0, abs=1e-4)
    assert row2["rouge-l"] == pytest.approx(400 / 7, abs=1e-4)
    assert result["rouge-1"] == pytest.approx((100 + 400 / 7) / 2, abs=1e-4)
    assert result["rouge-l"] == pytest.approx((75 + 400 / 7) / 2, abs=1e-4)
    assert result["rows"] == 2 and result["empty_predictions"] == 0


def test_equals_rouge_chinese_on_jieba_output_for_sampled_rows():
    import jieba
    from rouge_chinese import Rouge

    rows = random.Random(0).sample(sample_rows(300), 25)
    # Predictions of every kind of overlap: a lead of the text, the reference reshuffled, an unrelated title.
    predictions = [r["text"][:25] for r in rows[:10]]
    predictions += [r["summary"][::2] + r["summary"][1::2] for r in rows[10:20]]
    predictions += [rows[0]["summary"]] * 5
    references = [r["summary"] for r in rows]
    ours = score(predictions, references, "zh", bootstrap_samples=10)["per_row"]
    theirs = Rouge().get_scores(
        [" ".join(jieba.lcut(p)) for p in predictions], [" ".join(jieba.lcut(r)) for r in references]
    )
    for o, t in zip(ours, theirs):
        for m in ("rouge-1", "rouge-2", "rouge-l"):
            assert o[m] == pytest.approx(100 * t[m]["f"], abs=1e-9)
    assert len({round(o["rouge-l"], 6) for o in ours}) > 5  # the sample really spans different scores


def test_empty_prediction_scores_zero_and_is_counted():
    result = score(["", "  ", "我爱北京天安门"], ["我爱北京天安门"] * 3, "zh", bootstrap_samples=10)
    assert result["empty_predictions"] == 2
    assert all(v == 0.0 for row in result["per_row"][:2] for v in row.values())
    assert result["per_row"][2]["rouge-1"] == pytest.approx(100, abs=1e-4)
    assert result["per_row"][2]["bleu-4"] == pytest.approx(100, abs=1e-4)
    # The empty rows stay in the mean: one perfect row of three.
    assert result["rouge-1"] == pytest.approx(100 / 3, abs=1e-4)


def test_english_is_lower_cased_word_tokens():
    assert tokenize("The Cat, sat!", "en") == ["the", "cat", "sat"]
    result = score(["the cat sat"], ["The Cat sat."], "en", bootstrap_samples=10)
    assert result["rouge-1"] == pytest.approx(100, abs=1e-4)
    half = score(["the dog"], ["the cat"], "en", bootstrap_samples=10)
    assert half["rouge-1"] == pytest.approx(50, abs=1e-4)


def test_english_rouge_is_stemmed_worked_by_hand():
    # Porter stems of words over 3 letters: trains -> train, running -> run, runs -> run; "were" stays.
    #   hypothesis: the train were run   reference: train run
    #   ROUGE-1: 2 shared; P = 2/4, R = 2/2 -> F = 66.67; ROUGE-2: "train were", ... vs "train run": 0
    #   ROUGE-L: LCS train .. run = 2 -> F = 66.67 (unstemmed, nothing would match: 0)
    row = score_row("The trains were running.", "Train runs", "en")
    assert row["rouge-1"] == pytest.approx(200 / 3, abs=1e-9)
    assert row["rouge-2"] == 0.0
    assert row["rouge-l"] == pytest.approx(200 / 3, abs=1e-9)


def test_english_scores_equal_rouge_score_with_the_porter_stemmer():
    from rouge_score.rouge_scorer import RougeScorer

    pairs = [  # (hypothesis, reference): CNN/DailyMail-style highlights, one per line
        ("Police arrested two men after the robberies in Leeds.", "Two men arrested after robberies.\nPolice in Leeds say more arrests may follow."),
        ("The council's plans were rejected, residents said.", "Residents say the council rejected the plans.\nA vote is expected in June."),
        ("Scientists discovered a new species of frogs in Peru's forests.", "New frog species discovered in Peru.\nIt was found by scientists studying forests."),
        ("Shares fell 3% on Monday", "Shares fell by 3 per cent on Monday as markets reacted to the news."),
        ("completely unrelated words here", "Storm hits the coast."),
    ]
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    result = score([h for h, _ in pairs], [r for _, r in pairs], "en", bootstrap_samples=10)
    for (hyp, ref), ours in zip(pairs, result["per_row"]):
        theirs = scorer.score(ref, hyp)
        assert ours["rouge-1"] == pytest.approx(100 * theirs["rouge1"].fmeasure, abs=1e-9)
        assert ours["rouge-2"] == pytest.approx(100 * theirs["rouge2"].fmeasure, abs=1e-9)
        assert ours["rouge-l"] == pytest.approx(100 * theirs["rougeL"].fmeasure, abs=1e-9)
        assert score_row(hyp, ref, "en") == ours
    assert len({round(o["rouge-1"], 6) for o in result["per_row"]}) == 5  # the pairs span different scores
    # The stemmer is on: "arrested"/"robberies"/"discovered" match their stems, so stemmed > unstemmed here.
    plain = RougeScorer(["rouge1"], use_stemmer=False).score(pairs[2][1], pairs[2][0])["rouge1"].fmeasure
    assert result["per_row"][2]["rouge-1"] > 100 * plain
    assert SCORING_VERSION == 2  # rouge_score for English: registry row scores of version 1 are not compared


def test_reference_without_words_is_an_error_naming_the_row():
    with pytest.raises(ValueError, match="row 1"):
        score(["a", "b"], ["标题", "  "], "zh")


def test_bootstrap_is_reproducible_and_narrows_with_more_rows():
    rng = random.Random(1)
    values = [rng.uniform(0, 100) for _ in range(2000)]
    assert bootstrap_ci(values[:50], 300, seed=7) == bootstrap_ci(values[:50], 300, seed=7)
    assert bootstrap_ci(values[:50], 300, seed=7) != bootstrap_ci(values[:50], 300, seed=8)
    low_small, high_small = bootstrap_ci(values[:50], 300, seed=7)
    low_large, high_large = bootstrap_ci(values, 300, seed=7)
    mean = sum(values[:50]) / 50
    assert low_small < mean < high_small
    # The interval width shrinks like 1/sqrt(n): 40x the rows, about 6x narrower.
    assert (high_large - low_large) < (high_small - low_small) / 3


def test_score_intervals_bracket_the_mean_for_every_metric():
    rows = sample_rows(40)
    result = score([r["text"][:20] for r in rows], [r["summary"] for r in rows], "zh", bootstrap_samples=200, seed=3)
    for m in METRICS:
        assert result[f"{m}_low"] <= result[m] <= result[f"{m}_high"]
        assert result[f"{m}_low"] < result[f"{m}_high"]


def test_paired_bootstrap():
    rng = random.Random(2)
    b = [rng.uniform(0, 100) for _ in range(200)]
    shifted = paired_bootstrap([x + 2 for x in b], b, samples=200, seed=0)
    # Every row gains exactly 2: no uncertainty in the paired difference.
    assert shifted["delta"] == pytest.approx(2) and shifted["low"] == pytest.approx(2) and shifted["high"] == pytest.approx(2)
    assert shifted["p_not_better"] == 0.0
    noisy = [x + rng.gauss(1, 5) for x in b]
    result = paired_bootstrap(noisy, b, samples=500, seed=0)
    assert result == paired_bootstrap(noisy, b, samples=500, seed=0)
    assert result["low"] < result["delta"] < result["high"]
    with pytest.raises(ValueError, match="same rows"):
        paired_bootstrap([1.0, 2.0], [1.0], samples=10, seed=0)


def test_output_stats_by_hand():
    from tasks.core.scoring import output_stats

    predictions = ["基于国国国的研究", "基于国国国的研究", "深度学习方法", "图像分割"]
    references = ["基于深度学习的研究", "一种方法", "深度学习方法研究", "图像分割"]
    stats = output_stats(predictions, references, "zh")
    assert stats["distinct_share"] == 3 / 4
    assert stats["repeat_share"] == 2 / 4  # "国国国" twice; "研究" has no unit three times in a row
    assert stats["mean_length"] == (8 + 8 + 6 + 4) / 4
    assert stats["reference_mean_length"] == (9 + 4 + 8 + 4) / 4
    assert stats["length_ratio"] == pytest.approx(6.5 / 6.25)
    en = output_stats(["the the the cat", "a dog"], ["the cat sat", "a dog ran"], "en")
    assert en["repeat_share"] == 0.5 and en["mean_length"] == 3.0 and en["length_ratio"] == 1.0
    with pytest.raises(ValueError):
        output_stats([], [], "zh")
