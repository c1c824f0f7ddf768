"""ADM-format sample and reference batches (the ``.npz`` files of openai/guided-diffusion's evaluator).

A batch holds ``arr_0``: uint8 images N x H x W x 3 (and, in the labelled ImageNet batches,
``arr_1``: int labels). A *reference* batch such as ``VIRTUAL_imagenet256_labeled.npz`` also holds
``mu`` / ``sigma``, the Inception pool features' mean and covariance that the papers' FIDs are
measured against. ``read_reference_batch`` reads either form; ``NpzSampleWriter`` writes a sample
batch for the standard evaluator without holding it in memory (50,000 images at 256 px are 9.8 GB).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap


class ReferenceBatchError(ValueError):
    """The file is not an ADM reference batch; the message names the file and the key."""


def read_reference_batch(path: str | Path) -> dict[str, np.ndarray]:
    """``{"mu", "sigma"}`` when the batch carries its statistics, else ``{"images": arr_0}``."""
    path = Path(path)
    if not path.is_file():
        raise ReferenceBatchError(
            f"{path}: no such reference batch (an ADM .npz, e.g. VIRTUAL_imagenet256_labeled.npz)"
        )
    try:
        with np.load(path, allow_pickle=False) as batch:
            keys = set(batch.files)
            if {"mu", "sigma"} <= keys:
                mu, sigma = batch["mu"].astype(np.float64), batch["sigma"].astype(np.float64)
                if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
                    raise ReferenceBatchError(f"{path}: 'mu' {mu.shape} and 'sigma' {sigma.shape} are not D and D x D")
                return {"mu": mu, "sigma": sigma}
            if "arr_0" in keys:
                images = batch["arr_0"]
                if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                    raise ReferenceBatchError(
                        f"{path}: 'arr_0' is {images.dtype} {images.shape}, not uint8 N x H x W x 3"
                    )
                return {"images": images}
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        if isinstance(exc, ReferenceBatchError):
            raise
        raise ReferenceBatchError(f"{path}: not a readable .npz ({exc})") from None
    raise ReferenceBatchError(f"{path}: holds {sorted(keys)}, neither 'mu' + 'sigma' nor 'arr_0'")


class NpzSampleWriter:
    """Write ``count`` uint8 H x W x 3 images (and their labels) as an ADM sample batch, batch by
    batch: the images go to a memory-mapped ``.npy`` beside ``path`` and are stored (uncompressed,
    like ``np.savez``) into the ``.npz`` by ``close``; ``path`` appears only when it is complete."""

    def __init__(self, path: str | Path, count: int, height: int, width: int):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.partial.mkdir(parents=True, exist_ok=True)
        self.images = open_memmap(
            self.partial / "arr_0.npy", mode="w+", dtype=np.uint8, shape=(count, height, width, 3)
        )
        self.labels = np.zeros(count, dtype=np.int64)
        self.filled = 0

    def add(self, images_NHWC: np.ndarray, labels_N: np.ndarray) -> None:
        end = self.filled + len(images_NHWC)
        self.images[self.filled : end] = images_NHWC
        self.labels[self.filled : end] = labels_N
        self.filled = end

    def close(self) -> Path:
        if self.filled != len(self.labels):
            raise ValueError(f"{self.path}: {self.filled} of {len(self.labels)} images written")
        self.images.flush()
        np.save(self.partial / "arr_1.npy", self.labels)
        tmp = self.partial / "batch.npz"
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name in ("arr_0.npy", "arr_1.npy"):
                archive.write(self.partial / name, arcname=name)
        del self.images
        tmp.replace(self.path)
        for leftover in self.partial.iterdir():
            leftover.unlink()
        self.partial.rmdir()
        return self.path
