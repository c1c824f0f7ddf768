"""Stage runs in MLflow: params, buffered metrics, images, tags, nesting and failure status."""

import numpy as np
import pytest
from mlflow import MlflowClient

from core.tracking import FLUSH_EVERY, NullTracker, stage_run


def test_stage_run_records_params_metrics_image_and_tags(mlflow_store, monkeypatch):
    monkeypatch.setenv("ARPIPE_PARENT_RUN_ID", "")
    monkeypatch.setenv("ARPIPE_FLOW_RUN_ID", "flow-123")
    with stage_run("shard", {"shard.image_size": 16}) as tracker:
        for step in range(FLUSH_EVERY + 10):  # more than one log_batch flush
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        tracker.log_metrics({"accepted": 42})
        tracker.log_image(np.zeros((8, 8, 3), np.uint8), "preview.png")
    client = MlflowClient(mlflow_store)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "shard"
    assert run.data.params == {"shard.image_size": "16"}
    assert run.data.metrics["accepted"] == 42
    assert len(client.get_metric_history(run.info.run_id, "loss")) == FLUSH_EVERY + 10
    assert run.data.tags["arpipe.stage"] == "shard"
    assert run.data.tags["prefect.flow_run_id"] == "flow-123"
    assert "git.commit" in run.data.tags
    assert "mlflow.parentRunId" not in run.data.tags
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["preview.png"]


def test_stage_run_nests_under_the_pipeline_run_and_leaves_it_running(mlflow_store, monkeypatch):
    client = MlflowClient(mlflow_store)
    experiment = client.create_experiment("arpipe")
    parent = client.create_run(experiment, run_name="pipeline").info.run_id
    monkeypatch.setenv("ARPIPE_PARENT_RUN_ID", parent)
    with stage_run("shard") as tracker:
        pass
    assert client.get_run(tracker.run_id).data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(parent).info.status == "RUNNING"  # a child never ends its parent


def test_a_failing_stage_marks_its_run_failed_and_keeps_logged_metrics(mlflow_store):
    with pytest.raises(RuntimeError):
        with stage_run("shard") as tracker:
            tracker.log_metrics({"partial": 1.0}, step=0)
            raise RuntimeError("boom")
    run = MlflowClient(mlflow_store).get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.data.metrics["partial"] == 1.0


def test_tracking_off_gives_the_null_tracker(monkeypatch):
    monkeypatch.setenv("ARPIPE_TRACKING", "off")
    with stage_run("shard", {"a": 1}) as tracker:
        assert isinstance(tracker, NullTracker) and tracker.run_id is None
        tracker.log_metrics({"x": 1.0}, step=1)
        tracker.log_image(np.zeros((2, 2, 3), np.uint8), "x.png")
