"""`arpipe data stats`: DuckDB answers over the manifest and rejects."""

import pytest
from helpers import png_bytes, random_rgb

from core.manifest import data_stats, format_stats


def test_stats_count_splits_classes_duplicates_and_rejects(shard_run, tmp_path):
    root = tmp_path / "src"
    for seed, (name, n) in enumerate((("cat", 5), ("dog", 3))):
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"{i}.png").write_bytes(png_bytes(random_rgb(100 * seed + i)))
    (root / "dog" / "dup.png").write_bytes((root / "cat" / "0.png").read_bytes())
    (root / "dog" / "bad.png").write_text("nope")
    (root / "dog" / "bad2.png").write_bytes(b"")
    _, out = shard_run(source="imagefolder", source_path=str(root), val_fraction=0.3)
    stats = data_stats(out)
    counts = dict(stats.class_counts)
    # one of the two identical files is kept (which one depends only on the file names)
    assert sum(counts["cat"].values()) + sum(counts["dog"].values()) == 8
    assert stats.duplicates == 1 and stats.duplicate_keys == 0 and stats.seen == 11
    assert dict(stats.rejects) == {"not an image": 1, "empty file (0 bytes)": 1}
    text = format_stats(stats)
    assert "seen 11 = accepted 8 + rejected 2 + duplicates 1" in text
    assert text.splitlines()[0].split() == ["class", *stats.splits, "total"]


def test_stats_on_missing_shards_say_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the shard stage first"):
        data_stats(tmp_path)
