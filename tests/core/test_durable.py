"""Durable results: dvc.lock + metrics committed to a results branch, outs pushed to a DVC remote;
a failed push is reported and loses nothing."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.durable import DurableConfig, DurableError, load_durable, make_durable

STAGE = {
    "cmd": "python -c \"import json, pathlib, yaml; n = yaml.safe_load(open('params.yaml'))['work']['n']; "
    "pathlib.Path('out.txt').write_text('x' * n); pathlib.Path('metrics').mkdir(exist_ok=True); "
    "pathlib.Path('metrics/work.json').write_text(json.dumps({'n': n}))\"",
    "params": ["work"],
    "outs": ["out.txt"],
    "metrics": [{"metrics/work.json": {"cache": False}}],
}


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, check=check, capture_output=True, text=True)


@pytest.fixture
def project(tmp_path) -> Path:
    """A git + DVC repo with one stage, run once (dvc.lock, out.txt, metrics/work.json)."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text(
        yaml.safe_dump({"paths": {"metrics": "metrics", "plots": "plots"}, "work": {"n": 3}})
    )
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"work": STAGE}}))
    git(root, "init", "-q", "-b", "main")
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    git(root, "add", "-A")
    git(root, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    dvc(root, "repro")
    return root


@pytest.mark.slow
def test_results_land_on_the_branch_and_the_remote_and_the_checkout_is_untouched(project, tmp_path):
    dvc(project, "remote", "add", "-d", "store", str(tmp_path / "remote"))  # an uncommitted .dvc/config change
    head, status = git(project, "rev-parse", "HEAD"), git(project, "status", "--porcelain")

    first = make_durable(project, DurableConfig(branch="results"), "run 1")
    assert first.committed
    assert git(project, "rev-parse", "HEAD") == head and git(project, "status", "--porcelain") == status
    assert git(project, "symbolic-ref", "--short", "HEAD") == "main"
    assert git(project, "show", "results:dvc.lock") == (project / "dvc.lock").read_text().strip()
    assert git(project, "show", "results:metrics/work.json") == '{"n": 3}'
    assert "store" in git(project, "show", "results:.dvc/config")  # what the run ran with
    assert git(project, "log", "-1", "--format=%P", "results") == head
    assert git(project, "log", "-1", "--format=%s", "results") == "run 1"

    # elsewhere: the branch + the remote give back the outs, and DVC finds nothing to do
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "-b", "results", str(project), str(clone)], check=True)
    dvc(clone, "pull")
    assert (clone / "out.txt").read_text() == "xxx"
    assert "up to date" in dvc(clone, "status").stdout

    again = make_durable(project, DurableConfig(branch="results"), "run 2")
    assert not again.committed and again.commit == first.commit  # nothing new: no empty commit

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["work"]["n"] = 5
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    dvc(project, "repro")
    second = make_durable(project, DurableConfig(branch="results"), "run 3")
    assert second.committed and git(project, "log", "-1", "--format=%P", "results") == first.commit
    assert git(project, "show", "results:metrics/work.json") == '{"n": 5}'
    assert "n: 5" in git(project, "show", "results:params.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("remote", ["unwritable", "none"])
def test_a_failed_push_is_reported_and_loses_nothing(project, tmp_path, remote):
    if remote == "unwritable":
        (tmp_path / "a-file").write_text("not a directory")
        dvc(project, "remote", "add", "-d", "store", str(tmp_path / "a-file" / "remote"))
    with pytest.raises(DurableError) as info:
        make_durable(project, DurableConfig(branch="results"), "run")
    message = str(info.value)
    assert "results committed to results at" in message and "dvc push to the default remote failed" in message
    assert "outs are safe in the workspace and the DVC cache" in message
    assert (project / "out.txt").read_text() == "xxx"
    assert "up to date" in dvc(project, "status").stdout  # outs and cache intact
    assert git(project, "show", "results:metrics/work.json") == '{"n": 3}'


def test_durable_section_is_strict(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert load_durable(project) == DurableConfig()  # absent: defaults
    params["durable"] = {"branch": "r", "remote": "x"}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ValueError, match="durable.remote: unknown key"):
        load_durable(project)
