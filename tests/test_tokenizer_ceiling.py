"""benchmarks/tokenizer_ceiling.py: shards and trains the evalnet once per image size, then scores
each tokenizer config's ceiling (evaluate's `reconstruction` row) against the floor (its `train` row)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_two_configs_two_sizes_one_row_each(tmp_path):
    folder = tmp_path / "photos"
    build = [sys.executable, str(REPO / "benchmarks" / "photo_folder.py"), "--out", str(folder), "--per-class", "8"]
    assert subprocess.run(build, capture_output=True, text=True).returncode == 0
    env = {**os.environ, "ARPIPE_BENCH_RESULTS": str(tmp_path / "results"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "tokenizer_ceiling.py"), "--source", str(folder),
           "--label", "tiny", "--work", str(tmp_path / "work"), "--results", "tiny",
           "--config", "default", "--config", "at8 shard.image_size=8 train_tokenizer.model.channel_multipliers=[1,2]",
           "--set", "train_tokenizer.steps=2", "--set", "train_evalnet.steps=2",
           "--set", "evaluate.fid_resamples=0"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads((tmp_path / "results" / "tiny.json").read_text())["figures"]
    rows = {row["config"]: row for row in figures["rows"]}
    assert (rows["default"]["tokens"], rows["at8"]["tokens"]) == (16, 16)  # 16 px / 4 and 8 px / 2
    assert len(figures["data"]) == 2  # one shard + evalnet per image size
    for row in rows.values():
        assert row["ratio"] == row["ceiling"]["fid"] / row["floor"]["fid"] > 0
    assert "| default | 16 | 16 | 256 |" in result.stdout
