"""Durable results: after a successful (scheduled) pipeline run, commit dvc.lock + metrics + plots
to a results branch and ``dvc push`` the outs, so the run survives the machine that made it.

Settings: params.yaml ``durable`` (``DurableConfig``; no stage reads it). The commit is made with
a temporary git index, so the checkout's branch, index and working tree are left as they are:
its tree is HEAD's tree plus the working tree's changes to tracked files (what the run ran with)
plus ``dvc.lock``, ``paths.metrics`` and ``paths.plots``; its parents are the previous tip of
the results branch and HEAD, so ``git checkout <branch> && dvc pull`` gives back the code, params,
lock and outs of that run. A failed ``dvc push`` (or ``git push``) raises ``DurableError`` with
DVC's own message: the outs stay in the workspace and the DVC cache, the commit stays on the
branch, and ``dvc push`` by hand finishes the job. No torch here (the flow process uses it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from core.config import load_paths, load_section, read_params

IDENTITY = {"GIT_AUTHOR_NAME": "arpipe", "GIT_AUTHOR_EMAIL": "arpipe@localhost"}


class DurableError(RuntimeError):
    """Committing or pushing the results failed; the message says what is safe and what to run."""


@dataclass(frozen=True, kw_only=True)
class DurableConfig:
    branch: str = "arpipe-results"
    """Git branch that receives one commit per durable run (created from HEAD on first use)."""
    dvc_remote: str = ""
    """DVC remote to push the outs to; "" = the default remote (``dvc remote add -d``)."""
    git_remote: str = ""
    """Git remote to push the branch to (e.g. origin); "" = keep the branch local."""

    def __post_init__(self):
        if not self.branch or self.branch.startswith("-") or " " in self.branch:
            raise ValueError(f"branch {self.branch!r} is not a usable git branch name")


@dataclass(frozen=True)
class DurableResult:
    branch: str
    commit: str
    committed: bool
    """False when the branch already held exactly these results (nothing new to commit)."""
    dvc_remote: str
    git_pushed: bool

    def describe(self) -> str:
        what = f"committed to {self.branch} at {self.commit[:10]}" if self.committed else (
            f"already on {self.branch} at {self.commit[:10]}"
        )  # fmt: skip
        pushed = "; branch pushed" if self.git_pushed else ""
        return f"results {what}; dvc push to {self.dvc_remote or 'the default remote'} done{pushed}"


def load_durable(root: Path) -> DurableConfig:
    params = read_params(root / "params.yaml")
    return load_section(params, "durable", DurableConfig) if "durable" in params else DurableConfig()


def _run(cmd: list[str], root: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=root, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if check and result.returncode != 0:
        output = (result.stderr or result.stdout)[-800:]
        raise DurableError(f"`{' '.join(cmd)}` failed (exit {result.returncode}): {output}")
    return result


def _git(root: Path, *args: str, env: dict | None = None, check: bool = True) -> str:
    return _run(["git", *args], root, env, check).stdout.strip()


def _identity(root: Path) -> dict[str, str]:
    """Committer/author env for git when the repository has no user configured."""
    env = {}
    if not _git(root, "config", "user.name", check=False):
        env.update(GIT_AUTHOR_NAME=IDENTITY["GIT_AUTHOR_NAME"], GIT_COMMITTER_NAME=IDENTITY["GIT_AUTHOR_NAME"])
    if not _git(root, "config", "user.email", check=False):
        env.update(GIT_AUTHOR_EMAIL=IDENTITY["GIT_AUTHOR_EMAIL"], GIT_COMMITTER_EMAIL=IDENTITY["GIT_AUTHOR_EMAIL"])
    return env


def result_paths(root: Path) -> list[str]:
    """dvc.lock, the metrics and the plots folders (those that exist), relative to the root."""
    paths = load_paths(read_params(root / "params.yaml"))
    return [p for p in ("dvc.lock", paths.metrics, paths.plots) if (root / p).exists()]


def commit_results(root: Path, branch: str, message: str) -> tuple[str, bool]:
    """Commit the run's results to ``branch`` without touching the checkout; (commit, committed)."""
    root = Path(root)
    head = _git(root, "rev-parse", "HEAD")
    tip = _git(root, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}", check=False) or None
    current = _git(root, "symbolic-ref", "--quiet", "--short", "HEAD", check=False)
    env = _identity(root)
    if current == branch:  # the checkout is on the results branch: an ordinary commit
        _git(root, "add", "-u", env=env)
        _git(root, "add", "--", *result_paths(root), env=env)
        if not _git(root, "status", "--porcelain", "--untracked-files=no", check=False):
            return head, False
        _git(root, "commit", "-q", "-m", message, env=env)
        return _git(root, "rev-parse", "HEAD"), True
    with tempfile.TemporaryDirectory() as tmp:
        index = {"GIT_INDEX_FILE": str(Path(tmp) / "index"), **env}
        _git(root, "read-tree", "HEAD", env=index)
        _git(root, "add", "-u", env=index)
        _git(root, "add", "--", *result_paths(root), env=index)
        tree = _git(root, "write-tree", env=index)
    if tip and _git(root, "rev-parse", f"{tip}^{{tree}}") == tree:
        return tip, False
    parents = ["-p", tip] if tip else []
    if not tip or not _is_ancestor(root, head, tip):  # HEAD moved on (or first commit): record it as a parent
        parents += ["-p", head]
    commit = _git(root, "commit-tree", tree, *parents, "-m", message, env=env)
    _git(root, "update-ref", f"refs/heads/{branch}", commit, *([tip] if tip else []))
    return commit, True


def _is_ancestor(root: Path, ancestor: str, descendant: str) -> bool:
    return _run(["git", "merge-base", "--is-ancestor", ancestor, descendant], root, check=False).returncode == 0


def dvc_push(root: Path, remote: str = "") -> None:
    cmd = [sys.executable, "-m", "dvc", "push", *(["--remote", remote] if remote else [])]
    result = _run(cmd, Path(root), check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-8:])
        raise DurableError(
            f"dvc push to {remote or 'the default remote'} failed (exit {result.returncode}); the run's outs are "
            f"safe in the workspace and the DVC cache: run `dvc push{' -r ' + remote if remote else ''}` once the "
            f"remote is reachable.\n{tail}"
        )


def make_durable(root: Path, cfg: DurableConfig, message: str) -> DurableResult:
    """Commit the results to ``cfg.branch``, ``dvc push`` the outs, push the branch if configured."""
    root = Path(root)
    commit, committed = commit_results(root, cfg.branch, message)
    try:
        dvc_push(root, cfg.dvc_remote)
    except DurableError as exc:
        raise DurableError(f"results committed to {cfg.branch} at {commit[:10]}, but {exc}") from exc
    pushed = False
    if cfg.git_remote:
        _git(root, "push", "-q", cfg.git_remote, f"refs/heads/{cfg.branch}:refs/heads/{cfg.branch}")
        pushed = True
    return DurableResult(cfg.branch, commit, committed, cfg.dvc_remote, pushed)
