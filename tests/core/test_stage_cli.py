"""`python -m stages.<stage>` as a person runs it: --help, --params, one-line errors, Ctrl-C,
runs a killed stage left RUNNING closed as KILLED."""

import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def stage_cli(stage: str, *args: str, env: dict | None = None, cwd: Path = REPO, timeout: float = 120):
    base = {k: v for k, v in os.environ.items() if k != "ARPIPE_DEBUG"}
    child_env = {
        **base,
        "PYTHONPATH": str(REPO),
        "ARPIPE_TRACKING": "off",
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", *args],
        cwd=cwd,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny_shard_params(tmp_path: Path, **shard) -> Path:
    """A params file for shard on the digits at 8 px into tmp_path; ``shard`` overrides (or adds) keys."""
    from core.config import as_params
    from stages.shard import Config

    params = {
        "paths": {"shards": str(tmp_path / "shards"), "metrics": str(tmp_path / "metrics")},
        "shard": {**as_params(Config(image_size=8, num_workers=0)), **shard},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.parametrize("stage", ["pretrain", "evaluate"])
def test_help_lists_every_param_with_type_default_and_meaning_and_exits(stage):
    import importlib

    from core.config import field_docs

    result = stage_cli(stage, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m stages.{stage}")
    assert "--params FILE" in result.stdout and "--debug" in result.stdout
    config = importlib.import_module(f"stages.{stage}").Config
    for name, doc in field_docs(config).items():
        assert f"\n  {name} (" in result.stdout, name
        if doc:
            assert " ".join(doc.split()[:4]) in " ".join(result.stdout.split()), name
    if stage == "pretrain":
        assert f"\n  steps (int, default: {config().steps})\n      Optimizer steps.\n" in result.stdout


def test_every_stage_config_documents_its_fields():
    """--help prints each field's docstring: a stage field without one would list a bare name."""
    import importlib

    from core.config import field_docs
    from core.stage import params_help

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for stage in (s for s in params if s not in ("paths", "durable")):
        config = importlib.import_module(f"stages.{stage}").Config
        text = params_help(stage, config)
        assert all(f"  {name} (" in text for name in field_docs(config)), stage


def test_unknown_argument_fails_with_one_line():
    result = stage_cli("shard", "--steps", "10")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "python -m stages.shard: error: unrecognized arguments: --steps 10 (see --help)"
    ]


def test_params_file_is_honoured(tmp_path):
    result = stage_cli("shard", "--params", str(tiny_shard_params(tmp_path)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "shards" / "classes.json").is_file() and (tmp_path / "metrics" / "shard.json").is_file()
    assert "1797 seen" in result.stdout


@pytest.mark.parametrize(
    "shard, message",
    [
        ({"image_sise": 8}, "shard.image_sise: unknown key (known keys: "),
        ({"image_size": "8"}, "shard.image_size: expected int, got str '8'"),
    ],
)
def test_a_bad_param_is_one_line_naming_file_and_key(tmp_path, shard, message):
    params = tiny_shard_params(tmp_path, **shard)
    result = stage_cli("shard", "--params", str(params), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"shard: error: {params}: {message}"), result.stderr
    assert not (tmp_path / "shards").exists()  # failed before any work

    debug = stage_cli("shard", "--params", str(params), cwd=tmp_path, env={"ARPIPE_DEBUG": "1"})
    assert debug.returncode == 2 and "Traceback" in debug.stderr and message in debug.stderr


def test_an_input_error_is_one_line_with_the_debug_hint(tmp_path):
    params = tiny_shard_params(tmp_path, source="imagefolder", source_path=str(tmp_path / "nowhere"))
    result = stage_cli("shard", "--params", str(params), cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shard: error: ") and "nowhere" in lines[0], result.stderr
    assert "ARPIPE_DEBUG=1" in lines[0]


class _HangingTracker(http.server.BaseHTTPRequestHandler):
    """An MLflow server that answers /health and then never answers anything else."""

    hung = threading.Event()
    release = threading.Event()

    def do_GET(self):  # noqa: N802
        if self.path.startswith("/health"):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")
            return
        type(self).hung.set()
        type(self).release.wait(300)

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


def test_ctrl_c_prints_one_line_exits_130(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HangingTracker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "ARPIPE_TRACKING": "on",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{server.server_address[1]}",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "OMP_NUM_THREADS": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "stages.shard", "--params", str(tiny_shard_params(tmp_path))],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a terminal's Ctrl-C: a runner started in the background (`cmd &`) passes SIGINT on
        # ignored, and Python then installs no KeyboardInterrupt handler
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert _HangingTracker.hung.wait(60), "the stage never reached the tracking server"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=90)
    finally:
        _HangingTracker.release.set()
        process.kill()
        server.shutdown()
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines()[-1] == "shard: interrupted"


def test_a_run_left_running_by_a_dead_stage_is_closed_as_killed(tmp_path, mlflow_template_db):
    from mlflow import MlflowClient

    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(mlflow_template_db, db)
    uri = f"sqlite:///{db}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("arpipe", artifact_location=(tmp_path / "artifacts").as_uri())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tags = {"arpipe.stage": "pretrain", "arpipe.host": socket.gethostname()}
    abandoned = client.create_run(experiment, tags={**tags, "arpipe.pid": str(dead.pid)}).info.run_id
    other_host = client.create_run(experiment, tags={**tags, "arpipe.host": "elsewhere", "arpipe.pid": "1"})
    alive = client.create_run(experiment, tags={**tags, "arpipe.pid": str(os.getpid())}).info.run_id

    env = {"ARPIPE_TRACKING": "on", "MLFLOW_TRACKING_URI": uri, "DVC_ROOT": str(tmp_path)}
    result = stage_cli("shard", "--params", str(tiny_shard_params(tmp_path)), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert f"shard: closed MLflow run {abandoned} as KILLED" in result.stdout
    assert client.get_run(abandoned).info.status == "KILLED"
    assert client.get_run(other_host.info.run_id).info.status == "RUNNING"  # cannot tell: left alone
    assert client.get_run(alive).info.status == "RUNNING"
    runs = client.search_runs([experiment], "tags.`arpipe.stage` = 'shard'")
    assert [r.info.status for r in runs] == ["FINISHED"] and runs[0].data.tags["arpipe.pid"].isdigit()


def test_shard_checks_the_declared_class_count_before_decoding(tmp_path):
    result = stage_cli("shard", "--params", str(tiny_shard_params(tmp_path, num_classes=1000)), cwd=tmp_path)
    assert result.returncode == 1
    assert "shard.num_classes is 1000 but source 'digits' holds 10 classes" in result.stderr
    assert "seen" not in result.stdout  # nothing decoded


def test_off_a_terminal_progress_is_plain_lines_not_bar_fragments(tmp_path):
    env = {"TQDM_DISABLE": "", "TQDM_MININTERVAL": "0.5"}
    result = stage_cli("shard", "--params", str(tiny_shard_params(tmp_path)), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "█" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("shard: ")]
    assert lines and lines[-1].startswith("shard: 1797/1797 img (100%) in "), result.stderr
