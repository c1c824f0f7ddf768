"""The pipeline run in MLflow: named by commit and the params that changed, params.yaml logged."""

import yaml
from helpers import git
from mlflow import MlflowClient

from core.lineage import PipelineRun

PARAMS = {"paths": {"metrics": "metrics"}, "pretrain": {"lr": 0.001, "betas": [0.9, 0.95], "model": {"depth": 3}}}


def commit_project(root, params: dict) -> str:
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    return git(root, "rev-parse", "--short=7", "HEAD")


def open_and_close(root):
    pipeline = PipelineRun(root, flow_run_id=None)
    pipeline.finish("FINISHED")
    return MlflowClient().get_run(pipeline.run_id)


def test_pipeline_runs_are_named_by_commit_and_changed_params(tmp_path, mlflow_store):
    root = tmp_path / "project"
    commit = commit_project(root, PARAMS)

    first = open_and_close(root)
    assert first.info.run_name == f"pipeline {commit}"  # nothing to compare with yet
    assert first.data.params == {
        "paths.metrics": "metrics",
        "pretrain.lr": "0.001",
        "pretrain.betas": "[0.9, 0.95]",
        "pretrain.model.depth": "3",
    }
    assert "arpipe.params_changed" not in first.data.tags

    again = open_and_close(root)
    assert again.info.run_name == f"pipeline {commit} no param changes"
    assert again.data.tags["arpipe.params_changed"] == "none"

    changed = {**PARAMS, "pretrain": {**PARAMS["pretrain"], "lr": 0.002, "model": {"depth": 4}}}
    (root / "params.yaml").write_text(yaml.safe_dump(changed))  # uncommitted: the tree is dirty
    edited = open_and_close(root)
    assert edited.info.run_name == f"pipeline {commit}+dirty pretrain.lr=0.002, pretrain.model.depth=4"
    assert edited.data.params["pretrain.lr"] == "0.002"
    assert edited.data.tags["arpipe.params_changed"] == "pretrain.lr, pretrain.model.depth"


def test_a_long_list_of_changes_is_counted_and_a_removed_key_shown_as_a_dash(tmp_path, mlflow_store):
    root = tmp_path / "project"
    commit = commit_project(root, PARAMS)
    open_and_close(root)
    (root / "params.yaml").write_text(yaml.safe_dump({"cca": {"a": 1, "b": 2, "c": 3}, "paths": PARAMS["paths"]}))
    name = open_and_close(root).info.run_name
    assert name == f"pipeline {commit}+dirty cca.a=1, cca.b=2, cca.c=3 (+3 more)"
    (root / "params.yaml").write_text(yaml.safe_dump({"cca": {"a": 1, "b": 2, "c": 3}}))
    assert open_and_close(root).info.run_name == f"pipeline {commit}+dirty paths.metrics=–"


def test_the_flow_logs_a_png_of_each_curve_a_stage_wrote_to_its_run(tmp_path, mlflow_store, monkeypatch):
    """After `dvc repro` ran a stage, its MLflow run holds plots/<name>.png of the stage's curve
    CSVs (paths.plots/<stage>/): the curves viewable with no chart library from a CDN."""
    import numpy as np
    from PIL import Image

    from core.tracking import stage_run

    root = tmp_path / "project"
    commit_project(root, {**PARAMS, "paths": {"plots": "curves"}})
    pipeline = PipelineRun(root, flow_run_id=None)
    monkeypatch.setenv("ARPIPE_PARENT_RUN_ID", pipeline.run_id)
    with stage_run("pretrain") as tracker:  # the stage: its run, its curve files
        (root / "curves" / "pretrain").mkdir(parents=True)
        (root / "curves" / "pretrain" / "train.csv").write_text("step,loss\n10,4.0\n20,3.0\n")
        (root / "curves" / "pretrain" / "val.csv").write_text("step,val_loss\n20,3.5\n")
    assert pipeline.record_stage("pretrain", "ran", {}) == tracker.run_id

    client = MlflowClient()
    assert [a.path for a in client.list_artifacts(tracker.run_id, "plots")] == ["plots/train.png", "plots/val.png"]
    image = np.asarray(Image.open(client.download_artifacts(tracker.run_id, "plots/train.png", str(tmp_path))))
    assert image.ndim == 3 and image.std() > 0
