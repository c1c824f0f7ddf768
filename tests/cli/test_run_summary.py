"""`arpipe run` ends with the results: FIDs beside the real-data floor, the best checkpoint, the
champion, where the report is; the Prefect run's markdown artifact holds the same text."""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, make_project

EVALUATE = {
    "reconstruction": {"real": {"fid": 3.4, "is": 9.0, "precision": 0.8, "recall": 0.9, "class_acc": 0.9}},
    "train": {"real": {"fid": 3.514, "is": 9.0, "precision": 0.8, "recall": 0.9, "class_acc": 0.95}},
    "base": {
        "cfg1": {"fid": 3.432, "is": 9.1, "precision": 0.803, "recall": 0.919, "class_acc": 0.859},
        "cfg3": {"fid": 3.937, "is": 9.3, "precision": 0.819, "recall": 0.844, "class_acc": 0.968},
    },
    "ddo": {"cfg1": {"fid": 3.296, "is": 9.2, "precision": 0.776, "recall": 0.935, "class_acc": 0.888}},
    "best_value": 3.296,
}
REGISTRY = {
    "best_checkpoint": "ddo", "select": "fid@cfg1", "best_value": 3.296, "registered": True,
    "model": "arpipe-gpt", "version": "4", "checkpoint": "ddo", "champion_moved": True, "champion_version": "4",
    "previous_champion_version": "3", "previous_champion_value": 3.43,
    "reason": "candidate 3.296 beats champion 3.43 (lower is better)",
}  # fmt: skip


@pytest.mark.slow
def test_run_ends_with_the_results_and_the_artifact_says_the_same(tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    (tmp_path / "fixture").mkdir()
    (tmp_path / "fixture" / "evaluate.json").write_text(json.dumps(EVALUATE))
    (tmp_path / "fixture" / "registry.json").write_text(json.dumps(REGISTRY))
    fixture = tmp_path / "fixture"
    # a stand-in `evaluate` stage that writes what the real one writes: the metrics and the registry record
    cmd = (f"mkdir -p metrics .arpipe/last_run && cp {fixture}/evaluate.json metrics/evaluate.json && "
           f"cp {fixture}/registry.json .arpipe/last_run/evaluate_registry.json")  # fmt: skip
    dvc_yaml = {"stages": {"evaluate": {"cmd": cmd, "metrics": [{"metrics/evaluate.json": {"cache": False}}]}}}
    from core.config import as_params
    from stages.evaluate import Config

    params = {"paths": {"metrics": "metrics"}, "evaluate": as_params(Config())}
    root = make_project(tmp_path / "project", params=params, dvc_yaml=dvc_yaml)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "ARPIPE_TRACKING": "off",
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
    }
    result = subprocess.run([sys.executable, "-m", "arpipe.cli", "run"], cwd=root, env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout[result.stdout.index("## Results") :]
    assert "| base | cfg1 | 3.432 | 3.514 | 0.859 | 0.803 | 0.919 |" in summary
    assert "| **ddo** | cfg1 | 3.296 | 3.514 | 0.888 | 0.776 | 0.935 |" in summary
    assert "Best checkpoint: **ddo** (by fid@cfg1: 3.296)." in summary
    assert "Champion: arpipe-gpt v4, moved to this evaluation's best (was v3): candidate 3.296 beats" in summary
    assert "`data/eval/report.md`" in summary and "`data/eval/grid.png`" in summary and "`arpipe ui`" in summary

    import anyio

    async def latest_artifact():
        async with get_client() as client:
            return await client.read_latest_artifacts()

    artifacts = [a for a in anyio.run(latest_artifact) if a.key == "arpipe-pipeline-summary"]
    assert artifacts and summary.strip() in artifacts[0].data
