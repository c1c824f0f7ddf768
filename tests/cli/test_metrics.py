"""`arpipe metrics`: the stages' metrics one line per key, and the change since a git revision,
run as a user runs it (a subprocess in a throwaway git repository, real output)."""

import json
import os
import subprocess
import sys

import yaml
from helpers import REPO, git

COMMIT = ("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam")


def arpipe(cwd, *args):
    env = {k: v for k, v in os.environ.items() if k != "ARPIPE_DEBUG"} | {"PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "arpipe.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def write_metrics(root, stage, metrics):
    (root / "metrics" / f"{stage}.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))


def two_commits(root):
    """evaluate.json in both commits (FID improved, a key added); pretrain.json only in the second."""
    (root / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {"pretrain": {"cmd": "a"}, "evaluate": {"cmd": "b"}}}, sort_keys=False)
    )
    (root / "params.yaml").write_text(yaml.safe_dump({"paths": {"metrics": "metrics"}}))
    (root / "metrics").mkdir()
    write_metrics(root, "evaluate", {"base": {"cfg1": {"fid": 4.0123456, "precision": 0.75}}, "samples": 1000})
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, *COMMIT, "first")
    write_metrics(
        root, "evaluate", {"base": {"cfg1": {"fid": 3.896796, "fid_lo": 2.64, "precision": 0.75}}, "samples": 1000}
    )
    write_metrics(root, "pretrain", {"steps": 600, "val_loss": 3.4498199, "skipped": "no"})
    git(root, "add", "-A")
    git(root, *COMMIT, "second")
    return root


def test_metrics_prints_a_block_per_stage_in_pipeline_order_one_line_per_key(tmp_path):
    root = two_commits(tmp_path)
    result = arpipe(root, "metrics")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "pretrain",
        "  skipped                 no",  # a string leaf as it is
        "  steps                  600",  # an integer whole
        "  val_loss              3.45",  # a float to 4 significant digits
        "",
        "evaluate",
        "  base.cfg1.fid        3.897",
        "  base.cfg1.fid_lo      2.64",
        "  base.cfg1.precision   0.75",
        "  samples               1000",
    ]
    one = arpipe(root, "metrics", "pretrain", "--format", "csv")
    assert one.stdout.splitlines() == ["stage,metric,value", "pretrain,skipped,no", "pretrain,steps,600",
                                       "pretrain,val_loss,3.4498199"]  # fmt: skip


def test_metrics_rev_shows_the_old_value_beside_the_current_and_the_change(tmp_path):
    root = two_commits(tmp_path)
    result = arpipe(root, "metrics", "--rev", "HEAD~1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["pretrain", "HEAD~1", "workspace", "change"]
    assert lines[2].split() == ["steps", "–", "600", "–"]  # no pretrain.json at HEAD~1
    assert [line.split() for line in lines[5:10]] == [
        ["evaluate", "HEAD~1", "workspace", "change"],
        ["base.cfg1.fid", "4.012", "3.897", "-0.1155"],
        ["base.cfg1.fid_lo", "–", "2.64", "–"],
        ["base.cfg1.precision", "0.75", "0.75", "0"],
        ["samples", "1000", "1000", "0"],
    ]
    md = arpipe(root, "metrics", "evaluate", "--rev", "HEAD~1", "--format", "md")
    assert md.stdout.splitlines()[:3] == [
        "| stage | metric | HEAD~1 | workspace | change |",
        "|---|---|--:|--:|--:|",
        "| evaluate | base.cfg1.fid | 4.012 | 3.897 | -0.1155 |",
    ]


def test_metrics_unknown_stage_or_revision_fails_in_one_line(tmp_path):
    root = two_commits(tmp_path)
    result = arpipe(root, "metrics", "evaluate", "pretrian")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "arpipe: error: unknown stage 'pretrian': stages with metrics in metrics/: pretrain, evaluate "
        "(ARPIPE_DEBUG=1 or --debug shows the traceback)"
    ]
    bad_rev = arpipe(root, "metrics", "--rev", "no-such-branch")
    assert bad_rev.returncode == 1 and len(bad_rev.stderr.splitlines()) == 1
    assert "--rev no-such-branch: not a commit" in bad_rev.stderr
