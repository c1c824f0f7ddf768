"""GPU stages on a cluster: one DVC stage in its own workspace, run by a Prefect work-pool worker.

The flow ``remote_stage`` is what a GPU work pool executes (``prefect.yaml`` deployments
``stage-gpu-k8s``, a Kubernetes job with an ``nvidia.com/gpu`` request from
``cluster/kubernetes-gpu.json``, and ``stage-gpu-slurm``, a process worker whose command runs the
flow inside ``srun``). In a fresh workspace it runs::

    git clone --quiet <repo> <workspace> && git -C <workspace> checkout --quiet <rev>
    dvc repro --pull --single-item <stage>     # pulls the stage's inputs from the DVC remote
    dvc push [--remote R] <stage>              # its outs to the DVC remote

and returns the stage's ``dvc.lock`` entry, which the orchestrating checkout merges into its own
``dvc.lock`` (``apply_lock_entry``) before ``dvc pull <stage>``. The stage scales over the job's
GPUs through its params (``launcher: accelerate/multi-gpu.yaml``): the command line never
carries a hyper-parameter, so DVC's up-to-date check stays true. Every command runs in its own
process group and is killed, group and all, past its timeout (Prefect's timeout would not).
No torch here: the worker's flow process only needs git, DVC and Prefect.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from prefect import flow

DEFAULT_TIMEOUT_S = 48 * 3600


class WorkspaceStageFailed(RuntimeError):
    """A command of the remote stage failed or ran past its timeout; the message has its output."""


def workspace_commands(stage: str, repo: str, rev: str, workspace: str | Path, dvc_remote: str = "") -> list[list[str]]:
    """The commands, in order, that run ``stage`` of ``repo`` at ``rev`` in ``workspace``."""
    dvc = [sys.executable, "-m", "dvc"]
    remote = ["--remote", dvc_remote] if dvc_remote else []
    return [
        ["git", "clone", "--quiet", repo, str(workspace)],
        ["git", "-C", str(workspace), "checkout", "--quiet", rev],
        [*dvc, "repro", "--pull", "--single-item", stage],
        [*dvc, "push", *remote, stage],
    ]


def _run(cmd: list[str], cwd: Path, timeout_s: float) -> str:
    """Run ``cmd`` in its own process group (output printed, i.e. in the flow log, when it ends);
    kill the whole group past the timeout."""
    process = subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(5 if sig == signal.SIGTERM else 0)
        process.wait()
        raise WorkspaceStageFailed(f"`{' '.join(cmd)}` ran past {timeout_s:.0f} s and was killed") from None
    lines = out.splitlines()
    for line in lines:
        print(line)
    if process.returncode != 0:
        tail = "\n".join(lines[-15:])
        raise WorkspaceStageFailed(f"`{' '.join(cmd)}` failed (exit {process.returncode}):\n{tail}")
    return out


def run_in_workspace(
    stage: str, repo: str, rev: str, workspace: str | Path, dvc_remote: str = "", timeout_s: float = DEFAULT_TIMEOUT_S
) -> dict:
    """Run ``stage`` in a fresh clone at ``workspace`` and push its outs; its dvc.lock entry."""
    workspace = Path(workspace)
    if workspace.exists() and any(workspace.iterdir()):
        raise WorkspaceStageFailed(f"workspace {workspace} is not empty: each stage runs in a fresh clone")
    workspace.parent.mkdir(parents=True, exist_ok=True)
    for cmd in workspace_commands(stage, repo, rev, workspace, dvc_remote):
        _run(cmd, workspace if workspace.exists() else workspace.parent, timeout_s)
    lock = yaml.safe_load((workspace / "dvc.lock").read_text()) or {}
    entry = lock.get("stages", {}).get(stage)
    if entry is None:
        raise WorkspaceStageFailed(f"dvc.lock in {workspace} has no entry for stage {stage!r} after the run")
    return entry


def apply_lock_entry(root: str | Path, stage: str, entry: dict) -> None:
    """Merge a stage's dvc.lock entry from a remote workspace into ``root/dvc.lock``."""
    lock_file = Path(root) / "dvc.lock"
    lock = yaml.safe_load(lock_file.read_text()) if lock_file.is_file() else None
    lock = lock or {"schema": "2.0", "stages": {}}
    lock.setdefault("stages", {})[stage] = entry
    lock_file.write_text(yaml.safe_dump(lock, sort_keys=False))


@flow(name="arpipe-stage", log_prints=True)
def remote_stage(
    stage: str,
    repo: str,
    rev: str = "main",
    workspace: str = "",
    dvc_remote: str = "",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict:
    """One dvc.yaml stage in its own workspace: clone at ``rev``, ``dvc repro --pull -s``, ``dvc push``."""
    import tempfile

    root = Path(workspace or tempfile.mkdtemp(prefix=f"arpipe-{stage}-", dir=os.environ.get("ARPIPE_WORKSPACES")))
    target = root / "repo" if workspace == "" else root
    return run_in_workspace(stage, repo, rev, target, dvc_remote, timeout_s)
