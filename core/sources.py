"""Readers for the shard stage's sources: embedded digits, an image folder, Parquet, webdataset tars.

Each reader returns a ``Source``: class names and a lazy stream of ``Item`` (to decode) or
``Rejected`` (inputs refused before decoding, e.g. a file outside any class folder). A missing
path, an empty source or a Parquet without the configured columns raises ``SourceError`` at once,
naming the path or column.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from core.images import IMAGE_EXTENSIONS, Item, Rejected

TAR_IMAGE_EXTENSIONS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS) + ("ppm",)


class SourceError(ValueError):
    """The source cannot be read at all (missing path, empty, wrong columns)."""


@dataclass
class Source:
    class_names: list[str] | None  # None: "0".."max label seen" (tars without classes.json)
    entries: Iterator[Item | Rejected]
    total: int | None  # for the progress bar, when known up front


def open_source(kind: str, path: str, *, image_column: str = "image", label_column: str = "label") -> Source:
    if kind == "digits":
        return digits_source()
    root = Path(path)
    if not path:
        raise SourceError(f"shard.source_path is empty; the '{kind}' source needs a path")
    if not root.exists():
        raise SourceError(f"source path does not exist: {root}")
    if kind == "imagefolder":
        return imagefolder_source(root)
    if kind == "parquet":
        return parquet_source(root, image_column, label_column)
    if kind == "webdataset":
        return webdataset_source(root)
    raise SourceError(f"unknown source '{kind}' (expected digits, imagefolder, parquet, webdataset)")


def _png(array_HW: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array_HW, "L").save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def digits_source() -> Source:
    """scikit-learn's bundled 8x8 digits (1,797 images, ten classes); read from the installed package."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 17 grey levels (0..16) stretched to 0..255; the stage upsamples to image_size.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    order = _shuffled_order([f"digits/{i:04d}" for i in range(len(images))])
    entries = (Item(source=f"sklearn-digits:{i:04d}", label=int(digits.target[i]), data=_png(images[i])) for i in order)
    return Source([str(c) for c in range(10)], entries, len(images))


def _shuffled_order(names: list[str]) -> list[int]:
    """A fixed pseudo-random order (so shards mix classes) that depends only on the names."""
    return sorted(range(len(names)), key=lambda i: hashlib.sha1(names[i].encode()).digest())


def imagefolder_source(root: Path) -> Source:
    """``root/<class>/**/<image>``; class ids follow the sorted folder names. Dot-folders are ignored."""
    if not root.is_dir():
        raise SourceError(f"imagefolder source must be a directory: {root}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise SourceError(f"no class folders in {root} (expected {root}/<class>/<image files>)")
    stray = sorted(p for p in root.iterdir() if not p.is_dir())
    files: list[tuple[str, int, Path]] = []
    for label, class_dir in enumerate(class_dirs):
        for path in class_dir.rglob("*"):
            hidden = any(part.startswith(".") for part in path.relative_to(class_dir).parts[:-1])
            if not hidden and (path.is_file() or path.is_symlink()):
                files.append((path.relative_to(root).as_posix(), label, path))
    if not files and not stray:
        raise SourceError(f"no files under the class folders of {root}")
    order = _shuffled_order([name for name, _, _ in files])

    def entries() -> Iterator[Item | Rejected]:
        for path in stray:
            yield Rejected(str(path), "not inside a class folder")
        for i in order:
            name, label, path = files[i]
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                yield Rejected(str(path), f"unsupported file extension '{path.suffix}'")
            else:
                yield Item(source=str(path), label=label, path=str(path))

    return Source([p.name for p in class_dirs], entries(), len(files) + len(stray))


def parquet_source(root: Path, image_column: str, label_column: str) -> Source:
    """A Parquet file or directory with image bytes (binary, or the Hugging Face {bytes, path}
    struct) and an int or string label column."""
    import pyarrow.dataset as pads  # here: it loads pandas (0.25 s), and decode workers re-import this module

    files = [root] if root.is_file() else sorted(root.rglob("*.parquet"))
    if not files:
        raise SourceError(f"no .parquet files in {root}")
    dataset = pads.dataset([str(f) for f in files], format="parquet")
    for column in (image_column, label_column):
        if column not in dataset.schema.names:
            raise SourceError(
                f"{root}: column '{column}' not found (columns: {', '.join(dataset.schema.names)}); "
                "set shard.image_column / shard.label_column"
            )
    labels = dataset.to_table(columns=[label_column]).column(label_column)

    if pa.types.is_integer(labels.type):
        ids = sorted({int(v) for v in labels.drop_null().to_pylist()})
        names = _hf_class_names(dataset.schema, label_column) or [str(i) for i in range(max(ids) + 1)]
        to_label = {i: i for i in ids}
    elif pa.types.is_string(labels.type) or pa.types.is_large_string(labels.type):
        names = sorted(set(labels.drop_null().to_pylist()))
        to_label = {name: i for i, name in enumerate(names)}
    else:
        raise SourceError(f"{root}: label column '{label_column}' must be int or string, got {labels.type}")
    if not names:
        raise SourceError(f"{root}: no rows")

    def entries() -> Iterator[Item | Rejected]:
        for file in files:
            reader = pads.dataset(str(file), format="parquet")
            row = 0
            for batch in reader.to_batches(columns=[image_column, label_column], batch_size=256):
                images = batch.column(image_column).to_pylist()
                batch_labels = batch.column(label_column).to_pylist()
                for image, label in zip(images, batch_labels, strict=True):
                    source = f"{file}#row={row}"
                    row += 1
                    data = image.get("bytes") if isinstance(image, dict) else image
                    if data is None:
                        yield Rejected(source, f"null value in column '{image_column}'")
                    elif label is None or label not in to_label:
                        yield Rejected(source, f"missing or unknown label {label!r}")
                    else:
                        yield Item(source=source, label=to_label[label], data=bytes(data))

    return Source(names, entries(), dataset.count_rows())


def _hf_class_names(schema, label_column: str) -> list[str] | None:
    """ClassLabel names from the Hugging Face ``datasets`` schema metadata, when present."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        feature = json.loads(raw)["info"]["features"][label_column]
        return [str(n) for n in feature["names"]]
    except (KeyError, TypeError, ValueError):
        return None


def webdataset_source(root: Path) -> Source:
    """Existing webdataset tars (a file or a directory of ``*.tar``): each sample needs an image
    member and a ``.cls`` label. Unreadable tars and incomplete samples are recorded, not fatal."""
    import webdataset as wds

    tars = [root] if root.is_file() else sorted(root.rglob("*.tar"))
    if not tars:
        raise SourceError(f"no .tar files in {root}")
    classes_file = (root if root.is_dir() else root.parent) / "classes.json"
    names = json.loads(classes_file.read_text()) if classes_file.is_file() else None

    def entries() -> Iterator[Item | Rejected]:
        errors: list[Exception] = []

        def record(exn: Exception) -> bool:
            errors.append(exn)
            return True

        for tar in tars:
            dataset = wds.WebDataset(str(tar), shardshuffle=False, handler=record, empty_check=False)
            for sample in dataset:
                source = f"{tar}#{sample.get('__key__')}"
                image_key = next((k for k in TAR_IMAGE_EXTENSIONS if k in sample), None)
                if image_key is None:
                    yield Rejected(source, "sample has no image member")
                    continue
                try:
                    label = int(sample["cls"].decode().strip())
                except (KeyError, ValueError, UnicodeDecodeError):
                    yield Rejected(source, "sample has no valid .cls label")
                    continue
                yield Item(source=source, label=label, data=sample[image_key])
            while errors:
                yield Rejected(str(tar), f"unreadable tar data: {errors.pop(0)}")
            if problem := tar_problem(tar):
                yield Rejected(str(tar), f"unreadable tar data: {problem}")

    return Source(names, entries(), None)


def tar_problem(path: Path) -> str | None:
    """Why a tar is damaged, or None. Python's tarfile ends a stream silently when it is cut at a
    header boundary, so the end is checked here: a whole tar ends in zero blocks after its last member."""
    import tarfile

    try:
        with tarfile.open(path, "r:") as tar:
            tar.getmembers()
            end = tar.offset
    except (tarfile.TarError, OSError) as exc:
        return f"{exc}"
    with open(path, "rb") as f:
        f.seek(end)
        tail = f.read(1024)
    if len(tail) < 1024 or tail.strip(b"\0"):
        return f"truncated: the archive ends at byte {path.stat().st_size} inside a member (after byte {end})"
    return None
