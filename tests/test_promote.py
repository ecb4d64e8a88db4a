"""promote: the gate (better / worse / within noise / below min_delta), forced promotion, rollback,
racing promotions, and re-scoring a champion whose cached scores are for another test split."""

from __future__ import annotations

import json

import threading

import pytest
from conftest import ROOT, sample_rows
from registry_helpers import build_upstream, sqlite_store

ROWS = sample_rows(130)[120:130]
BASE = [30.0 + (i % 3) for i in range(len(ROWS))]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with sqlite_store(tmp_path_factory) as root:
        yield root


def _params(tiny_overrides, name, *extra):
    from tasks.core.config import load_params

    return load_params(ROOT / "params.yaml", tiny_overrides + [f"register.model_name={name}", *extra])


def _register(params, model_dir, scores, rows=ROWS) -> int:
    from tasks import register

    build_upstream(params, model_dir, rows, scores)
    return register.run(params)["version"]


def _aliases(name):
    import mlflow

    return {a: int(v) for a, v in mlflow.MlflowClient().get_registered_model(name).aliases.items()}


def _tags(name, version):
    import mlflow

    return mlflow.MlflowClient().get_model_version(name, str(version)).tags


def test_gate_promotes_only_a_significantly_better_model(store, tiny_overrides, tiny_model_dir):
    from tasks import promote

    params = _params(tiny_overrides, "gate")
    v1 = _register(params, tiny_model_dir, BASE)
    first = promote.run(params)
    assert first["decision"] == "champion" and first["reason"] == "no champion yet"

    v2 = _register(params, tiny_model_dir, [s + 8 + (i % 2) for i, s in enumerate(BASE)])
    import mlflow

    with mlflow.start_run() as run:  # the flow's run: the decision and its figures go there too
        better = promote.run(params)
    recorded = mlflow.MlflowClient().get_run(run.info.run_id).data
    assert recorded.tags["promote.decision"] == "champion" and recorded.metrics["promote.delta"] == pytest.approx(8.5)
    assert better["decision"] == "champion" and better["previous_champion"] == v1
    assert better["delta"] == pytest.approx(8.5) and better["low"] > 0
    assert _aliases("gate") == {"champion": v2}  # one alias per meaning: the champion is not also challenger
    assert _tags("gate", v2)["promote.decision"] == "champion"
    assert _tags("gate", v1)["promote.decision"] == "replaced"
    described = mlflow.MlflowClient().get_model_version("gate", str(v2)).description
    assert described.startswith("champion (") and "ROUGE-L +8.50" in described and f"over version {v1}" in described
    assert mlflow.MlflowClient().get_model_version("gate", str(v1)).description.startswith(f"replaced as champion by version {v2}")

    v3 = _register(params, tiny_model_dir, [s + 3 for s in BASE])  # worse than v2
    worse = promote.run(params)
    assert worse["decision"] == "challenger" and worse["delta"] == pytest.approx(3 - 8.5)
    assert _aliases("gate") == {"champion": v2, "challenger": v3}
    assert _tags("gate", v3)["promote.decision"] == "challenger"
    assert f"champion stays version {v2}" in mlflow.MlflowClient().get_model_version("gate", str(v3)).description
    assert _tags("gate", v2)["promote.decision"] == "defended" and _tags("gate", v2)["promote.last_challenger"] == str(v3)

    # Mean gain +1 but rows swing by ±10: the bootstrap's lower bound is below 0 -> noise.
    v4 = _register(params, tiny_model_dir, [s + 8.5 + (11 if i % 2 else -9) for i, s in enumerate(BASE)])
    noise = promote.run(params)
    assert noise["delta"] == pytest.approx(1.0) and noise["low"] < 0
    assert noise["decision"] == "challenger" and "within noise" in noise["reason"]
    assert _aliases("gate") == {"champion": v2, "challenger": v4}

    # A consistent gain of 2 points is significant but below promote.min_delta = 3.
    strict = _params(tiny_overrides, "gate", "promote.min_delta=3")
    v5 = _register(strict, tiny_model_dir, [s + 10.5 for s in BASE])
    small = promote.run(strict)
    assert small["low"] > 0 and small["decision"] == "challenger" and "min_delta" in small["reason"]
    assert promote.run(params)["decision"] == "champion"  # the same version passes the default min_delta 0
    assert _aliases("gate")["champion"] == v5


def test_forced_promotion_and_rollback(store, tiny_overrides, tiny_model_dir, capsys):
    import json

    from tasks import promote
    from tasks.cli import main
    from tasks.core.errors import StageError

    params = _params(tiny_overrides, "manual")
    v1 = _register(params, tiny_model_dir, BASE)
    promote.run(params)
    v2 = _register(params, tiny_model_dir, [s - 5 for s in BASE])
    assert promote.run(params)["decision"] == "challenger"

    argv = ["-p", str(ROOT / "params.yaml"), *[f"-S{o}" for o in tiny_overrides], "-Sregister.model_name=manual"]
    capsys.readouterr()
    assert main(["promote", *argv, "--version", str(v2)]) == 0  # `sftflow promote --version N`
    forced = json.loads(capsys.readouterr().out)
    assert forced["manual"] is True and _aliases("manual")["champion"] == v2
    assert main(["lineage", *argv, "champion"]) == 0
    assert f"manual version {v2}" in capsys.readouterr().out
    assert _tags("manual", v2)["promote.manual"] == "true"

    back = promote.rollback(params)
    assert back == {"champion": v1, "rolled_back": v2, "history": [v1]}
    assert _aliases("manual")["champion"] == v1
    assert _tags("manual", v2)["promote.rolled_back"] == "true"
    with pytest.raises(StageError, match="no previous champion"):
        promote.rollback(params)


def test_racing_promotions_leave_one_champion_as_if_serial(store, tiny_overrides, tiny_model_dir):
    """v2 beats v1 by 10, v3 by 5: in either order the serial outcome is champion v2."""
    from tasks import promote

    params = _params(tiny_overrides, "race")
    _register(params, tiny_model_dir, BASE)
    promote.run(params)
    v2 = _register(params, tiny_model_dir, [s + 10 for s in BASE])
    v3 = _register(params, tiny_model_dir, [s + 5 for s in BASE])

    barrier = threading.Barrier(2)
    results, errors = {}, []

    def contend(version):
        try:
            barrier.wait()
            results[version] = promote.gate(params, version)
        except Exception as e:  # noqa: BLE001 - collected and asserted on below
            errors.append(e)

    threads = [threading.Thread(target=contend, args=(v,)) for v in (v2, v3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert _aliases("race")["champion"] == v2
    assert results[v2]["decision"] == "champion"
    # v3 either lost to v2, or won against v1 first and was then replaced by v2.
    assert results[v3]["previous_champion"] in {1, v2}
    import json

    import mlflow

    history = json.loads(mlflow.MlflowClient().get_registered_model("race").tags["promote.history"])
    assert history in (["1", str(v2)], ["1", str(v3), str(v2)])


def test_champion_is_rescored_on_a_new_test_split(store, tiny_overrides, tiny_model_dir):
    """The champion's cached 90s are for the old split; on the new one it scores ~0 (untrained model)."""
    from tasks import promote, register

    params = _params(tiny_overrides, "rescore")
    v1 = _register(params, tiny_model_dir, [90.0] * len(ROWS))
    promote.run(params)
    new_rows = sample_rows(140)[130:140]
    v2 = _register(params, tiny_model_dir, [40.0 + (i % 2) for i in range(len(new_rows))], rows=new_rows)
    result = promote.run(params)
    assert result["champion_rescored"] is True and result["challenger_rescored"] is False
    assert result["champion_rouge-l"] < 40 and result["decision"] == "champion"
    assert _aliases("rescore")["champion"] == v2
    from tasks.core.registry import row_scores_key
    from tasks.core.scoring import SCORING_VERSION

    key = row_scores_key(result["test_sha256"], _tags("rescore", v1)["sftflow.settings_sha256"], SCORING_VERSION)
    cached = register.load_row_scores(_tags_run("rescore", v1), key)
    assert sorted(cached) == sorted(r["id"] for r in new_rows)


def _tags_run(name, version):
    import mlflow

    return mlflow.MlflowClient().get_model_version(name, str(version)).run_id


def test_champion_scored_by_an_older_scoring_version_is_rescored(store, tiny_overrides, tiny_model_dir, monkeypatch):
    from tasks import promote, register

    params = _params(tiny_overrides, "scoring-version")
    _register(params, tiny_model_dir, [90.0] * len(ROWS))  # its stored scores: scoring version 1
    promote.run(params)
    # The scoring code changed (version 2): the challenger is registered with v2 scores, the champion's
    # cached v1 scores must not be compared with them.
    newer = promote.SCORING_VERSION + 1
    monkeypatch.setattr(register, "SCORING_VERSION", newer)
    monkeypatch.setattr(promote, "SCORING_VERSION", newer)
    v2 = _register(params, tiny_model_dir, [40.0 + (i % 2) for i in range(len(ROWS))])
    result = promote.run(params)
    assert result["champion_rescored"] is True and result["challenger_rescored"] is False
    assert result["scoring_version"] == newer
    assert result["champion_rouge-l"] < 40 and result["decision"] == "champion"  # the untrained model rescored: ~0
    assert _aliases("scoring-version") == {"champion": v2}


def test_versions_with_different_settings_are_each_compared_as_registered(store, tiny_overrides, tiny_model_dir):
    from tasks import promote

    params = _params(tiny_overrides, "settings")
    v1 = _register(params, tiny_model_dir, BASE)
    promote.run(params)
    shorter = _params(tiny_overrides, "settings", "evaluate.max_new_tokens=5")
    v2 = _register(shorter, tiny_model_dir, [s + 8 + (i % 2) for i, s in enumerate(BASE)])
    result = promote.run(shorter)
    # Each version's own stored scores (made under its own settings) were used: nothing rescored.
    assert result["champion_rescored"] is False and result["challenger_rescored"] is False
    assert json.loads(result["champion_settings"])["max_new_tokens"] == 8
    assert json.loads(result["challenger_settings"])["max_new_tokens"] == 5
    assert json.loads(_tags("settings", v2)["promote.champion_settings"])["max_new_tokens"] == 8
    assert result["decision"] == "champion" and result["previous_champion"] == v1


def _register_with_int8(params, model_dir, scores) -> int:
    """A version with its int8 variant (the quantize stage's own functions; its measured drop 0.2)."""
    from tasks import register
    from tasks.core.io import dir_sha256, write_json
    from tasks.core.modeling import load_model_and_tokenizer
    from tasks.core.variants import save_int8
    from tasks.quantize import quantize_int8

    build_upstream(params, model_dir, ROWS, scores)
    source = dir_sha256(params.layout.final_model)
    model, tokenizer = load_model_and_tokenizer(model_dir)
    _, tensors, layout = quantize_int8(model)
    save_int8(tensors, layout, model, tokenizer, params.layout.stage_dir("quantize") / "int8", source_sha256=source)
    write_json(params.layout.metrics_file("quantize"), {"rows": len(ROWS), "int8.rouge-l": 1.0, "int8.rouge-l_drop": 0.2,
                                                        "int8.passed": True, "model_sha256": source})
    return register.run(params)["version"]


def test_versions_are_compared_as_the_app_serves_them_on_this_device(store, tiny_overrides, tiny_model_dir, monkeypatch):
    """serve.variant_cpu=int8 with int8 registered: both versions are scored through their int8 variant, loaded as
    the app loads it, not on the float32 row scores register stored; the decision record says what was scored."""
    from tasks import promote
    from tasks.core.loading import load_registered
    from tasks.core.registry import row_scores_key
    from tasks.core.scoring import SCORING_VERSION, score

    monkeypatch.setattr(promote, "this_device", lambda: "cpu")  # the int8 variant serves on the CPU
    params = _params(tiny_overrides, "served", "serve.variant_cpu=int8", "serve.variant_gpu=bf16")
    v1 = _register_with_int8(params, tiny_model_dir, [90.0] * len(ROWS))
    promote.run(params)
    _register_with_int8(params, tiny_model_dir, [40.0] * len(ROWS))
    result = promote.run(params)
    assert result["scored_on"] == "cpu"
    assert result["challenger_scored_as"] == result["champion_scored_as"] == "int8 (int8 on cpu)"
    assert result["champion_rescored"] is True and result["challenger_rescored"] is True
    # The number compared is the number served: the champion's int8 variant's own summaries of these rows.
    served = load_registered(_tags("served", v1)["sftflow.variant.int8"]).predict([r["text"] for r in ROWS])
    per_row = score(served, [r["summary"] for r in ROWS], params.data.language, bootstrap_samples=1)["per_row"]
    assert result["champion_rouge-l"] == pytest.approx(sum(s["rouge-l"] for s in per_row) / len(per_row))
    assert result["delta"] == pytest.approx(0.0) and result["decision"] == "challenger"  # same weights: no gain
    assert "not re-scored on this CPU" in result["scoring_note"] and "serve.variant_gpu=bf16" in result["scoring_note"]
    assert _tags("served", result["version"])["promote.champion_scored_as"] == "int8 (int8 on cpu)"
    key = row_scores_key(result["test_sha256"], _tags("served", v1)["sftflow.settings_sha256"], SCORING_VERSION)
    assert promote.load_row_scores(_tags_run("served", v1), f"{key}.int8-cpu") is not None  # cached for the variant
    # Served in full precision: the float32 row scores register stored are compared, nothing generated.
    full = promote.run(_params(tiny_overrides, "served", "serve.variant_cpu=full", "serve.variant_gpu=full"))
    assert full["champion_scored_as"] == full["challenger_scored_as"] == "full (float32 on cpu)"
    assert full["champion_rescored"] is False and full["delta"] == pytest.approx(-50.0)
