"""Natural-photo patches -> an image folder that ``shard.source: imagefolder`` reads.

The photo test folder of issue 21, cut from the three photographs that ship inside installed
packages, read from local files only (nothing is downloaded):

- ``china.jpg``, ``flower.jpg`` (640x427) from scikit-learn (``sklearn/datasets/images``, CC BY 2.0)
- ``grace_hopper.jpg`` (512x600) from matplotlib (``mpl-data/sample_data``; matplotlib is an mlflow
  dependency)

Eight classes, each a set of rectangles of one photo (``CLASSES`` below); a patch is a square of
``--min-side``..``--max-side`` source pixels (capped by the rectangle) at a random position
fully inside one rectangle (picked with probability proportional to its area), resized to
``--size`` px. ``--set a`` and ``--set b`` cut the same eight categories from disjoint rectangles
(no source pixel is in both), so a recipe tuned on one folder can be checked on the other.

Writes ``OUT/<class>/<index>.png``; the same arguments give the same files byte for byte on the
same Pillow, numpy and package versions (the script prints them: one seeded generator per class,
so ``--per-class 100`` is the first 100 of ``--per-class 600``), and no two files of a folder are
identical (a repeated patch is redrawn)::

    .venv/bin/python benchmarks/photo_folder.py --out /data/photos-a            # 8 x 600, 32 px
    .venv/bin/python benchmarks/photo_folder.py --out /data/photos-b --set b
    arpipe run  # with shard.source: imagefolder, shard.source_path: /data/photos-a
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Photo:
    package: str
    """Distribution name, for the version printed beside the file."""
    module: str
    """Importable module whose folder holds the file (found without importing it)."""
    relative_path: str

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"package {self.package} is not installed (needed for {self.relative_path})")
        return Path(spec.origin).parent / self.relative_path

    def version(self) -> str:
        return importlib.metadata.version(self.package)


PHOTOS = {
    "china": Photo("scikit-learn", "sklearn", "datasets/images/china.jpg"),
    "flower": Photo("scikit-learn", "sklearn", "datasets/images/flower.jpg"),
    "grace_hopper": Photo("matplotlib", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}

# class -> (photo, {set: rectangles (left, top, right, bottom) in source pixels, right/bottom exclusive}).
# Chosen by eye on a 20 px grid; a few pixels of a neighbouring region can show at an edge.
CLASSES: dict[str, tuple[str, dict[str, tuple[tuple[int, int, int, int], ...]]]] = {
    # china.jpg: a pagoda against the sky above a lake, trees left, right and below
    "sky": ("china", {"a": ((340, 0, 640, 130),), "b": ((0, 0, 90, 130), (90, 0, 185, 55), (225, 0, 340, 55))}),
    "pagoda": ("china", {"a": ((100, 170, 320, 245),), "b": ((80, 250, 340, 335),)}),
    "foliage": ("china", {"a": ((555, 190, 640, 427), (360, 315, 555, 427)), "b": ((0, 360, 200, 427),)}),
    # flower.jpg: one orange dahlia in the middle of a blurred teal background
    "petals": ("flower", {"a": ((215, 125, 400, 220),), "b": ((215, 220, 400, 315),)}),
    "bokeh": ("flower", {"a": ((0, 0, 160, 427),), "b": ((455, 0, 640, 385),)}),
    # grace_hopper.jpg: a portrait in navy uniform before a flag and a blue backdrop
    "flag": ("grace_hopper", {"a": ((0, 0, 130, 140),), "b": ((0, 145, 135, 300),)}),
    "face": ("grace_hopper", {"a": ((180, 165, 265, 315),), "b": ((265, 165, 340, 315),)}),
    "uniform": ("grace_hopper", {"a": ((30, 390, 200, 478), (40, 522, 200, 600)),
                                 "b": ((335, 430, 500, 488), (335, 535, 505, 600))}),
}  # fmt: skip
SETS = ("a", "b")
MAX_REDRAWS = 1000  # per patch, before a class is declared too small for --per-class


def _overlaps(r: tuple[int, int, int, int], s: tuple[int, int, int, int]) -> bool:
    return r[0] < s[2] and s[0] < r[2] and r[1] < s[3] and s[1] < r[3]


def check_classes(min_side: int) -> None:
    """Every rectangle fits a min_side patch and no two rectangles of one photo overlap (so the
    sets are disjoint and no source pixel belongs to two classes)."""
    by_photo: dict[str, list[tuple[str, tuple[int, int, int, int]]]] = {}
    for name, (photo, sets) in CLASSES.items():
        for set_name, rects in sets.items():
            for rect in rects:
                if min(rect[2] - rect[0], rect[3] - rect[1]) < min_side:
                    raise ValueError(f"{name} set {set_name}: rectangle {rect} is smaller than --min-side {min_side}")
                by_photo.setdefault(photo, []).append((f"{name}/{set_name}", rect))
    for photo, rects in by_photo.items():
        for i, (name, rect) in enumerate(rects):
            for other, rect2 in rects[i + 1 :]:
                if _overlaps(rect, rect2):
                    raise ValueError(f"{photo}: {name} {rect} overlaps {other} {rect2}")


def cut_patches(image: Image.Image, rects, count: int, size: int, min_side: int, max_side: int, seed) -> list[bytes]:
    """``count`` distinct PNGs of ``size`` px: random squares inside ``rects``, in draw order."""
    rng = np.random.default_rng(seed)
    areas = np.array([(r[2] - r[0]) * (r[3] - r[1]) for r in rects], dtype=np.float64)
    pngs: list[bytes] = []
    seen: set[bytes] = set()
    redraws = 0
    while len(pngs) < count:
        left, top, right, bottom = rects[rng.choice(len(rects), p=areas / areas.sum())]
        side = int(rng.integers(min_side, min(max_side, right - left, bottom - top) + 1))
        x = int(rng.integers(left, right - side + 1))
        y = int(rng.integers(top, bottom - side + 1))
        patch = image.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        patch.save(buffer, format="PNG", compress_level=6)  # no timestamps or text chunks: stable bytes
        digest = hashlib.sha256(buffer.getvalue()).digest()
        if digest in seen:
            redraws += 1
            if redraws > MAX_REDRAWS * count:
                raise ValueError(f"only {len(pngs)} distinct patches after {redraws} repeats; lower --per-class")
            continue
        seen.add(digest)
        pngs.append(buffer.getvalue())
    return pngs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="image folder to write (must not exist)")
    parser.add_argument("--set", choices=SETS, default="a", help="which disjoint rectangles to cut from (default a)")
    parser.add_argument("--per-class", type=int, default=600, help="patches per class (default 600)")
    parser.add_argument("--size", type=int, default=32, help="side of the written PNGs in pixels (default 32)")
    parser.add_argument("--min-side", type=int, default=32, help="smallest patch side in source pixels (default 32)")
    parser.add_argument("--max-side", type=int, default=80, help="largest patch side in source pixels (default 80)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patch positions and scales (default 0)")
    args = parser.parse_args()
    if args.per_class < 1 or args.size < 1 or not 1 <= args.min_side <= args.max_side:
        parser.error("--per-class and --size must be >= 1 and 1 <= --min-side <= --max-side")
    if args.out.exists():
        parser.error(f"{args.out} exists; choose a new folder")
    try:
        check_classes(args.min_side)
        images = {name: Image.open(photo.path()).convert("RGB") for name, photo in PHOTOS.items()}
    except (OSError, ValueError) as error:
        parser.error(str(error))

    counts = {}
    for index, (name, (photo, sets)) in enumerate(CLASSES.items()):
        seed = (args.seed, SETS.index(args.set), index)
        try:
            pngs = cut_patches(images[photo], sets[args.set], args.per_class, args.size, args.min_side,
                               args.max_side, seed)  # fmt: skip
        except ValueError as error:
            parser.error(f"{name}: {error}")
        folder = args.out / name
        folder.mkdir(parents=True)
        for i, png in enumerate(pngs):
            (folder / f"{i:05d}.png").write_bytes(png)
        counts[name] = len(pngs)

    print(f"{sum(counts.values())} images of {args.size} px in {len(counts)} classes (set {args.set}) -> {args.out}")
    for name, (photo, sets) in CLASSES.items():
        print(f"  {name:8s} {counts[name]:6d}  {photo}: {', '.join(map(str, sets[args.set]))}")
    for name, photo in PHOTOS.items():
        print(f"  source {name}: {photo.path()} ({photo.package} {photo.version()})")
    print(f"  pillow {importlib.metadata.version('pillow')}, numpy {np.__version__}")


if __name__ == "__main__":
    main()
