"""Tracking never loses a run: an unreachable server spools the stage's run; sync uploads it."""

import socket

import numpy as np

from core.tracking import spool_dir, stage_run, sync_spool, tracking_reachable


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is


def test_unreachable_server_spools_the_run_and_sync_uploads_it(tmp_path, mlflow_store, monkeypatch):
    from mlflow import MlflowClient

    down = f"http://127.0.0.1:{closed_port()}"
    assert not tracking_reachable(down, timeout_s=1)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    monkeypatch.setenv("ARPIPE_PARENT_RUN_ID", "pipeline-that-was-never-created")
    with stage_run("pretrain", {"pretrain.lr": 0.001}) as tracker:
        tracker.log_metrics({"train/loss": 2.5}, step=10)
        tracker.log_metrics({"train_loss": 2.5, "val_loss": 3.1})  # final values: the curve's name
        tracker.log_image(np.zeros((4, 4, 3), np.uint8), "samples.png")
        tracker.set_tags({"arpipe.note": "offline"})
    spooled = list(spool_dir(tmp_path).glob("pretrain-*"))
    assert len(spooled) == 1 and (spooled[0] / "artifacts" / "samples.png").is_file()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    uploaded = sync_spool(tmp_path)
    assert [name for name, _ in uploaded] == [spooled[0].name] and not spooled[0].exists()
    run = MlflowClient(mlflow_store).get_run(uploaded[0][1])
    assert run.info.status == "FINISHED" and run.info.run_name == "pretrain"
    assert run.data.params["pretrain.lr"] == "0.001"
    assert run.data.metrics == {"train/loss": 2.5, "val/loss": 3.1}
    assert len(MlflowClient(mlflow_store).get_metric_history(run.info.run_id, "train/loss")) == 1
    assert run.data.tags["arpipe.note"] == "offline" and run.data.tags["arpipe.stage"] == "pretrain"
    assert run.data.tags["arpipe.spooled_parent"] == "pipeline-that-was-never-created"
    artifacts = [a.path for a in MlflowClient(mlflow_store).list_artifacts(run.info.run_id)]
    assert artifacts == ["samples.png"]
    assert sync_spool(tmp_path) == []  # nothing left


def test_a_failing_stage_is_spooled_as_failed(tmp_path, monkeypatch):
    import json

    import pytest

    monkeypatch.setenv("ARPIPE_TRACKING", "on")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(RuntimeError):
        with stage_run("cca"):
            raise RuntimeError("boom")
    (record,) = [json.loads(p.read_text()) for p in spool_dir(tmp_path).glob("cca-*/run.json")]
    assert record["status"] == "FAILED" and record["end_time"] >= record["start_time"]
