"""MNIST-format (IDX) image files -> an image folder that ``shard.source: imagefolder`` reads.

The post-training benchmark's harder dataset: Fashion-MNIST as Debian ships it
(``apt install dataset-fashion-mnist`` puts the IDX files under
``/usr/share/datasets/fashion-mnist``), read from local files only. Writes
``OUT/<label>_<name>/<index>.png`` (28x28 grayscale; ``shard`` resizes and converts to RGB),
the first ``--per-class`` images of each class in file order, so the folder is the same on
every machine::

    .venv/bin/python benchmarks/idx_to_folder.py --out /data/fmnist12k
    .venv/bin/python benchmarks/posttrain.py --families gpt \\
        --set shard.source=imagefolder --set shard.source_path=/data/fmnist12k
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_NAMES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (optionally gzipped): uint8 images (N, H, W) for magic 2051, labels (N,) for 2049."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such IDX file")
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as file:
        raw = file.read()
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: IDX magic {found}, expected {magic}")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(raw[3])]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * len(dims))
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {data.size} bytes of data for dims {dims}")
    return data.reshape(dims)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--src",
        type=Path,
        default=Path("/usr/share/datasets/fashion-mnist"),
        help="folder with <split>-images-idx3-ubyte[.gz] and <split>-labels-idx1-ubyte[.gz]",
    )
    parser.add_argument("--split", default="train", help="file prefix: train or t10k (default train)")
    parser.add_argument("--out", type=Path, required=True, help="image folder to write (must not exist)")
    parser.add_argument(
        "--per-class", type=int, default=1200, help="images per class, first in file order (default 1200)"
    )
    parser.add_argument("--names", default=",".join(FASHION_NAMES), help="comma-separated class names, by label")
    args = parser.parse_args()

    def find(kind: str) -> Path:
        for name in (f"{args.split}-{kind}-ubyte.gz", f"{args.split}-{kind}-ubyte"):
            if (args.src / name).is_file():
                return args.src / name
        parser.error(f"{args.src}: no {args.split}-{kind}-ubyte[.gz]")

    try:
        images = read_idx(find("images-idx3"), 2051)
        labels = read_idx(find("labels-idx1"), 2049)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    if len(images) != len(labels):
        parser.error(f"{len(images)} images but {len(labels)} labels")
    names = args.names.split(",")
    if labels.max() >= len(names):
        parser.error(f"label {labels.max()} but only {len(names)} --names")
    if args.out.exists():
        parser.error(f"{args.out} exists; choose a new folder")
    written = dict.fromkeys(range(len(names)), 0)
    for index in range(len(images)):
        label = int(labels[index])
        if written[label] >= args.per_class:
            continue
        folder = args.out / f"{label}_{names[label]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index]).save(folder / f"{index:05d}.png")
        written[label] += 1
        if min(written.values()) >= args.per_class:
            break
    short = {names[k]: v for k, v in written.items() if v < args.per_class}
    print(
        f"{sum(written.values())} images in {len(names)} classes -> {args.out}" + (f"; short: {short}" if short else "")
    )


if __name__ == "__main__":
    main()
