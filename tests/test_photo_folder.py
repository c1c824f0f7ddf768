"""benchmarks/photo_folder.py: patches of the photos shipped in installed packages become an
image folder that `shard` reads, the same bytes on every build."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "photo_folder.py"
CLASSES = ["bokeh", "face", "flag", "foliage", "pagoda", "petals", "sky", "uniform"]


def build(out: Path, *extra: str) -> dict[str, bytes]:
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), *extra]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "scikit-learn" in result.stdout and "matplotlib" in result.stdout  # sources named with versions
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_photo_folder_shards_cleanly_and_builds_byte_identical(tmp_path, shard_run):
    first = build(tmp_path / "a1", "--per-class", "4")
    assert sorted({name.split("/")[0] for name in first}) == CLASSES and len(first) == 32
    assert build(tmp_path / "a2", "--per-class", "4") == first
    # one generator per class: a smaller folder is the first files of a larger one
    assert build(tmp_path / "a3", "--per-class", "2").items() <= first.items()
    # set b cuts from disjoint rectangles: no patch in common
    assert not set(build(tmp_path / "b", "--per-class", "4", "--set", "b").values()) & set(first.values())

    metrics, out = shard_run(source="imagefolder", source_path=str(tmp_path / "a1"), image_size=16)
    assert (metrics["accepted"], metrics["rejected"], metrics["duplicates"]) == (32, 0, 0)
    assert json.loads((out / "classes.json").read_text()) == CLASSES
