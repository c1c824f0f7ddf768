"""The GPU-cluster path, as far as it runs without a cluster: the work-pool deployments and the
Kubernetes job template validate, the workspace commands are right, and a stage really runs in
its own fresh clone against a DVC remote (`dvc repro --pull -s`, `dvc push`) and merges back."""

import asyncio
import inspect
import json
import subprocess
import sys

import pytest
import yaml
from helpers import REPO, git, make_project

from flows.cluster import apply_lock_entry, run_in_workspace, workspace_commands

TEMPLATE = json.loads((REPO / "cluster" / "kubernetes-gpu.json").read_text())


def deployments() -> dict:
    return {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}


def test_gpu_deployments_point_at_the_workspace_flow_with_valid_parameters():
    from prefect.flows import load_flow_from_entrypoint

    for name in ("stage-gpu-k8s", "stage-gpu-slurm"):
        deployment = deployments()[name]
        path, entry = deployment["entrypoint"].split(":")
        flow = load_flow_from_entrypoint(f"{REPO / path}:{entry}")
        assert flow.name == "arpipe-stage"
        assert set(deployment["parameters"]) <= set(flow.parameters.properties)
        assert set(flow.parameters.required) <= set(deployment["parameters"])
    slurm = deployments()["stage-gpu-slurm"]["work_pool"]["job_variables"]["command"]
    assert slurm.startswith("srun ") and "--gres=gpu:" in slurm and slurm.endswith("python -m prefect.engine")


def test_kubernetes_job_template_is_a_valid_base_job_template_with_a_gpu_request():
    import jsonschema
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.templating import apply_values

    # what `prefect work-pool create --base-job-template` checks: every {{ placeholder }} is a variable
    WorkPoolCreate(name="arpipe-gpu-k8s", type="kubernetes", base_job_template=TEMPLATE)
    job_variables = deployments()["stage-gpu-k8s"]["work_pool"]["job_variables"]
    job_variables = {**job_variables, "image": "registry/arpipe:cu128", "env": {"A": "1"}}  # {{ $VARS }} filled
    jsonschema.validate(job_variables, TEMPLATE["variables"])
    defaults = {k: v["default"] for k, v in TEMPLATE["variables"]["properties"].items() if "default" in v}
    rendered = apply_values(TEMPLATE["job_configuration"], {**defaults, **job_variables, "command": "x", "name": "j"})
    pod = rendered["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert (
        container["resources"]["limits"]["nvidia.com/gpu"] == 8 == container["resources"]["requests"]["nvidia.com/gpu"]
    )
    assert container["image"] == "registry/arpipe:cu128" and container["env"] == {"A": "1"}
    assert rendered["job_manifest"]["spec"]["activeDeadlineSeconds"] == 172800  # the hard time limit
    assert {"name": "workspace", "mountPath": "/workspace"} in container["volumeMounts"]
    assert deployments()["stage-gpu-k8s"]["parameters"]["workspace"].startswith("/workspace/")


def test_kubernetes_template_passes_the_kubernetes_worker_when_installed():
    worker = pytest.importorskip("prefect_kubernetes.worker")  # not in the pinned stack; checked when present
    values = {"image": "registry/arpipe:cu128", "name": "j", "command": "python -m prefect.engine"}
    defaults = {k: v["default"] for k, v in TEMPLATE["variables"]["properties"].items() if "default" in v}
    config = worker.KubernetesWorkerJobConfiguration.from_template_and_values(TEMPLATE, {**defaults, **values})
    if inspect.iscoroutine(config):  # async in prefect-kubernetes 0.8
        config = asyncio.run(config)
    (container,) = config.job_manifest["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8 and container["image"] == values["image"]


def test_workspace_commands_clone_repro_with_pull_and_push_the_stage():
    commands = workspace_commands("pretrain", "git@host:org/arpipe.git", "abc123", "/w/repo", dvc_remote="s3store")
    assert [c[:2] if c[0] == "git" else c[3:] for c in commands] == [
        ["git", "clone"],
        ["git", "-C"],
        ["repro", "--pull", "--single-item", "pretrain"],
        ["push", "--remote", "s3store", "pretrain"],
    ]
    assert commands[0][-2:] == ["git@host:org/arpipe.git", "/w/repo"] and commands[1][-1] == "abc123"
    assert all(c[1:3] == ["-m", "dvc"] for c in commands[2:])
    assert workspace_commands("cca", "r", "main", "/w")[3][3:] == ["push", "cca"]  # default remote


def test_a_stage_runs_in_its_own_clone_and_its_lock_entry_merges_back(tmp_path):
    """`first` runs here and is pushed; `second` (reads first's out) runs in a fresh clone that pulls
    that input from the remote; back here, the merged lock entry + `dvc pull` make DVC see it done."""

    def dvc(cwd, *args):
        return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, check=True, capture_output=True, text=True)

    stages = {
        "first": {"cmd": "echo one > a.txt", "outs": ["a.txt"]},
        "second": {"cmd": "cat a.txt a.txt > b.txt", "deps": ["a.txt"], "outs": ["b.txt"]},
    }
    root = make_project(tmp_path / "origin", params={"paths": {}}, dvc_yaml={"stages": stages})
    dvc(root, "remote", "add", "-d", "store", str(tmp_path / "remote"))
    dvc(root, "repro", "first")
    dvc(root, "push")
    git(root, "add", "-A")
    git(root, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "first ran")
    rev = git(root, "rev-parse", "HEAD")

    entry = run_in_workspace("second", str(root), rev, tmp_path / "jobs" / "second")
    assert (tmp_path / "jobs" / "second" / "b.txt").read_text() == "one\none\n"
    assert [o["path"] for o in entry["outs"]] == ["b.txt"]

    apply_lock_entry(root, "second", entry)
    dvc(root, "pull", "second")
    assert (root / "b.txt").read_text() == "one\none\n"
    assert "up to date" in dvc(root, "status").stdout
    with pytest.raises(RuntimeError, match="is not empty"):
        run_in_workspace("second", str(root), rev, tmp_path / "jobs" / "second")
