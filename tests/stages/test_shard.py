"""The shard stage: round trip, every kind of bad input, the four sources, determinism."""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from helpers import png_bytes, random_rgb
from PIL import Image

from core.config import ConfigError, from_dict
from core.images import Item, Prepared, decode_png, prepare_image
from core.sources import SourceError
from stages.shard import Config, split_of


def read_tables(out: Path):
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    rejected = pq.read_table(out / "rejected.parquet").to_pylist()
    return manifest, rejected


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def test_digits_round_trip_every_row_readable_with_matching_pixels(shard_run):
    metrics, out = shard_run(source="digits", image_size=16, shard_max_count=500)
    manifest, rejected = read_tables(out)
    assert metrics["seen"] == 1797 == len(manifest) + len(rejected)
    assert json.loads((out / "classes.json").read_text()) == [str(i) for i in range(10)]
    assert metrics["train"]["count"] + metrics["val"]["count"] == len(manifest)
    assert 0.05 < metrics["val"]["count"] / len(manifest) < 0.15  # val_fraction 0.1
    assert len(list(out.glob("train-*.tar"))) == 4  # 1,6xx train images in shards of 500

    from sklearn.datasets import load_digits

    digits = load_digits()
    members = {}
    for shard in sorted({r["shard"] for r in manifest}):
        members |= tar_members(out / shard)
    for row in manifest:
        png = members[f"{row['key']}.png"]
        assert int(members[f"{row['key']}.cls"]) == row["label"]
        meta = json.loads(members[f"{row['key']}.json"])
        assert meta["sha256"] == row["sha256"] and (meta["width"], meta["height"]) == (8, 8)
        pixels = decode_png(png)
        assert pixels.shape == (16, 16, 3)
        index = int(row["source"].split(":")[1])
        assert digits.target[index] == row["label"] == int(row["class_name"])
        # the 8x8 original, stretched to 0..255, is what the 16x16 image shows: compare on the 8x8 grid
        original = digits.images[index] * 255 / 16
        down = pixels[..., 0].reshape(8, 2, 8, 2).mean(axis=(1, 3))
        assert np.abs(down - original).mean() < 20


def test_shards_are_readable_by_webdataset(shard_run):
    _, out = shard_run(source="digits")
    dataset = wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False).decode("rgb8")
    manifest, _ = read_tables(out)
    labels = {r["key"]: r["label"] for r in manifest}
    count = 0
    for sample in dataset:
        assert sample["png"].shape == (16, 16, 3)
        assert sample["cls"] == labels[sample["__key__"]]
        count += 1
    assert count == len(manifest)


def test_outs_are_byte_identical_across_runs_and_worker_counts(shard_run):
    _, first = shard_run("a", source="digits", num_workers=0)
    _, second = shard_run("b", source="digits", num_workers=0)
    _, parallel = shard_run("c", source="digits", num_workers=2)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in parallel.iterdir())
    for name in names:
        content = (first / name).read_bytes()
        assert content == (second / name).read_bytes(), name
        assert content == (parallel / name).read_bytes(), name


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    """An image folder with one of every kind of bad or unusual input."""
    root = tmp_path / "images"
    cats, dogs = root / "cat", root / "dog"
    cats.mkdir(parents=True)
    dogs.mkdir()
    good = png_bytes(random_rgb(0))
    for i in range(6):
        (cats / f"cat{i}.png").write_bytes(png_bytes(random_rgb(10 + i)))
        (dogs / f"dog{i}.jpg").write_bytes(_jpeg(random_rgb(20 + i)))
    (cats / "good.png").write_bytes(good)
    (dogs / "copy-of-good.png").write_bytes(good)  # duplicate of cat/good.png
    (cats / "truncated.png").write_bytes(png_bytes(random_rgb(1, 64))[:300])
    (cats / "truncated.jpg").write_bytes(_jpeg(random_rgb(2, 64))[:400])
    (cats / "empty.png").write_bytes(b"")
    (cats / "text.png").write_text("this is not an image")
    os.symlink(cats / "missing-target.png", cats / "unreadable.png")  # dangling link: cannot be read
    (cats / "bomb.png").write_bytes(_bomb_png())
    # unusual modes, converted to RGB
    (dogs / "cmyk.jpg").write_bytes(_save(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG"))
    (dogs / "sixteen.png").write_bytes(png_bytes(np.full((20, 20), 65535, np.uint16)))
    (dogs / "palette.png").write_bytes(_save(Image.new("RGB", (20, 20), (200, 10, 10)).convert("P"), "PNG"))
    rgba = np.zeros((20, 20, 4), np.uint8)  # fully transparent: composited on white
    (dogs / "rgba.png").write_bytes(png_bytes(rgba, "RGBA"))
    (dogs / "gray.png").write_bytes(png_bytes(np.full((20, 20), 90, np.uint8), "L"))
    (dogs / "anim.gif").write_bytes(_save(Image.new("P", (20, 20), 3), "GIF"))
    # names that would make bad keys if they were used raw
    (dogs / "a.b.c.png").write_bytes(png_bytes(random_rgb(30)))
    (dogs / "..png").write_bytes(png_bytes(random_rgb(31)))
    (dogs / "ñ space (1).PNG").write_bytes(png_bytes(random_rgb(32)))
    (dogs / "notes.txt").write_text("hello")
    (root / "stray.png").write_bytes(png_bytes(random_rgb(40)))  # not inside a class folder
    (root / ".hidden").mkdir()  # dot-folders are not classes
    (root / ".hidden" / "x.png").write_bytes(png_bytes(random_rgb(41)))
    return root


def _save(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    return _save(Image.fromarray(array), "JPEG")


def _bomb_png() -> bytes:
    """A 12 kB PNG that claims 10,000 x 10,000 pixels."""
    return _save(Image.new("1", (10_000, 10_000)), "PNG")


REJECT_REASONS = {
    "truncated.png": "truncated or corrupt image",
    "truncated.jpg": "truncated or corrupt image",
    "empty.png": "empty file (0 bytes)",
    "text.png": "not an image",
    "unreadable.png": "unreadable file",
    "bomb.png": "too many pixels",
    "notes.txt": "unsupported file extension '.txt'",
    "stray.png": "not inside a class folder",
}


def test_every_bad_input_is_recorded_with_its_reason(shard_run, messy_folder):
    metrics, out = shard_run(source="imagefolder", source_path=str(messy_folder), image_size=16)
    manifest, rejected = read_tables(out)
    by_name = {Path(r["source"]).name: r for r in rejected}
    for name, reason in REJECT_REASONS.items():
        assert name in by_name, f"{name} not recorded in rejected.parquet"
        assert reason in by_name[name]["reason"], (name, by_name[name]["reason"])
        assert by_name[name]["kind"] == "invalid"
    duplicate = by_name["copy-of-good.png"]
    assert duplicate["kind"] == "duplicate" and "good.png" in duplicate["reason"]
    assert metrics["seen"] == metrics["accepted"] + metrics["rejected"] + metrics["duplicates"]
    assert (metrics["rejected"], metrics["duplicates"]) == (len(REJECT_REASONS), 1)
    accepted = {Path(r["source"]).name for r in manifest}
    assert {"cmyk.jpg", "sixteen.png", "palette.png", "rgba.png", "gray.png", "anim.gif"} <= accepted
    assert {"a.b.c.png", "..png", "ñ space (1).PNG", "good.png"} <= accepted
    assert "x.png" not in accepted  # inside a dot-folder
    assert json.loads((out / "classes.json").read_text()) == ["cat", "dog"]
    for row in manifest:  # keys are generated hex, never taken from file names
        assert len(row["key"]) == 20 and all(c in "0123456789abcdef" for c in row["key"])
        assert row["class_name"] == Path(row["source"]).parent.name


def test_unusual_modes_are_converted_sensibly(messy_folder):
    def pixels(name: str) -> np.ndarray:
        result = prepare_image(Item(name, 0, path=str(messy_folder / "dog" / name)), 8, 10**7)
        assert isinstance(result, Prepared), result
        return decode_png(result.png).astype(int)

    assert (pixels("sixteen.png") == 255).all()  # 16-bit full scale -> white, not clipped garbage
    assert (pixels("rgba.png") == 255).all()  # transparent -> white background
    red = pixels("palette.png")[4, 4]
    assert red[0] > 150 and red[1] < 60
    assert (pixels("gray.png") == 90).all()
    cmyk = pixels("cmyk.jpg")[4, 4]  # C=0, M=255, Y=255 -> red
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60


def test_split_is_stable_when_images_are_added(shard_run, tmp_path):
    root = tmp_path / "grow"
    (root / "a").mkdir(parents=True)
    for i in range(40):
        (root / "a" / f"{i}.png").write_bytes(png_bytes(random_rgb(i)))
    _, before = shard_run("before", source="imagefolder", source_path=str(root), val_fraction=0.3)
    for i in range(40, 80):
        (root / "a" / f"{i}.png").write_bytes(png_bytes(random_rgb(i)))
    _, after = shard_run("after", source="imagefolder", source_path=str(root), val_fraction=0.3)
    split_before = {r["sha256"]: r["split"] for r in read_tables(before)[0]}
    split_after = {r["sha256"]: r["split"] for r in read_tables(after)[0]}
    assert len(split_after) == 80
    assert all(split_after[sha] == split for sha, split in split_before.items())
    assert split_of("0" * 64, 0.1) == "val" and split_of("f" * 64, 0.1) == "train"


def test_parquet_source_hugging_face_layout(shard_run, tmp_path):
    images = [{"bytes": png_bytes(random_rgb(i)), "path": f"{i}.png"} for i in range(12)]
    images[3] = {"bytes": b"garbage", "path": "bad.png"}
    images[5] = None
    table = pa.table({"img": images, "y": [i % 3 for i in range(12)]})
    hf = {"info": {"features": {"y": {"names": ["ant", "bee", "cow"], "_type": "ClassLabel"}}}}
    table = table.replace_schema_metadata({"huggingface": json.dumps(hf)})
    pq.write_table(table, tmp_path / "train.parquet")
    metrics, out = shard_run(
        source="parquet", source_path=str(tmp_path / "train.parquet"), image_column="img", label_column="y"
    )
    manifest, rejected = read_tables(out)
    assert json.loads((out / "classes.json").read_text()) == ["ant", "bee", "cow"]
    assert (metrics["seen"], metrics["accepted"], metrics["rejected"]) == (12, 10, 2)
    reasons = {r["source"].rsplit("#", 1)[1]: r["reason"] for r in rejected}
    assert "not an image" in reasons["row=3"] and "null value in column 'img'" in reasons["row=5"]
    assert {r["class_name"] for r in manifest} == {"ant", "bee", "cow"}


def test_parquet_source_binary_column_with_string_labels(shard_run, tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    for part in range(2):
        rows = {
            "image": [png_bytes(random_rgb(part * 10 + i)) for i in range(5)],
            "label": ["zebra" if i % 2 else "apple" for i in range(5)],
        }
        pq.write_table(pa.table(rows), folder / f"part-{part}.parquet")
    metrics, out = shard_run(source="parquet", source_path=str(folder))
    assert metrics["accepted"] == 10
    assert json.loads((out / "classes.json").read_text()) == ["apple", "zebra"]


def test_webdataset_source_reshards_and_records_broken_tars(shard_run, tmp_path):
    _, first = shard_run("first", source="digits")
    broken_dir = tmp_path / "tars"
    broken_dir.mkdir()
    for tar in first.glob("*.tar"):
        (broken_dir / tar.name).write_bytes(tar.read_bytes())
    (broken_dir / "classes.json").write_bytes((first / "classes.json").read_bytes())
    with wds.TarWriter(str(broken_dir / "extra.tar")) as writer:
        writer.write({"__key__": "../../evil", "png": png_bytes(random_rgb(99)), "cls": b"3"})
        writer.write({"__key__": "nolabel", "png": png_bytes(random_rgb(98))})
    good = (broken_dir / "val-000000.tar").read_bytes()
    (broken_dir / "zz-truncated.tar").write_bytes(good[: len(good) // 2 + 100])
    metrics, out = shard_run("second", source="webdataset", source_path=str(broken_dir))
    manifest, rejected = read_tables(out)
    reasons = " | ".join(r["reason"] for r in rejected)
    assert "sample has no valid .cls label" in reasons
    assert "unreadable tar data" in reasons
    assert metrics["seen"] == metrics["accepted"] + metrics["rejected"] + metrics["duplicates"]
    # the truncated tar's readable samples are copies of images already kept
    assert metrics["duplicates"] >= 1
    assert metrics["accepted"] == 1797 + 1  # every digit once, plus the "../../evil" sample
    assert json.loads((out / "classes.json").read_text()) == [str(i) for i in range(10)]
    assert not any(".." in r["key"] or "/" in r["key"] for r in manifest)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (
            {"source": "imagefolder", "source_path": "/nonexistent/folder"},
            SourceError,
            "source path does not exist: /nonexistent/folder",
        ),
        ({"source": "imagefolder", "source_path": ""}, SourceError, "shard.source_path is empty"),
        ({"source": "parquet", "source_path": "EMPTY"}, SourceError, "no .parquet files in"),
        ({"source": "imagefolder", "source_path": "EMPTY"}, SourceError, "no class folders in"),
        (
            {"source": "parquet", "source_path": "TABLE", "image_column": "pixels"},
            SourceError,
            "column 'pixels' not found",
        ),
    ],
)
def test_unusable_sources_fail_fast_naming_the_problem(shard_run, tmp_path, overrides, error, message):
    (tmp_path / "empty").mkdir()
    pq.write_table(pa.table({"image": [b"x"], "label": [0]}), tmp_path / "t.parquet")
    path = overrides.get("source_path")
    overrides = {
        **overrides,
        "source_path": {"EMPTY": str(tmp_path / "empty"), "TABLE": str(tmp_path / "t.parquet")}.get(path, path),
    }
    with pytest.raises(error, match=message):
        shard_run(**overrides)
    assert not (tmp_path / "shards").exists()  # nothing half-written


def test_unknown_source_is_rejected_by_the_config():
    with pytest.raises(ConfigError, match="shard.source: expected one of 'digits'"):
        from_dict(Config, {"source": "s3"}, prefix="shard")


def test_a_source_with_no_usable_image_fails_with_reasons(shard_run, tmp_path):
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.png").write_text("nope")
    with pytest.raises(ValueError, match="no usable images.*not an image"):
        shard_run(source="imagefolder", source_path=str(tmp_path / "bad"))
