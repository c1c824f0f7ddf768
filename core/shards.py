"""Read the shard stage's output back into memory: keys, labels and uint8 images per split.

Everything is decoded into one ``(N, H, W, 3)`` uint8 array, which is right for the digits scale
(1,797 images of 16x16 are under 1.4 MB). At large scale a training stage would stream the tars
with ``webdataset`` instead, shuffling shards and samples, and never hold the split in memory.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from core.images import decode_png
from core.progress import progress


@dataclass(frozen=True)
class SplitImages:
    keys: list[str]
    """Content keys, in manifest order."""
    labels_N: np.ndarray
    """int64 class ids."""
    images_NHWC: np.ndarray
    """uint8 RGB pixels."""

    def __len__(self) -> int:
        return len(self.keys)


def class_names(shards_dir: str | Path) -> list[str]:
    return json.loads((Path(shards_dir) / "classes.json").read_text())


def load_split(shards_dir: str | Path, split: str) -> SplitImages:
    """Decode every image of ``split`` from the tars, in manifest order."""
    shards_dir = Path(shards_dir)
    manifest_file = shards_dir / "manifest.parquet"
    if not manifest_file.is_file():
        raise FileNotFoundError(f"{manifest_file} not found: run the shard stage first (dvc repro shard)")
    manifest = pq.read_table(manifest_file, columns=["key", "split", "label", "shard"]).to_pylist()
    rows = [r for r in manifest if r["split"] == split]
    if not rows:
        raise ValueError(f"{manifest_file}: no images in split '{split}'")
    pixels: dict[str, np.ndarray] = {}
    for shard in sorted({r["shard"] for r in rows}):
        with tarfile.open(shards_dir / shard) as tar:
            members = [m for m in tar if m.name.endswith(".png")]
            for member in progress(members, desc=f"read {split} {shard}", unit="img", leave=False):
                pixels[member.name[: -len(".png")]] = decode_png(tar.extractfile(member).read())
    missing = [r["key"] for r in rows if r["key"] not in pixels]
    if missing:
        raise ValueError(f"{shards_dir}: {len(missing)} manifest keys have no image in their tar (e.g. {missing[0]})")
    images = np.stack([pixels[r["key"]] for r in rows])
    labels = np.array([r["label"] for r in rows], dtype=np.int64)
    return SplitImages([r["key"] for r in rows], labels, images)
