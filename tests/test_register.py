"""register: lineage tags, safetensors and no pickle, nothing registered on failure, champion loads in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, sample_rows
from registry_helpers import build_upstream, sqlite_store

ROWS = sample_rows(130)[120:130]  # not in tiny_data: held-out "test" rows


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with sqlite_store(tmp_path_factory) as root:
        yield root


def _params(tiny_overrides, name, *extra):
    from tasks.core.config import load_params

    return load_params(ROOT / "params.yaml", tiny_overrides + [f"register.model_name={name}", *extra])


def test_register_records_lineage_and_safetensors_only(store, tiny_overrides, tiny_model_dir, tiny_data):
    import mlflow

    from tasks import register
    from tasks.core.io import file_sha256
    from tasks.core.registry import row_scores_key
    from tasks.core.scoring import SCORING_VERSION

    def git_head():
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    params = _params(tiny_overrides, "reg-lineage")
    build_upstream(params, tiny_model_dir, ROWS, [30.0 + i for i in range(len(ROWS))])
    from tasks.core.io import write_json

    write_json(params.layout.metrics_file("train"), {"deterministic": False, "deterministic_reason": "3 ranks: all-reduce order"})
    head_before = git_head()
    result = register.run(params, flow_run_id="flow-123")
    heads = {head_before, git_head()}  # others may commit to this checkout meanwhile

    client = mlflow.MlflowClient()
    mv = client.get_model_version("reg-lineage", str(result["version"]))
    tags = mv.tags
    assert tags["data.sha256"] == file_sha256(tiny_data)
    assert tags["code.commit"] in heads and tags["code.dirty"] in {"true", "false"}
    assert tags["params.sha256"] == params.digest()
    assert tags["model.base"] == "scratch"
    assert tags["validate.success"] == "true"
    assert tags["prefect.flow_run_id"] == "flow-123"
    assert tags["train.deterministic"] == "false" and tags["train.deterministic_reason"] == "3 ranks: all-reduce order"
    assert tags["split.test_sha256"] == file_sha256(params.layout.stage_dir("split") / "test.jsonl")
    # Metrics live on the run; the version's tags hold lineage (and a hash of the metrics it was registered with).
    assert not [k for k in tags if k.startswith("evaluate.rouge")]
    assert client.get_run(mv.run_id).data.metrics["evaluate.rouge-l"] == pytest.approx(34.5)
    assert json.loads(tags["sftflow.settings"])["max_new_tokens"] == 8 and len(tags["sftflow.settings_sha256"]) == 64
    # Per-row scores for promotion are stored in the run, keyed by test split, settings and scoring version.
    key = row_scores_key(tags["split.test_sha256"], tags["sftflow.settings_sha256"], SCORING_VERSION)
    assert register.load_row_scores(mv.run_id, key)[ROWS[2]["id"]] == pytest.approx(32.0)

    local = Path(mlflow.artifacts.download_artifacts(f"models:/reg-lineage/{mv.version}"))
    files = [p for p in local.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert not [p for p in files if p.suffix in {".pkl", ".pickle", ".bin", ".pt"}], files
    mlmodel = (local / "MLmodel").read_text()
    assert "mlflow.pyfunc.loaders.code_model" in mlmodel and "python_model.pkl" not in mlmodel  # models from code
    settings = json.loads(next(p for p in files if p.name == "sftflow.json").read_text(encoding="utf-8"))
    assert settings["prompt_template"] == params.data.prompt_template and settings["max_new_tokens"] == 8

    text = register.lineage(params, mv.version)
    for needle in (tags["data.sha256"], tags["code.commit"], params.digest(), "rouge-l 34.5000", "validation success=true"):
        assert needle in text


def test_failed_run_registers_nothing(store, tiny_overrides, tiny_model_dir):
    import mlflow

    from tasks import register
    from tasks.core.errors import StageError

    params = _params(tiny_overrides, "reg-failed")
    build_upstream(params, tiny_model_dir, ROWS, [30.0] * len(ROWS))
    params.layout.metrics_file("evaluate").unlink()  # evaluate failed: no metrics
    with pytest.raises(StageError, match="evaluate.json does not exist"):
        register.run(params)
    assert mlflow.MlflowClient().search_model_versions("name='reg-failed'") == []


def test_register_refuses_metrics_or_variants_of_other_weights(store, tiny_overrides, tiny_model_dir):
    """`sftflow train` with new params, then `sftflow register` without evaluate/quantize: refused, nothing registered."""
    import mlflow

    from tasks import register
    from tasks.core.errors import StageError
    from tasks.core.io import dir_sha256, read_json, write_json

    params = _params(tiny_overrides, "reg-stale")
    build_upstream(params, tiny_model_dir, ROWS, [30.0] * len(ROWS))
    # The model is retrained (other weights): metrics/evaluate.json still describes the old ones.
    config = params.layout.final_model / "config.json"
    config.write_text(config.read_text(encoding="utf-8").replace("}", ', "retrained": true}', 1), encoding="utf-8")
    with pytest.raises(StageError, match=r"evaluate.json was computed for other weights .* re-run `sftflow evaluate`"):
        register.run(params)
    # Evaluate again (its metrics now name these weights), but the int8 folder is the old model's.
    metrics = read_json(params.layout.metrics_file("evaluate"))
    write_json(params.layout.metrics_file("evaluate"), {**metrics, "model_sha256": dir_sha256(params.layout.final_model)})
    _int8_variant(params, tiny_model_dir, drop=0.1)
    marker = params.layout.variant_dir("int8") / "sftflow_quantization.json"
    write_json(marker, {**read_json(marker), "source_sha256": "0" * 64})
    with pytest.raises(StageError, match=r"quantized from other weights .* re-run `sftflow quantize`"):
        register.run(params)
    assert mlflow.MlflowClient().search_model_versions("name='reg-stale'") == []
    assert mlflow.MlflowClient().search_model_versions("name='reg-stale-int8'") == []


def test_champion_loads_in_fresh_process_and_matches_evaluate(store, tiny_overrides, tiny_model_dir):
    from tasks import promote, register
    from tasks.core.generation import GenerationSettings, generate
    from tasks.core.modeling import load_model_and_tokenizer

    params = _params(tiny_overrides, "reg-serve")
    build_upstream(params, tiny_model_dir, ROWS, [30.0] * len(ROWS))
    version = register.run(params)["version"]
    assert promote.run(params)["champion"] == version  # the first version becomes champion

    texts = [r["text"] for r in ROWS[:4]]
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    expected = generate(model, tokenizer, texts, GenerationSettings.of(params))
    code = (
        "import json, sys, mlflow, pandas as pd\n"
        "m = mlflow.pyfunc.load_model('models:/reg-serve@champion')\n"
        "texts = json.loads(sys.stdin.read())\n"
        "print('RESULT' + json.dumps(list(m.predict(pd.DataFrame({'text': texts}))), ensure_ascii=False))\n"
        "inner = m.unwrap_python_model()\n"
        "print('ATTRS' + json.dumps([type(inner.model).__name__, inner.settings['language']]))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], check=False, input=json.dumps(texts), capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    got = json.loads(next(x for x in lines if x.startswith("RESULT"))[len("RESULT"):])
    attrs = json.loads(next(x for x in lines if x.startswith("ATTRS"))[len("ATTRS"):])
    assert got == expected and len(got) == len(texts)
    assert attrs == ["Qwen2ForCausalLM", "zh"]


def _int8_variant(params, model_dir, drop):
    """The quantize stage's int8 folder (its own functions) and a metrics/quantize.json with the given drop."""
    from tasks.core.io import dir_sha256, write_json
    from tasks.core.modeling import load_model_and_tokenizer
    from tasks.core.variants import save_int8
    from tasks.quantize import quantize_int8

    source = dir_sha256(params.layout.final_model)
    model, tokenizer = load_model_and_tokenizer(model_dir)
    _, tensors, layout = quantize_int8(model)
    folder = params.layout.stage_dir("quantize") / "int8"
    save_int8(tensors, layout, model, tokenizer, folder, source_sha256=source)
    write_json(params.layout.metrics_file("quantize"), {"rows": len(ROWS), "int8.rouge-l": 30.0 - drop,
                                                        "int8.rouge-l_drop": drop, "int8.passed": drop <= 1.0,
                                                        "model_sha256": source})
    return folder


def test_quantized_variant_registered_loaded_and_gated(store, tiny_overrides, tiny_model_dir):
    import mlflow
    import pandas as pd

    from tasks import promote, register
    from tasks.core.generation import GenerationSettings, generate
    from tasks.core.variants import load_quantized

    # Served in full precision, so the gate compares the given float32 row scores (a served int8 variant would be
    # re-scored as served: tests/test_promote.py); each variant's drop is gated either way.
    params = _params(tiny_overrides, "reg-variant", "serve.variant_cpu=full", "serve.variant_gpu=full")
    build_upstream(params, tiny_model_dir, ROWS, [30.0] * len(ROWS))
    from tasks.core.io import write_jsonl

    folder = _int8_variant(params, tiny_model_dir, drop=0.2)
    # quantize's texts for the variant: every row's reference but the first
    write_jsonl(params.layout.stage_dir("quantize") / "predictions.jsonl",
                [{"id": r["id"], "reference": r["summary"], "int8": "" if n == 0 else r["summary"]} for n, r in enumerate(ROWS)])
    first = register.run(params)
    assert first["variants"] == {"int8": "models:/reg-variant-int8/1"}
    tags = mlflow.MlflowClient().get_model_version("reg-variant", str(first["version"])).tags
    # stored as promote reads a version served as int8 on the CPU, so it is not generated again there
    from tasks.core.registry import SETTINGS_SHA_TAG, load_row_scores, row_scores_key
    from tasks.core.scoring import SCORING_VERSION

    key = row_scores_key(tags["split.test_sha256"], tags[SETTINGS_SHA_TAG], SCORING_VERSION) + ".int8-cpu"
    stored = load_row_scores(first["run_id"], key)
    assert stored == pytest.approx({str(r["id"]): (0.0 if n == 0 else 100.0) for n, r in enumerate(ROWS)})
    assert tags["sftflow.variant.int8"] == "models:/reg-variant-int8/1"
    run_metrics = mlflow.MlflowClient().get_run(first["run_id"]).data.metrics
    assert run_metrics["quantize.int8.rouge-l_drop"] == pytest.approx(0.2)

    texts = [r["text"] for r in ROWS[:3]]
    model, tokenizer = load_quantized(folder)
    expected = generate(model, tokenizer, texts, GenerationSettings.of(params))
    loaded = mlflow.pyfunc.load_model("models:/reg-variant-int8/1")
    assert loaded.predict(pd.DataFrame({"text": texts})) == expected
    assert type(loaded.unwrap_python_model().model).__name__ == type(model).__name__
    assert promote.run(params)["decision"] == "champion"

    # Better by 8 points, but its int8 variant loses 2.5 > quantize.max_drop (1.0): stays challenger.
    build_upstream(params, tiny_model_dir, ROWS, [38.0] * len(ROWS))
    _int8_variant(params, tiny_model_dir, drop=2.5)
    second = register.run(params)
    assert second["variants"] == {"int8": "models:/reg-variant-int8/2"}
    gated = promote.run(params)
    assert gated["delta"] == pytest.approx(8.0) and gated["int8_drop"] == pytest.approx(2.5)
    assert gated["decision"] == "challenger" and "int8 variant loses 2.50" in gated["reason"]


def test_register_is_idempotent_after_a_partial_attempt_and_a_retry(store, tiny_overrides, tiny_model_dir, monkeypatch):
    import mlflow

    from tasks import register

    params = _params(tiny_overrides, "reg-idem")
    build_upstream(params, tiny_model_dir, ROWS, [30.0] * len(ROWS))
    _int8_variant(params, tiny_model_dir, drop=0.2)
    client = mlflow.MlflowClient()

    def versions(name):
        return sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))

    # A partial attempt: killed after the variant was registered, before the main version.
    real = register.log_and_register

    def killed_before_main(model_dir, params, *, tags, registered_name=None, quantization=None):
        if quantization is None:
            raise KeyboardInterrupt("killed before the main version")
        return real(model_dir, params, tags=tags, registered_name=registered_name, quantization=quantization)

    monkeypatch.setattr(register, "log_and_register", killed_before_main)
    with pytest.raises(KeyboardInterrupt):
        register.run(params, flow_run_id="killed")
    monkeypatch.setattr(register, "log_and_register", real)
    assert versions("reg-idem-int8") == [1] and versions("reg-idem") == []

    # The next attempt reuses the variant and registers the main version once, pointing at it.
    first = register.run(params, flow_run_id="retry")
    assert versions("reg-idem-int8") == [1] and versions("reg-idem") == [1]
    assert first["variants"] == {"int8": "models:/reg-idem-int8/1"} and not first["reused"]
    main = client.get_model_version("reg-idem", "1")
    assert main.tags["sftflow.variant.int8"] == "models:/reg-idem-int8/1"
    assert main.tags[register.CONTENT_TAG] == register.content_sha256(
        params.layout.final_model, params, {**main.tags, "code.commit": "other"}
    )  # circumstances (commit, flow run) are not content

    # A retry of a run that already finished: the same versions, nothing new.
    again = register.run(params, flow_run_id="again")
    assert again["version"] == 1 and again["reused"] and again["variants"] == first["variants"]
    assert versions("reg-idem-int8") == [1] and versions("reg-idem") == [1]

    # Different content (another evaluation of the same weights) is a new version, not a reuse.
    build_upstream(params, tiny_model_dir, ROWS, [31.0] * len(ROWS))
    third = register.run(params)
    assert third["version"] == 2 and not third["reused"]
    assert versions("reg-idem-int8") == [1, 2] and versions("reg-idem") == [1, 2]
