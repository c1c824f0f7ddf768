"""Scheduled retraining: the pipeline flow as a Prefect deployment with a cron (or interval) schedule.

Prefect's temporary server cannot hold schedules, so scheduling needs a running Prefect server:
``PREFECT_API_URL`` when set, else a local ``prefect server start --host 127.0.0.1`` that
``ensure_server`` starts (or reuses) on port 4200, logging to ``.arpipe/prefect-server.log`` (pid
in ``.arpipe/prefect-server.pid``). ``register`` creates or updates the deployment
``arpipe-pipeline/<name>``; ``serve`` (``arpipe schedule``) keeps a process running that executes
the scheduled runs while a ``Watchdog`` checks that the server really schedules them: a server
whose scheduler fails (errors in its log, or no run created when one is due) stops ``serve`` with
one line naming the cause and the log, instead of polling forever. ``list_schedules`` (with each
deployment's last and next run) and ``remove`` manage them. ``prefect.yaml`` describes the same
deployment for work pools.
"""

from __future__ import annotations

import _thread
import datetime as dt
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

# Prefect is imported inside the functions: PREFECT_API_URL must be set (ensure_server) before
# Prefect reads its settings, or the client would start a temporary server instead.
LOCAL_API = "http://127.0.0.1:4200/api"
FLOW_NAME = "arpipe-pipeline"
SERVER_LOG = Path(".arpipe") / "prefect-server.log"
SERVER_PID = Path(".arpipe") / "prefect-server.pid"


class ScheduleFailed(RuntimeError):
    """The server is not producing the scheduled runs; the message says why and where to look."""


def _healthy(api_url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


def ensure_server(root: Path, wait_s: float = 90.0) -> str:
    """The API URL of a running Prefect server: ``PREFECT_API_URL``, or a local one on 127.0.0.1:4200
    (started in the background, logging to ``.arpipe/prefect-server.log``, when none answers)."""
    api = os.environ.get("PREFECT_API_URL") or LOCAL_API
    if _healthy(api):
        os.environ["PREFECT_API_URL"] = api
        return api
    if api != LOCAL_API:
        raise RuntimeError(f"PREFECT_API_URL={api} does not answer; start that server or unset the variable")
    log = Path(root) / SERVER_LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    prefect = Path(sys.executable).with_name("prefect")
    with log.open("ab") as out:
        server = subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", "4200"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    (Path(root) / SERVER_PID).write_text(f"{server.pid}\n")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if _healthy(api):
            os.environ["PREFECT_API_URL"] = api
            return api
        if server.poll() is not None:
            raise RuntimeError(f"the local Prefect server exited with code {server.returncode}; see {log}")
        time.sleep(1.0)
    raise RuntimeError(f"the local Prefect server did not start within {wait_s:.0f} s; see {log}")


def deployment(
    name: str,
    cron: str | None,
    root: Path,
    until: str | None = None,
    durable: bool = True,
    interval_s: float | None = None,
):
    """The pipeline flow as a RunnerDeployment with a cron schedule (validated by Prefect), or every
    ``interval_s`` seconds; with ``durable`` each successful run commits its results and pushes them
    (core/durable.py)."""
    from flows.pipeline import pipeline

    if (cron is None) == (interval_s is None):
        raise ValueError("give exactly one of a cron expression or an interval")
    if interval_s is not None and interval_s <= 0:
        raise ValueError(f"the interval must be positive, got {interval_s} s")
    return pipeline.to_deployment(
        name=name,
        cron=cron,
        interval=None if interval_s is None else dt.timedelta(seconds=interval_s),
        parameters={"root": str(Path(root).resolve()), "until": until, "durable": durable},
        description="arpipe: scheduled retraining (every dvc.yaml stage; DVC skips what is up to date)",
        tags=["arpipe"],
        concurrency_limit=1,  # a run due while the last one still works waits for it (one DVC repo, one lock)
    )


def register(name: str, cron: str | None, root: Path, until: str | None = None, durable: bool = True,
             interval_s: float | None = None) -> str:  # fmt: skip
    """Create or update ``arpipe-pipeline/<name>`` on the current Prefect API; its id."""
    return str(deployment(name, cron, root, until, durable, interval_s).apply())


class Watchdog:
    """Checks every ``every_s`` seconds that the server schedules ``arpipe-pipeline/<name>``'s runs.

    ``problem()`` is None while all is well, else one line: the first new ERROR line in the log of
    the local server (``log``; None for a server this process did not start), or "no run scheduled"
    once ``grace_s`` seconds passed after start without the server creating any run for the
    deployment (Prefect's scheduler creates the upcoming runs within seconds of registration)."""

    def __init__(self, name: str, log: Path | None, grace_s: float = 90.0):
        self.name, self.log, self.grace_s = name, log, grace_s
        self.started = time.monotonic()
        self.log_offset = log.stat().st_size if log is not None and log.is_file() else 0

    def log_error(self) -> str | None:
        if self.log is None or not self.log.is_file():
            return None
        with self.log.open("rb") as f:
            f.seek(self.log_offset)
            new = f.read()
        self.log_offset += len(new)
        for line in new.decode(errors="replace").splitlines():
            if "| ERROR" in line or line.startswith("ERROR"):
                return f"the Prefect server's scheduler is failing: {line.strip()[:200]} (see {self.log})"
        return None

    def problem(self) -> str | None:
        error = self.log_error()
        if error:
            return error
        if time.monotonic() - self.started > self.grace_s and not flow_runs(self.name, limit=1):
            where = f"see {self.log}" if self.log else "see the server's log"
            return (
                f"the Prefect server created no run for {FLOW_NAME}/{self.name} within "
                f"{self.grace_s:.0f} s of registering it: its scheduler is not running ({where})"
            )
        return None


def serve(
    name: str,
    cron: str | None,
    root: Path,
    until: str | None = None,
    durable: bool = True,
    interval_s: float | None = None,
    watchdog: Watchdog | None = None,
    check_every_s: float = 10.0,
) -> None:
    """Register the deployment and execute its scheduled runs in this process until interrupted;
    raises ``ScheduleFailed`` as soon as ``watchdog`` reports a problem."""
    from prefect import serve as prefect_serve

    found: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(check_every_s):
            try:
                problem = watchdog.problem()
            except Exception as exc:  # the API itself is gone
                problem = f"the Prefect server stopped answering: {exc}"
            if problem:
                found.append(problem)
                _thread.interrupt_main()  # prefect_serve ends as on Ctrl-C (and pauses the schedule)
                return

    if watchdog is not None:
        threading.Thread(target=watch, name="arpipe-schedule-watchdog", daemon=True).start()
    try:
        prefect_serve(deployment(name, cron, root, until, durable, interval_s))
    except KeyboardInterrupt:
        if not found:
            raise
    finally:
        stop.set()
    if found:
        raise ScheduleFailed(found[0])


def flow_runs(name: str, limit: int = 10, upcoming: bool | None = None) -> list:
    """Flow runs of ``arpipe-pipeline/<name>``, newest expected start first; ``upcoming=True``: only
    those not started yet (scheduled, waiting or pending), soonest first; ``False``: only those that
    started (running or finished), latest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    waiting = [StateType.SCHEDULED, StateType.PENDING]
    state_filter, sort = None, FlowRunSort.EXPECTED_START_TIME_DESC
    if upcoming is not None:
        kind = {"any_": waiting} if upcoming else {"not_any_": waiting}
        state_filter = FlowRunFilterState(type=FlowRunFilterStateType(**kind))
        sort = FlowRunSort.EXPECTED_START_TIME_ASC if upcoming else FlowRunSort.START_TIME_DESC
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])),
            flow_run_filter=FlowRunFilter(state=state_filter),
            sort=sort,
            limit=limit,
        )


def _describe(run) -> dict | None:
    if run is None:
        return None
    return {"state": run.state_name or str(run.state_type), "at": run.start_time or run.expected_start_time,
            "id": str(run.id)}  # fmt: skip


def list_schedules() -> list[dict]:
    """The arpipe deployments: name, schedules (cron or interval), paused, last and next run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags

    with get_client(sync_client=True) as client:
        found = client.read_deployments(deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=["arpipe"])))
    out = []
    for d in found:
        schedules = []
        for s in d.schedules or []:
            cron, interval = getattr(s.schedule, "cron", None), getattr(s.schedule, "interval", None)
            schedules.append(cron or (f"every {interval.total_seconds():g} s" if interval else str(s.schedule)))
        last = flow_runs(d.name, limit=1, upcoming=False)
        upcoming = flow_runs(d.name, limit=1, upcoming=True)
        out.append({
            "name": f"{FLOW_NAME}/{d.name}", "cron": schedules, "paused": bool(d.paused), "id": str(d.id),
            "last": _describe(last[0] if last else None), "next": _describe(upcoming[0] if upcoming else None),
        })  # fmt: skip
    return sorted(out, key=lambda d: d["name"])


def remove(name: str) -> None:
    """Delete ``arpipe-pipeline/<name>`` (or a full ``flow/deployment`` name)."""
    from prefect.client.orchestration import get_client

    full = name if "/" in name else f"{FLOW_NAME}/{name}"
    with get_client(sync_client=True) as client:
        found = client.read_deployment_by_name(full)
        client.delete_deployment(found.id)
