"""Scheduled retraining end to end, through the command a user runs: `arpipe schedule` registers an
interval schedule on a real Prefect server, the server's scheduler creates the runs, the serving
process executes them, the run completes with its MLflow pipeline run, and the server logs no
error (the regression: SQLAlchemy 2.1 broke Prefect 3.8's scheduler silently). Once against the
local server `arpipe schedule` starts itself, once against a server given by PREFECT_API_URL with
durable results (commit to the results branch + `dvc push` to a local remote)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import git, make_project

from flows.schedule import LOCAL_API, SERVER_LOG, SERVER_PID, Watchdog, _healthy

BIN = Path(sys.executable).parent
WAIT_S = 240  # server start (~15 s) + first run due (10 s) + runner poll (10 s) + `dvc repro shard` (~20 s)


def user_env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),  # the server's database: never the user's ~/.prefect
        PREFECT_SERVER_ANALYTICS_ENABLED="false",  # no network here: telemetry would log an ERROR
        ARPIPE_TRACKING="on", TQDM_DISABLE="1", OMP_NUM_THREADS="1", **extra,
    )  # fmt: skip
    return env


def api_post(api: str, path: str, body: dict) -> list:
    request = urllib.request.Request(
        api.rstrip("/") + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def wait_for_completed_run(api: str, deployment: str, serving: subprocess.Popen, log: Path) -> dict:
    """The first COMPLETED flow run of the deployment (bounded wait); fails on a FAILED/CRASHED one."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        assert serving.poll() is None, f"arpipe schedule exited {serving.returncode}: {log.read_text()[-3000:]}"
        try:
            runs = api_post(api, "/flow_runs/filter", {"deployments": {"name": {"any_": [deployment]}}})
        except OSError:  # the server `arpipe schedule` starts is not up yet
            runs = []
        for run in runs:
            assert run["state_type"] not in ("FAILED", "CRASHED"), f"scheduled run {run['name']}: {run['state']}"
            if run["state_type"] == "COMPLETED":
                return run
        time.sleep(3)
    pytest.fail(f"no scheduled run of {deployment} completed within {WAIT_S} s; {log.read_text()[-3000:]}")


def pipeline_run_of(project: Path, flow_run_id: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / '.arpipe' / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(
        experiments, filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}' and tags.`arpipe.stage` = 'pipeline'"
    )
    return run


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)  # Ctrl-C: Prefect pauses the schedule and exits
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def assert_no_server_errors(log: Path) -> None:
    errors = [line for line in log.read_text(errors="replace").splitlines() if "| ERROR" in line]
    assert not errors, "the Prefect server logged errors:\n" + "\n".join(errors[:5])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_schedule_on_the_local_server_fires_and_completes(tmp_path):
    if _healthy(LOCAL_API):
        pytest.skip("a Prefect server already answers on 127.0.0.1:4200; this test starts its own there")
    project = make_project(tmp_path / "project")
    out = tmp_path / "schedule.out"
    with out.open("wb") as sink:
        serving = subprocess.Popen(
            [BIN / "arpipe", "schedule", "--interval", "10", "--name", "probe", "--until", "shard", "--no-durable"],
            cwd=project, env=user_env(tmp_path), stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        run = wait_for_completed_run(LOCAL_API, "probe", serving, out)
        listed = subprocess.run(
            [BIN / "arpipe", "schedule", "--list"], cwd=project, env=user_env(tmp_path),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        stop(serving)
        server_pid = project / SERVER_PID
        if server_pid.is_file():
            kill_group(int(server_pid.read_text()))
    assert "arpipe-pipeline/probe  every 10 s" in listed.stdout, listed.stdout + listed.stderr
    assert "last run: Completed" in listed.stdout, listed.stdout  # the run above; later ones wait for it
    parent = pipeline_run_of(project, run["id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["arpipe.until"] == "shard"
    assert (project / "data" / "shards" / "manifest.parquet").is_file()
    assert_no_server_errors(project / SERVER_LOG)


@pytest.mark.slow
def test_a_durable_schedule_on_a_given_server_commits_and_pushes(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    server_log = tmp_path / "server.log"
    with server_log.open("wb") as sink:
        server = subprocess.Popen(
            [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=user_env(tmp_path), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    project = make_project(tmp_path / "project")
    subprocess.run([BIN / "dvc", "remote", "add", "-d", "store", tmp_path / "remote"], cwd=project, check=True)
    out = tmp_path / "schedule.out"
    try:
        deadline = time.monotonic() + 120
        while not _healthy(api):
            assert time.monotonic() < deadline and server.poll() is None, server_log.read_text()[-3000:]
            time.sleep(1)
        with out.open("wb") as sink:
            serving = subprocess.Popen(
                [BIN / "arpipe", "schedule", "--interval", "10", "--name", "nightly", "--until", "shard"],
                cwd=project, env=user_env(tmp_path, PREFECT_API_URL=api), stdout=sink, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            run = wait_for_completed_run(api, "nightly", serving, out)
        finally:
            stop(serving)
    finally:
        kill_group(server.pid)
    parent = pipeline_run_of(project, run["id"])
    assert parent.info.status == "FINISHED"
    durable = parent.data.tags["arpipe.durable"]
    assert durable.startswith("results committed to arpipe-results"), durable
    assert "data/shards" in git(project, "show", "arpipe-results:dvc.lock")
    assert any((tmp_path / "remote").rglob("*")), "dvc push wrote nothing to the remote"
    assert_no_server_errors(server_log)


def test_the_watchdog_reports_a_scheduler_error_with_the_log_path(tmp_path):
    log = tmp_path / "prefect-server.log"
    log.write_text("12:00:00.000 | ERROR   | old error, before arpipe schedule started\n")
    watchdog = Watchdog("probe", log, grace_s=3600)
    assert watchdog.problem() is None  # errors from before the start are not this schedule's
    with log.open("a") as f:
        f.write("12:14:38.615 | ERROR   | docket.dependencies - schedule_deployments()\n")
    problem = watchdog.problem()
    assert "scheduler is failing" in problem and "schedule_deployments" in problem and str(log) in problem
