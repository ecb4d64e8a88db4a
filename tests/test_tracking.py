"""tracking: the default sqlite store in the project root, and logging what stages wrote into a run."""

from __future__ import annotations

import pytest

from tasks.core.io import write_json


@pytest.fixture
def project_root(tmp_path, monkeypatch):
    """A project root (the cwd) with no MLFLOW_TRACKING_URI: the default store applies."""
    import mlflow

    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield root
    mlflow.set_tracking_uri(None)


def test_default_store_and_stage_logging(project_root, tiny_params):
    import mlflow

    from tasks.core.tracking import log_params, log_run_files, log_stage, setup_mlflow

    params = tiny_params
    experiment_id = setup_mlflow(params.register.experiment)
    assert mlflow.get_tracking_uri() == f"sqlite:///{project_root / 'mlflow.db'}"
    experiment = mlflow.get_experiment(experiment_id)
    assert experiment.name == "sftflow"
    assert experiment.artifact_location == (project_root / "mlartifacts").as_uri()
    assert setup_mlflow(params.register.experiment) == experiment_id  # idempotent: found, not created again

    write_json(params.layout.metrics_file("evaluate"),
               {"rouge-l": 21.5, "rouge-l_low": 19.0, "test_sha256": "abc", "base": {"rouge-l": 3.25}, "ok": True})
    params.layout.plots_dir("evaluate").mkdir(parents=True)
    (params.layout.plots_dir("evaluate") / "metrics.png").write_bytes(b"\x89PNG fake")
    write_json(params.layout.stage_dir("evaluate") / "predictions.jsonl.json", {"x": 1})
    (params.layout.stage_dir("evaluate") / "predictions.jsonl").write_text('{"id": "1"}\n', encoding="utf-8")
    model = params.layout.stage_dir("train") / "model"
    model.mkdir(parents=True)
    write_json(model / "config.json", {})
    (model / "model.safetensors").write_bytes(b"weights")
    write_json(params.layout.metrics_file("train"), {"train_loss": 2.5})
    params.layout.plots_dir("train").mkdir(parents=True)
    (params.layout.plots_dir("train") / "loss.csv").write_text(
        "step,train_loss,val_loss\n1,3.0,\n2,2.5,2.75\n3,2.0,\n", encoding="utf-8"
    )
    (project_root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n", encoding="utf-8")

    with mlflow.start_run() as run:
        assert log_params(params) == len(params.flat())
        logged = log_stage(params, "evaluate")
        log_stage(params, "train")
        log_run_files(params)
    assert logged == {"evaluate.rouge-l": 21.5, "evaluate.rouge-l_low": 19.0, "evaluate.base.rouge-l": 3.25, "evaluate.ok": 1.0}

    client = mlflow.MlflowClient()
    data = client.get_run(run.info.run_id).data
    assert data.params["train.learning_rate"] == str(params.train.learning_rate)
    assert data.params["data.prompt_template"] == params.data.prompt_template
    assert data.tags["params.sha256"] == params.digest()
    assert data.metrics["evaluate.base.rouge-l"] == 3.25
    assert data.metrics["train.train_loss"] == 2.5  # the stage's final figure, apart from the curve
    loss = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train.curve.train_loss")]
    assert sorted(loss) == [(1, 3.0), (2, 2.5), (3, 2.0)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train.curve.val_loss")] == [(2, 2.75)]

    def names(path=None):
        return sorted(f.path for f in client.list_artifacts(run.info.run_id, path))

    assert names() == ["dvc.lock", "evaluate", "params.yaml", "plots"]  # no train/: weights are the registry's
    assert names("evaluate") == ["evaluate/predictions.jsonl", "evaluate/predictions.jsonl.json"]
    assert names("plots/evaluate") == ["plots/evaluate/metrics.png"]
    assert names("plots") == ["plots/evaluate", "plots/train"]
    assert (project_root / "mlartifacts").is_dir()


def test_logging_without_a_run_fails_clearly(project_root, tiny_params):
    from tasks.core.errors import StageError
    from tasks.core.tracking import log_stage

    with pytest.raises(StageError, match="no active MLflow run"):
        log_stage(tiny_params, "evaluate")
