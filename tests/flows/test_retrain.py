"""Retraining semantics through the flow: one new image in an image-folder source re-runs `shard`
and what follows it, and nothing else; a scheduled-style (durable) run commits and pushes its
results, and a failed push fails the run loudly without losing anything."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO, TINY_VQ, git, make_project, png_bytes

CHAIN = ["shard", "train_tokenizer", "cache_tokens"]


def write_image(path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)))


def tiny_folder_project(root):
    """The project with an 8 px, 3-class image folder under sources/ and a 4-step tokenizer."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["shard"].update(source="imagefolder", source_path="sources/tiny", image_size=8, num_workers=0)
    params["train_tokenizer"].update(kind="vq", model=TINY_VQ, steps=4, batch_size=8, num_grid=2)
    project = make_project(root, params=params)
    for c in range(3):
        for i in range(8):
            write_image(project / "sources" / "tiny" / f"class{c}" / f"{i}.png", seed=10 * c + i)
    return project  # the images are not in git (*.png is ignored; a real source is tracked with `dvc add`)


def stale_stages(root) -> set[str]:
    """Stages `dvc status` reports as changed (a stage that never ran counts as changed)."""
    out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True, text=True)
    return set(yaml.safe_load(out.stdout or "{}"))


@pytest.mark.slow
def test_one_new_image_reruns_shard_and_what_follows_and_nothing_else(tmp_path, prefect_harness, monkeypatch):
    from flows.pipeline import pipeline

    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("ARPIPE_TRACKING", "off")
    project = tiny_folder_project(tmp_path / "project")
    first = pipeline(until="cache_tokens", root=str(project))
    assert [(r["stage"], r["status"]) for r in first] == [(s, "ran") for s in CHAIN]
    assert first[0]["metrics"]["accepted"] == 24
    assert not stale_stages(project) & set(CHAIN)

    write_image(project / "sources" / "tiny" / "class1" / "new.png", seed=999)
    # before the run, only shard is out of date: its dependency (the source folder) changed
    assert stale_stages(project) & set(CHAIN) == {"shard"}
    second = pipeline(until="cache_tokens", root=str(project))
    assert [(r["stage"], r["status"]) for r in second] == [(s, "ran") for s in CHAIN]
    assert second[0]["metrics"]["accepted"] == 25

    # a change elsewhere (a pretrain param) re-runs none of them
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["pretrain"]["steps"] = 7
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = pipeline(until="cache_tokens", root=str(project))
    assert [(r["stage"], r["status"]) for r in third] == [(s, "skipped") for s in CHAIN]


def durable_project(root, remote) -> object:
    """A one-stage project (shard of a 3-image folder) with a DVC remote at ``remote``."""
    project = make_project(
        root,
        params={
            "paths": {"metrics": "metrics", "plots": "plots"},
            "work": {"n": 2},
            "durable": {"branch": "nightly", "dvc_remote": "", "git_remote": ""},
        },
        dvc_yaml={
            "stages": {
                "work": {
                    "cmd": "python -c \"import pathlib; pathlib.Path('out.txt').write_text('ok'); "
                    "pathlib.Path('metrics').mkdir(exist_ok=True); "
                    "pathlib.Path('metrics/work.json').write_text('{}')\"",
                    "params": ["work"],
                    "outs": ["out.txt"],
                    "metrics": [{"metrics/work.json": {"cache": False}}],
                }
            }
        },
    )
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(remote)], cwd=project, check=True)
    return project


@pytest.mark.slow
def test_a_durable_run_commits_and_pushes_and_a_failed_push_fails_the_run(tmp_path, prefect_harness, monkeypatch):
    from core.durable import DurableError
    from flows.pipeline import pipeline
    from flows.schedule import deployment

    monkeypatch.setenv("ARPIPE_TRACKING", "off")
    assert deployment("nightly", "0 3 * * *", REPO).parameters["durable"] is True  # what the schedule runs

    good = durable_project(tmp_path / "good", tmp_path / "remote")
    results = pipeline(root=str(good), durable=True)
    assert [(r["stage"], r["status"]) for r in results] == [("work", "ran")]
    assert git(good, "show", "nightly:metrics/work.json") == "{}"
    assert "out.txt" in git(good, "show", "nightly:dvc.lock")
    assert any((tmp_path / "remote").rglob("*")), "dvc push wrote nothing to the remote"

    (tmp_path / "a-file").write_text("")
    bad = durable_project(tmp_path / "bad", tmp_path / "a-file" / "remote")
    with pytest.raises(DurableError, match="results committed to nightly at .* but dvc push"):
        pipeline(root=str(bad), durable=True)
    assert (bad / "out.txt").read_text() == "ok"
    assert git(bad, "show", "nightly:metrics/work.json") == "{}"


@pytest.mark.slow
def test_a_larger_image_size_runs_the_chain_with_every_size_derived(tmp_path):
    """`dvc exp run -S shard.image_size=32` (the README's example): the tokenizer and the evalnet
    take the image size from the shards and the AR model its sequence from the tokenizer, so one
    param change runs the chain (here to a few pretrain steps)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["shard"]["num_workers"] = 0
    params["train_tokenizer"].update(steps=4, batch_size=16, num_grid=2)
    params["pretrain"].update(steps=4, batch_size=16, warmup_steps=1, log_every=2, eval_every=4, save_every=0,
                              samples_per_class=1, sample_cfg_scales=[1.0])  # fmt: skip
    project = make_project(tmp_path / "project", params=params)
    env = {
        **os.environ,
        "ARPIPE_TRACKING": "off",
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }  # dvc's `python -m stages.X`
    run = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "run", "-S", "shard.image_size=32", "pretrain"],
        cwd=project, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    tokenizer = json.loads((project / "data" / "tokenizer" / "config.json").read_text())
    base = json.loads((project / "data" / "models" / "base" / "config.json").read_text())
    assert tokenizer["image_size"] == 32 and tokenizer["seq_len"] == 64  # 32 px / 4 = 8 x 8 tokens
    assert base["image_size"] == 32 and base["model"]["seq_len"] == 64
