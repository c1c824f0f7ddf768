"""MLflow tracking: one run per stage invocation, nested under the pipeline run when there is one.

Environment (set by ``arpipe run`` / the Prefect flow; never semantic, so DVC's checks stay true):

- ``MLFLOW_TRACKING_URI``  absolute store URI; default ``sqlite:///<repo>/.arpipe/mlflow.db``
- ``ARPIPE_EXPERIMENT``    experiment name (default ``arpipe``)
- ``ARPIPE_PARENT_RUN_ID`` the pipeline run a stage run nests under
- ``ARPIPE_FLOW_RUN_ID``   the Prefect flow-run id, recorded as a tag
- ``ARPIPE_TRACKING=off``  use the null tracker (no MLflow at all)

When the tracking server cannot be reached, a stage still runs: its run is spooled to
``.arpipe/spool/<stage>-<time>-<id>/`` (params, metrics, tags, status, images, artifacts) and
``arpipe tracking sync`` uploads it later (``sync_spool``).

A run records the host and process that opened it (``arpipe.host``, ``arpipe.pid``): a run left
RUNNING by a process that died without closing it (killed, a closed pipe) is closed as KILLED the
next time a stage starts on that host (``close_abandoned_runs``).

A stage opens a *new* child run (tag ``mlflow.parentRunId``); it never resumes the parent's id,
which would mark the pipeline run finished. Step metrics are buffered and written with
``log_batch`` (one call per metric is ~100x slower on sqlite). This module imports no torch, so
the flow process can use it.

One name per quantity in a stage run: the final values that metrics/<stage>.json names
``train_loss`` / ``val_psnr`` (DVC's names) are logged as ``train/loss`` / ``val/psnr``, the names
of the per-step curves they end, at the curve's last step and only when they differ from its last
point (``metric_name``, ``CurveEnds``).
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_EXPERIMENT = "arpipe"
FLUSH_EVERY = 500  # buffered metric points per log_batch call (MLflow accepts up to 1000)


def repo_root() -> Path:
    """The DVC root when run by DVC, else the current directory."""
    return Path(os.environ.get("DVC_ROOT", Path.cwd())).resolve()


def tracking_uri(root: Path | None = None) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = (root or repo_root()) / ".arpipe" / "mlflow.db"
    store.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store}"


def tracking_enabled() -> bool:
    return os.environ.get("ARPIPE_TRACKING", "on").lower() not in {"off", "0", "false", "no"}


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def git_dirty(root: Path) -> bool:
    """Whether the work tree differs from HEAD (tracked changes or untracked, not-ignored files)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and bool(out.stdout.strip())


class NullTracker:
    """Same interface as ``MlflowTracker``, records nothing (tests, ``ARPIPE_TRACKING=off``)."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_image(self, image_HWC: np.ndarray, name: str) -> None: ...
    def log_artifact(self, path: str | Path, folder: str | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def flush(self) -> None: ...


class CurveEnds:
    """Where each metric of a run stands: the step and value of its last point, so a final value
    (logged without a step) lands on the end of its curve instead of adding a point at step 0."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[int, float]] = {}

    def place(self, key: str, value: float, step: int | None) -> tuple[str, float, int] | None:
        """(name, value, step) to log, or None when the point is already the curve's last one."""
        name, value = metric_name(key), float(value)
        if step is None:
            last = self.last.get(name)
            if last is not None and (value == last[1] or math.isnan(value) and math.isnan(last[1])):
                return None
            step = last[0] if last is not None else 0
        self.last[name] = (step, value)
        return name, value, step


class MlflowTracker(NullTracker):
    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id
        self._buffer: list = []
        self._curves = CurveEnds()

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if point := self._curves.place(key, value, step):
                name, value, at = point
                self._buffer.append(Metric(name, value, now, at))
        if len(self._buffer) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_image(self, image_HWC: np.ndarray, name: str) -> None:
        self.client.log_image(self.run_id, np.ascontiguousarray(image_HWC), artifact_file=name)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def param_value(value: Any) -> str:
    """A param as MLflow stores it: text of at most 6,000 characters (its limit)."""
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def metric_name(key: str) -> str:
    """A metric's one MLflow name: ``train_loss`` -> ``train/loss``, ``val_psnr`` and
    ``val/val_psnr`` -> ``val/psnr``; characters MLflow refuses (class names may hold anything;
    keys allow alphanumerics, '_', '-', '.', ' ', '/') become '_'."""
    for split in ("train", "val"):
        for prefix in (f"{split}/{split}_", f"{split}_"):
            if key.startswith(prefix):
                key = f"{split}/{key.removeprefix(prefix)}"
                break
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def client_for(root: Path | None = None):
    from mlflow import MlflowClient

    uri = tracking_uri(root)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client, root: Path | None = None) -> str:
    """The experiment's id, created on first use with an absolute artifact folder in the repo."""
    name = os.environ.get("ARPIPE_EXPERIMENT", DEFAULT_EXPERIMENT)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri(root).startswith("sqlite:"):
        location = ((root or repo_root()) / ".arpipe" / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it between our two calls
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def tracking_reachable(uri: str, timeout_s: float = 3.0) -> bool:
    """Whether an http(s) tracking server answers its /health endpoint (local stores always do).
    Checked once per stage, so an unreachable server costs seconds, not MLflow's retry minutes."""
    if not uri.startswith(("http://", "https://")):
        return True
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


def spool_dir(root: Path | None = None) -> Path:
    return (root or repo_root()) / ".arpipe" / "spool"


class SpoolTracker(NullTracker):
    """Records a run on disk for ``sync_spool``: run.json (params, metrics, tags, status) and files."""

    def __init__(self, directory: Path, stage: str, tags: Mapping[str, Any]):
        self.directory = directory
        (directory / "artifacts").mkdir(parents=True)
        self.record: dict[str, Any] = {"stage": stage, "tags": dict(tags), "params": {}, "metrics": []}
        self._curves = CurveEnds()
        self.record["start_time"] = int(time.time() * 1000)
        self.flush()

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.record["params"].update({k: param_value(v) for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        points = (self._curves.place(k, v, step) for k, v in metrics.items())
        self.record["metrics"] += [[name, value, now, at] for name, value, at in filter(None, points)]

    def log_image(self, image_HWC: np.ndarray, name: str) -> None:
        from PIL import Image

        target = self.directory / "artifacts" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(image_HWC)).save(target)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        import shutil

        target = self.directory / "artifacts" / (folder or "")
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / Path(path).name)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.record["tags"].update({k: str(v) for k, v in tags.items()})

    def flush(self) -> None:
        import json

        (self.directory / "run.json").write_text(json.dumps(self.record) + "\n")


def sync_spool(root: Path | None = None) -> list[tuple[str, str]]:
    """Upload every spooled run to the tracking store, then delete it; [(spool name, run id)].

    A parent run id that the store does not know (the pipeline run was spooled too) is dropped, so
    the run lands top-level with an ``arpipe.spooled_parent`` tag instead."""
    import json
    import shutil

    from mlflow.entities import Metric, Param

    client = client_for(root)
    uploaded = []
    for directory in sorted(p for p in spool_dir(root).glob("*") if (p / "run.json").is_file()):
        record = json.loads((directory / "run.json").read_text())
        tags = dict(record["tags"])
        parent = tags.get("mlflow.parentRunId")
        if parent:
            try:
                client.get_run(parent)
            except Exception:
                tags["arpipe.spooled_parent"] = tags.pop("mlflow.parentRunId")
        tags["arpipe.spooled"] = directory.name
        run = client.create_run(
            experiment_id(client, root), start_time=record["start_time"], run_name=record["stage"], tags=tags
        )
        run_id = run.info.run_id
        params = [Param(k, v) for k, v in record["params"].items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i : i + 100])
        metrics = [Metric(*m) for m in record["metrics"]]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        artifacts = directory / "artifacts"
        if any(artifacts.rglob("*")):
            client.log_artifacts(run_id, str(artifacts))
        client.set_terminated(run_id, status=record.get("status", "FINISHED"), end_time=record.get("end_time"))
        shutil.rmtree(directory)
        uploaded.append((directory.name, run_id))
    return uploaded


def process_tags() -> dict[str, str]:
    """Which process owns a run, so a later one can tell it was abandoned."""
    return {"arpipe.host": socket.gethostname(), "arpipe.pid": str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def close_abandoned_runs(client, experiment: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose process no longer exists; their ids.

    Runs from other hosts, and runs without ``arpipe.pid`` (older ones), are left alone."""
    host = socket.gethostname().replace("'", "\\'")
    runs = client.search_runs(
        [experiment], f"attributes.status = 'RUNNING' and tags.`arpipe.host` = '{host}'", max_results=200
    )
    closed = []
    for run in runs:
        pid = run.data.tags.get("arpipe.pid", "")
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    return closed


@contextmanager
def stage_run(stage: str, params: Mapping[str, Any] | None = None) -> Iterator[NullTracker]:
    """Open the stage's MLflow run (a child of ``ARPIPE_PARENT_RUN_ID`` when set).

    The run ends FINISHED, FAILED when the body raises, or KILLED when it is interrupted (Ctrl-C,
    SIGTERM: any ``BaseException`` that is not an ``Exception``); buffered metrics are flushed
    either way. Runs an earlier, killed process left RUNNING are closed as KILLED first.
    """
    if not tracking_enabled():
        yield NullTracker()
        return
    root = repo_root()
    commit = git_commit(root)
    tags = {
        "arpipe.stage": stage,
        "git.commit": commit,
        "mlflow.source.git.commit": commit,
        "mlflow.source.name": f"stages.{stage}",
        **process_tags(),
    }
    if parent := os.environ.get("ARPIPE_PARENT_RUN_ID"):
        tags["mlflow.parentRunId"] = parent
    if flow_run := os.environ.get("ARPIPE_FLOW_RUN_ID"):
        tags["prefect.flow_run_id"] = flow_run
    if experiment := os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = experiment
    uri = tracking_uri(root)
    if not tracking_reachable(uri):
        import uuid

        directory = spool_dir(root) / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        print(
            f"{stage}: tracking server {uri} is unreachable; spooling this run to {directory} "
            "(upload it later with `arpipe tracking sync`)",
            flush=True,
        )
        spool = SpoolTracker(directory, stage, tags)
        if params:
            spool.log_params(params)
        spool.record["status"] = "FAILED"
        try:
            yield spool
            spool.record["status"] = "FINISHED"
        except BaseException as exc:
            spool.record["status"] = "FAILED" if isinstance(exc, Exception) else "KILLED"
            raise
        finally:
            spool.record["end_time"] = int(time.time() * 1000)
            spool.flush()
        return
    client = client_for(root)
    experiment = experiment_id(client, root)
    for run_id in close_abandoned_runs(client, experiment):
        print(f"{stage}: closed MLflow run {run_id} as KILLED (its process is gone)", flush=True)
    run = client.create_run(experiment, run_name=stage, tags=tags)
    tracker = MlflowTracker(client, run.info.run_id)
    if params:
        tracker.log_params(params)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except BaseException as exc:
        status = "FAILED" if isinstance(exc, Exception) else "KILLED"
        raise
    finally:
        try:
            tracker.flush()
        finally:
            client.set_terminated(tracker.run_id, status=status)
