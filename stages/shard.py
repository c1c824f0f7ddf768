"""shard: raw images -> webdataset tars + a Parquet manifest.

Reads ``shard.source`` (embedded ``digits``, an ``imagefolder``, ``parquet`` or existing
``webdataset`` tars), decodes, converts to RGB and center-crops/resizes every image to
``image_size`` in ``num_workers`` processes, and writes into ``paths.shards``:

- ``{split}-%06d.tar``   samples ``<key>.png`` + ``<key>.cls`` + ``<key>.json``
- ``manifest.parquet``   key, split, label, class_name, shard, sha256, width, height, source
- ``rejected.parquet``   source, reason, kind (``invalid`` | ``duplicate``), sha256
- ``classes.json``       class names by label id

Keys are the first 20 hex digits of the image's sha256 (never a file name), the split is a
function of the same hash (adding images never moves existing ones), and the outs are
byte-identical for any worker count. ``seen = accepted + rejected + duplicates`` is checked.
Run by DVC as ``python -m stages.shard`` (params.yaml ``shard`` and ``paths.shards``).
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.config import Paths
from core.images import Item, Prepared, Rejected, decode_png, prepare_image
from core.metrics import flatten_metrics
from core.progress import progress
from core.sources import open_source
from core.stage import stage_main

STAGE = "shard"
KEY_HEX_DIGITS = 20
PREVIEW_PER_CLASS = 8


@dataclass(frozen=True, kw_only=True)
class Config:
    source: Literal["digits", "imagefolder", "parquet", "webdataset"] = "digits"
    """Where images come from; ``digits`` is embedded (scikit-learn's bundled 8x8 digits)."""
    source_path: str = "sources"
    """Folder, Parquet file/folder or tar file/folder; unused for ``digits``."""
    image_column: str = "image"
    """Parquet column with encoded image bytes (or the Hugging Face {bytes, path} struct)."""
    label_column: str = "label"
    """Parquet column with an int class id or a class-name string."""
    image_size: int = 16
    """Side of the square RGB images written to the shards, in pixels."""
    val_fraction: float = 0.1
    """Share of images (by content hash) that go to the val split."""
    max_pixels: int = 40_000_000
    """Images with more pixels are rejected (decompression-bomb guard)."""
    shard_max_count: int = 10_000
    """Samples per tar before a new shard starts."""
    num_workers: int = 2
    """Decode/resize processes; 0 or 1 decodes in the stage process. Outs do not depend on it."""
    num_classes: int = 0
    """Classes the source is expected to hold (0 = whatever it holds). When set, shard fails if the
    data has another count, and ``arpipe plan`` sizes the models with it before any data exists."""

    def __post_init__(self):
        if self.image_size < 4:
            raise ValueError(f"image_size must be >= 4, got {self.image_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_pixels < 1 or self.shard_max_count < 1 or self.num_workers < 0 or self.num_classes < 0:
            raise ValueError("max_pixels and shard_max_count must be >= 1, num_workers and num_classes >= 0")


def _check_class_count(cfg: Config, found: int) -> None:
    if cfg.num_classes and found != cfg.num_classes:
        where = f" at {cfg.source_path}" if cfg.source != "digits" else ""
        raise ValueError(
            f"shard.num_classes is {cfg.num_classes} but source '{cfg.source}'{where} holds {found} classes: "
            "fix the source or the param (0 = whatever the source holds)"
        )


def split_of(sha256: str, val_fraction: float) -> str:
    """Deterministic split from the content hash: stable when other images are added."""
    return "val" if int(sha256[:16], 16) / 16**16 < val_fraction else "train"


def run(cfg: Config, paths: Paths, tracker) -> dict:
    started = time.perf_counter()
    out_dir = Path(paths.shards)
    partial_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial_dir, ignore_errors=True)
    partial_dir.mkdir(parents=True)

    source = open_source(cfg.source, cfg.source_path, image_column=cfg.image_column, label_column=cfg.label_column)
    if source.class_names is not None:  # known before decoding anything: check now, not hours later
        _check_class_count(cfg, len(source.class_names))
    rows: list[dict] = []
    rejected: list[dict] = []
    first_of: dict[str, str] = {}  # sha256 -> source of the kept copy
    writers: dict = {}  # split -> webdataset.ShardWriter, opened on the split's first sample
    preview: dict[int, list[bytes]] = {}  # label -> first PREVIEW_PER_CLASS train PNGs
    seen = 0
    prepare = partial(prepare_image, size=cfg.image_size, max_pixels=cfg.max_pixels)

    with _results(source.entries, prepare, cfg.num_workers) as results:
        bar = progress(results, total=source.total, desc="shard", unit="img", mininterval=1.0)
        for result in bar:
            seen += 1
            if isinstance(result, Rejected):
                rejected.append({**asdict(result), "kind": "invalid"})
                continue
            if result.sha256 in first_of:
                reason = f"duplicate of {first_of[result.sha256]}"
                rejected.append(
                    {"source": result.source, "reason": reason, "sha256": result.sha256, "kind": "duplicate"}
                )
                continue
            first_of[result.sha256] = result.source
            row = _write_sample(result, cfg, partial_dir, writers)
            rows.append(row)
            if row["split"] == "train" and len(pngs := preview.setdefault(row["label"], [])) < PREVIEW_PER_CLASS:
                pngs.append(result.png)
    for writer in writers.values():
        writer.close()

    class_names = source.class_names or [str(i) for i in range(max((r["label"] for r in rows), default=-1) + 1)]
    _check_class_count(cfg, len(class_names))
    for row in rows:
        if not 0 <= row["label"] < len(class_names):
            raise ValueError(f"{row['source']}: label {row['label']} has no class name in {class_names}")
        row["class_name"] = class_names[row["label"]]
    duplicates = sum(r["kind"] == "duplicate" for r in rejected)
    invalid = len(rejected) - duplicates
    if seen != len(rows) + invalid + duplicates:  # a bookkeeping bug, never bad input
        raise AssertionError(f"counts do not add up: seen {seen} != {len(rows)} + {invalid} + {duplicates}")
    if not rows:
        reasons = Counter(r["reason"] for r in rejected).most_common(3)
        raise ValueError(f"no usable images in source '{cfg.source}' {cfg.source_path} ({seen} seen; {reasons})")

    _write_tables(partial_dir, rows, rejected, class_names)
    shutil.rmtree(out_dir, ignore_errors=True)
    partial_dir.rename(out_dir)

    elapsed = time.perf_counter() - started
    metrics = _summary(rows, class_names, seen=seen, invalid=invalid, duplicates=duplicates)
    tracker.log_metrics({**flatten_metrics(metrics), "images_per_s": seen / elapsed, "seconds": elapsed})
    tracker.log_image(preview_grid(preview), "preview.png")
    print(
        f"shard: {seen} seen = {len(rows)} accepted + {invalid} rejected + {duplicates} duplicates "
        f"({seen / elapsed:.0f} images/s) -> {out_dir}"
    )
    return metrics


class _results:
    """Ordered results of ``prepare`` over the entries, in worker processes when asked.

    ``imap`` keeps input order, so the outs do not depend on the worker count. Entries that are
    already ``Rejected`` pass straight through.
    """

    def __init__(self, entries, prepare, num_workers: int):
        self.entries, self.prepare, self.num_workers = entries, prepare, num_workers
        self.pool = None

    def __enter__(self):
        work = partial(_prepare_or_pass, prepare=self.prepare)
        if self.num_workers <= 1:
            return map(work, self.entries)
        # spawn: no inherited threads or locks from the parent (MLflow, tqdm).
        self.pool = multiprocessing.get_context("spawn").Pool(self.num_workers)
        return self.pool.imap(work, self.entries, chunksize=128)

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _prepare_or_pass(entry: Item | Rejected, prepare) -> Prepared | Rejected:
    return entry if isinstance(entry, Rejected) else prepare(entry)


def _write_sample(result: Prepared, cfg: Config, out_dir: Path, writers: dict) -> dict:
    # Imported here, not at the top: spawned decode workers re-import this module, and webdataset
    # pulls in torch (~0.6 s per worker start).
    import webdataset as wds

    split = split_of(result.sha256, cfg.val_fraction)
    key = result.sha256[:KEY_HEX_DIGITS]
    if split not in writers:
        pattern = str(out_dir / f"{split}-%06d.tar")
        # mtime fixed so the tar bytes depend only on the content; an int, because a float mtime
        # makes tarfile add a pax header to every member (+37% size).
        writers[split] = wds.ShardWriter(pattern, maxcount=cfg.shard_max_count, verbose=0, mtime=0)
    meta = {"source": result.source, "width": result.width, "height": result.height, "sha256": result.sha256}
    writer = writers[split]
    writer.write(
        {
            "__key__": key,
            "png": result.png,
            "cls": str(result.label).encode(),
            "json": json.dumps(meta, sort_keys=True).encode(),
        }
    )
    return {
        "key": key,
        "split": split,
        "label": result.label,
        "class_name": "",
        "shard": Path(writer.fname).name,
        "sha256": result.sha256,
        "width": result.width,
        "height": result.height,
        "source": result.source,
    }


MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("split", pa.string()),
        ("label", pa.int32()),
        ("class_name", pa.string()),
        ("shard", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("source", pa.string()),
    ]
)
REJECTED_SCHEMA = pa.schema(
    [("source", pa.string()), ("reason", pa.string()), ("kind", pa.string()), ("sha256", pa.string())]
)


def _write_tables(out_dir: Path, rows: list[dict], rejected: list[dict], class_names: list[str]) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), out_dir / "manifest.parquet")
    pq.write_table(pa.Table.from_pylist(rejected, schema=REJECTED_SCHEMA), out_dir / "rejected.parquet")
    (out_dir / "classes.json").write_text(json.dumps(class_names, indent=1) + "\n")


def _summary(rows: list[dict], class_names: list[str], *, seen: int, invalid: int, duplicates: int) -> dict:
    counts = Counter((r["split"], r["class_name"]) for r in rows)
    per_split = {
        split: {"count": sum(v for (s, _), v in counts.items() if s == split)}
        | {f"class_{name}": counts[(split, name)] for name in class_names}
        for split in ("train", "val")
    }
    return {"seen": seen, "accepted": len(rows), "rejected": invalid, "duplicates": duplicates, **per_split}


def preview_grid(preview: dict[int, list[bytes]]) -> np.ndarray:
    """One row of train images per class (first 20 classes), upscaled to >= 32 px."""
    labels = sorted(preview)[:20]
    images = {label: [decode_png(png) for png in preview[label]] for label in labels}
    size = images[labels[0]][0].shape[0]
    grid = np.full((len(labels) * size, PREVIEW_PER_CLASS * size, 3), 255, np.uint8)
    for row, label in enumerate(labels):
        for col, image in enumerate(images[label]):
            grid[row * size : (row + 1) * size, col * size : (col + 1) * size] = image
    scale = max(1, 32 // size)
    return grid.repeat(scale, 0).repeat(scale, 1)


def main() -> None:
    stage_main(STAGE, Config, run)


if __name__ == "__main__":
    main()
