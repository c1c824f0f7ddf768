"""Scheduled retraining: the pipeline flow as a Prefect deployment with a cron schedule.

Prefect's temporary server cannot hold schedules, so scheduling needs a running Prefect server:
``PREFECT_API_URL`` when set, else a local ``prefect server start --host 127.0.0.1`` that
``ensure_server`` starts (or reuses) on port 4200. ``register`` creates or updates the
deployment ``arpipe-pipeline/<name>`` with its cron schedule; ``serve`` (``arpipe schedule``)
keeps a process running that executes the scheduled runs. ``list_schedules`` and ``remove``
manage them. ``prefect.yaml`` describes the same deployment for work pools.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# Prefect is imported inside the functions: PREFECT_API_URL must be set (ensure_server) before
# Prefect reads its settings, or the client would start a temporary server instead.
LOCAL_API = "http://127.0.0.1:4200/api"
FLOW_NAME = "arpipe-pipeline"


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
    log = Path(root) / ".arpipe" / "prefect-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    prefect = Path(sys.executable).with_name("prefect")
    with log.open("ab") as out:
        subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", "4200"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if _healthy(api):
            os.environ["PREFECT_API_URL"] = api
            return api
        time.sleep(1.0)
    raise RuntimeError(f"the local Prefect server did not start within {wait_s:.0f} s; see {log}")


def deployment(name: str, cron: str, root: Path, until: str | None = None, durable: bool = True):
    """The pipeline flow as a RunnerDeployment with a cron schedule (validated by Prefect); with
    ``durable`` each successful run commits its results and pushes them (core/durable.py)."""
    from flows.pipeline import pipeline

    return pipeline.to_deployment(
        name=name,
        cron=cron,
        parameters={"root": str(Path(root).resolve()), "until": until, "durable": durable},
        description="arpipe: scheduled retraining (every dvc.yaml stage; DVC skips what is up to date)",
        tags=["arpipe"],
    )


def register(name: str, cron: str, root: Path, until: str | None = None, durable: bool = True) -> str:
    """Create or update ``arpipe-pipeline/<name>`` on the current Prefect API; its id."""
    return str(deployment(name, cron, root, until, durable).apply())


def serve(name: str, cron: str, root: Path, until: str | None = None, durable: bool = True) -> None:
    """Register the deployment and execute its scheduled runs in this process until interrupted."""
    from prefect import serve as prefect_serve

    prefect_serve(deployment(name, cron, root, until, durable))


def list_schedules() -> list[dict]:
    """The arpipe deployments: name, cron schedules, paused."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags

    with get_client(sync_client=True) as client:
        found = client.read_deployments(deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=["arpipe"])))
        out = []
        for d in found:
            crons = [getattr(s.schedule, "cron", str(s.schedule)) for s in (d.schedules or [])]
            out.append({"name": f"{FLOW_NAME}/{d.name}", "cron": crons, "paused": bool(d.paused), "id": str(d.id)})
        return sorted(out, key=lambda d: d["name"])


def remove(name: str) -> None:
    """Delete ``arpipe-pipeline/<name>`` (or a full ``flow/deployment`` name)."""
    from prefect.client.orchestration import get_client

    full = name if "/" in name else f"{FLOW_NAME}/{name}"
    with get_client(sync_client=True) as client:
        found = client.read_deployment_by_name(full)
        client.delete_deployment(found.id)
