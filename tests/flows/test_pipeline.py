"""The Prefect flow: stages through DVC, nested MLflow runs with lineage tags, skips, timeouts."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO, git, make_project
from mlflow import MlflowClient

from flows.pipeline import StageFailed, run_stage, select_stages, stage_names, summary_markdown


def test_stage_order_comes_from_dvc_yaml_and_until_is_checked():
    names = stage_names(REPO)
    assert names[0] == "shard"
    assert names.index("init_model") == names.index("pretrain") - 1  # pretrain's start point, fetched just before
    assert select_stages(names, "shard") == ["shard"]
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        select_stages(names, "nope")


def test_summary_lists_every_stage_with_status():
    text = summary_markdown(
        [{"stage": "shard", "status": "skipped", "seconds": 0.4, "run_id": "abc", "metrics": {"seen": 5}}],
        ["shard", "later"],
        "parent1",
        "FINISHED",
    )
    assert "| shard | skipped | 0.4 | `abc` | seen=5 |" in text and "| later | not run |" in text


@pytest.fixture
def dvc_project(tmp_path):
    def _make(cmd: str) -> Path:
        root = make_project(
            tmp_path / "proj",
            params={"paths": {"metrics": "metrics"}},
            dvc_yaml={"stages": {"work": {"cmd": cmd, "outs": ["out.txt"]}}},
        )
        return root

    return _make


def test_a_stage_past_its_timeout_is_killed_with_its_children(dvc_project):
    marker = "arpipe-timeout-test-sleeper"
    root = dvc_project(f"bash -c 'exec -a {marker} sleep 60' && echo done > out.txt")
    started = time.perf_counter()
    with pytest.raises(StageFailed, match="ran past its timeout of 3 s"):
        run_stage.fn("work", str(root), {}, 3.0)
    assert time.perf_counter() - started < 30
    time.sleep(0.5)
    alive = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    assert not alive.strip(), "the stage's child process outlived the timeout"


def test_a_failing_stage_reports_its_exit_code_and_output(dvc_project):
    root = dvc_project("python -c \"import sys; print('bad input in foo.png'); sys.exit(3)\"")
    with pytest.raises(StageFailed) as info:
        run_stage.fn("work", str(root), {}, 60.0)
    assert "stage 'work' failed" in str(info.value) and "bad input in foo.png" in str(info.value)


def test_interrupting_the_flow_stops_the_stage_it_is_running(dvc_project):
    """Ctrl-C reaches the flow's process group only (each stage runs in its own session): the
    task stops the stage's group instead of leaving it running behind the user's back."""
    import os
    import signal

    marker = "arpipe-interrupt-test-sleeper"
    root = dvc_project(f"bash -c 'exec -a {marker} sleep 60' && echo done > out.txt")
    code = f"from flows.pipeline import run_stage; run_stage.fn('work', {str(root)!r}, {{}}, 120.0)"
    flow = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        for _ in range(120):
            if subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 0:
                break
            time.sleep(0.5)
        else:
            pytest.fail("the stage never started")
        flow.send_signal(signal.SIGINT)
        flow.wait(timeout=90)
    finally:
        flow.kill()
    time.sleep(0.5)
    assert subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 1, "the stage outlived the flow"


def test_a_stage_error_line_is_the_whole_failure_message(dvc_project):
    """A stage's one-line error (core/errors.py) becomes the message, without DVC's lines around it."""
    line = "work: error: params.yaml: work.x: unknown key"
    root = dvc_project(f"python -c \"import sys; print('{line}', file=sys.stderr); sys.exit(2)\"")
    with pytest.raises(StageFailed) as info:
        run_stage.fn("work", str(root), {}, 60.0)
    assert str(info.value) == "stage 'work' failed: params.yaml: work.x: unknown key"


@pytest.mark.slow
def test_pipeline_runs_shard_through_dvc_with_nested_mlflow_runs(tmp_path, mlflow_store, prefect_harness, monkeypatch):
    from flows.pipeline import pipeline

    root = make_project(tmp_path / "project")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    first = pipeline(until="shard", root=str(root))
    assert [(r["stage"], r["status"]) for r in first] == [("shard", "ran")]
    assert first[0]["metrics"]["seen"] == 1797

    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("arpipe").experiment_id
    parents = client.search_runs([experiment], "tags.`arpipe.stage` = 'pipeline'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    commit = git(root, "rev-parse", "HEAD")
    assert parent.info.run_name == f"pipeline {commit[:7]}"  # the first run: nothing to compare with
    assert parent.data.params["shard.image_size"] == "16"  # params.yaml, flattened
    child = client.get_run(first[0]["run_id"])
    tags = child.data.tags
    assert tags["mlflow.parentRunId"] == parent.info.run_id
    assert tags["arpipe.stage"] == "shard"
    assert tags["git.commit"] == commit
    assert tags["prefect.flow_run_id"] == parent.data.tags["prefect.flow_run_id"] != ""
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["shard"]
    shards_md5 = next(o["md5"] for o in lock["outs"] if o["path"] == "data/shards")
    assert f"data/shards={shards_md5}" in tags["arpipe.dvc.outs"]
    assert "stages/shard.py=" in tags["arpipe.dvc.deps"]
    metrics = child.data.metrics
    assert metrics["seen"] == 1797 and metrics["rejected"] == 0 and metrics["images_per_s"] > 0
    assert metrics["train/count"] + metrics["val/count"] == 1797 and "val/class_7" in metrics
    assert child.data.params["shard.image_size"] == "16"
    assert [a.path for a in client.list_artifacts(child.info.run_id)] == ["preview.png"]
    assert json.loads((root / "metrics" / "shard.json").read_text())["accepted"] == 1797

    second = pipeline(until="shard", root=str(root))
    assert [(r["stage"], r["status"]) for r in second] == [("shard", "skipped")]
    assert second[0]["run_id"] == child.info.run_id  # linked to the run that made the outs
    latest = client.search_runs(
        [experiment], "tags.`arpipe.stage` = 'pipeline'", order_by=["attributes.start_time DESC"]
    )[0]
    # the first run wrote dvc.lock and metrics/shard.json: the tree differs from the commit
    assert latest.info.run_name == f"pipeline {commit[:7]}+dirty no param changes"
    assert latest.data.tags["arpipe.shard.status"] == "skipped"
    assert latest.data.tags["arpipe.shard.run_id"] == child.info.run_id
    assert len(client.search_runs([experiment], "tags.`arpipe.stage` = 'shard'")) == 1
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "shard"], cwd=root, capture_output=True, text=True)
    assert "up to date" in status.stdout


@pytest.mark.slow
def test_whole_chain_through_pretrain_var_on_a_tiny_config(tmp_path, mlflow_store, prefect_harness, monkeypatch):
    """shard -> train_tokenizer (msvq) -> cache_tokens -> init_model -> pretrain (var) -> sar -> cca -> ddo ->
    distill_pairs -> distill -> distill2 -> train_evalnet -> evaluate,
    each a DVC stage run by the flow, each an MLflow child run; the champion is registered; a second
    run skips everything but init_model (always_changed: it reads the registry; its out unchanged)."""
    from helpers import TINY_MSVQ

    from flows.pipeline import pipeline

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["shard"]["image_size"] = 8
    params["train_tokenizer"].update(kind="msvq", model=TINY_MSVQ, steps=4, batch_size=16, num_grid=2)
    params["pretrain"].update(
        arch="var",
        model={"depth": 2, "width": 32, "heads": 2},
        steps=6,
        batch_size=16,
        warmup_steps=2,
        log_every=2,
        eval_every=3,
        samples_per_class=1,
    )
    params["sar"].update(steps=3, batch_size=16, log_every=1, save_every=0, samples_per_class=1)
    params["cca"].update(steps=3, batch_size=16, log_every=1, save_every=0, samples_per_class=1)
    params["ddo"].update(rounds=2, steps_per_round=2, batch_size=16, log_every=1, save_every=0, samples_per_class=1)
    params["distill_pairs"].update(count=48, batch_size=24, ode_steps=8)
    params["distill"].update(
        steps=3, batch_size=16, warmup_steps=1, log_every=1, save_every=0, val_count=8, samples_per_class=1
    )
    params["distill2"].update(gts_steps=2, steps=2, batch_size=8, head_width=16, head_depth=1, warmup_steps=1,
                              log_every=1, save_every=0, eval_count=8, samples_per_class=1)  # fmt: skip
    params["train_evalnet"].update(steps=8, batch_size=16, model={"channels": [8, 16], "feature_dim": 16})
    params["evaluate"].update(samples_per_class=4, cfg_scales=[1.0, 2.0], grid_per_class=1)
    root = make_project(tmp_path / "project", params=params)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    results = pipeline(root=str(root))
    assert [(r["stage"], r["status"]) for r in results] == [
        ("shard", "ran"),
        ("train_tokenizer", "ran"),
        ("cache_tokens", "ran"),
        ("init_model", "ran"),
        ("pretrain", "ran"),
        ("sar", "ran"),
        ("cca", "ran"),
        ("ddo", "ran"),
        ("distill_pairs", "ran"),
        ("distill", "ran"),
        ("distill2", "ran"),
        ("train_evalnet", "ran"),
        ("evaluate", "ran"),
    ]
    client = MlflowClient(mlflow_store)
    run = client.get_run(results[4]["run_id"])
    assert run.data.tags["arpipe.stage"] == "pretrain" and "mlflow.parentRunId" in run.data.tags
    assert {"val/loss", "val/token_acc", "val/scale_loss/1x1", "train/loss", "speed/mfu"} <= set(run.data.metrics)
    for result in results:  # one name per metric: no `train_loss` beside `train/loss`
        logged = client.get_run(result["run_id"]).data.metrics
        assert not [m for m in logged if m.startswith(("train_", "val_"))], (result["stage"], sorted(logged))
    assert "samples.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
    curves = [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
    assert curves == ["plots/train.png", "plots/val.png"]  # logged by the flow: viewable offline
    config = json.loads((root / "data" / "models" / "base" / "config.json").read_text())
    assert config["arch"] == "var" and config["model"]["scales"] == TINY_MSVQ["scales"]
    refined = client.get_run(results[5]["run_id"])
    assert refined.data.tags["arpipe.stage"] == "sar" and refined.data.params["sar.forced_scales"] == "[2]"
    assert {"train/tf_loss", "train/csfl", "train/sf_loss", "train/disagreement"} <= set(refined.data.metrics)
    cca_config = json.loads((root / "data" / "models" / "cca" / "config.json").read_text())
    sar_config = json.loads((root / "data" / "models" / "sar" / "config.json").read_text())
    assert cca_config["input_checkpoint"] == {"name": "sar", "fingerprint": sar_config["fingerprint"]}
    evaluation = client.get_run(results[-1]["run_id"])
    assert evaluation.data.tags["arpipe.registry.model"] == "arpipe-var"
    champion = client.get_model_version_by_alias("arpipe-var", "champion")
    assert champion.tags["arpipe.checkpoint"] in {"base", "sar", "cca", "ddo"}
    assert {"base/cfg1/fid", "sar/cfg1/fid", "cca/cfg1/fid", "ddo/cfg1/fid"} <= set(evaluation.data.metrics)
    assert {"distilled/1step/fid", "distilled/2step/fid"} <= set(evaluation.data.metrics)
    assert evaluation.data.metrics["speed/distilled/1step_speedup"] > 0
    assert {"distilled2/1step/fid", "distilled2/1step/gap_closed_vs_dd1"} <= set(evaluation.data.metrics)
    ddo_config = json.loads((root / "data" / "models" / "ddo" / "config.json").read_text())
    assert ddo_config["input_checkpoint"]["name"] == "cca"
    distilled = json.loads((root / "data" / "models" / "distilled" / "config.json").read_text())
    assert distilled["distilled"] is True and distilled["teacher"]["name"] == "ddo"
    assert (root / "data" / "eval" / "report.md").is_file()
    always = {"init_model": "ran"}  # always_changed; pretrain after it is skipped: the start point did not change
    again = pipeline(root=str(root))
    assert {r["stage"]: r["status"] for r in again} == {**{r["stage"]: "skipped" for r in results}, **always}

    # remote artifacts: push to a local-directory DVC remote; a fresh clone pulls and has nothing to do
    def dvc(cwd, *args):
        return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, check=True, capture_output=True, text=True)

    dvc(root, "remote", "add", "-d", "store", str(tmp_path / "remote"))
    git(root, "add", "-A")
    git(root, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "pipeline outs")
    dvc(root, "push")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True)
    dvc(clone, "pull")
    assert set(json.loads(dvc(clone, "status", "--json").stdout)) == set(always)
    assert (clone / "data" / "models" / "base" / "model.safetensors").is_file()
    in_clone = pipeline(root=str(clone))
    assert {r["stage"]: r["status"] for r in in_clone} == {**{r["stage"]: "skipped" for r in results}, **always}
