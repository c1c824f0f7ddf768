"""`arpipe plots`: the training curves as PNGs and a page that opens with no network."""

import os
import subprocess
import sys

import numpy as np
import yaml
from helpers import REPO
from PIL import Image

TRAIN_CSV = "step,loss,lr\n10,4.0,0.001\n20,3.0,0.001\n30,2.5,0.0005\n"


def arpipe(cwd, *args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "arpipe.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_plots_writes_a_png_per_curve_file_and_a_page_without_scripts(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"paths": {"plots": "curves"}}))
    (tmp_path / "curves" / "pretrain").mkdir(parents=True)
    (tmp_path / "curves" / "pretrain" / "train.csv").write_text(TRAIN_CSV)
    (tmp_path / "curves" / "distill2").mkdir()
    (tmp_path / "curves" / "distill2" / "gts.csv").write_text("step,gts_loss\n1,2.0\n2,\n")  # an empty cell

    result = arpipe(tmp_path, "plots", "--out", "out")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "wrote out/index.html: 2 plots as PNGs, no network needed to view them\n"
    page = (tmp_path / "out" / "index.html").read_text()
    assert '<img src="pretrain/train.png"' in page and '<img src="distill2/gts.png"' in page
    assert "<script" not in page and "http" not in page  # nothing to fetch
    image = np.asarray(Image.open(tmp_path / "out" / "pretrain" / "train.png").convert("RGB"))
    assert image.shape[1] > image.shape[0] > 100 and image.std() > 0  # two panels side by side, drawn


def test_plots_without_curves_says_what_to_run(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("paths: {plots: plots}\n")
    result = arpipe(tmp_path, "plots")
    assert result.returncode == 1
    assert result.stderr.strip().endswith(
        f"no curve files (*.csv) under {tmp_path / 'plots'}: run a training stage first"
    )
