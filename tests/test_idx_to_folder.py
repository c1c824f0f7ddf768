"""benchmarks/idx_to_folder.py: MNIST-format files become an image folder that `shard` reads."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "idx_to_folder.py"


def write_idx(folder: Path, images: np.ndarray, labels: np.ndarray, magic_images: int = 2051) -> None:
    n, h, w = images.shape
    header = magic_images.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, h, w))
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
    header = (2049).to_bytes(4, "big") + n.to_bytes(4, "big")
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + labels.tobytes()))


def convert(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--src", str(src), "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_first_images_per_class_become_a_folder_that_shard_reads(tmp_path, shard_run):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2] * 13 + [0], np.uint8)
    write_idx(tmp_path, images, labels)
    result = convert(tmp_path, tmp_path / "folder", "--per-class", "10", "--names", "a,b,c")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["0_a", "1_b", "2_c"]
    # the first 10 of each class in file order: class 0 sits at indices 0, 3, ..., 27
    assert sorted(p.name for p in (tmp_path / "folder" / "0_a").iterdir()) == [f"{i:05d}.png" for i in range(0, 30, 3)]

    metrics, out = shard_run(source="imagefolder", source_path=str(tmp_path / "folder"), image_size=16)
    assert metrics["accepted"] == 30 and metrics["rejected"] == 0
    assert json.loads((out / "classes.json").read_text()) == ["0_a", "1_b", "2_c"]
    assert len(pq.read_table(out / "manifest.parquet")) == 30


def test_bad_input_is_named(tmp_path):
    images = np.zeros((3, 4, 4), np.uint8)
    write_idx(tmp_path, images, np.zeros(3, np.uint8), magic_images=1234)
    result = convert(tmp_path, tmp_path / "folder")
    assert result.returncode != 0 and "train-images-idx3-ubyte.gz: IDX magic 1234, expected 2051" in result.stderr
    result = convert(tmp_path / "missing", tmp_path / "folder")
    assert result.returncode != 0 and "no train-images-idx3-ubyte[.gz]" in result.stderr
    assert not (tmp_path / "folder").exists()
