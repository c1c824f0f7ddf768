"""arpipe compare: pipeline runs side by side, only the params that differ, the champion marked."""

import time

from core.compare import compare_pipeline_runs, format_comparison


def make_pipeline_run(client, experiment, lr: str, val_loss: float, evaluate_run: str | None = None) -> str:
    stage = client.create_run(experiment, tags={"arpipe.stage": "pretrain"}).info.run_id
    client.log_param(stage, "pretrain.lr", lr)
    client.log_param(stage, "pretrain.steps", "10")
    parent = client.create_run(experiment, tags={"arpipe.stage": "pipeline", "arpipe.pretrain.run_id": stage})
    parent_id = parent.info.run_id
    client.log_metric(parent_id, "pretrain/val_loss", val_loss)
    if evaluate_run:
        client.set_tag(parent_id, "arpipe.evaluate.run_id", evaluate_run)
    client.set_terminated(parent_id)
    time.sleep(0.01)  # distinct start times: newest first
    return parent_id


def test_compare_shows_differing_params_key_metrics_and_the_champion(mlflow_store):
    from mlflow import MlflowClient

    from core.registry import register_and_gate

    client = MlflowClient(mlflow_store)
    experiment = client.create_experiment("arpipe")
    evaluate_run = client.create_run(experiment).info.run_id
    register_and_gate(
        client, name="arpipe-gpt", source=f"runs:/{evaluate_run}/model", run_id=evaluate_run,
        metric="fid@cfg1", value=3.0, higher_is_better=False,
    )  # fmt: skip
    old = make_pipeline_run(client, experiment, "0.001", 3.9)
    new = make_pipeline_run(client, experiment, "0.002", 3.5, evaluate_run=evaluate_run)

    comparison = compare_pipeline_runs(experiment, last=5, client=client)
    assert comparison.runs == [new, old]
    rows = dict(comparison.rows)
    assert rows["param pretrain.lr"] == ["0.002", "0.001"]
    assert "param pretrain.steps" not in rows  # equal everywhere: not shown
    assert rows["pretrain/val_loss"] == ["3.5", "3.9"]
    assert rows["champion"] == ["arpipe-gpt v1", ""]

    markdown = format_comparison(comparison, "md")
    assert "| param pretrain.lr | 0.002 | 0.001 |" in markdown
    csv_text = format_comparison(comparison, "csv")
    assert csv_text.splitlines()[0] == f"field,{new},{old}"


def test_compare_reads_the_clients_store_not_the_process_default(mlflow_store, tmp_path, monkeypatch):
    """`arpipe compare` searches the store of the client it is given, whatever the process-wide
    tracking URI says (mlflow.search_runs would read that one instead)."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_store)
    experiment = client.create_experiment("arpipe")
    run = make_pipeline_run(client, experiment, "0.001", 3.9)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")

    assert compare_pipeline_runs(experiment, client=client).runs == [run]


def test_the_saved_runs_view_has_the_key_metrics_as_columns(mlflow_store):
    """What `arpipe ui` opens (?viewStateShareKey=arpipe): the key metrics the pipeline runs hold,
    in KEY_METRICS order (FID first), and nothing else of their hundreds of metrics."""
    import json

    from mlflow import MlflowClient

    from core.compare import VIEW_TAG, save_runs_view

    client = MlflowClient(mlflow_store)
    experiment = client.create_experiment("arpipe")
    parent = make_pipeline_run(client, experiment, "0.001", 3.9)
    for name in ("train_tokenizer/val_psnr", "evaluate/ddo/cfg3/fid", "evaluate/base/cfg3/fid", "shard/seen"):
        client.log_metric(parent, name, 1.0)
    client.log_metric(client.create_run(experiment).info.run_id, "evaluate/sar/cfg3/fid", 1.0)  # not a pipeline run

    assert save_runs_view(client, experiment) == [
        "evaluate/base/cfg3/fid",
        "evaluate/ddo/cfg3/fid",
        "pretrain/val_loss",
        "train_tokenizer/val_psnr",
    ]
    state = json.loads(client.get_experiment(experiment).tags[VIEW_TAG])
    assert state["selectedColumns"] == [
        "attributes.`Duration`",
        "metrics.`evaluate/base/cfg3/fid`",
        "metrics.`evaluate/ddo/cfg3/fid`",
        "metrics.`pretrain/val_loss`",
        "metrics.`train_tokenizer/val_psnr`",
    ]
