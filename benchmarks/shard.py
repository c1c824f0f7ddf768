"""Throughput of the ``shard`` stage (raw images -> webdataset tars + manifest), in images/s.

Measures ``stages.shard.run(cfg, paths, tracker)`` end to end (source listing, decode, RGB,
center-crop/resize, PNG encode, tar + Parquet writing, worker-pool start-up) on two sources:

- ``digits``: the embedded scikit-learn digits (1,797 images, 8x8), written at ``image_size`` 16;
- ``folder``: an ``imagefolder`` of ``--folder-images`` generated 64x64 RGB PNGs (smooth random
  colour fields plus noise, 10 class subfolders, fixed seed), written at ``--image-size`` (32).
  The folder is generated once into a temporary directory; generation is not timed, and the
  files are then in the OS page cache (a warm-cache figure).

Each source runs with ``num_workers`` 1 (decode in the stage process) and 2 (a spawn pool), each
``--repeats`` times; the wall-clock of the whole ``run`` call is timed, pool start-up included,
because users pay it too. Tracking is off (``NullTracker``); the stage's progress bar and summary
line are hidden unless ``--verbose``. Prints the median and best time per case and whether the goal
(>= 1,000 images/s on the folder with 2 workers, median) is met. Needs no network or GPU.

Run from the repository root::

    .venv/bin/python benchmarks/shard.py            # or: make bench
    .venv/bin/python benchmarks/shard.py --repeats 5 --folder-images 2000 --keep
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

SCRIPT_START = time.perf_counter()
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/shard.py` puts benchmarks/ first, not the root
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._results import write_results  # noqa: E402

GOAL_IMAGES_PER_S = 1_000.0
GOAL_SOURCE, GOAL_WORKERS = "folder", 2
DIGITS_IMAGE_SIZE = 16
FOLDER_SIDE = 64
FOLDER_CLASSES = 10
SEED = 1234
WORKER_COUNTS = (1, 2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Time the shard stage (stages.shard.run) on the embedded digits and on a generated "
            "image folder, with 1 and 2 workers, and print images/s."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs per (source, workers) case; median and best are reported",
    )
    parser.add_argument(
        "--folder-images",
        type=int,
        default=10_000,
        help=f"generated {FOLDER_SIDE}x{FOLDER_SIDE} PNGs in the folder source (0 skips the folder cases)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=32,
        help=f"output side in pixels for the folder source (digits always use {DIGITS_IMAGE_SIZE})",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (generated folder, last shards)"
    )
    parser.add_argument("--verbose", action="store_true", help="show the stage's progress bar and summary line")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.folder_images < 0:
        parser.error("--folder-images must be >= 0")
    if args.image_size < 4:
        parser.error("--image-size must be >= 4")
    return args


def generate_folder(root: Path, count: int, seed: int = SEED) -> None:
    """``count`` distinct 64x64 RGB PNGs under ``root/class_<k>/``: a bilinearly upsampled random
    4x4 colour field (so PNG compression behaves like on photos, not on pure noise) plus noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k in range(FOLDER_CLASSES):
        (root / f"class_{k}").mkdir(parents=True)
    for i in range(count):
        coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse, "RGB").resize((FOLDER_SIDE, FOLDER_SIDE), Image.BILINEAR))
        noise = rng.integers(-24, 25, size=field.shape, dtype=np.int16)
        pixels = np.clip(field.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(root / f"class_{i % FOLDER_CLASSES}" / f"img_{i:06d}.png")


def time_case(cfg, work_dir: Path, repeats: int, verbose: bool) -> tuple[list[float], int]:
    """Wall-clock seconds of ``run`` per repeat, and the number of images the stage saw."""
    from core.config import Paths
    from core.tracking import NullTracker
    from stages.shard import run

    paths = Paths(shards=str(work_dir / "shards"), metrics=str(work_dir / "metrics"))
    seconds: list[float] = []
    seen = 0
    for _ in range(repeats):
        shutil.rmtree(work_dir / "shards", ignore_errors=True)  # untimed; run() would replace it anyway
        sink = io.StringIO()
        quiet = contextlib.ExitStack()
        if not verbose:
            quiet.enter_context(contextlib.redirect_stdout(sink))
            quiet.enter_context(contextlib.redirect_stderr(sink))
        with quiet:
            start = time.perf_counter()
            metrics = run(cfg, paths, NullTracker())
            seconds.append(time.perf_counter() - start)
        seen = metrics["seen"]
    return seconds, seen


def elapsed() -> float:
    return time.perf_counter() - SCRIPT_START


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from stages.shard import Config

    tmp = Path(tempfile.mkdtemp(prefix="arpipe-bench-shard-"))
    try:
        cases: list[tuple[str, Config]] = []
        for workers in WORKER_COUNTS:
            cases.append(("digits", Config(source="digits", image_size=DIGITS_IMAGE_SIZE, num_workers=workers)))
        if args.folder_images:
            folder = tmp / "folder"
            print(
                f"generating {args.folder_images:,} {FOLDER_SIDE}x{FOLDER_SIDE} PNGs in {folder} (not timed) ...",
                flush=True,
            )
            gen_start = time.perf_counter()
            generate_folder(folder, args.folder_images)
            print(f"  done in {time.perf_counter() - gen_start:.1f} s", flush=True)
            for workers in WORKER_COUNTS:
                cases.append(
                    (
                        "folder",
                        Config(
                            source="imagefolder",
                            source_path=str(folder),
                            image_size=args.image_size,
                            num_workers=workers,
                        ),
                    )
                )

        print(
            f"shard stage, {args.repeats} repeat(s) per case, wall-clock of run() incl. pool start-up; "
            f"{os.cpu_count()} CPU(s), Python {sys.version.split()[0]}",
            flush=True,
        )
        results = []
        for name, cfg in cases:
            seconds, seen = time_case(cfg, tmp / "work", args.repeats, args.verbose)
            median = statistics.median(seconds)
            results.append(
                (
                    f"{name} ({cfg.image_size}px)",
                    seen,
                    cfg.num_workers,
                    median,
                    seen / median,
                    seen / min(seconds),
                    name,
                )
            )

        header = ("source", "images", "workers", "median s", "images/s (median)", "images/s (best)")
        rows = [
            (src, f"{seen:,}", str(workers), f"{median:.2f}", f"{rate:,.0f}", f"{best:,.0f}")
            for src, seen, workers, median, rate, best, _ in results
        ]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

        def line(cells) -> str:  # source left-aligned, figures right-aligned
            return "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )

        print()
        print(line(header))
        print(line(["-" * w for w in widths]))
        for row in rows:
            print(line(row))
        print()

        goal = next((r for r in results if r[6] == GOAL_SOURCE and r[2] == GOAL_WORKERS), None)
        target = f"goal >= {GOAL_IMAGES_PER_S:,.0f} images/s on the folder with {GOAL_WORKERS} workers"
        if goal is None:
            print(f"{target}: not measured (--folder-images 0)")
        else:
            verdict = "MET" if goal[4] >= GOAL_IMAGES_PER_S else "NOT MET"
            print(f"{target}: {verdict} (median {goal[4]:,.0f} images/s, best {goal[5]:,.0f} images/s)")
        cases_out = [
            {"source": src, "images": seen, "workers": workers, "median_seconds": median,
             "images_per_s_median": rate, "images_per_s_best": best}
            for src, seen, workers, median, rate, best, _ in results
        ]  # fmt: skip
        write_results(
            "shard",
            {"repeats": args.repeats, "goal_images_per_s": GOAL_IMAGES_PER_S, "cases": cases_out},
            argv=None if argv is None else ["benchmarks/shard.py", *argv],
        )
        return 0  # a benchmark, not a test: a missed goal is reported, not an error
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"whole benchmark (generation, imports and clean-up included): {elapsed():.1f} s")


if __name__ == "__main__":  # required: the stage's spawn pool re-imports this module in its workers
    sys.exit(main())
