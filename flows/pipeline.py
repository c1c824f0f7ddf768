"""The arpipe pipeline as one Prefect flow: one task per dvc.yaml stage, in dvc.yaml's order.

Each task runs ``dvc repro --single-item <stage>`` in its own process group (DVC decides what is
up to date; Prefect caching is off), streams its output to the Prefect log and enforces its own
timeout by killing the whole group (Prefect's task timeout would leave the child running). The
flow opens the parent MLflow run; every stage run nests under it, and stages DVC skipped are
linked to the run that produced their current outs. A markdown artifact summarises the run: the
stages, then the results (``run_summary``: FIDs beside the real-data floor, the best checkpoint,
the champion, where the report is), the same text ``arpipe run`` prints last.
With ``durable=True`` (scheduled runs, ``arpipe run --durable``) a successful run ends by
committing dvc.lock + metrics + plots to the results branch and ``dvc push``-ing the outs
(params.yaml ``durable``; core/durable.py); a failure there fails the flow run, loudly.

No torch, models or stages are imported here: a flow worker only needs Prefect, DVC and MLflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from core.config import load_paths, read_params
from core.durable import DurableError, load_durable, make_durable
from core.lineage import open_pipeline_run
from core.runlock import annotate
from core.summary import results_summary

DEFAULT_STAGE_TIMEOUT_S = 6 * 3600
TRANSIENT_MARKERS = ("is busy, it is being blocked by", "Unable to acquire lock")


class StageFailed(RuntimeError):
    """``dvc repro`` of a stage exited non-zero or ran past its timeout."""


class TransientStageError(StageFailed):
    """DVC could not take its lock (another dvc process); worth a retry."""


def stage_names(root: Path) -> list[str]:
    """Stages in the order dvc.yaml lists them (the pipeline is linear)."""
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        raise FileNotFoundError(f"{dvc_yaml} not found: run arpipe from the repository root")
    return list((yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}))


def select_stages(names: list[str], until: str | None) -> list[str]:
    if until is None:
        return names
    if until not in names:
        raise ValueError(f"unknown stage '{until}' (stages: {', '.join(names)})")
    return names[: names.index(until) + 1]


def _logger():
    """The Prefect run logger, or a plain one when called outside a run (``run_stage.fn``)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("arpipe.pipeline")


def _retry_if_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except TransientStageError:
        return True
    except Exception:
        return False
    return False


@task(
    name="dvc-repro",
    task_run_name="{stage}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=_retry_if_transient,
)
def run_stage(stage: str, root: str, env: dict[str, str], timeout_s: float, metrics_dir: str = "metrics") -> dict:
    """Run one stage through DVC; returns its status (ran | skipped | restored), time and metrics."""
    logger = _logger()
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    logger.info("$ %s", " ".join(cmd[2:]))
    process = subprocess.Popen(
        cmd,
        cwd=root,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so a timeout kills every child
    )
    timed_out = threading.Event()

    def kill_group() -> None:
        timed_out.set()
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            time.sleep(wait)

    timer = threading.Timer(timeout_s, kill_group)
    timer.start()
    lines: list[str] = []
    try:
        for line in process.stdout:  # text mode: tqdm's '\r' updates arrive as lines too
            line = line.rstrip()
            if line:
                lines.append(line)
                logger.info(line)
        code = process.wait()
    except BaseException:  # Ctrl-C or a kill of the flow: its own process group would outlive it
        timer.cancel()
        _stop_group(process)
        raise
    finally:
        timer.cancel()
    output = "\n".join(lines[-200:])
    if timed_out.is_set():
        raise StageFailed(f"stage '{stage}' ran past its timeout of {timeout_s:.0f} s and was killed")
    if code != 0:
        error = TransientStageError if any(m in output for m in TRANSIENT_MARKERS) else StageFailed
        # a stage reports a bad param or input as one line `<stage>: error: ...` (core/errors.py)
        reason = next((line for line in reversed(lines) if line.startswith(f"{stage}: error: ")), None)
        if reason is not None:
            raise error(f"stage '{stage}' failed: {reason.removeprefix(f'{stage}: error: ')}")
        tail = "\n".join(lines[-15:])
        raise error(f"stage '{stage}' failed (dvc repro exit code {code}):\n{tail}")
    if f"Stage '{stage}' didn't change, skipping" in output:
        status = "skipped"
    elif f"Stage '{stage}' is cached - skipping run" in output:  # DVC's run-cache restored the outs
        status = "restored"
    else:
        status = "ran"
    metrics_file = Path(root) / metrics_dir / f"{stage}.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    seconds = time.perf_counter() - started
    logger.info("%s: %s in %.1f s", stage, _STATUS_WORDS[status], seconds)
    return {"stage": stage, "status": status, "seconds": round(seconds, 2), "metrics": metrics}


def _stop_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the stage's process group (the stage closes its MLflow run as KILLED), SIGKILL it
    if it has not exited after ``grace_s``."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace_s)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


_STATUS_WORDS = {
    "ran": "ran",
    "skipped": "up to date (DVC), skipped",
    "restored": "restored from DVC's run-cache (no new MLflow run)",
}


@task(name="durable-results", cache_policy=NO_CACHE)
def durable_results(root: str, parent_run_id: str, results: list[dict]) -> str:
    """Commit dvc.lock + metrics + plots to the results branch, ``dvc push``, push the branch."""
    ran = [r["stage"] for r in results if r["status"] == "ran"]
    message = (
        f"arpipe results: pipeline run {parent_run_id or '(untracked)'}\n\n"
        f"ran: {', '.join(ran) or 'nothing (all up to date)'}\n"
        + "".join(f"{r['stage']}: {r['status']}\n" for r in results)
    )
    outcome = make_durable(Path(root), load_durable(Path(root)), message)
    _logger().info(outcome.describe())
    return outcome.describe()


@flow(name="arpipe-pipeline", log_prints=True)
def pipeline(
    until: str | None = None,
    root: str = ".",
    stage_timeout_s: float = DEFAULT_STAGE_TIMEOUT_S,
    durable: bool = False,
) -> list[dict]:
    """Every dvc.yaml stage in order (or up to ``until``), skipping what DVC finds up to date; with
    ``durable``, then commit the results to the results branch and ``dvc push`` (core/durable.py)."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    root_path = Path(root).resolve()
    stages = select_stages(stage_names(root_path), until)
    if durable:
        load_durable(root_path)  # a bad `durable` section fails before hours of training, not after
    metrics_dir = load_paths(read_params(root_path / "params.yaml")).metrics
    parent = open_pipeline_run(root_path, flow_run.get_id(), tags={"arpipe.until": until or "all"})
    annotate(root_path, flow_run_name=str(flow_run.get_name() or ""), flow_run_id=str(flow_run.get_id() or ""))
    env = {
        **parent.env(),
        "ARPIPE_FLOW_RUN_ID": str(flow_run.get_id() or ""),
        "TQDM_MININTERVAL": os.environ.get("TQDM_MININTERVAL", "10"),
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
    }
    logger.info("pipeline run %s: stages %s", parent.run_id, ", ".join(stages))
    results: list[dict] = []
    status = "FAILED"
    try:
        for stage in stages:
            result = run_stage(stage, str(root_path), env, stage_timeout_s, metrics_dir)
            result["run_id"] = parent.record_stage(stage, result["status"], result["metrics"])
            results.append(result)
        status = "FINISHED"
        if durable:
            _record_durable(parent, root_path, results)
    finally:
        parent.finish(status)
        results_text = run_summary(root_path, results)
        create_markdown_artifact(
            key="arpipe-pipeline-summary",
            markdown=summary_markdown(results, stages, parent.run_id, status)
            + ("\n" + results_text if results_text else ""),
            description="arpipe pipeline run",
        )
    return results


def run_summary(root: Path, results: list[dict]) -> str:
    """The results section (core/summary.py) when this run reached ``evaluate`` (ran or up to date),
    else "" (an older evaluation would not describe this run's models)."""
    evaluate = next((r for r in results if r["stage"] == "evaluate"), None)
    if evaluate is None:
        return ""
    paths = load_paths(read_params(root / "params.yaml"))
    return results_summary(
        root / paths.metrics / "evaluate.json",
        root / paths.last_run / "evaluate_registry.json",
        paths.eval,
        evaluate["status"],
    )


def _record_durable(parent, root_path: Path, results: list[dict]) -> None:
    """Run the durable-results task; its outcome (or failure) is tagged on the pipeline run."""
    client = getattr(parent, "client", None)
    try:
        outcome = durable_results(str(root_path), parent.run_id, results)
    except DurableError as exc:
        if client is not None:
            client.set_tag(parent.run_id, "arpipe.durable", f"failed: {str(exc)[:4000]}")
        raise
    if client is not None:
        client.set_tag(parent.run_id, "arpipe.durable", outcome)


def summary_markdown(results: list[dict], stages: list[str], parent_run_id: str, status: str) -> str:
    done = {r["stage"]: r for r in results}
    lines = [
        f"# arpipe pipeline: {status.lower()}",
        "",
        f"MLflow pipeline run: `{parent_run_id}`",
        "",
        "| stage | status | seconds | MLflow run | key metrics |",
        "|---|---|---|---|---|",
    ]
    for stage in stages:
        r = done.get(stage)
        if r is None:
            lines.append(f"| {stage} | not run | | | |")
            continue
        top = {k: v for k, v in r["metrics"].items() if not isinstance(v, dict)}
        shown = ", ".join(f"{k}={v}" for k, v in list(top.items())[:6])
        lines.append(f"| {stage} | {r['status']} | {r['seconds']} | `{r['run_id'] or '-'}` | {shown} |")
    return "\n".join(lines) + "\n"
